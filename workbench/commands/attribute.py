"""`fvl attribute`: which pixels and which fusion streams an answer rests on (captum).

Writes DIR/attribution.json (stream shares, completeness deltas, top pixels) and DIR/attribution.png
(the image, the pixel attribution overlay, the stream shares and each stream's per-token map).
"""
from __future__ import annotations

import json


def register(sub) -> None:
    from workbench.commands._common import add_model_args

    p = sub.add_parser("attribute", help="attribute an answer to pixels (IG / occlusion) and to fusion streams")
    add_model_args(p)
    p.add_argument("--image", required=True, help="image file, or packaged:NAME for an image shipped in a pip package")
    p.add_argument("--question", help="the question asked about the image")
    p.add_argument("--answer", help="the answer whose score is attributed")
    p.add_argument("--probe", metavar="LABEL", default=None,
                   help="attribute a linear probe's logit for this label instead of an answer (needs --store, --tap)")
    p.add_argument("--store", default=None, help="feature store (mean/global pooled) the probe is fitted on")
    p.add_argument("--tap", default=None, help="the tap the probe reads, e.g. prompt.ocr")
    p.add_argument("--probe-class", default=None, help="class whose logit to attribute (default: the prediction)")
    p.add_argument("--out", required=True, help="output directory (attribution.json, attribution.png)")
    p.add_argument("--method", choices=["ig", "occlusion"], default="ig", help="pixel attribution method")
    p.add_argument("--steps", type=int, default=32, help="integration steps for pixel IG (default 32)")
    p.add_argument("--stream-steps", type=int, default=64,
                   help="integration steps for the stream shares (fusion + LLM only, so cheaper; default 64)")
    p.add_argument("--score", choices=["logit", "logprob"], default="logit",
                   help="logit of the answer's first token (default) or log-likelihood of the whole answer")
    p.add_argument("--baseline", choices=["black", "mean"], default="black",
                   help="pixel baseline: a black image (default) or the mean colour (zeros after normalisation)")
    p.add_argument("--stream-baseline", choices=["zero", "mean", "image"], default="zero",
                   help="streams integrate from zeros (as ablate mode zero), their token mean, or the baseline image")
    p.add_argument("--template", choices=["plain", "phi3", "llama3"],
                   help="conversation template (default: the model's; `plain` drops the question)")
    p.add_argument("--window", type=int, default=None, help="occlusion patch side in pixels (default image/8)")
    p.add_argument("--stride", type=int, default=None, help="occlusion stride (default window/2)")
    p.add_argument("--batch-size", type=int, default=8, help="images per forward inside captum (internal_batch_size)")
    p.add_argument("--top", type=int, default=10, help="how many top pixels to report")
    p.add_argument("--no-streams", action="store_true", help="skip the stream shares")
    p.add_argument("--float64", action="store_true", help="run in float64 (tighter completeness, slower)")
    p.add_argument("--json", action="store_true", help="print the JSON result")
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from probes.attribution import (AnswerScore, AttributionError, pixel_attribution, plot_attribution,
                                    stream_attribution)
    from workbench.cli import UserError
    from workbench.commands._common import open_model
    from workbench.data.images import ImageError, load_image, packaged_image

    if args.probe:
        if not (args.store and args.tap):
            raise UserError("--probe LABEL needs --store STORE (to fit the probe) and --tap TAP (what it reads)")
    elif not (args.question and args.answer):
        raise UserError("pass --question and --answer (or --probe LABEL --store STORE --tap TAP)")
    if args.steps < 2 or args.stream_steps < 2:
        raise UserError("--steps and --stream-steps must be at least 2")
    if args.batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    try:
        image = packaged_image(args.image.split(":", 1)[1]) if args.image.startswith("packaged:") else load_image(args.image)
    except (ImageError, KeyError, FileNotFoundError) as exc:
        raise UserError(f"--image {args.image}: {exc}") from exc
    model, processor = open_model(args)
    if processor is None:
        raise UserError("this model has no processor (tokenizers); pass a model directory that holds them")
    if args.float64:
        model = model.double()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    px = processor.images([image])
    try:
        target = _probe_target(args, model, px) if args.probe else \
            AnswerScore(model, processor, args.question, args.answer, score=args.score, template=args.template)
        pixels = pixel_attribution(model, px, target, method=args.method, steps=args.steps, baseline=args.baseline,
                                   internal_batch_size=args.batch_size, window=args.window, stride=args.stride,
                                   orig_size=tuple(image.size))
        streams = None
        if not args.no_streams and not args.probe and model.config.encoder_type == "florence2" \
                and model.config.fusion != "average":
            streams = stream_attribution(model, px, target, steps=args.stream_steps, baseline=args.stream_baseline,
                                         pixel_baseline=args.baseline, internal_batch_size=args.batch_size)
    except AttributionError as exc:
        raise UserError(str(exc)) from exc
    result = {"image": args.image, "model": args.model or f"preset:{args.preset or args._default_preset}",
              "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
              "pixels": pixels.to_dict(top_k=args.top), "streams": streams.to_dict() if streams else None}
    warnings = []
    for name, res in (("pixels", pixels), ("streams", streams)):
        rel = res.relative_delta if res is not None else None
        if rel is not None and rel > 0.05:
            warnings.append(f"{name}: completeness delta is {rel:.1%} of F(x)-F(baseline); raise "
                            f"--{'steps' if name == 'pixels' else 'stream-steps'} (or use --float64)")
    result["warnings"] = warnings
    (out / "attribution.json").write_text(json.dumps(result, indent=2) + "\n")
    plot_attribution(pixels, streams, out / "attribution.png", has_global=not model.config.drop_global_token)
    result["files"] = [str(out / "attribution.json"), str(out / "attribution.png")]
    if args.json:
        print(json.dumps(result))
    else:
        t = pixels.target
        what = f"{t['score']} of {t['first_token']!r} (answer {args.answer!r})" if t["kind"] == "answer" else \
            f"probe logit for {t['label']} = {t['class']!r} on {t['tap']}"
        print(f"target: {what}; F(x)={pixels.output:.4f}, F(baseline)={pixels.baseline_output:.4f}")
        if pixels.delta is not None:
            print(f"pixels ({args.method}): completeness delta {pixels.delta:.3g} ({pixels.relative_delta:.2%})")
        if streams is not None:
            shares = ", ".join(f"{k} {v:.1%}" for k, v in streams.shares.items())
            print(f"stream shares: {shares}; delta {streams.delta:.3g} ({streams.relative_delta:.2%})")
        for w in warnings:
            print(f"warning: {w}")
        print(f"wrote {out / 'attribution.json'} and {out / 'attribution.png'}")
    return 0


