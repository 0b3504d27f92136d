"""`fvl heatmap`: the Simple-Baselines heatmap head as a localisation probe on frozen features.

    fvl heatmap figures --out FIG --n 600            # stick figures (+ mirrored copies) and joints
    fvl capture --data FIG/images --pool none --taps vision.stage1,depth --out STORE
    fvl heatmap probe --store STORE --figures FIG --out DIR

The probe trains a deconvolution head per tap on the train figures, reports PCK@0.05 (image
size) and PCK@0.2 (torso) on the test figures, with and without the flip test (features of the
mirrored images), against the untrained head. Writes DIR/heatmap.json and DIR/pck.png.
"""
from __future__ import annotations


def register(sub) -> None:
    from workbench.commands._common import add_device_args

    p = sub.add_parser("heatmap", help="heatmap (pose) localisation probe on frozen spatial features")
    hs = p.add_subparsers(dest="heatmap_command", metavar="{figures,probe}")
    f = hs.add_parser("figures", help="write a stick-figure dataset (images, mirrored images, joints)")
    f.add_argument("--out", required=True, help="output directory")
    f.add_argument("--n", type=int, default=600, help="figures (default 600; each also mirrored)")
    f.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    f.add_argument("--test-fraction", type=float, default=0.25)
    f.add_argument("--occlude", type=float, default=0.0, help="probability of an occluding box (default 0)")
    f.add_argument("--seed", type=int, default=0)
    f.set_defaults(func=run_figures)
    q = hs.add_parser("probe", help="train the heatmap head on stored features of the figures")
    q.add_argument("--store", required=True, help="features of FIG/images captured with --pool none")
    q.add_argument("--figures", required=True, help="the `fvl heatmap figures` directory (joints.json)")
    q.add_argument("--taps", default=None, help="comma-separated spatial taps (default: every vision.stage*, "
                                                "depth and prompt.* tap in the store)")
    q.add_argument("--n-deconv", type=int, choices=[0, 2, 3], default=2, help="deconvolution layers (default 2)")
    q.add_argument("--channels", type=int, default=64, help="channels per deconvolution (default 64)")
    q.add_argument("--epochs", type=int, default=20)
    q.add_argument("--batch-size", type=int, default=32)
    q.add_argument("--lr", type=float, default=1e-3)
    q.add_argument("--sigma", type=float, default=2.0, help="target Gaussian sigma in heatmap pixels (default 2)")
    q.add_argument("--no-shift", action="store_true", help="flip test without the one-pixel shift")
    q.add_argument("--train-flips", action="store_true", help="add the mirrored train figures (flip augmentation)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--out", required=True, help="output directory (heatmap.json, pck.png)")
    q.add_argument("--json", action="store_true", help="print the JSON result")
    add_device_args(q, dtype=False)  # the head trains in float32: the stored features' dtype is chosen at capture
    q.set_defaults(func=run_probe)
    p.set_defaults(func=lambda args: (p.print_help(), 0)[1])


def run_figures(args) -> int:
    from workbench.commands._common import UserError, check_output
    from workbench.data.stick_figures import write_stick_figures

    if args.n < 2:
        raise UserError("--n must be at least 2 (train and test figures)")
    if args.size < 16:
        raise UserError(f"--size {args.size}: give at least 16 pixels")
    if not 0.0 <= args.occlude <= 1.0:
        raise UserError(f"--occlude {args.occlude}: give a probability between 0 and 1")
    check_output(args.out)
    try:
        meta = write_stick_figures(args.out, args.n, args.size, seed=args.seed, test_fraction=args.test_fraction,
                                   occlude_prob=args.occlude)
    except ValueError as exc:
        raise UserError(str(exc)) from exc
    print(f"wrote {meta['n']} stick figures (+ mirrored copies) to {args.out}/images and joints to "
          f"{args.out}/joints.json; next: fvl capture --data {args.out}/images --pool none --out STORE")
    return 0


def spatial(x, tap: str):
    """(n, C, H, W) maps from a stored tap: spatial maps as they are, token maps (n, N, D)
    without their global token and reshaped to (n, D, h, w)."""
    import numpy as np

    from probes.similarity import split_global

    if x.ndim == 4:
        return x
    if x.ndim == 3:
        _, p = split_global(x)
        return np.ascontiguousarray(np.moveaxis(p, -1, 1))
    raise ValueError(f"tap {tap} has per-item shape {x.shape[1:]}: pooled features cannot be localised; "
                     "capture with --pool none")


