"""`fvl similarity`: how alike are the taps / prompt streams?

* CKA between every pair of taps (token maps pooled per item; a random sample of --max-rows items when
  the store holds more, said in the output): DIR/similarity.json and DIR/cka.png.
* ``--items ID,...`` (stores captured with ``--pool none``): per item, the per-patch cosine similarity of
  every stream to ``--reference`` (DIR/diff_<item>.png) and the PCA-as-RGB maps of all streams with one
  shared PCA (DIR/pca_<item>.png), as in the paper's Fig. 3.
* ``--embed LABEL``: a 2-D UMAP (PCA fallback for few items) of each tap coloured by LABEL
  (DIR/embed_<tap>.png).

The work is `workbench.pipelines.similarity.similarity_over_store`; this module parses, calls it, prints.
"""
from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("similarity", help="CKA between taps, per-prompt difference maps, PCA-RGB maps, UMAP")
    p.add_argument("--store", required=True, help="a feature store written by `fvl capture`")
    p.add_argument("--taps", default=None,
                   help="comma-separated taps, views or globs (default: every tap except llm.*)")
    p.add_argument("--debiased", action="store_true", help="debiased CKA (unbiased HSIC; better for small n)")
    p.add_argument("--items", default=None, help="comma-separated item ids for difference / PCA-RGB maps")
    p.add_argument("--reference", default=None, help="the stream the others are compared with (default: depth, "
                                                     "else the first tap)")
    p.add_argument("--background", choices=["otsu", "zero", "none"], default="otsu",
                   help="PCA-RGB background removal rule (default otsu)")
    p.add_argument("--embed", default=None, metavar="LABEL", help="also embed each tap in 2-D, coloured by LABEL")
    p.add_argument("--method", choices=["umap", "pca"], default="umap", help="2-D embedding method (default umap)")
    p.add_argument("--max-rows", type=int, default=5000,
                   help="CKA and embeddings on a random sample of this many items when there are more (default 5000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--json", action="store_true", help="print the JSON result")
    p.set_defaults(func=run)


def run(args) -> int:
    import json
    import sys

    from workbench.commands._common import UserError, check_output
    from workbench.store import FeatureStore, StoreError

    if args.max_rows < 4:
        raise UserError(f"--max-rows {args.max_rows}: give at least 4")
    out = check_output(args.out)
    try:
        store = FeatureStore(args.store)
    except (StoreError, OSError) as exc:
        raise UserError(f"--store {args.store}: {exc}") from exc

    from workbench.data.files import atomic_write_json
    from workbench.pipelines.probing import ProbeSetupError
    from workbench.pipelines.similarity import similarity_over_store

    try:
        result = similarity_over_store(store, out, taps=args.taps, debiased=args.debiased, items=args.items,
                                       reference=args.reference, background=args.background, embed=args.embed,
                                       method=args.method, seed=args.seed, max_rows=args.max_rows)
        atomic_write_json(out / "similarity.json", result)
    except (ProbeSetupError, StoreError) as exc:
        raise UserError(str(exc)) from exc
    except OSError as exc:
        raise UserError(f"--out {args.out}: cannot write ({exc.strerror or exc}); choose a writable directory") from exc
    for w in result["warnings"]:
        print(f"fvl similarity: warning: {w}", file=sys.stderr)
    if args.json:
        print(json.dumps(result))
        return 0
    cka = result["cka"]
    names = cka["labels"]
    width = max(len(n) for n in names)
    rows = f" on a random sample of {cka['rows']} of {cka['of']} items (seed {cka['seed']})" if cka["sampled"] else ""
    print("linear CKA" + (" (debiased)" if args.debiased else "") + rows)
    for n, row in zip(names, cka["matrix"]):
        print(f"  {n:<{width}}  " + " ".join(f"{v:5.2f}" for v in row))
    print(f"wrote {out}")
    return 0
