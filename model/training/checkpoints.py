"""Checkpoints of the training loop: what a resumable step leaves on disk, and the final stage model.

OUT/checkpoint-{step}/ holds the weights (safetensors, loadable by `load_model`), optimizer and
scheduler state, the RNG state of every rank and OUT's trainer_state.json (the step, the schedule,
the loss history), written atomically (temp dir, then rename) so a crash never leaves half of one.
OUT/model/ is the final model of a finished stage. Only plain tensors are ever read back
(`torch.load(weights_only=True)`, safetensors).
"""
from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from model.training.config import TrainConfig
from model.training.distributed import DistInfo, barrier, init_distributed
from model.training.layout import CHECKPOINT_PREFIX, FINAL_DIR, STATE_FILE, latest_checkpoint, list_checkpoints
from model.training.layout import stage_finished  # noqa: F401  (re-exported: callers find it beside FINAL_DIR)
from workbench.data.files import atomic_dir

def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    np_state = np.random.get_state()
    state["numpy_keys"] = torch.from_numpy(np_state[1].astype(np.int64))
    state["numpy_meta"] = torch.tensor([np_state[2], np_state[3]], dtype=torch.int64)
    state["numpy_gauss"] = torch.tensor([np_state[4]], dtype=torch.float64)
    py = random.getstate()
    state["python"] = torch.tensor(py[1], dtype=torch.int64)
    state["python_meta"] = torch.tensor([py[0]] + ([py[2]] if py[2] is not None else []), dtype=torch.float64)
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    meta = state["numpy_meta"].tolist()
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), int(meta[0]), int(meta[1]),
                         float(state["numpy_gauss"][0])))
    pm = state["python_meta"].tolist()
    random.setstate((int(pm[0]), tuple(int(x) for x in state["python"].tolist()), pm[1] if len(pm) > 1 else None))


def _damaged(path: Path, exc: BaseException) -> ValueError:
    return ValueError(f"cannot resume from {path}: the file is missing, truncated, or not a plain tensor file "
                      f"({type(exc).__name__}; only plain tensors are ever read: torch.load(weights_only=True)). "
                      f"Delete {path.parent} to resume from an earlier checkpoint, or start again with a new --out")


def load_tensors_file(path: Path):
    """`torch.load(weights_only=True)`, with a clear error naming the file instead of a bare UnpicklingError."""
    try:
        return torch.load(path, weights_only=True)
    except Exception as exc:  # pickle.UnpicklingError (code in the pickle), RuntimeError (truncated zip), OSError
        raise _damaged(path, exc) from None


