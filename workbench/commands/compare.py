"""`fvl compare`: train small Florence-VL variants under several seeds and judge the paper's claims.

    fvl compare --quick --out runs/compare-quick --json        # tiny settings, 2 seeds, a minute or two
    fvl compare --config configs/compare.json --out runs/compare
    fvl compare --config configs/compare.json --out runs/compare --device cuda
    fvl compare --config configs/compare.json --out runs/compare --only fvl-channel,fvl-token

Each variant (encoder kind, encoder training or random, fusion, prompt subset) is trained once per seed (stage 1
+ stage 2), evaluated per question, captured, and scored with cheap measures of its stored features (alignment
loss, linear-probe accuracy, correspondence across augmented views). Each paper claim gets the 95% interval of
the difference and a verdict: reproduced, reversed or unresolved. OUT/compare.md, OUT/compare.json,
OUT/forest.png and OUT/proxies.png hold the results. A rerun reuses finished work.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys

from workbench.commands._common import UserError
from workbench.pipelines import compare as pipeline


def register(sub) -> None:
    p = sub.add_parser("compare", help="train variants (encoders, fusion, prompts) under seeds and judge the paper",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--config", metavar="FILE", help="a comparison config (default: configs/compare.json)")
    src.add_argument("--quick", action="store_true",
                     help="the tiny shipped config configs/compare_quick.json (whole pipeline, 2 seeds)")
    p.add_argument("--out", default=None, help="output directory (required unless --check); a rerun reuses finished work")
    p.add_argument("--only", default=None, metavar="NAMES",
                   help="comma-separated variant names to run (must include the alignment reference)")
    p.add_argument("--device", default=None, help="cpu (default) or cuda[:N]")
    p.add_argument("--force", action="store_true",
                   help="redo variant/encoder directories made with other settings instead of refusing them")
    p.add_argument("--check", action="store_true", help="only validate the config and list the variants")
    p.add_argument("--json", action="store_true", help="print one JSON object (logs and progress go to stderr)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run, resumable=True)


def _listing(path, cfg, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"config": str(path), "name": cfg.name, "preset": cfg.preset, "seeds": cfg.seeds,
                          "variants": [v.to_dict() for v in cfg.variants]}))
        return
    print(f"{path}: {len(cfg.variants)} variant(s) x {len(cfg.seeds)} seed(s) {cfg.seeds}, preset {cfg.preset}")
    for v in cfg.variants:
        print(f"  {v.name:<20} {v.encoder:<9} {v.training:<10} {v.fusion:<8} {'+'.join(v.prompts) or '-'}")


def _summary(result: dict) -> None:
    for o in result["orderings"]:
        print(f"{o['source']:<9} {o['verdict']:<11} {o['claim']}: diff {o['diff']} [{o['ci_low']}, {o['ci_high']}]")
    for name, p in result["proxies"].items():
        print(f"measure {name:<15} Spearman {p['spearman']} [{p['ci_low']}, {p['ci_high']}], picks {p['picks']} "
              f"(best by VQA: {p['best']})")
    print(f"report: {result['files']['markdown']}  ({result['meta']['minutes']:.2f} min)")


def run(args) -> int:
    device = args.device
    if device is not None and not (device == "cpu" or device == "cuda" or device.startswith("cuda:")):
        raise UserError(f"--device {device}: expected cpu, cuda or cuda:N")
    try:
        path = args.config or pipeline.shipped_config(quick=args.quick)
        cfg = pipeline.load_config(path)
        if args.check:
            pipeline.check_encoder_configs(cfg)
            _listing(path, cfg, args.json)
            return 0
        if not args.out:
            raise UserError("--out DIR is required (where the variants, compare.json and compare.md go)")
        only = [n.strip() for n in args.only.split(",") if n.strip()] if args.only else None
        log = (lambda s: print(s, file=sys.stderr)) if args.json else print
        with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
            result = pipeline.run_compare(cfg, args.out, only=only, force=args.force, progress=not args.quiet,
                                          device=device, log=log)
    except pipeline.ConfigError as exc:
        raise UserError(str(exc)) from None
    if args.json:
        keys = ("seeds", "orderings", "untestable", "proxies", "variants", "encoders", "files", "meta")
        print(json.dumps({k: result[k] for k in keys}))
    else:
        _summary(result)
    return 0
