"""`fvl align`: the paper's vision-language alignment loss per stream and per encoder (Figs. 4-5).

Reads mean-pooled vision features from one or more feature stores (one per encoder / model), the
captions of the same items from the data directory, computes text features with a language model
(the Florence-VL model's own LLM, or the packaged MiniLM sentence model), trains a projection per
feature set and writes DIR/alignment.json and DIR/alignment.png.
"""
from __future__ import annotations

import json


def register(sub) -> None:
    from workbench.commands._common import add_model_args

    p = sub.add_parser("align", help="vision-language alignment loss per stream / encoder (paper Figs. 4-5)")
    p.add_argument("--store", action="append", required=True, metavar="[NAME=]DIR",
                   help="a feature store (repeat for several encoders; NAME= labels it)")
    p.add_argument("--data", required=True, help="the data directory the stores were captured from (captions)")
    p.add_argument("--text", choices=["llm", "minilm"], default="llm",
                   help="text side: the model's LLM (default) or the packaged MiniLM sentence model")
    add_model_args(p, default_preset=None)
    p.add_argument("--taps", default=None,
                   help="comma-separated taps/views to compare (default: the fusion streams: fusion.input[*] "
                        "views, else depth + prompt.*)")
    p.add_argument("--caption", choices=["detailed", "short"], default="detailed", help="which caption is the text")
    p.add_argument("--steps", type=int, default=300, help="training steps of the projection (default 300)")
    p.add_argument("--batch-size", type=int, default=32, help="pairs per batch; chance = ln(batch) (default 32)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--held-out", type=float, default=0.2, help="fraction of pairs held out for the loss (default 0.2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=None, help="divide logits by T (the paper uses none)")
    p.add_argument("--projection", choices=["linear", "mlp"], default="linear")
    p.add_argument("--no-standardize", action="store_true", help="feed raw vision features (no z-scoring)")
    p.add_argument("--no-leave-one-out", action="store_true", help="skip the leave-one-stream-out runs")
    p.add_argument("--control", action="store_true", help="also run all streams on shuffled pairs (a floor)")
    p.add_argument("--out", required=True, help="output directory (alignment.json, alignment.png)")
    p.add_argument("--json", action="store_true", help="print the JSON result")
    p.set_defaults(func=run)


def _parse_store(spec: str) -> tuple[str, str]:
    from pathlib import Path

    if "=" in spec and not Path(spec).exists():
        name, path = spec.split("=", 1)
        return name, path
    return Path(spec).name or spec, spec


def read_captions(data: str, kind: str = "detailed") -> dict[str, str]:
    """item id -> caption: synthetic dirs (scenes.jsonl) or LLaVA files (first answer per image)."""
    from pathlib import Path

    from workbench.data.dataset import load_scenes, open_dataset
    from workbench.data.llava import read_llava

    dataset = open_dataset(data)
    if dataset.kind == "synthetic":
        key = "detailed_caption" if kind == "detailed" else "caption"
        return {r["id"]: r[key] for r in load_scenes(data)}
    if dataset.kind == "llava":
        by_image: dict[Path, str] = {}
        for s in read_llava(Path(data), check_images=False):
            answer = next((t["value"] for t in s.conversations if t.get("from") == "gpt"), None)
            if s.image_path is not None and answer and s.image_path not in by_image:
                by_image[s.image_path] = answer
        return {it.id: by_image[it.image_path] for it in dataset if it.image_path in by_image}
    raise ValueError(f"{data} is an image folder without captions; pass a `fvl data synth` directory or a LLaVA file")


def stream_taps(store, taps: str | None) -> dict[str, str]:
    """display name -> tap/view to load from the store."""
    if taps:
        names = [t.strip() for t in taps.split(",") if t.strip()]
        missing = [t for t in names if t not in store.taps and t not in store.view_names]
        if missing:
            raise ValueError(f"{store.path} has no taps {missing}; it has {store.taps + store.view_names}")
        return {t: t for t in names}
    if "fusion.input" in store.views:
        return {v: f"fusion.input[{v}]" for v in store.views["fusion.input"]}
    if "depth" in store.taps:
        order = (store.manifest.get("model") or {}).get("streams") or []
        prompts = [n for n in order if f"prompt.{n}" in store.taps] or \
                  [t.split(".", 1)[1] for t in store.taps if t.count(".") == 1 and t.startswith("prompt.")]
        return {"depth": "depth", **{n: f"prompt.{n}" for n in prompts}}
    raise ValueError(f"{store.path} holds none of fusion.input, depth, prompt.*; pass --taps with the taps to compare "
                     f"(it has {store.taps})")


def _text_model(args, manifest: dict):
    """The Florence-VL model whose LLM gives the text side: --model/--preset, else the store's model."""
    from pathlib import Path

    from workbench.cli import UserError
    from workbench.commands._common import open_model

    if args.model or args.preset:
        return open_model(args)
    model_id = str(manifest.get("model_id") or "")
    if model_id.startswith("preset:"):
        args.preset = model_id.split(":", 1)[1]
        return open_model(args)
    if model_id and Path(model_id).is_dir():
        args.model = model_id
        return open_model(args)
    raise UserError("--text llm needs a model: pass --model DIR or --preset NAME (the store does not name a "
                    "model directory that exists here)")


def run(args) -> int:
    from pathlib import Path

    import numpy as np

    from probes.alignment import (TextModelUnavailable, alignment_by_stream, flatten, mean_pool, plot_alignment,
                                  summary, text_features)
    from workbench.cli import UserError
    from workbench.store import FeatureStore, StoreError

    if args.steps < 1 or args.batch_size < 2:
        raise UserError("--steps must be >= 1 and --batch-size >= 2")
    if not 0 < args.held_out < 1:
        raise UserError(f"--held-out {args.held_out}: give a fraction between 0 and 1")
    stores = {}
    for spec in args.store:
        name, path = _parse_store(spec)
        if name in stores:
            raise UserError(f"--store {spec}: the name {name!r} is used twice; label stores as NAME=DIR")
        try:
            stores[name] = FeatureStore(path)
        except (StoreError, OSError, ValueError) as exc:
            raise UserError(f"--store {spec}: {exc}") from exc
    try:
        captions = read_captions(args.data, args.caption)
    except (OSError, ValueError) as exc:
        raise UserError(f"--data {args.data}: {exc}") from exc
    items = sorted(set.intersection(*(set(s.items) for s in stores.values())) & set(captions))
    if len(items) < 8:
        raise UserError(f"only {len(items)} items are in every store and have a caption in {args.data}; the loss "
                        "needs at least 8 (capture the stores from this data directory, with more items)")
    texts = [captions[i] for i in items]
    try:
        if args.text == "minilm":
            text = text_features(texts, "minilm", progress=not args.json)
            text_source = "minilm"
        else:
            model, processor = _text_model(args, next(iter(stores.values())).manifest)
            if processor is None:
                raise UserError("the text model has no tokenizer; pass a model directory that holds its processor")
            text = text_features(texts, model, processor=processor, progress=not args.json)
            text_source = f"llm:{args.model or 'preset:' + str(args.preset)}"
            del model
    except TextModelUnavailable as exc:
        raise UserError(f"--text minilm: {exc}") from exc
    kw = dict(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed, held_out=args.held_out,
              temperature=args.temperature, projection=args.projection, standardize=not args.no_standardize)
    results, summaries, curves = {}, {}, {}
    for name, store in stores.items():
        try:
            taps = stream_taps(store, args.taps)
            # only unpooled token maps carry the global token first; grid-pooled maps are patches only
            has_global = store.manifest.get("pool") == "none" and \
                not (store.manifest.get("model") or {}).get("drop_global_token", False)
            feats = {k: mean_pool(store.load(t, items, dtype="float32"), has_global) for k, t in taps.items()}
        except (ValueError, KeyError) as exc:
            raise UserError(f"--store {name}: {exc}") from exc
        bad = [k for k, v in feats.items() if not np.isfinite(v).all()]
        if bad:
            raise UserError(f"--store {name}: taps {bad} hold NaN/inf (float16 overflow?); recapture as float32")
        try:
            res = alignment_by_stream(feats, text, leave_one_out=not args.no_leave_one_out, control=args.control,
                                      single=len(feats) > 1, **kw)
        except ValueError as exc:
            raise UserError(f"--store {name}: {exc}") from exc
        res["taps"] = taps
        results[name] = res
        summaries[name] = summary(res)
        for label, curve in flatten(res).items():
            curves[label if len(stores) == 1 else f"{name}:{label}"] = curve
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    first = next(iter(results.values()))["all"]
    report = {"text": text_source, "caption": args.caption, "n_items": len(items), "n_train": first["n_train"],
              "n_eval": first["n_eval"], "batch_size": first["batch_size"], "chance": first["chance"],
              "settings": {k: v for k, v in kw.items() if k != "held_out"} | {"held_out": args.held_out},
              "summary": summaries, "results": results}
    (out / "alignment.json").write_text(json.dumps(report) + "\n")
    plot_alignment(curves, out / "alignment.png",
                   title=f"alignment loss vs {text_source} text ({len(items)} pairs, batch {first['batch_size']})")
    if args.json:
        print(json.dumps({k: v for k, v in report.items() if k != "results"}
                         | {"files": [str(out / "alignment.json"), str(out / "alignment.png")]}))
    else:
        print(f"{len(items)} pairs ({first['n_train']} train, {first['n_eval']} held out), batch {first['batch_size']}, "
              f"chance ln {first['batch_size']} = {first['chance']:.4f}")
        for name, summ in summaries.items():
            print(f"{name}: " + ", ".join(f"{k} {v:.4f}" for k, v in summ.items()))
        print(f"wrote {out / 'alignment.json'} and {out / 'alignment.png'}")
    return 0
