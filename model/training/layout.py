"""The layout of a training run's output directory, readable without torch.

    OUT/metrics.jsonl           one JSON line per optimiser step
    OUT/checkpoint-{step}/      a loadable model directory + what resuming needs + trainer_state.json
    OUT/model/                  the stage's final model (with trainer_state.json) once the schedule is done

Apart from `checkpoints` so that `fvl train` can check an output directory before torch loads.
"""
from __future__ import annotations

from pathlib import Path

CHECKPOINT_PREFIX = "checkpoint-"
FINAL_DIR = "model"
STATE_FILE = "trainer_state.json"
METRICS_FILE = "metrics.jsonl"


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Finished checkpoints of a run, oldest first (temp dirs of an interrupted write are ignored)."""
    out = Path(out_dir)
    if not out.is_dir():
        return []
    found = []
    for p in out.iterdir():
        if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX) and (p / STATE_FILE).is_file():
            try:
                found.append((int(p.name[len(CHECKPOINT_PREFIX):]), p))
            except ValueError:
                continue
    return [p for _, p in sorted(found)]


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(out_dir)
    return ckpts[-1] if ckpts else None


def stage_finished(out_dir: str | Path) -> bool:
    """True when OUT holds the final model of a completed stage (the recipe skips such stages)."""
    final = Path(out_dir) / FINAL_DIR
    return (final / "config.json").is_file() and (final / STATE_FILE).is_file()
