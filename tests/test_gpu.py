"""The GPU path on a CPU-only machine: device/dtype/attention choices and the GPU check at tiny size."""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model.device import (apply_attn_implementation, choose_attn_implementation, choose_dtype, flash_attn_available,
                          parse_dtype, resolve_device)

REPO = Path(__file__).resolve().parents[1]


def _no_find_spec(name, *a, **k):
    raise AssertionError(f"find_spec({name!r}) must not be called without CUDA")


def test_cpu_choices_never_look_for_flash_attn(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", _no_find_spec)
    assert choose_attn_implementation("cpu") == "sdpa"  # even where CUDA is present (the GPU machine)
    assert not flash_attn_available("cpu")
    assert choose_dtype("cpu") == torch.float32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU-only machine, wherever this runs
    assert choose_attn_implementation(None) == "sdpa"
    assert resolve_device("auto").type == "cpu"


def test_cuda_choices_with_and_without_flash_attn(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    found = {"flash_attn": object()}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: found.get(name))
    assert choose_attn_implementation("cuda") == "flash_attention_2"
    assert choose_dtype("cuda") == torch.bfloat16
    assert choose_attn_implementation("cpu") == "sdpa"  # CUDA present, but the CPU was asked for
    found.clear()
    assert choose_attn_implementation("cuda") == "sdpa"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert choose_dtype("cuda:0") == torch.float16


def test_unavailable_cuda_and_bad_dtype_are_clear_errors(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_device("cuda")
    assert parse_dtype("bf16") == torch.bfloat16 and parse_dtype("auto") is None
    with pytest.raises(ValueError, match="unknown dtype"):
        parse_dtype("float8")


def test_flash_request_falls_back_to_sdpa_and_keeps_davit_off_flash(tiny):
    model, _ = tiny
    try:
        # flash-attn is not installed here: the request falls back instead of failing
        assert apply_attn_implementation(model, "flash_attention_2") == "sdpa"
        assert model.language_model.config._attn_implementation == "sdpa"
        # where flash does apply, the DaViT (channel attention: head dim = token count) is put back on sdpa
        model.set_attn_implementation("eager")

        def fake_set(impl):
            model.config._attn_implementation = impl

        model.set_attn_implementation = fake_set
        assert apply_attn_implementation(model, "flash_attention_2") == "flash_attention_2"
        assert model.vision_tower.vision_tower.config._attn_implementation == "sdpa"
    finally:
        if "set_attn_implementation" in model.__dict__:
            del model.set_attn_implementation
        model.set_attn_implementation("sdpa")
        model.config._attn_implementation = "sdpa"
    assert model.vision_tower.encoder.config._attn_implementation == "sdpa"


def _args(**kw):
    from benchmarks import gpu

    parser = argparse.ArgumentParser()
    gpu.add_arguments(parser)
    args = parser.parse_args(["--preset", "tiny", "--device", "cpu", "--repeats", "1"])
    for k, v in kw.items():
        setattr(args, k, v)
    return args


def test_gpu_check_tiny_on_cpu():
    from benchmarks import gpu

    result = gpu.run(_args(peak_tflops=1.0))
    json.dumps(result)  # one JSON object
    ext = result["extraction"]["tiny"]
    assert ext["fused_images_s"] > 0 and ext["naive_images_s"] > 0
    assert ext["speedup"] == pytest.approx(ext["fused_images_s"] / ext["naive_images_s"], rel=0.01)
    assert ext["max_abs_diff_vs_naive"] < 1e-4  # fused and naive compute the same features
    train = result["train"]
    assert "error" not in train, train
    assert train["tokens_s"] > 0 and train["loss_finite"]
    assert train["tokens_s"] == pytest.approx(train["batch"] * train["seq_len"] / train["step_s"], rel=0.01)
    assert train["mfu"] == pytest.approx(train["achieved_tflops"] / 1.0, rel=0.05)
    assert train["trainable_params_b"] < train["params_b"]  # the vision tower is frozen
    assert result["device"] == "cpu" and result["dtype"] == "float32" and result["attn_implementation"] == "sdpa"
    assert gpu._peak_flops(torch.device("cpu"), None) is None  # no MFU without a known peak


def test_gpu_check_reports_a_failing_phase_and_fvl_bench_prints_json(capsys):
    from workbench.cli import main

    # --seq-len shorter than the 17 image tokens: the phase reports its error, the run still ends in JSON
    assert main(["bench", "gpu", "--json", "--preset", "tiny", "--device", "cpu", "--parts", "train",
                 "--seq-len", "10"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["benchmark"] == "gpu" and "seq-len 10" in result["train"]["error"]


def test_gpu_check_script_runs_standalone_and_never_imports_flash_attn():
    """A fresh interpreter running the script from the repo root, as on the lent GPU machine."""
    out = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--preset", "tiny", "--device", "cpu",
                          "--repeats", "1", "--parts", "extraction", "--batch", "1"], cwd=REPO, capture_output=True,
                         text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout)
    assert result["extraction"]["tiny"]["speedup"] > 0
    assert result["flash_attn_imported"] is False
