"""`fvl probe`: linear probes of every stored tap for every label (grouped CV, C sweep with
nested selection, control tasks / selectivity). Writes DIR/probe.json (ProbeMatrix.to_dict()),
DIR/probe.md and DIR/probe.png."""
from __future__ import annotations

MAX_CLASSES = 50


def register(sub) -> None:
    p = sub.add_parser("probe", help="linear probes: taps x labels with grouped CV, C sweep and control tasks")
    p.add_argument("--store", required=True, help="a feature store written by `fvl capture`")
    p.add_argument("--taps", default=None, help="comma-separated taps or views (default: every tap except llm.*)")
    p.add_argument("--labels", default=None, help="comma-separated label names (default: every usable label)")
    p.add_argument("--folds", type=int, default=5, help="grouped CV folds (default 5)")
    p.add_argument("--cs", default=None, help="comma-separated C values (default: 8 values, 1e-4 .. 1e2)")
    p.add_argument("--select", choices=["inner", "cv"], default="inner",
                   help="choose C on an inner validation split per fold (default) or by mean CV score")
    p.add_argument("--no-control", action="store_true", help="skip the control tasks (no selectivity)")
    p.add_argument("--pca", default="auto", help="'auto' (256 dims when d > 512), a number of dims, or 'none'")
    p.add_argument("--pool", choices=["mean", "global"], default="mean",
                   help="how token maps (N, D) become one vector per item (default mean)")
    p.add_argument("--group-by", default=None, help="a label holding the group (image) id (default: the item id)")
    p.add_argument("--types", default=None, help="a label holding the control-task type (default: the group)")
    p.add_argument("--regression", default=None, help="comma-separated labels to treat as regression targets")
    p.add_argument("--classification", default=None, help="comma-separated labels to treat as classes")
    p.add_argument("--precondition", choices=["auto", "on", "off"], default="auto",
                   help="precondition the probe solver with the features' covariance: auto (when it is far "
                        "from isotropic, as real features are), on or off; changes speed, not results")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output directory (probe.json, probe.md, probe.png)")
    p.add_argument("--json", action="store_true", help="print the JSON result instead of the table")
    p.set_defaults(func=run)


def _split(text: str | None) -> list[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def usable_labels(labels: dict, names: list[str], tasks: dict[str, str], n_folds: int) -> tuple[list[str], dict[str, str]]:
    """Labels worth probing, and why the others are skipped (constant, mostly missing, id-like)."""
    import numpy as np

    from probes.linear import _missing_mask, detect_task

    keep, skipped = [], {}
    for name in names:
        y = np.asarray(labels[name])
        valid = y[~_missing_mask(y)]
        if valid.size < 2 * n_folds:
            skipped[name] = f"only {valid.size} values"
            continue
        distinct = np.unique(valid.astype(str)).size
        if distinct < 2:
            skipped[name] = "constant"
            continue
        task = tasks.get(name) or detect_task(y)
        if task == "classification" and (distinct > MAX_CLASSES or 2 * distinct > valid.size):
            skipped[name] = (f"{distinct} classes for {valid.size} values (id-like or free text; "
                             f"pass --regression {name} if numeric)")
            continue
        keep.append(name)
    return keep, skipped


def run(args) -> int:
    import json
    from pathlib import Path

    import numpy as np

    from probes.linear import DEFAULT_CS, probe_matrix
    from workbench.cli import UserError
    from workbench.store import FeatureStore, StoreError

    try:
        store = FeatureStore(args.store)
    except (StoreError, OSError) as exc:
        raise UserError(f"--store {args.store}: {exc}") from exc
    if not store.items:
        raise UserError(f"--store {args.store} holds no captured items; run `fvl capture` first")
    taps = _split(args.taps) or [t for t in store.taps if not t.startswith("llm.")]
    bad = [t for t in taps if t not in store.taps and t not in store.view_names]
    if bad:
        raise UserError(f"--taps: {bad} not in the store; it has {store.taps + store.view_names}")
    labels = store.labels()
    wanted = _split(args.labels) or list(labels)
    missing = [n for n in wanted if n not in labels]
    if missing:
        raise UserError(f"--labels: {missing} not in the store; it has {sorted(labels)}")
    tasks = {n: "regression" for n in _split(args.regression)}
    tasks.update({n: "classification" for n in _split(args.classification)})
    names, skipped = usable_labels(labels, [n for n in wanted if n not in (args.group_by, args.types)], tasks,
                                   args.folds)
    if not names:
        raise UserError(f"no usable labels to probe (skipped: {skipped}); pass --labels with per-item labels")
    for n, why in skipped.items():
        print(f"fvl probe: skipping label {n!r}: {why}")
    groups = np.asarray(store.items)
    if args.group_by:
        if args.group_by not in labels:
            raise UserError(f"--group-by {args.group_by}: no such label; labels: {sorted(labels)}")
        groups = np.asarray(labels[args.group_by]).astype(str)
    types = None
    if args.types:
        if args.types not in labels:
            raise UserError(f"--types {args.types}: no such label; labels: {sorted(labels)}")
        types = np.asarray(labels[args.types]).astype(str)
    try:
        Cs = [float(c) for c in _split(args.cs)] or list(DEFAULT_CS)
    except ValueError as exc:
        raise UserError(f"--cs {args.cs}: give comma-separated numbers, e.g. 0.01,0.1,1,10") from exc
    pca = None if args.pca == "none" else ("auto" if args.pca == "auto" else None)
    if args.pca not in ("auto", "none"):
        try:
            pca = int(args.pca)
        except ValueError as exc:
            raise UserError(f"--pca {args.pca}: use 'auto', 'none' or a number of dimensions") from exc
    feats = {t: store.load(t, dtype="float32") for t in taps}
    try:
        matrix = probe_matrix(feats, {n: labels[n] for n in names}, groups, types=types, tasks=tasks, Cs=Cs,
                              n_folds=args.folds, select=args.select, control=not args.no_control, pca=pca,
                              pool=args.pool, seed=args.seed, progress=not args.json,
                              precondition={"auto": "auto", "on": True, "off": False}[args.precondition])
    except ValueError as exc:
        raise UserError(str(exc)) from exc
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    d = matrix.to_dict()
    d["settings"].update({"store": str(args.store), "skipped_labels": skipped})
    (out / "probe.json").write_text(json.dumps(d, indent=2))
    (out / "probe.md").write_text(matrix.to_markdown() + "\n")
    from probes.plots import plot_probe_matrix, save

    save(plot_probe_matrix(matrix), out / "probe.png")
    if args.json:
        print(json.dumps(d))
    else:
        print(matrix.to_markdown())
        print(f"\nwrote {out / 'probe.json'}, {out / 'probe.md'}, {out / 'probe.png'}")
    return 0
