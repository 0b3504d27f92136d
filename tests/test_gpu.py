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

from model.device import (apply_attn_implementation, check_device_text, check_dtype_text, choose_attn_implementation,
                          choose_dtype, flash_attn_available, parse_dtype, resolve_device, resolve_dtype)

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
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
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


def test_device_and_dtype_options_are_parsed_in_one_place(monkeypatch):
    assert check_device_text("cuda:3") == "cuda:3" and check_dtype_text("bfloat16") == "bfloat16"
    for bad in ("gpu", "cuda:", "mps", "CPU", ""):
        with pytest.raises(ValueError, match=r"--device .*choose auto, cpu, cuda or cuda:N"):
            check_device_text(bad)
    with pytest.raises(ValueError, match=r"--dtype int8: not a dtype; choose auto, float32, bfloat16, float16"):
        check_dtype_text("int8")
    assert resolve_dtype("bfloat16", "cpu") == torch.bfloat16 and resolve_dtype("float16", "cpu") == torch.float16
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu") and resolve_dtype("auto", "auto") == torch.float32
    with pytest.raises(ValueError, match="--device cuda:0: CUDA was requested but CUDA is not available"):
        resolve_device("cuda:0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_device("auto") == torch.device("cuda") and resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_dtype("auto", "cuda:1") == torch.bfloat16
    with pytest.raises(ValueError, match=r"--device cuda:2: this machine has 2 CUDA device\(s\); choose cuda:0 to cuda:1"):
        resolve_device("cuda:2")


def _generate(capsys, *extra):
    from workbench.cli import main

    rc = main(["generate", "--preset", "tiny", "--image", "packaged:grace_hopper", "--max-new-tokens", "3", *extra])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_generate_runs_on_the_device_and_dtype_asked_for(capsys):
    """On this machine's hardware, whatever it is: auto picks CUDA where present and the CPU elsewhere;
    an explicit cuda runs there or is refused by name on a CPU-only machine (no skip either way)."""
    rc, out, _ = _generate(capsys, "--json", "--device", "auto")
    assert rc == 0
    result = json.loads(out)
    assert result["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert result["dtype"] == str(choose_dtype(result["device"])).replace("torch.", "")
    rc, out, err = _generate(capsys, "--json", "--device", "cuda", "--dtype", "float32")
    if torch.cuda.is_available():
        assert rc == 0 and json.loads(out)["device"] == "cuda" and json.loads(out)["dtype"] == "float32"
    else:
        assert rc == 2 and "--device cuda: CUDA was requested but CUDA is not available" in err
    rc, out, _ = _generate(capsys, "--json", "--device", "cpu", "--dtype", "bfloat16")
    assert rc == 0 and json.loads(out)["device"] == "cpu" and json.loads(out)["dtype"] == "bfloat16"
    rc, _, err = _generate(capsys, "--device", "gpu")
    assert rc == 2 and "--device gpu: not a device" in err and "Traceback" not in err


def test_generate_refuses_more_new_tokens_than_the_position_table_holds(capsys, tmp_path):
    from PIL import Image

    from model.presets import PRESETS
    from workbench.cli import main

    rc, _, err = _generate(capsys, "--max-new-tokens", "100000")
    limit = PRESETS["tiny"]["llm"]["max_position_embeddings"]
    assert rc == 2 and f"--max-new-tokens 100000: the model's position table holds {limit} positions" in err
    room = int(err.split("choose at most ")[1].split()[0])
    rc, _, _ = _generate(capsys, "--max-new-tokens", str(room + 1))
    assert rc == 2  # one past the room is refused; the room itself fits (not generated here: slow)
    Image.new("RGB", (4, 4)).save(tmp_path / "tiny.png")
    assert main(["generate", "--preset", "tiny", "--image", str(tmp_path / "tiny.png")]) == 2
    err = capsys.readouterr().err
    assert "4x4 pixels" in err and "use a larger image" in err and "min_side" not in err  # no flag it lacks


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
