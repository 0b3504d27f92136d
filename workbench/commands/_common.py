"""Helpers shared by `fvl` subcommands: opening a model from --model DIR or --preset NAME."""
from __future__ import annotations

import argparse


def add_model_args(p: argparse.ArgumentParser, default_preset: str | None = "tiny") -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--model", metavar="DIR", help="a model directory written by `fvl train` or `fvl convert`")
    g.add_argument("--preset", default=None, help=f"a random-init preset (default: {default_preset})")
    p.set_defaults(_default_preset=default_preset)


def open_model(args, device: str | None = None):
    """(model, processor) from --model DIR or --preset NAME, with clear errors for bad input."""
    from pathlib import Path

    from workbench.cli import UserError

    if getattr(args, "model", None):
        path = Path(args.model)
        if not path.is_dir():
            raise UserError(f"--model {args.model}: no such directory; pass a directory written by `fvl train`"
                            " or `fvl convert`, or use --preset NAME")
        from model.builder import load_model

        try:
            return load_model(path, device=device)
        except (FileNotFoundError, ValueError, OSError) as exc:
            raise UserError(f"--model {args.model}: {exc}") from exc
    from model.config import PRESETS, REAL_SIZE_PRESETS

    preset = args.preset or args._default_preset
    if preset not in PRESETS:
        raise UserError(f"--preset {preset}: unknown preset; choose one of: {', '.join(PRESETS)}")
    from model.builder import build_model

    if preset in REAL_SIZE_PRESETS:
        return build_model(preset, device="cpu")
    return build_model(preset, device=device)
