"""`fvl probe`: linear probes of every stored tap for every label (grouped CV, C sweep with nested
selection, control tasks / selectivity). Writes DIR/probe.json, DIR/probe.md and DIR/probe.png.
The work is `workbench.pipelines.probing.probe_store`; this module parses, calls it and prints."""
from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("probe", help="linear probes: taps x labels with grouped CV, C sweep and control tasks")
    p.add_argument("--store", required=True, help="a feature store written by `fvl capture`")
    p.add_argument("--taps", default=None,
                   help="comma-separated taps, views or globs as `fvl capture` takes them (e.g. 'prompt.*', "
                        "'fusion.input[*]', all; default: every tap except llm.*)")
    p.add_argument("--labels", default=None, help="comma-separated label names (default: every usable label)")
    p.add_argument("--folds", type=int, default=5, help="grouped CV folds, 2 up to the number of groups (default 5)")
    p.add_argument("--cs", default=None, help="comma-separated C values (default: 8 values, 1e-4 .. 1e2)")
    p.add_argument("--select", choices=["inner", "cv"], default="inner",
                   help="choose C on an inner validation split per fold (default) or by mean CV score")
    p.add_argument("--no-control", action="store_true", help="skip the control tasks (no selectivity)")
    p.add_argument("--pca", default="auto", help="'auto' (256 dims when d > 512), a number of dims, or 'none'")
    p.add_argument("--pool", choices=["mean", "global"], default="mean",
                   help="how token maps (N, D) become one vector per item (default mean)")
    p.add_argument("--group-by", default=None, help="a label holding the group (image) id (default: the item id)")
    p.add_argument("--types", default=None, help="a label holding the control-task type (default: the group)")
    p.add_argument("--regression", default=None, help="comma-separated numeric labels to treat as regression targets")
    p.add_argument("--classification", default=None, help="comma-separated labels to treat as classes")
    p.add_argument("--precondition", choices=["auto", "on", "off"], default="auto",
                   help="precondition the probe solver with the features' covariance: auto (when it is far "
                        "from isotropic, as real features are), on or off; changes speed, not results")
    p.add_argument("--device", default="cpu",
                   help="where the batched solver runs: cpu (default), cuda, cuda:N or auto (float32 either way)")
    p.add_argument("--save-probes", action="store_true",
                   help="also fit and save each classification probe at its chosen C (DIR/probes/TAP/LABEL), "
                        "for `fvl attribute --probe-file`")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output directory (probe.json, probe.md, probe.png)")
    p.add_argument("--json", action="store_true", help="print the JSON result instead of the table")
    p.set_defaults(func=run)


def _parse_numbers(args):
    """(Cs, pca) from --cs and --pca, refused by name when malformed."""
    from workbench.commands._common import UserError

    try:
        cs = [float(c) for c in (args.cs or "").split(",") if c.strip()] or None
    except ValueError:
        raise UserError(f"--cs {args.cs}: give comma-separated positive numbers, e.g. 0.01,0.1,1,10") from None
    if cs is not None and min(cs) <= 0:
        raise UserError(f"--cs {args.cs}: every C must be positive, e.g. 0.01,0.1,1,10")
    if args.pca in ("auto", "none"):
        return cs, None if args.pca == "none" else "auto"
    try:
        pca = int(args.pca)
    except ValueError:
        raise UserError(f"--pca {args.pca}: use 'auto', 'none' or a number of dimensions") from None
    if pca < 1:
        raise UserError(f"--pca {args.pca}: give at least 1 dimension, or 'none'")
    return cs, pca


def run(args) -> int:
    import json

    from workbench.commands._common import UserError, check_output
    from workbench.store import FeatureStore, StoreError

    if args.folds < 2:
        raise UserError(f"--folds {args.folds}: use 2 or more (up to the number of groups in the store)")
    cs, pca = _parse_numbers(args)
    out = check_output(args.out)
    try:
        store = FeatureStore(args.store)
    except (StoreError, OSError) as exc:
        raise UserError(f"--store {args.store}: {exc}") from exc

    from workbench.pipelines.probing import ProbeSetupError, probe_store, save_probes, write_probe_outputs

    try:
        result = probe_store(store, taps=args.taps, labels=args.labels, folds=args.folds, cs=cs, select=args.select,
                             control=not args.no_control, pca=pca, pool=args.pool, group_by=args.group_by,
                             types=args.types, regression=args.regression or (),
                             classification=args.classification or (),
                             precondition={"auto": "auto", "on": True, "off": False}[args.precondition],
                             seed=args.seed, device=args.device, progress=not args.json)
    except (ProbeSetupError, StoreError) as exc:
        raise UserError(str(exc)) from exc
    for name, why in result.skipped.items():
        if not args.json:
            print(f"fvl probe: skipping label {name!r}: {why}")
    try:
        files = write_probe_outputs(result, out)
        if args.save_probes:
            files += save_probes(store, result, out, pool=args.pool)
    except OSError as exc:
        raise UserError(f"--out {args.out}: cannot write ({exc.strerror or exc}); choose a writable directory") from exc
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        print(result.matrix.to_markdown())
        print(f"\nwrote {', '.join(str(f) for f in files)}")
    return 0
