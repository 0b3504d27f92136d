"""Training: the generic loop and its engines, the stage-specific data, Florence-2 pretraining, the
recipe, evaluation and the objectives of the small encoders.

    loop            run_loop (optimizer, schedule, accumulation, clipping, DDP), StageData
    accelerated     the same loop on `accelerate.Accelerator` (--engine accelerate)
    checkpoints     checkpoint + resume (weights, optimizer, scheduler, RNG), the final stage model
    config          TrainConfig
    distributed     ranks, device, bf16
    vlm             Florence-VL stage 1 / stage 2: LLaVA samples, the feature bank, train_stage
    florence2       Florence-2 multi-task pretraining (florence2_tags: its dense region-tag loss)
    evaluate        VQA exact match per type, Florence-2 task metrics (metrics: F1, IoU, recall)
    recipe          the whole scaled-down recipe
    encoder_objectives, cycle_contrast, selsa   objectives of the small encoders

This package sits above the model layer: it imports `model`, and nothing in the model layer imports it.
"""
from __future__ import annotations

from model.lazy import lazy_exports

# Public names, imported lazily (PEP 562) as in `model`: `import model.training` loads no torch.
_EXPORTS: dict[str, str] = {
    "TrainConfig": "model.training.config",
    "run_loop": "model.training.loop", "StageData": "model.training.loop",
    "LoopHooks": "model.training.checkpoints", "latest_checkpoint": "model.training.checkpoints",
    "stage_finished": "model.training.checkpoints",
    "train_stage": "model.training.vlm", "FeatureBank": "model.training.vlm", "qa_template": "model.training.vlm",
    "train_florence2": "model.training.florence2", "load_florence2": "model.training.florence2",
    "evaluate_vqa": "model.training.evaluate", "evaluate_florence2": "model.training.evaluate",
    "RecipeConfig": "model.training.recipe", "run_recipe": "model.training.recipe",
    "train_clip_style": "model.training.encoder_objectives", "train_supervised": "model.training.encoder_objectives",
    "train_cycle_contrast": "model.training.cycle_contrast", "selsa_experiment": "model.training.selsa",
}
__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
