"""Which adapter serves which transformers family, and opening a family's directory with it."""
from __future__ import annotations

from pathlib import Path

from model.adapters.base import FeatureSource
from model.adapters.clip import ClipAdapter
from model.adapters.dinov2 import Dinov2Adapter
from model.adapters.florence2 import Florence2Adapter
from model.adapters.llava import LlavaAdapter
from model.adapters.siglip import SiglipAdapter
from model.adapters.vit import ViTAdapter
from model.adapters.vit_style import ViTStyleAdapter

ADAPTERS: dict[str, type[FeatureSource]] = {
    "clip": ClipAdapter, "siglip": SiglipAdapter, "dinov2": Dinov2Adapter, "vit": ViTAdapter,
    "llava": LlavaAdapter, "florence2": Florence2Adapter,
}


def open_family(family: str, path: str | Path, config: dict, dtype=None) -> tuple[FeatureSource, dict]:
    """(adapter, transformers' loading info) for a directory of `family` (a key of ADAPTERS but florence2,
    which `model.loading` converts first). Weights load through transformers (safetensors, or
    torch.load(weights_only=True)); no code from the directory runs."""
    import transformers

    cls = ADAPTERS[family]
    if issubclass(cls, ViTStyleAdapter):
        model_cls = cls.model_class(config)
    else:
        model_cls = transformers.LlavaForConditionalGeneration
    kwargs = {"dtype": dtype} if dtype is not None else {}
    model, info = model_cls.from_pretrained(str(path), output_loading_info=True, local_files_only=True,
                                            trust_remote_code=False, **kwargs)
    return cls(model), info
