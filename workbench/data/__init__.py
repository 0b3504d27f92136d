"""Data for the workbench: synthetic scenes with full ground truth, LLaVA JSON, image folders,
robust image loading and Florence-2 location tokens.

Videos (`workbench.data.videos`) and stick figures live in their own modules and are not
re-exported here, so importing this package stays light.
"""
from __future__ import annotations

from workbench.data.dataset import (
    DatasetError,
    ImageDataset,
    Item,
    load_florence2_tasks,
    load_qa,
    load_scenes,
    open_dataset,
    read_labels_csv,
)
from workbench.data.images import (
    ImageError,
    load_image,
    packaged_image,
    packaged_image_names,
    packaged_images,
)
from workbench.data.llava import LlavaFormatError, Sample, read_llava, write_llava
from workbench.data.loc_tokens import (
    NUM_BINS,
    box_to_loc,
    dequantize,
    loc_to_box,
    parse_region_string,
    quantize,
    region_string,
)
from workbench.data.scenes import (
    ANSWER_SETS,
    CHANCE,
    COLORS,
    LABEL_NAMES,
    QA,
    QA_TYPES,
    SHAPES,
    WORDS,
    Scene,
    SceneObject,
    SceneWord,
    generate_scene,
    normalize_answer,
)
from workbench.data.synth import SynthError, SynthResult, synth_scenes

__all__ = [
    "ANSWER_SETS", "CHANCE", "COLORS", "LABEL_NAMES", "NUM_BINS", "QA", "QA_TYPES", "SHAPES", "WORDS",
    "DatasetError", "ImageDataset", "ImageError", "Item", "LlavaFormatError", "Sample", "Scene", "SceneObject",
    "SceneWord", "SynthError", "SynthResult",
    "box_to_loc", "dequantize", "generate_scene", "load_florence2_tasks", "load_image", "load_qa", "load_scenes",
    "loc_to_box", "normalize_answer", "open_dataset", "packaged_image", "packaged_image_names", "packaged_images",
    "parse_region_string", "quantize", "read_labels_csv", "read_llava", "region_string", "synth_scenes", "write_llava",
]
