"""Process group, device and precision choices of the training loop.

Why a module of its own: the native loop, the accelerate engine and the stages all ask the same
questions (which rank am I, which device, bf16 or not), and must get the same answers.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> DistInfo:
    """Join the torchrun process group (gloo on CPU, nccl on CUDA) when WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and os.environ.get("FVL_DIST_BACKEND") != "gloo" else "gloo"
        dist.init_process_group(backend)
    rank = dist.get_rank()
    local = int(os.environ.get("LOCAL_RANK", rank))
    if torch.cuda.is_available() and dist.get_backend() == "nccl":
        torch.cuda.set_device(local)
    return DistInfo(rank, dist.get_world_size(), local)


def barrier(dist_info: DistInfo) -> None:
    if dist_info.world_size > 1:
        import torch.distributed as dist

        dist.barrier()


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def use_bf16(mode: str, device: torch.device) -> bool:
    """bf16 autocast "where supported": on by default on CUDA with bf16, off on CPU unless asked. Even
    on the development machine's Xeon, which has native bf16 (AMX), it does not pay at our sizes: a
    small-preset Florence-2 step at batch 8 takes 0.63-0.69 s under bf16 against 0.38-0.39 s in fp32
    (`fvl train florence2 --max-steps 30 --bf16 yes|no`, metrics.jsonl), a stage-2 step 1.05-1.12x
    less (`fvl bench train-step --json`, `bf16_speedup`); and exact resume is promised for fp32."""
    if mode not in ("auto", "yes", "no"):
        raise ValueError(f"bf16={mode!r}: choose auto, yes or no")
    if mode == "no":
        return False
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return mode == "yes"
