"""`fvl demo`: data, training, capture, probes, alignment, attribution and a report, end to end.

Each step skips when its output is complete, so a second run reuses everything and an interrupted
run resumes. Prints the one command that opens the app on the result.
"""
from __future__ import annotations

import json


def register(sub) -> None:
    p = sub.add_parser("demo", help="run the whole workbench end to end into a run directory, with a report")
    p.add_argument("--out", default="runs/demo", help="run directory (default runs/demo)")
    p.add_argument("--quick", action="store_true", help="tiny preset and a few dozen images (a few minutes)")
    p.add_argument("--preset", default=None, help="model preset (default: small; tiny with --quick)")
    p.add_argument("--n", type=int, default=None,
                   help="synthetic images for training and analysis (default: the recipe's; 48 with --quick)")
    p.add_argument("--recipe", default=None, metavar="JSON",
                   help='training recipe overrides, e.g. \'{"image_size": 192, "n_images": 1000}\' (model.training.recipe.RecipeConfig fields)')
    p.add_argument("--only", default=None, help="stop after this step (data, train, capture, probe, align, "
                                                 "attribute, project, report)")
    p.add_argument("--redo", default="", help="comma-separated steps to run again even if complete")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    p.set_defaults(func=run, resumable=True)


def run(args) -> int:
    import dataclasses

    from workbench.commands._common import UserError
    from workbench.pipelines.demo import STEPS, DemoSettings, run_demo
    from workbench.pipelines.rundir import app_command

    settings = DemoSettings.quick() if args.quick else DemoSettings()
    changes = {}
    if args.preset:
        from model.presets import PRESETS, REAL_SIZE_PRESETS

        if args.preset not in PRESETS or args.preset in REAL_SIZE_PRESETS:
            raise UserError(f"--preset {args.preset}: the demo trains on CPU; choose tiny or small")
        changes["preset"] = args.preset
    if args.n is not None:
        if args.n < 24:
            raise UserError(f"--n {args.n}: the probes and the alignment need at least 24 images")
        changes["n_images"] = args.n
    if args.recipe:
        try:
            extra = json.loads(args.recipe)
        except json.JSONDecodeError as exc:
            raise UserError(f"--recipe {args.recipe!r} is not JSON ({exc.msg}); write e.g. '{{\"image_size\": 192}}'") from None
        if not isinstance(extra, dict):
            raise UserError("--recipe must be a JSON object of RecipeConfig fields")
        changes["recipe"] = tuple({**dict(settings.recipe), **extra}.items())
    settings = dataclasses.replace(settings, **changes)
    try:
        settings.recipe_config()
    except ValueError as exc:
        raise UserError(f"--recipe: {exc}") from None
    names = [s.name for s in STEPS]
    redo = [s.strip() for s in args.redo.split(",") if s.strip()]
    for n in redo + ([args.only] if args.only else []):
        if n not in names:
            raise UserError(f"unknown step {n!r}; steps are: {', '.join(names)}")
    from workbench.data.synth import SynthError

    try:
        summary = run_demo(args.out, settings, only=[args.only] if args.only else None, force=redo,
                           progress=not args.json, log=(lambda m: None) if args.json else print)
    except SynthError as exc:
        raise UserError(f"--out {args.out}: {exc} (each run directory keeps the settings it was made with; "
                        "use another --out for other settings)") from exc
    summary["app"] = app_command(args.out)
    if args.json:
        print(json.dumps(summary, default=str))
    else:
        total = summary["seconds"]
        ran = [k for k, v in summary["steps"].items() if v["status"] == "ran"]
        print(f"done in {total:.0f} s ({', '.join(ran) or 'nothing to do: every step was complete'}); "
              f"report: {args.out}/report.md")
        print(f"open the app:\n  {summary['app']}")
    return 0
