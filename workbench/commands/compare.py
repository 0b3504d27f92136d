"""`fvl compare`: train small Florence-VL variants and compare them with the paper's ablations.

    fvl compare --quick --out runs/compare-quick --json        # tiny settings, a few minutes (the tests' run)
    fvl compare --config configs/compare.json --out runs/compare
    fvl compare --config configs/compare.json --out runs/compare --only fvl-channel,fvl-token

Each variant (encoder kind, encoder training or random, fusion, prompt subset) is trained (stage 1 + stage 2),
evaluated on VQA per question type, captured into a feature store, probed and scored with the paper's alignment
loss. OUT/compare.json, OUT/compare.md and OUT/*.png hold the results table beside the paper's numbers (Tables 1,
4, 5, Figs. 4-5) and, per ordering, whether our numbers reproduce it. A rerun reuses finished variants.
"""
from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser("compare", help="train variants (encoders, fusion, prompts) and compare them with the paper",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--config", metavar="FILE", help="a comparison config (default: configs/compare.json)")
    src.add_argument("--quick", action="store_true",
                     help="the tiny shipped config configs/compare_quick.json (whole pipeline in a few minutes)")
    p.add_argument("--out", default=None, help="output directory (required unless --check); a rerun reuses finished variants")
    p.add_argument("--only", default=None, metavar="NAMES",
                   help="comma-separated variant names to run (must include the alignment reference)")
    p.add_argument("--force", action="store_true",
                   help="redo variant/encoder directories made with other settings instead of refusing them")
    p.add_argument("--check", action="store_true", help="only validate the config and list the variants")
    p.add_argument("--json", action="store_true", help="print one JSON object (logs and progress go to stderr)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args) -> int:
    import contextlib
    import json
    import sys

    from workbench.cli import UserError
    from workbench.experiments import ConfigError, load_config, run_compare, shipped_config

    try:
        path = args.config or shipped_config(quick=args.quick)
        cfg = load_config(path)
    except ConfigError as exc:
        raise UserError(str(exc)) from None
    only = [n.strip() for n in args.only.split(",") if n.strip()] if args.only else None
    if args.check:
        listing = {"config": str(path), "name": cfg.name, "preset": cfg.preset,
                   "variants": [v.to_dict() for v in cfg.variants]}
        if args.json:
            print(json.dumps(listing))
        else:
            print(f"{path}: {len(cfg.variants)} variant(s), preset {cfg.preset}")
            for v in cfg.variants:
                print(f"  {v.name:<20} {v.encoder:<9} {v.training:<10} {v.fusion:<8} {'+'.join(v.prompts) or '-'}")
        return 0
    if not args.out:
        raise UserError("--out DIR is required (where the variants, compare.json and compare.md go)")
    log = (lambda s: print(s, file=sys.stderr)) if args.json else print
    try:
        with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
            result = run_compare(cfg, args.out, only=only, force=args.force, progress=not args.quiet, log=log)
    except ConfigError as exc:
        raise UserError(str(exc)) from None
    if args.json:
        print(json.dumps({k: result[k] for k in ("rows", "orderings", "files", "meta")}, default=str))
    else:
        for o in result["orderings"]:
            print(f"{o['source']:<9} {o['reproduced']:<4} {o['claim']}: {o['ours']}")
        print(f"table: {result['files']['markdown']}  ({result['meta']['minutes']:.2f} min)")
    return 0
