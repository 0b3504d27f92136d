"""The "accelerate" engine of the training loop: the same loop, driven by `accelerate.Accelerator`.

    fvl train finetune ... --engine accelerate                          # one process
    accelerate launch --num_processes N -m workbench.cli train finetune ... --engine accelerate
    torchrun --nproc_per_node N -m workbench.cli train finetune ... --engine accelerate

Why a second engine: `Accelerator.prepare` wraps the module for whatever `accelerate launch` was
configured with (DDP here; the launcher's other back ends are its business), and
`save_state` / `load_state` hold the optimizer, scheduler and every process's RNG state. The data
order, the loss normalisation and the checkpoint directory layout stay the loop's own, so both
engines give the same loss sequence (tests/test_train.py).

A checkpoint of this engine is a loadable model directory (as with the native engine) plus
`accelerate/`, the `save_state` folder that a resume reads with `load_state`.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from model.training.checkpoints import LoopHooks, prune_checkpoints
from model.training.config import TrainConfig
from model.training.distributed import DistInfo, use_bf16
from model.training.layout import CHECKPOINT_PREFIX, STATE_FILE

STATE_DIR = "accelerate"


class AccelerateEngine:
    """The engine interface of `model.training.loop.NativeEngine`, on an `Accelerator`."""

    name = "accelerate"

    def __init__(self, cfg: TrainConfig, device: torch.device | None = None):
        from accelerate import Accelerator

        cuda = torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda")
        bf16 = use_bf16(cfg.bf16, torch.device("cuda" if cuda else "cpu"))
        # step_scheduler_with_optimizer=False: the loop steps the schedule once per optimiser step
        # whatever the number of processes (accelerate would otherwise step it once per process).
        self.accelerator = Accelerator(cpu=not cuda, mixed_precision="bf16" if bf16 else "no",
                                       step_scheduler_with_optimizer=False)
        acc = self.accelerator
        self.device = acc.device
        self.dist_info = DistInfo(acc.process_index, acc.num_processes, acc.local_process_index)

    def prepare(self, task: nn.Module, optimizer, scheduler):
        return self.accelerator.prepare(task, optimizer, scheduler)

    def no_sync(self, module: nn.Module, last: bool):
        return contextlib.nullcontext() if last else self.accelerator.no_sync(module)

    def autocast(self):
        return contextlib.nullcontext()  # prepare() already runs the module's forward under autocast

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    def reduce_sum(self, value: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(value, reduction="sum")

    def clip(self, module: nn.Module, params: list[nn.Parameter], max_norm: float) -> float:
        return float(self.accelerator.clip_grad_norm_(module.parameters(), max_norm))

    def save(self, out: Path, state: dict, optimizer, scheduler, hooks: LoopHooks, keep: int | None) -> None:
        """Every process writes into one temporary folder (save_state writes the shared files from the
        main process and one RNG file per process); the main process then adds the model directory
        and trainer_state.json and renames the folder into place, so a crash leaves no half checkpoint."""
        acc = self.accelerator
        final = out / f"{CHECKPOINT_PREFIX}{state['step']}"
        tmp = out / f".tmp-{final.name}"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp / STATE_DIR))
        acc.wait_for_everyone()
        if acc.is_main_process:
            hooks.save_model_dir(tmp)
            (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            prune_checkpoints(out, keep)
        acc.wait_for_everyone()

    def load(self, ckpt: Path, optimizer, scheduler, hooks: LoopHooks) -> None:
        folder = ckpt / STATE_DIR
        if not folder.is_dir():
            raise ValueError(f"cannot resume from {ckpt}: it has no {STATE_DIR}/ folder (it was not written by "
                             "--engine accelerate); resume with the engine that wrote it, or use a new --out")
        try:
            self.accelerator.load_state(str(folder))
        except Exception as exc:  # UnpicklingError (not plain tensors), RuntimeError (truncated), OSError, safetensors
            raise ValueError(f"cannot resume from {ckpt}: {STATE_DIR}/ is damaged ({type(exc).__name__}); delete "
                             f"{ckpt} to resume from an earlier checkpoint, or use a new --out") from None
