"""Settings of one training stage (`TrainConfig`), shared by the loop, the stages and the commands."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

ENGINES = ("native", "accelerate")


@dataclass
class TrainConfig:
    """Settings of one training stage. `batch_size` is the GLOBAL batch (samples per optimiser
    step over all ranks); `micro_batch_size` is what one forward pass holds (accumulation fills
    the rest), so memory and the optimisation are chosen independently."""

    out_dir: str | None = None
    stage: str = "finetune"  # "florence2", "pretrain" or "finetune" (names the metrics rows)
    template: str | None = None  # None: "plain" for pretrain, the model's template for finetune
    epochs: float = 1.0
    max_steps: int | None = None  # overrides epochs
    batch_size: int = 16
    micro_batch_size: int | None = None  # None: the whole per-rank share in one pass
    lr: float = 1e-3
    vision_lr: float | None = None  # learning rate of the vision side when it trains (None: lr)
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.0
    max_grad_norm: float | None = 1.0
    bf16: str = "auto"  # "auto" (CUDA with bf16 support), "yes", "no"
    gradient_checkpointing: bool = False
    tune_vision: bool = False
    tune_projector: bool = True
    tune_llm: bool = True
    cache_features: bool | None = None  # None: cache image features whenever the vision side is frozen
    # stage 2: seeded shuffle of each conversation's QA turns (see load_vlm_samples). Off by default: real
    # multi-turn data can refer back to earlier turns, and `fvl data synth` already writes shuffled turns.
    shuffle_turns: bool = False
    # stage 2: pack each conversation's turns as independent single-turn samples sharing the image prefix
    # (`FlorenceVLProcessor.encode_independent_turns`): every answer sees only its own question, as at
    # test time, for the cost of one sequence. Only for independent questions (synthetic QA).
    independent_turns: bool = False
    save_every: int = 0  # checkpoint every N steps (0: only the final one)
    save_total_limit: int | None = 2  # keep the newest N checkpoints
    resume: bool = False
    stop_after: int | None = None  # stop after N steps in this run (a planned interruption)
    seed: int = 42
    log_every: int = 1
    progress: bool = True
    max_length: int | None = None
    num_threads: int | None = None
    # "native": this package's loop (one process, or DDP under torchrun); "accelerate": the same loop
    # driven by `accelerate.Accelerator` (prepare, backward, save_state / load_state), launched by
    # `accelerate launch` for data parallel runs (see model.training.accelerated)
    engine: str = "native"
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        if "betas" in kw:
            kw["betas"] = tuple(kw["betas"])
        return cls(**kw)

