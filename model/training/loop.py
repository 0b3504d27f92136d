"""The training loop shared by every stage (Florence-2 pretraining, Florence-VL stage 1 and stage 2).

What it gives:
  * AdamW, transformers' cosine schedule with linear warmup, gradient accumulation, gradient
    clipping, bf16 autocast where the device supports it, tqdm progress, one JSON line per optimiser
    step in OUT/metrics.jsonl.
  * Exact resume: every `save_every` steps OUT/checkpoint-{step}/ (see `model.training.checkpoints`);
    `resume=True` continues from the latest one and the loss sequence equals that of an uninterrupted
    run on CPU.
  * Data parallel: each optimiser step consumes one *global* batch chosen by a seeded permutation that
    every rank computes identically; rank r takes every world-th sample of it. The loss of a step is
    the sum of token losses over the global batch divided by the number of label tokens in the global
    batch, so the gradient does not depend on how the batch is split into ranks and micro-batches:
    one process and N processes give the same losses.
  * Two engines drive the same loop: "native" (this module; DDP under torchrun) and "accelerate"
    (`model.training.accelerated`: `Accelerator.prepare`, `save_state` / `load_state`, launched by
    `accelerate launch`).

Stage-specific code (what a sample is, how a batch is built, what the loss is) comes from a
`StageData` (samples + batch builder + label counter) and a task module whose forward returns the
summed token loss.
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from model.processing import IGNORE_INDEX
from model.training.accelerated import AccelerateEngine
from model.training.checkpoints import (LoopHooks, check_resumable, checkpoint_state, load_checkpoint,
                                        rewrite_metrics, save_checkpoint)
from model.training.config import ENGINES, TrainConfig
from model.training.distributed import DistInfo, barrier, default_device, init_distributed, use_bf16
from model.training.layout import CHECKPOINT_PREFIX, METRICS_FILE, STATE_FILE, latest_checkpoint


# ---------------------------------------------------------------------------------------------
# Losses and the order of the data
# ---------------------------------------------------------------------------------------------
def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor, shift: bool = True) -> torch.Tensor:
    """Sum of cross-entropy over label tokens (labels == -100 ignored), in float32.

    Summing here and dividing by the global batch's label count later is what makes the loss
    independent of micro-batching and of the number of ranks."""
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def count_label_tokens(labels: Sequence[int], shift: bool = True) -> int:
    seq = labels[1:] if shift else labels
    return sum(1 for x in seq if x != IGNORE_INDEX)


@dataclass
class StageData:
    """`n` samples; `make_batch(indices)` -> dict of tensors for the task module;
    `label_count(i)` -> label tokens of sample i (known before any forward pass)."""

    n: int
    make_batch: Callable[[list[int]], dict[str, torch.Tensor]]
    label_count: Callable[[int], int]
    describe: str = ""


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The sample order of one epoch: a permutation that depends only on (seed, epoch), so every
    rank and every resumed run computes the same one."""
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
    return torch.randperm(n, generator=g).tolist()


