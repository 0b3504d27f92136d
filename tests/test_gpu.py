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
    cap = result["capture"]
    assert "error" not in cap, cap
    assert cap["captured"] == cap["images"] == 4 and cap["failed"] == 0 and cap["workers"] == 2
    assert cap["capture_images_s"] > 0 and cap["naive_images_s"] > 0 and cap["naive_images"] == 4
    assert cap["speedup"] == pytest.approx(cap["capture_images_s"] / cap["naive_images_s"], rel=0.01)
    assert cap["taps"] == ["depth", "prompt.*", "fusion.output"] and cap["store_dtype"] == "float16"


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


# ---- --device / --dtype on the heavy analysis commands ------------------------------------------------
@pytest.fixture(scope="module")
def heavy_inputs(tmp_path_factory):
    """A tiny 64 px model, eight synthetic scenes, a mean-pooled store of them, stick figures and their
    unpooled store: the inputs of attribute, contributions, align and heatmap probe."""
    from model.loading import build_model, save_model
    from workbench.cli import main

    base = tmp_path_factory.mktemp("heavy")
    data, figs = base / "data", base / "figs"
    assert main(["data", "synth", "--out", str(data), "--n", "8", "--image-size", "64", "--workers", "1",
                 "--quiet"]) == 0
    model = save_model(*build_model("tiny", image_size=64, seed=0), base / "model")
    assert main(["capture", "--model", str(model), "--data", str(data), "--taps", "depth,prompt.*,fusion.input",
                 "--pool", "mean", "--device", "cpu", "--out", str(base / "store")]) == 0
    assert main(["heatmap", "figures", "--out", str(figs), "--n", "4", "--size", "32"]) == 0
    assert main(["capture", "--model", str(model), "--data", str(figs / "images"), "--taps", "depth", "--pool",
                 "none", "--device", "cpu", "--out", str(base / "figstore")]) == 0
    image = sorted((data / "images").glob("*.png"))[0]
    return {"data": str(data), "model": str(model), "store": str(base / "store"), "figs": str(figs),
            "figstore": str(base / "figstore"), "image": str(image)}


def _heavy_commands(i: dict, out: Path) -> dict[str, tuple[list[str], str]]:
    """Each command with tiny valid inputs, and the JSON file it writes (which records the device)."""
    m = ["--model", i["model"]]
    return {
        "attribute": (["attribute", *m, "--image", i["image"], "--question", "What color?", "--answer", "red",
                       "--steps", "2", "--stream-steps", "2", "--out", str(out / "attr")],
                      "attr/attribution.json"),
        "contributions": (["contributions", *m, "--data", i["data"], "--split", "train", "--limit", "2",
                           "--out", str(out / "contrib")], "contrib/contributions.json"),
        "align": (["align", "--store", i["store"], "--data", i["data"], *m, "--steps", "2", "--batch-size", "2",
                   "--no-leave-one-out", "--out", str(out / "align")], "align/alignment.json"),
        "heatmap probe": (["heatmap", "probe", "--store", i["figstore"], "--figures", i["figs"], "--epochs", "1",
                           "--taps", "depth", "--out", str(out / "heatmap")], "heatmap/heatmap.json"),
    }


@pytest.mark.parametrize("name", ["attribute", "contributions", "align", "heatmap probe"])
def test_heavy_commands_run_on_the_device_asked_for(name, heavy_inputs, tmp_path, capsys):
    """auto runs on this machine's best device and says so; cuda runs there, or (CPU-only machine) is refused
    by name with status 2 and no traceback; a bad text is refused before anything loads."""
    from workbench.cli import main

    argv, written = _heavy_commands(heavy_inputs, tmp_path)[name]
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert main([*argv, "--device", "auto"]) == 0, capsys.readouterr().err[-2000:]
    capsys.readouterr()
    assert json.loads((tmp_path / written).read_text())["device"] == expected
    rc = main([*argv, "--device", "cuda"])
    err = capsys.readouterr().err
    if torch.cuda.is_available():
        assert rc == 0, err[-2000:]
        assert json.loads((tmp_path / written).read_text())["device"] == "cuda"
    else:
        assert rc == 2 and "--device cuda: CUDA was requested but CUDA is not available" in err
        assert "Traceback" not in err
    assert main([*argv, "--device", "gpu"]) == 2
    err = capsys.readouterr().err
    assert "--device gpu: not a device" in err and "Traceback" not in err


@pytest.mark.parametrize("name", ["attribute", "contributions", "align"])
def test_heavy_commands_run_in_the_dtype_asked_for(name, heavy_inputs, tmp_path, capsys):
    """--dtype reaches the model: bfloat16 runs (pixel inputs cast to the model's dtype, also inside integrated
    gradients) and is recorded; a bad dtype is refused by name."""
    from workbench.cli import main

    argv, written = _heavy_commands(heavy_inputs, tmp_path)[name]
    assert main([*argv, "--device", "auto", "--dtype", "bfloat16"]) == 0, capsys.readouterr().err[-2000:]
    capsys.readouterr()
    assert json.loads((tmp_path / written).read_text())["dtype"] == "bfloat16"
    assert main([*argv, "--dtype", "int8"]) == 2
    err = capsys.readouterr().err
    assert "--dtype int8: not a dtype" in err and "Traceback" not in err
