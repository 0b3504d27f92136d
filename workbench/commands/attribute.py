"""`fvl attribute`: which pixels and which fusion streams an answer rests on (captum).

Writes DIR/attribution.json (stream shares, completeness deltas, top pixels) and DIR/attribution.png
(the image, the pixel attribution overlay, the stream shares and each stream's per-token map).
"""
from __future__ import annotations

import json


def register(sub) -> None:
    from workbench.commands._common import add_device_args, add_model_args

    p = sub.add_parser("attribute", help="attribute an answer to pixels (IG / occlusion) and to fusion streams")
    add_model_args(p)
    p.add_argument("--image", required=True, help="image file, or packaged:NAME for an image shipped in a pip package")
    p.add_argument("--question", help="the question asked about the image")
    p.add_argument("--answer", help="the answer whose score is attributed")
    p.add_argument("--probe", metavar="LABEL", default=None,
                   help="attribute a linear probe's logit for this label instead of an answer (needs --store, --tap)")
    p.add_argument("--probe-file", default=None, metavar="DIR",
                   help="attribute a probe saved by `fvl probe --save-probes` (OUT/probes/TAP/LABEL) as it is")
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
    add_device_args(p)
    p.add_argument("--json", action="store_true", help="print the JSON result")
    p.add_argument("--force", action="store_true",
                   help="use a --store captured from other weights anyway (recorded in the output)")
    p.set_defaults(func=run)


def run(args) -> int:
    from workbench.commands._common import UserError, check_output, device_and_dtype, model_id, open_model
    from workbench.data.images import ImageError, load_image, packaged_image

    if args.probe and not args.probe_file and not (args.store and args.tap):
        raise UserError("--probe LABEL needs --store STORE (to fit the probe) and --tap TAP (what it reads), "
                        "or --probe-file DIR (a probe saved by `fvl probe --save-probes`)")
    if not (args.probe or args.probe_file) and not (args.question and args.answer):
        raise UserError("pass --question and --answer (or --probe LABEL --store STORE --tap TAP, "
                        "or --probe-file DIR)")
    if args.steps < 2 or args.stream_steps < 2:
        raise UserError("--steps and --stream-steps must be at least 2")
    if args.batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    out = check_output(args.out)
    if args.float64 and args.dtype != "auto":
        raise UserError(f"--float64 and --dtype {args.dtype} ask for two dtypes; pass one of them")
    device, dtype = device_and_dtype(args)
    try:
        image = packaged_image(args.image.split(":", 1)[1]) if args.image.startswith("packaged:") else load_image(args.image)
    except (ImageError, KeyError, FileNotFoundError) as exc:
        raise UserError(f"--image {args.image}: {exc}") from exc
    probe = _probe_target(args) if args.probe or args.probe_file else None
    import torch

    model, processor = open_model(args, device=str(device), dtype=dtype)
    if processor is None:
        raise UserError("this model has no processor (tokenizers); pass a model directory that holds them")
    forced = _check_store_model(args, probe, model)
    model = model.to(device=device, dtype=torch.float64 if args.float64 else dtype)

    from probes.attribution import AttributionError
    from workbench.pipelines.attributing import attribute_image, write_attribution_outputs
    from workbench.store import StoreError

    try:
        result = attribute_image(model, processor, image, question=args.question, answer=args.answer, probe=probe,
                                 method=args.method, steps=args.steps, stream_steps=args.stream_steps,
                                 score=args.score, baseline=args.baseline, stream_baseline=args.stream_baseline,
                                 template=args.template, batch_size=args.batch_size, window=args.window,
                                 stride=args.stride, streams=not args.no_streams, top=args.top)
    except (AttributionError, StoreError) as exc:
        raise UserError(str(exc)) from exc
    result = {"image": args.image, "model": model_id(args), "device": str(device), **result}
    if forced:
        result["forced_store_mismatch"] = forced
    try:
        files = write_attribution_outputs(result, out, has_global=not model.config.drop_global_token)
    except OSError as exc:
        raise UserError(f"--out {args.out}: cannot write ({exc.strerror or exc}); choose a writable directory") from exc
    pixels, streams = result.pop("_objects")
    result["files"] = [str(f) for f in files]
    if args.json:
        print(json.dumps(result))
        return 0
    t = pixels.target
    what = f"{t['score']} of {t['first_token']!r} (answer {args.answer!r})" if t["kind"] == "answer" else \
        f"probe logit for {t['label']} = {t['class']!r} on {t['tap']}"
    print(f"target: {what}; F(x)={pixels.output:.4f}, F(baseline)={pixels.baseline_output:.4f}")
    if pixels.delta is not None:
        print(f"pixels ({args.method}): completeness delta {pixels.delta:.3g} ({pixels.relative_delta:.2%})")
    if streams is not None:
        shares = ", ".join(f"{k} {v:.1%}" for k, v in streams.shares.items())
        print(f"stream shares: {shares}; delta {streams.delta:.3g} ({streams.relative_delta:.2%})")
    for w in result["warnings"]:
        print(f"warning: {w}")
    print(f"wrote {files[0]} and {files[1]}")
    return 0


def _check_store_model(args, probe, model) -> list[str]:
    """Refuse a probe store captured from other weights than --model/--preset (unless --force)."""
    from workbench.commands._common import UserError
    from workbench.store import StoreMismatchError, model_fingerprint

    if probe is None or probe.store is None:   # no probe, or a saved probe (--probe-file): no store to check
        return []
    try:
        return probe.store.check_against(model_fingerprint=model_fingerprint(model, getattr(args, "model", None)),
                                         force=args.force)
    except StoreMismatchError as exc:
        raise UserError(f"--store {args.store}: {exc}") from exc


def _probe_target(args):
    """--probe-file DIR, or --probe LABEL --store STORE --tap TAP [--probe-class C], as a pipeline ProbeTarget
    (the probe or store opened here, so a bad one is refused before the model loads)."""
    from workbench.commands._common import UserError
    from workbench.pipelines.attributing import ProbeTarget
    from workbench.store import FeatureStore, StoreError

    if args.probe_file:
        from probes.estimator import LinearProbe

        try:
            fitted = LinearProbe.load(args.probe_file)
        except (ValueError, OSError, KeyError) as exc:
            raise UserError(f"--probe-file {args.probe_file}: {exc}") from exc
        about = fitted.about
        tap, label = args.tap or about.get("tap"), args.probe or about.get("label", "probe")
        if not tap:
            raise UserError(f"--probe-file {args.probe_file}: the probe does not say which tap it reads; pass --tap")
        return ProbeTarget(None, tap, label, args.probe_class, fitted=fitted, pool=about.get("pool", "mean"))

    try:
        store = FeatureStore(args.store)
    except (StoreError, OSError, ValueError) as exc:
        raise UserError(f"--store {args.store}: {exc}") from exc
    if args.tap not in store.taps:
        raise UserError(f"--tap {args.tap}: not in {args.store}; it has {store.taps}")
    if args.probe not in store.label_names():
        raise UserError(f"--probe {args.probe}: no such label in {args.store}; it has {store.label_names()}")
    return ProbeTarget(store, args.tap, args.probe, args.probe_class)