def _probe_target(args, model, px):
    """A ProbeScore for --probe LABEL: a logistic probe fitted on --store's --tap, for --probe-class
    (default: the class the probe predicts for this image)."""
    import torch

    from probes.attribution import AttributionError, ProbeScore, probe_from_store
    from workbench.cli import UserError
    from workbench.store import FeatureStore, StoreError

    try:
        store = FeatureStore(args.store)
    except (StoreError, OSError, ValueError) as exc:
        raise UserError(f"--store {args.store}: {exc}") from exc
    probe, classes = probe_from_store(store, args.tap, args.probe)
    pool = store.manifest.get("pool", "mean")
    binary = len(classes) == 2
    score = ProbeScore(model, args.tap, probe, class_index=None if binary else 0, pool=pool)
    try:
        with torch.no_grad():
            logits = score.logits(px)[0].reshape(-1)
    except RuntimeError as exc:  # e.g. a store of another model: the widths differ
        raise UserError(f"--store {args.store}: its {args.tap} features do not fit this model's ({exc}); "
                        "attribute with the model that captured the store") from exc
    if args.probe_class is None:
        pick = int(logits[0] > 0) if binary else int(logits.argmax())
    elif args.probe_class in classes:
        pick = classes.index(args.probe_class)
    else:
        raise AttributionError(f"--probe-class {args.probe_class!r} is not a class of {args.probe}: {classes}")
    if binary and pick == 0:  # one logit for classes[1]: attribute its negation for classes[0]
        score = ProbeScore(model, args.tap, lambda x: -probe(x), class_index=None, pool=pool)
    elif not binary:
        score.class_index = pick
    score.description = {"label": args.probe, "class": classes[pick], "classes": classes}
    return score

