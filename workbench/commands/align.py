"""`fvl align`: the paper's vision-language alignment loss per stream and per encoder (Figs. 4-5).

Reads mean-pooled vision features from one or more feature stores (one per encoder / model, captured
over the same data), the captions of the same items from the data, computes text features (the last
hidden layer of `--text-model`, any transformers causal LM or text encoder, mean-pooled over the caption
tokens as the paper does with Llama-3-8B-Instruct; or the Florence-VL model's own LLM; or the packaged
MiniLM), trains a projection per feature set on the same pairs and split, and writes DIR/alignment.json
(with a held-out loss per store) and DIR/alignment.png. The work is `workbench.pipelines.aligning`.
"""
from __future__ import annotations

import json


def register(sub) -> None:
    from workbench.commands._common import add_device_args, add_model_args
    from workbench.data.dataset import add_image_folder_option

    p = sub.add_parser("align", help="vision-language alignment loss per stream / encoder (paper Figs. 4-5)")
    p.add_argument("--store", action="append", required=True, metavar="[NAME=]DIR",
                   help="a feature store (repeat for several encoders over the same data; NAME= labels it)")
    p.add_argument("--data", required=True, help="the data the stores were captured from (captions)")
    add_image_folder_option(p)
    p.add_argument("--text-model", default=None, metavar="DIR|HUB_ID",
                   help="text side: the last hidden layer of this transformers model (a causal LM such as "
                        "meta-llama/Meta-Llama-3-8B-Instruct, or a text encoder), mean-pooled over the caption")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow --text-model to run code shipped with its checkpoint (off by default)")
    p.add_argument("--text", choices=["llm", "minilm"], default="llm",
                   help="without --text-model: the Florence-VL model's LLM (default) or the packaged MiniLM")
    add_model_args(p, default_preset=None)
    add_device_args(p)  # where the text model (or the Florence-VL LLM) runs, in which dtype
    p.add_argument("--taps", default=None,
                   help="comma-separated taps/views to compare (default: the fusion streams: fusion.input[*] "
                        "views, else depth + prompt.*, else vision.output or the last vision.layer)")
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
    p.add_argument("--force", action="store_true",
                   help="pair stores with a --data they were not captured from anyway (recorded in the output)")
    p.set_defaults(func=run)


def _florence_llm(args, manifest: dict):
    """The Florence-VL model whose LLM gives the text side: --model/--preset, else the store's model."""
    from pathlib import Path

    from workbench.commands._common import UserError, open_model

    def opened():
        model, processor = open_model(args, device=str(args.device), dtype=args.dtype)
        return model.to(device=args.device, dtype=args.dtype), processor

    if args.model or args.preset:
        return opened()
    model_id = str(manifest.get("model_id") or "")
    if model_id.startswith("preset:"):
        args.preset = model_id.split(":", 1)[1]
        return opened()
    if model_id and Path(model_id).is_dir():
        args.model = model_id
        return opened()
    raise UserError("--text llm needs a model: pass --text-model DIR|HUB_ID, --model DIR or --preset NAME (the "
                    "store does not name a model directory that exists here)")


def _text_side(args, manifest: dict):
    """texts -> (features, description), as the options ask."""
    from workbench.commands._common import UserError

    def text(texts):
        from probes.alignment import TextModelUnavailable, text_features
        from workbench.pipelines.aligning import text_model_features

        try:
            if args.text_model:
                return text_model_features(texts, args.text_model, device=args.device, dtype=args.dtype,
                                           trust_remote_code=args.trust_remote_code,
                                           progress=not args.json), f"model:{args.text_model}"
            if args.text == "minilm":
                return text_features(texts, "minilm", progress=not args.json), "minilm"
        except TextModelUnavailable as exc:
            raise UserError(f"--text-model {args.text_model}: {exc}" if args.text_model else f"--text minilm: {exc}") \
                from exc
        model, processor = _florence_llm(args, manifest)
        if processor is None:
            raise UserError("the text model has no tokenizer; pass a model directory that holds its processor")
        return text_features(texts, model, processor=processor, progress=not args.json), \
            f"llm:{args.model or 'preset:' + str(args.preset)}"

    return text


def _check_stores_data(args, stores: dict) -> dict[str, list[str]]:
    """Refuse a store that was not captured from --data (unless --force); returns what --force let through."""
    from workbench.commands._common import UserError
    from workbench.data.dataset import open_dataset
    from workbench.store import StoreMismatchError

    dataset = open_dataset(args.data, image_folder=args.image_folder, check_images=False)
    forced = {}
    for name, store in stores.items():
        try:
            problems = store.check_against(dataset=dataset, force=args.force)
        except StoreMismatchError as exc:
            raise UserError(f"--store {name}: {exc}") from exc
        if problems:
            forced[name] = problems
    return forced


def run(args) -> int:
    from workbench.commands._common import UserError, check_output, device_and_dtype
    from workbench.store import FeatureStore, StoreError

    if args.steps < 1 or args.batch_size < 2:
        raise UserError("--steps must be >= 1 and --batch-size >= 2")
    if not 0 < args.held_out < 1:
        raise UserError(f"--held-out {args.held_out}: give a fraction between 0 and 1")
    out = check_output(args.out)
    args.device, args.dtype = device_and_dtype(args)  # resolved once: the text side reads them from here

    from workbench.pipelines.aligning import (align_stores, parse_store_spec, read_captions,
                                              write_alignment_outputs)
    from workbench.pipelines.probing import ProbeSetupError

    stores = {}
    for spec in args.store:
        name, path = parse_store_spec(spec)
        if name in stores:
            raise UserError(f"--store {spec}: the name {name!r} is used twice; label stores as NAME=DIR")
        try:
            stores[name] = FeatureStore(path)
        except (StoreError, OSError, ValueError) as exc:
            raise UserError(f"--store {spec}: {exc}") from exc
    try:
        captions = read_captions(args.data, args.caption, args.image_folder)
    except (OSError, ValueError) as exc:
        raise UserError(f"--data {args.data}: {exc}") from exc
    forced = _check_stores_data(args, stores)
    kw = dict(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed, held_out=args.held_out,
              temperature=args.temperature, projection=args.projection, standardize=not args.no_standardize)
    try:
        report = align_stores(stores, captions, _text_side(args, next(iter(stores.values())).manifest),
                              taps=args.taps, leave_one_out=not args.no_leave_one_out, control=args.control,
                              progress=not args.json, **kw)
        report["caption"] = args.caption
        report["device"], report["dtype"] = str(args.device), str(args.dtype).replace("torch.", "")
        if forced:
            report["forced_store_mismatch"] = forced
        files = write_alignment_outputs(report, out)
    except (ProbeSetupError, StoreError, KeyError) as exc:
        raise UserError(str(exc)) from exc
    except OSError as exc:
        raise UserError(f"--out {args.out}: cannot write ({exc.strerror or exc}); choose a writable directory") from exc
    if args.json:
        print(json.dumps({k: v for k, v in report.items() if k != "results"} | {"files": [str(f) for f in files]}))
        return 0
    print(f"{report['n_items']} pairs ({report['n_train']} train, {report['n_eval']} held out), batch "
          f"{report['batch_size']}, chance ln {report['batch_size']} = {report['chance']:.4f}; text: {report['text']}")
    for name, summ in report["summary"].items():
        print(f"{name}: " + ", ".join(f"{k} {v:.4f}" for k, v in summ.items()))
    print(f"wrote {files[0]} and {files[1]}")
    return 0
