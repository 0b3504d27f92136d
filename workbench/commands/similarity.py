"""`fvl similarity`: how alike are the taps / prompt streams?

* CKA between every pair of taps over all stored items (token maps pooled per item):
  DIR/similarity.json and DIR/cka.png.
* ``--items ID,...`` (stores captured with ``--pool none``): per item, the per-patch cosine
  similarity of every stream to ``--reference`` (DIR/diff_<item>.png) and the PCA-as-RGB maps
  of all streams with one shared PCA (DIR/pca_<item>.png), as in the paper's Fig. 3.
* ``--embed LABEL``: a 2-D UMAP (PCA fallback for few items) of each tap coloured by LABEL
  (DIR/embed_<tap>.png).
"""
from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("similarity", help="CKA between taps, per-prompt difference maps, PCA-RGB maps, UMAP")
    p.add_argument("--store", required=True, help="a feature store written by `fvl capture`")
    p.add_argument("--taps", default=None, help="comma-separated taps or views (default: every tap except llm.*)")
    p.add_argument("--debiased", action="store_true", help="debiased CKA (unbiased HSIC; better for small n)")
    p.add_argument("--items", default=None, help="comma-separated item ids for difference / PCA-RGB maps")
    p.add_argument("--reference", default=None, help="the stream the others are compared with (default: depth, "
                                                     "else the first tap)")
    p.add_argument("--background", choices=["otsu", "zero", "none"], default="otsu",
                   help="PCA-RGB background removal rule (default otsu)")
    p.add_argument("--embed", default=None, metavar="LABEL", help="also embed each tap in 2-D, coloured by LABEL")
    p.add_argument("--method", choices=["umap", "pca"], default="umap", help="2-D embedding method (default umap)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--json", action="store_true", help="print the JSON result")
    p.set_defaults(func=run)


def _split(text: str | None) -> list[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def run(args) -> int:
    import json
    from pathlib import Path

    import numpy as np

    from probes import plots
    from probes.linear import pool_tokens
    from probes.similarity import cka_matrix, difference_maps
    from workbench.cli import UserError
    from workbench.store import FeatureStore, StoreError

    try:
        store = FeatureStore(args.store)
    except (StoreError, OSError) as exc:
        raise UserError(f"--store {args.store}: {exc}") from exc
    taps = _split(args.taps) or [t for t in store.taps if not t.startswith("llm.")]
    bad = [t for t in taps if t not in store.taps and t not in store.view_names]
    if bad:
        raise UserError(f"--taps: {bad} not in the store; it has {store.taps + store.view_names}")
    if len(store.items) < (4 if args.debiased else 2):
        raise UserError(f"--store {args.store}: {len(store.items)} items is too few for CKA")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pooled = {}
    for t in taps:
        x = store.load(t, dtype="float32")
        pooled[t] = pool_tokens(x, "mean") if x.ndim > 2 else x
    names, mat = cka_matrix(pooled, debiased=args.debiased)
    result: dict = {"store": str(args.store), "n": len(store.items), "debiased": args.debiased,
                    "cka": {"labels": names, "matrix": np.round(mat, 6).tolist()}}
    plots.save(plots.plot_cka_matrix(names, mat), out / "cka.png")

    items = _split(args.items)
    if items:
        unknown = [i for i in items if i not in store]
        if unknown:
            raise UserError(f"--items: {unknown} are not stored items (e.g. {store.items[:3]})")
        maps_taps = [t for t in taps if len(store.tap_shape(t)) == 2]
        if len(maps_taps) < 2:
            raise UserError("--items needs at least two token-map taps (N, D); capture with --pool none "
                            f"(tap shapes here: { {t: store.tap_shape(t) for t in taps} })")
        ref = args.reference or ("depth" if "depth" in maps_taps else maps_taps[0])
        if ref not in maps_taps:
            raise UserError(f"--reference {ref}: not one of the token-map taps {maps_taps}")
        from probes.projection import pca_rgb_many

        result["items"] = {}
        for item in items:
            streams = {t: store.load(t, [item], dtype="float32")[0] for t in maps_taps}
            widths = {s.shape[-1] for s in streams.values()}
            try:
                diffs = difference_maps({ref: streams[ref], **{k: v for k, v in streams.items() if k != ref}},
                                        reference=ref) if len(widths) == 1 else {}
            except ValueError as exc:
                raise UserError(f"item {item}: {exc}") from exc
            entry = {"reference": ref, "mean_cosine": {k: float(v.mean()) for k, v in diffs.items()}}
            if diffs:
                plots.save(plots.plot_difference_maps(diffs), out / f"diff_{_safe(item)}.png")
            if len(widths) == 1:
                rgb = pca_rgb_many(streams, background=args.background)
                plots.save(plots.plot_pca_rgb_grid({item: rgb}), out / f"pca_{_safe(item)}.png")
                entry["foreground_fraction"] = {k: float(v.mask.mean()) for k, v in rgb.items()}
            result["items"][item] = entry

    if args.embed:
        labels = store.labels()
        if args.embed not in labels:
            raise UserError(f"--embed {args.embed}: no such label; labels: {sorted(labels)}")
        from probes.projection import embed_2d

        result["embed"] = {}
        for t, x in pooled.items():
            e = embed_2d(x, method=args.method, seed=args.seed)
            plots.save(plots.plot_embedding(e, labels=labels[args.embed], title=f"{t} ({e.method})"),
                       out / f"embed_{_safe(t)}.png")
            result["embed"][t] = {"method": e.method, "reason": e.reason}
    (out / "similarity.json").write_text(json.dumps(result, indent=2))
    if args.json:
        print(json.dumps(result))
    else:
        width = max(len(n) for n in names)
        print("linear CKA" + (" (debiased)" if args.debiased else ""))
        for n, row in zip(names, mat):
            print(f"  {n:<{width}}  " + " ".join(f"{v:5.2f}" for v in row))
        print(f"wrote {out}")
    return 0