def steps_per_epoch(n: int, batch_size: int) -> int:
    return max(1, n // batch_size)  # the incomplete last batch is dropped (every step sees a full batch)


def total_steps(n: int, cfg: TrainConfig) -> int:
    if cfg.max_steps is not None:
        return int(cfg.max_steps)
    return max(1, int(math.ceil(cfg.epochs * steps_per_epoch(n, cfg.batch_size))))


def global_batch(n: int, cfg: TrainConfig, step: int) -> list[int]:
    spe = steps_per_epoch(n, cfg.batch_size)
    epoch, b = divmod(step, spe)
    order = epoch_order(n, cfg.seed, epoch)
    return order[b * cfg.batch_size:(b + 1) * cfg.batch_size]


# ---------------------------------------------------------------------------------------------
# Optimizer and schedule
# ---------------------------------------------------------------------------------------------
def _param_groups(params: list[tuple[str, nn.Parameter]], cfg: TrainConfig, is_vision: Callable[[str], bool]):
    groups: dict[str, list[nn.Parameter]] = {"main": [], "vision": []}
    for name, p in params:
        groups["vision" if (cfg.vision_lr is not None and is_vision(name)) else "main"].append(p)
    out = [{"params": groups["main"], "lr": cfg.lr}]
    if groups["vision"]:
        out.append({"params": groups["vision"], "lr": cfg.vision_lr})
    return [g for g in out if g["params"]]


def make_optimizer(groups: list[dict[str, Any]], cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW, with torch's fused kernel on CPU and CUDA: one pass over all parameters instead of a
    dozen small operations per tensor (the same update rule, up to float rounding). On the 2-core
    development machine the small Florence-2 stage's optimizer step (272 tensors, 4.1 M parameters)
    takes 5-8 ms fused against 17-29 ms unfused (three runs), saving about 5% of a training step
    (`fvl bench train-step --json`, key "optimizer", times both and their difference)."""
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay,
                             fused=device.type in ("cpu", "cuda"))


def make_scheduler(optimizer: torch.optim.Optimizer, warmup: int, total: int, min_ratio: float = 0.0):
    """transformers' cosine decay with linear warmup (to `min_ratio` x the peak when it is above 0).

    The warmup ramp is the library's: step s of the warmup runs at s / warmup of the peak, so the
    first step of a run with warmup runs at 0 (the hand-written schedule this replaced used
    (s + 1) / warmup); after the warmup the two are the same numbers (docs/training.md)."""
    from transformers import get_cosine_schedule_with_warmup, get_cosine_with_min_lr_schedule_with_warmup

    if min_ratio > 0:
        return get_cosine_with_min_lr_schedule_with_warmup(optimizer, warmup, total, min_lr_rate=min_ratio)
    return get_cosine_schedule_with_warmup(optimizer, warmup, total)


# ---------------------------------------------------------------------------------------------
# The native engine (one process, or DDP under torchrun)
# ---------------------------------------------------------------------------------------------
class NativeEngine:
    """What the loop asks of an engine: wrap the module, run backward, reduce, clip, save and load."""

    name = "native"

    def __init__(self, cfg: TrainConfig, dist_info: DistInfo | None = None, device: torch.device | None = None):
        self.dist_info = dist_info or init_distributed()
        self.device = device or default_device()
        self.bf16 = use_bf16(cfg.bf16, self.device)

    def prepare(self, task: nn.Module, optimizer, scheduler):
        if self.dist_info.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            return DDP(task, device_ids=ids, broadcast_buffers=False), optimizer, scheduler
        return task, optimizer, scheduler

    def no_sync(self, module: nn.Module, last: bool):
        return module.no_sync() if (self.dist_info.world_size > 1 and not last) else contextlib.nullcontext()

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def reduce_sum(self, value: torch.Tensor) -> torch.Tensor:
        if self.dist_info.world_size > 1:
            import torch.distributed as dist

            dist.all_reduce(value)
        return value

    def clip(self, module: nn.Module, params: list[nn.Parameter], max_norm: float) -> float:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))

    def save(self, out: Path, state: dict, optimizer, scheduler, hooks: LoopHooks, keep: int | None) -> None:
        save_checkpoint(out, state, optimizer, scheduler, hooks, self.dist_info, keep)

    def load(self, ckpt: Path, optimizer, scheduler, hooks: LoopHooks) -> None:
        load_checkpoint(ckpt, optimizer, scheduler, hooks, self.dist_info.rank)


def make_engine(cfg: TrainConfig, dist_info: DistInfo | None = None, device: torch.device | None = None):
    if cfg.engine not in ENGINES:
        raise ValueError(f"engine={cfg.engine!r}: choose one of {', '.join(ENGINES)}")
    if cfg.engine == "accelerate":
        return AccelerateEngine(cfg, device)
    return NativeEngine(cfg, dist_info, device)


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------
def _check_inputs(task: nn.Module, data: StageData, cfg: TrainConfig, world: int) -> list[tuple[str, nn.Parameter]]:
    if cfg.batch_size < world:
        raise ValueError(f"batch_size {cfg.batch_size} is smaller than the number of processes ({world}); "
                         "every rank needs at least one sample per step")
    if data.n < 1:
        raise ValueError("the training set is empty; check the data directory and split")
    named = [(n, p) for n, p in task.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("nothing to train: every parameter is frozen (check tune_vision / tune_projector / tune_llm)")
    return named


def _one_step(engine, module: nn.Module, data: StageData, cfg: TrainConfig, step: int, optimizer,
              params: list[nn.Parameter]) -> tuple[float, float | None, int]:
    """Forward + backward over this rank's share of one global batch, clipping; returns
    (mean token loss over the global batch, gradient norm, label tokens of the global batch)."""
    world, rank = engine.dist_info.world_size, engine.dist_info.rank
    batch_idx = global_batch(data.n, cfg, step)
    n_tok = sum(data.label_count(i) for i in batch_idx)
    local = batch_idx[rank::world]
    mbs = cfg.micro_batch_size or len(local)
    micro = [local[i:i + mbs] for i in range(0, len(local), mbs)]
    optimizer.zero_grad(set_to_none=True)
    loss_sum = torch.zeros((), dtype=torch.float64, device=engine.device)
    for j, mb in enumerate(micro):
        with engine.no_sync(module, last=j == len(micro) - 1):
            batch = {k: (v.to(engine.device) if isinstance(v, torch.Tensor) else v)
                     for k, v in data.make_batch(mb).items()}
            with engine.autocast():
                s = module(**batch)
            engine.backward(s * (world / max(1, n_tok)))
        loss_sum += s.detach().double()
    loss_sum = engine.reduce_sum(loss_sum)
    grad_norm = engine.clip(module, params, cfg.max_grad_norm) if cfg.max_grad_norm else None
    return float(loss_sum) / max(1, n_tok), grad_norm, n_tok


def run_loop(task: nn.Module, data: StageData, cfg: TrainConfig, hooks: LoopHooks, *,
             is_vision_param: Callable[[str], bool] = lambda n: False, dist_info: DistInfo | None = None,
             device: torch.device | None = None) -> list[dict[str, Any]]:
    """Train `task` (forward(**batch) -> summed token loss) over `data`; returns one row per step
    (this run's and, after a resume, the earlier ones, so the history is always complete).

    Longer than most functions here because it is the whole life of a run in order (set up, resume,
    step, log, checkpoint); each part of a step lives in `_one_step` and the engine."""
    engine = make_engine(cfg, dist_info, device)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    named = _check_inputs(task, data, cfg, engine.dist_info.world_size)
    task.to(engine.device)  # batches go to the device; so must the weights (in place: the same Parameters)
    out = Path(cfg.out_dir) if cfg.out_dir else None
    n_steps = total_steps(data.n, cfg)
    params = [p for _, p in named]
    optimizer = make_optimizer(_param_groups(named, cfg, is_vision_param), cfg, engine.device)
    scheduler = make_scheduler(optimizer, int(round(cfg.warmup_ratio * n_steps)), n_steps, cfg.min_lr_ratio)
    module, optimizer, scheduler = engine.prepare(task, optimizer, scheduler)

    history: list[dict[str, Any]] = []
    start = 0
    if cfg.resume and out is not None and (ckpt := latest_checkpoint(out)) is not None:
        state = check_resumable(ckpt, n_steps, data.n, engine.name)
        engine.load(ckpt, optimizer, scheduler, hooks)
        start, history = int(state["step"]), list(state.get("history", []))
    main = engine.dist_info.is_main
    if out is not None and main:
        out.mkdir(parents=True, exist_ok=True)
        rewrite_metrics(out / METRICS_FILE, keep_until=start)
    barrier(engine.dist_info)
    task.train()

    def save(step: int) -> None:
        state = checkpoint_state(step, n_steps, data.n, cfg, history, engine.dist_info.world_size)
        engine.save(out, state, optimizer, scheduler, hooks, cfg.save_total_limit)

    from tqdm.auto import tqdm

    bar = tqdm(total=n_steps, initial=start, desc=cfg.stage, unit="step", disable=not (cfg.progress and main),
               dynamic_ncols=True)
    t0, step = time.time(), start
    try:
        while step < n_steps and not (cfg.stop_after is not None and step - start >= cfg.stop_after):
            loss, grad_norm, n_tok = _one_step(engine, module, data, cfg, step, optimizer, params)
            lr_now = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            step += 1
            row = {"stage": cfg.stage, "step": step, "epoch": round(step / steps_per_epoch(data.n, cfg.batch_size), 4),
                   "loss": loss, "lr": lr_now, "grad_norm": grad_norm, "tokens": n_tok,
                   "elapsed_s": round(time.time() - t0, 3)}
            history.append(row)
            if main:
                if out is not None and (step % max(1, cfg.log_every) == 0 or step == n_steps):
                    with open(out / METRICS_FILE, "a") as f:
                        f.write(json.dumps(row) + "\n")
                bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{lr_now:.2e}")
                bar.update()
            if out is not None and cfg.save_every and step % cfg.save_every == 0 and step < n_steps:
                save(step)
    finally:
        bar.close()
    if out is not None and step > start and (step == n_steps or cfg.stop_after is not None):
        # The final step (or a planned stop) always leaves a checkpoint to resume from or to load.
        if not (out / f"{CHECKPOINT_PREFIX}{step}" / STATE_FILE).is_file():
            save(step)
    return history