def load_weights_into(module: nn.Module, path: Path) -> None:
    """Load a safetensors file written by save_pretrained into `module` in place; only tied weights
    (stored once) may be missing."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise _damaged(path, exc) from None
    try:
        result = module.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # size mismatches
        raise ValueError(f"checkpoint {path} does not fit the model ({str(exc).strip().splitlines()[-1].strip()}); "
                         "resume with the same model and stage, or use a new --out") from None
    tied = set()
    for name in getattr(module, "all_tied_weights_keys", {}) or {}:
        tied.add(name)
    tied |= set(getattr(module, "_tied_weights_keys", None) or {})
    missing = [k for k in result.missing_keys if k not in tied]
    if missing or result.unexpected_keys:
        raise ValueError(f"checkpoint {path} does not fit the model: missing {missing[:5]}, "
                           f"unexpected {result.unexpected_keys[:5]}; resume with the same model and stage")



def rewrite_metrics(path: Path, keep_until: int) -> None:
    """After a resume, drop metric rows past the checkpoint (they will be written again)."""
    if not path.is_file():
        return
    rows = []
    for line in path.read_text().splitlines():
        try:
            if line.strip() and json.loads(line).get("step", 0) <= keep_until:
                rows.append(line)
        except json.JSONDecodeError:  # a line torn by a crash mid-write: it is written again
            continue
    path.write_text("".join(r + "\n" for r in rows))


@dataclass
class LoopHooks:
    """How a stage saves its weights (a loadable model directory) and reloads them for resume."""

    save_model_dir: Callable[[Path], None]
    load_weights: Callable[[Path], None]


def checkpoint_state(step: int, n_steps: int, n_samples: int, cfg: TrainConfig, history: list,
                     world_size: int) -> dict[str, Any]:
    """The trainer_state.json of a checkpoint: where the run is and the losses so far."""
    return {"step": step, "total_steps": n_steps, "n_samples": n_samples, "world_size": world_size,
            "samples_seen": step * cfg.batch_size, "finished": step >= n_steps, "config": cfg.to_dict(),
            "engine": cfg.engine, "history": history}


def check_resumable(ckpt: Path, n_steps: int, n_samples: int, engine: str) -> dict[str, Any]:
    """The state of `ckpt`, refused when it was written for another schedule, data size or engine."""
    state = json.loads((ckpt / STATE_FILE).read_text())
    if state.get("total_steps") != n_steps or state.get("n_samples") != n_samples:
        raise ValueError(f"checkpoint {ckpt} was written for {state.get('total_steps')} steps over "
                         f"{state.get('n_samples')} samples, this run has {n_steps} over {n_samples}; resume "
                         "with the same data and schedule, or use a new --out")
    if state.get("engine", "native") != engine:
        raise ValueError(f"checkpoint {ckpt} was written by the {state.get('engine', 'native')!r} engine; resume "
                         f"with --engine {state.get('engine', 'native')}, or use a new --out")
    return state


def prune_checkpoints(out: Path, keep: int | None) -> None:
    if keep:
        for old in list_checkpoints(out)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(out: Path, state: dict[str, Any], optimizer, scheduler, hooks: LoopHooks, dist_info: DistInfo,
                    keep: int | None) -> None:
    """OUT/checkpoint-{step}/ of the native loop: model dir, optimizer, scheduler, one RNG file per rank."""
    final = out / f"{CHECKPOINT_PREFIX}{state['step']}"
    if dist_info.is_main:
        def write(tmp: Path) -> None:
            hooks.save_model_dir(tmp)
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            torch.save(rng_state(), tmp / "rng-rank0.pt")
            (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))

        atomic_dir(final, write)
    barrier(dist_info)
    if not dist_info.is_main:  # every rank keeps its own RNG state (dropout masks differ per rank)
        torch.save(rng_state(), final / f"rng-rank{dist_info.rank}.pt")
    barrier(dist_info)
    if dist_info.is_main:
        prune_checkpoints(out, keep)


def load_checkpoint(ckpt: Path, optimizer, scheduler, hooks: LoopHooks, rank: int) -> None:
    """Restore what `save_checkpoint` wrote (weights, optimizer, scheduler, this rank's RNG)."""
    hooks.load_weights(ckpt)
    optimizer.load_state_dict(load_tensors_file(ckpt / "optimizer.pt"))
    scheduler.load_state_dict(load_tensors_file(ckpt / "scheduler.pt"))
    rng_file = ckpt / f"rng-rank{rank}.pt"
    if rng_file.is_file():
        set_rng_state(load_tensors_file(rng_file))


def finish_stage(cfg: TrainConfig, history: list[dict[str, Any]], save: Callable[[Path], None]) -> Path | None:
    """Write OUT/model (the stage's final weights + trainer_state.json) when the schedule is complete."""
    if not cfg.out_dir:
        return None
    out = Path(cfg.out_dir)
    dist_info = init_distributed()
    ckpt = latest_checkpoint(out)
    if not history or ckpt is None:
        return None
    state = json.loads((ckpt / STATE_FILE).read_text())
    if not state.get("finished"):
        return None
    if dist_info.is_main:
        def write(tmp: Path) -> None:
            save(tmp)
            (tmp / STATE_FILE).write_text(json.dumps({**state, "history": history}, indent=1))

        atomic_dir(out / FINAL_DIR, write)
    barrier(dist_info)
    return out / FINAL_DIR