def run_probe(args) -> int:
    import json
    from pathlib import Path

    from workbench.commands._common import UserError, check_output, device_and_dtype

    for flag in ("epochs", "batch_size", "channels"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: give a positive number")
    check_output(args.out)  # before torch loads and before any training
    device, _ = device_and_dtype(args)

    import numpy as np

    from probes.heatmap import train_heatmap_probe
    from probes.plots import plot_pck_bars, save
    from workbench.data.files import atomic_write_text
    from workbench.store import FeatureStore, StoreError

    try:
        store = FeatureStore(args.store)
    except (StoreError, OSError) as exc:
        raise UserError(f"--store {args.store}: {exc}") from exc
    jpath = Path(args.figures) / "joints.json"
    if not jpath.is_file():
        raise UserError(f"--figures {args.figures}: no joints.json; write one with `fvl heatmap figures`")
    table = json.loads(jpath.read_text())
    meta_path = Path(args.figures) / "manifest.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    size = int(meta.get("size", 64))
    flip_pairs = [tuple(p) for p in meta.get("flip_pairs", [[2, 3], [5, 6], [7, 8]])]
    by_stem = {Path(i).stem: i for i in store.items}
    originals = [s for s, r in table.items() if r.get("flip_of") is None and s in by_stem]
    train = [s for s in originals if table[s]["split"] == "train"]
    test = [s for s in originals if table[s]["split"] == "test"]
    if len(train) < 2 or not test:
        raise UserError(f"the store holds {len(train)} train and {len(test)} test figures of {args.figures}; "
                        f"capture {args.figures}/images into the store first")
    if args.train_flips:
        train += [f"{s}_flip" for s in train if f"{s}_flip" in by_stem]
    flips = [f"{s}_flip" for s in test]
    have_flips = all(f in by_stem for f in flips)
    taps = [t.strip() for t in (args.taps or "").split(",") if t.strip()]
    if not taps:
        taps = [t for t in store.taps if t.startswith(("vision.stage", "prompt.")) or t == "depth"]
        taps = [t for t in taps if len(store.tap_shape(t)) in (2, 3)]
    bad = [t for t in taps if t not in store.taps and t not in store.view_names]
    if bad or not taps:
        raise UserError(f"--taps: {bad or 'none'} usable; the store has {store.taps}")

    def joints(stems):
        return (np.array([table[s]["joints"] for s in stems], dtype=np.float32),
                np.array([table[s]["visible"] for s in stems], dtype=bool))

    jtr, vtr = joints(train)
    jte, vte = joints(test)
    results = {}
    for t in taps:
        try:
            xtr = spatial(store.load(t, [by_stem[s] for s in train], dtype="float32"), t)
            xte = spatial(store.load(t, [by_stem[s] for s in test], dtype="float32"), t)
            xfl = spatial(store.load(t, [by_stem[s] for s in flips], dtype="float32"), t) if have_flips else None
        except ValueError as exc:
            raise UserError(str(exc)) from exc
        print(f"fvl heatmap: {t}: features {tuple(xtr.shape[1:])}, {len(train)} train / {len(test)} test")
        r = train_heatmap_probe(xtr, jtr, xte, jte, image_size=size, train_visible=vtr, test_visible=vte,
                                flip_feats=xfl, flip_pairs=flip_pairs, n_deconv=args.n_deconv,
                                channels=args.channels, sigma=args.sigma, epochs=args.epochs,
                                batch_size=args.batch_size, lr=args.lr, shift=not args.no_shift, seed=args.seed,
                                device=str(device), progress=not args.json)
        results[t] = r
        print(f"  PCK@0.05 {r['pck']:.3f} (untrained {r['untrained']['pck']:.3f})"
              + (f", flip test {r['pck_flip']:.3f}" if "pck_flip" in r else "")
              + f", mean error {r['mean_px_error']:.2f} px")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    doc = {"store": str(args.store), "figures": str(args.figures), "image_size": size, "device": str(device),
           "results": results}
    atomic_write_text(out / "heatmap.json", json.dumps(doc, indent=2, default=float))
    save(plot_pck_bars(results), out / "pck.png")
    if args.json:
        print(json.dumps(doc, default=float))
    else:
        print(f"wrote {out / 'heatmap.json'}, {out / 'pck.png'}")
    return 0
