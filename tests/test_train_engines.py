"""The training loop's library parts: transformers' cosine schedule (guarded against the formula it
replaced), the accelerate engine (same losses as the native loop, exact resume from its save_state),
and what `fvl train` says when a run stops before the end of its schedule."""
from __future__ import annotations

import json
import math

import pytest
import torch

import model.training.loop as loop
from model.loading import build_model
from model.training.layout import latest_checkpoint, stage_finished
from model.training.config import TrainConfig
from model.training.vlm import load_vlm_samples, train_stage
from workbench.cli import main as fvl


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from workbench.data.synth import synth_scenes

    out = tmp_path_factory.mktemp("scenes")
    synth_scenes(out, 16, seed=5, image_size=64, workers=1, progress=False, log=None)
    return out


@pytest.fixture(scope="module")
def samples(data_dir):
    _, proc = build_model("tiny", seed=0)
    return load_vlm_samples(proc, data_dir / "instruct.json", "phi3")


def cfg(out=None, **kw) -> TrainConfig:
    base = dict(out_dir=str(out) if out else None, stage="finetune", batch_size=4, lr=3e-3, max_steps=5,
                warmup_ratio=0.0, progress=False, seed=1)
    base.update(kw)
    return TrainConfig(**base)


def old_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """The hand-written schedule the loop used before transformers' (kept here as the reference)."""
    if step < warmup:
        return (step + 1) / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def lr_sequence(scheduler_factory, total: int) -> list[float]:
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = scheduler_factory(opt)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def old_scheduler(optimizer, warmup, total, min_ratio=0.0):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: old_factor(s, warmup, total, min_ratio))


# ---- the schedule ----------------------------------------------------------------------------
@pytest.mark.parametrize("min_ratio", [0.0, 0.1])
def test_library_schedule_gives_the_old_values(min_ratio):
    total = 23
    new = lr_sequence(lambda o: loop.make_scheduler(o, 0, total, min_ratio), total)
    assert new == pytest.approx([old_factor(s, 0, total, min_ratio) for s in range(total)], abs=1e-12)
    # with a warmup the decay is the same numbers; the library's ramp starts one step earlier (at 0)
    warm = 4
    new = lr_sequence(lambda o: loop.make_scheduler(o, warm, total, min_ratio), total)
    old = [old_factor(s, warm, total, min_ratio) for s in range(total)]
    assert new[warm:] == pytest.approx(old[warm:], abs=1e-12)
    assert new[0] == 0.0 and new[1:warm] == pytest.approx(old[:warm - 1], abs=1e-12)


def test_loss_sequence_of_a_short_run_is_unchanged_by_the_swap(samples, monkeypatch):
    def run():
        m, proc = build_model("tiny", seed=0)
        return [h["loss"] for h in train_stage(m, proc, samples, cfg(max_steps=6, min_lr_ratio=0.1))]

    library = run()
    monkeypatch.setattr(loop, "make_scheduler", old_scheduler)
    hand_written = run()
    assert library == hand_written  # exact: the same learning rate at every step
    assert library[-1] < library[0]


# ---- the accelerate engine ---------------------------------------------------------------------
def test_accelerate_engine_matches_the_native_loop_and_resumes_exactly(samples, tmp_path):
    def run(out, **kw):
        m, proc = build_model("tiny", seed=0)
        return train_stage(m, proc, samples, cfg(out, save_every=2, **kw))

    native = [h["loss"] for h in run(None)]
    full = [h["loss"] for h in run(tmp_path / "full", engine="accelerate")]
    assert full == native  # exact: on one process the engine changes nothing in the arithmetic
    part = run(tmp_path / "cut", engine="accelerate", stop_after=3)
    assert len(part) == 3 and not stage_finished(tmp_path / "cut")
    ckpt = latest_checkpoint(tmp_path / "cut")
    assert ckpt.name == "checkpoint-3"
    state = {p.name for p in (ckpt / "accelerate").iterdir()}
    assert {"model.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl"} <= state
    assert (ckpt / "config.json").is_file() and (ckpt / "model.safetensors").is_file()  # a loadable model dir
    with pytest.raises(ValueError, match="written by the 'accelerate' engine; resume with --engine accelerate"):
        run(tmp_path / "cut", resume=True)
    resumed = run(tmp_path / "cut", engine="accelerate", resume=True)
    assert [h["loss"] for h in resumed] == full  # exact
    assert stage_finished(tmp_path / "cut")
    assert not any(p.name.startswith(".tmp-") for p in (tmp_path / "cut").iterdir())


def test_accelerate_state_is_read_as_plain_tensors_only(samples, tmp_path):
    """A damaged save_state folder is refused by name, never unpickled."""
    def run(**kw):
        m, proc = build_model("tiny", seed=0)
        return train_stage(m, proc, samples, cfg(tmp_path, engine="accelerate", max_steps=3, **kw))

    run(stop_after=1)
    (latest_checkpoint(tmp_path) / "accelerate" / "optimizer.bin").write_bytes(b"not a tensor file")
    with pytest.raises(ValueError, match="accelerate/ is damaged"):
        run(resume=True)


# ---- the command -------------------------------------------------------------------------------
def test_fvl_train_stop_after_names_the_checkpoint_not_a_model(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "finetune", "--preset", "tiny", "--data", str(data_dir), "--out", str(out), "--max-steps", "3",
            "--batch-size", "4", "--save-every", "0", "--quiet", "--engine", "accelerate"]
    assert fvl(args + ["--stop-after", "1"]) == 0
    said = capsys.readouterr().out
    assert "model in" not in said and not (out / "model").exists()
    assert f"checkpoint in {out / 'checkpoint-1'}" in said and "--resume" in said
    assert fvl(args + ["--resume"]) == 0
    said = capsys.readouterr().out
    assert f"model in {out / 'model'}" in said and stage_finished(out)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert fvl(args[:-2] + ["--engine", "native", "--stop-after", "0", "--resume"]) == 2
    assert "--stop-after 0: must be at least 1" in capsys.readouterr().err
