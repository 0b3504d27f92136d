"""What the `fvl` commands share: the user-error type, the --model/--preset options, opening a model,
and checking an output path before any work.

Everything here is cheap to import: names are checked against `model.presets` and paths against the
file system before torch or transformers load, so a bad argument is refused in well under a second.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from model.loading.errors import CheckpointError
from model.loading.layout import detect_layout
from model.presets import PRESETS, REAL_SIZE_PRESETS
from workbench.data.files import OutputError, check_writable


class UserError(Exception):
    """An error caused by the user's input; `fvl` prints it without a traceback and exits with status 2."""


def add_model_args(p: argparse.ArgumentParser, default_preset: str | None = "tiny") -> None:
    """--model DIR|HUB_ID or --preset NAME (never both)."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("--model", metavar="DIR", help="a model directory (this project's, an official checkpoint, "
                                                  "or a supported transformers family) or a hub id")
    g.add_argument("--preset", default=None, help=f"a random-init preset: {', '.join(PRESETS)} "
                                                  f"(default: {default_preset})")
    p.set_defaults(_default_preset=default_preset)


def preset_name(args) -> str:
    """The preset asked for (or the command's default), refused by name if unknown."""
    preset = getattr(args, "preset", None) or getattr(args, "_default_preset", None)
    if preset not in PRESETS:
        raise UserError(f"--preset {preset}: unknown preset; choose one of: {', '.join(PRESETS)}")
    return preset


def model_id(args) -> str:
    """How a model is named in outputs: the --model path as given, or preset:NAME."""
    return args.model if getattr(args, "model", None) else f"preset:{preset_name(args)}"


def check_model_arg(args) -> None:
    """Refuse a missing --model directory (a hub id, which has no slash-free local meaning, passes) or an
    unknown --preset, before anything heavy is imported."""
    model = getattr(args, "model", None)
    if model:
        path = Path(model)
        looks_local = path.is_absolute() or model.startswith(".") or path.exists() or model.count("/") != 1
        if looks_local and not path.is_dir():
            raise UserError(f"--model {model}: no such directory; pass a model directory (written by `fvl train` "
                            "or `fvl convert`, or a transformers save_pretrained directory), a hub id, or --preset NAME")
        if path.is_dir():
            try:
                detect_layout(path)  # reads config.json only: an unsupported family is refused before torch loads
            except CheckpointError as exc:
                raise UserError(f"--model {model}: {exc}") from None
    else:
        preset_name(args)


def open_model(args, device: str | None = None, dtype=None):
    """(model, processor) from --model DIR|HUB_ID or --preset NAME, with clear errors for bad input."""
    check_model_arg(args)
    from model.loading import build_model, load_model

    if getattr(args, "model", None):
        try:
            return load_model(args.model, device=device, dtype=dtype)
        except (FileNotFoundError, ValueError, OSError) as exc:
            raise UserError(f"--model {args.model}: {exc}") from exc
    preset = preset_name(args)
    model, processor = build_model(preset, device="cpu" if preset in REAL_SIZE_PRESETS else device)
    from model.device import parse_dtype

    if parse_dtype(dtype) is not None:
        model = model.to(parse_dtype(dtype))
    return model, processor


DEVICE_HELP = "where the model runs: auto (CUDA when present, else the CPU), cpu, cuda or cuda:N (default auto)"
DTYPE_HELP = ("the model's dtype: auto (bfloat16 on GPUs that support it, float16 on older GPUs, float32 on the "
              "CPU), float32, bfloat16 or float16 (default auto)")


def add_device_args(p: argparse.ArgumentParser, dtype: bool = True) -> None:
    """--device (and --dtype) with the same wording on every command that runs a model."""
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    if dtype:
        p.add_argument("--dtype", default="auto", help=DTYPE_HELP)


def device_and_dtype(args):
    """(torch device, torch dtype or None) from --device / --dtype: the texts are checked before torch loads,
    then resolved on this machine; an unusable choice is a UserError naming the option. The dtype is None
    when the command has no --dtype."""
    from model.device import check_device_text, check_dtype_text

    text_dtype = getattr(args, "dtype", None)
    try:
        check_device_text(args.device)
        if text_dtype is not None:
            check_dtype_text(text_dtype)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    from model.device import resolve_device, resolve_dtype

    try:
        device = resolve_device(args.device)
        return device, (resolve_dtype(text_dtype, device) if text_dtype is not None else None)
    except ValueError as exc:
        raise UserError(str(exc)) from None


def check_output(path: str | Path, what: str = "--out") -> Path:
    """Refuse an output location that cannot be written, before any work is done."""
    try:
        return check_writable(path, what)
    except OutputError as exc:
        raise UserError(str(exc)) from exc
