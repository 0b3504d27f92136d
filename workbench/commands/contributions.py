"""`fvl contributions`: exact Shapley values of the fusion streams for VQA, per question type.

Each of the 2^K subsets of streams (K = 4: depth, caption, ocr, grounding) is evaluated with the
absent streams ablated (zero or mean); the vision tower runs once per image. Writes
DIR/contributions.json and DIR/contributions.png (Shapley bars per question type).
"""
from __future__ import annotations

import json


def register(sub) -> None:
    from workbench.commands._common import add_device_args, add_model_args

    p = sub.add_parser("contributions", help="Shapley values of the fusion streams for VQA, per question type")
    add_model_args(p)
    p.add_argument("--data", required=True, help="a `fvl data synth` directory (uses its qa.jsonl)")
    p.add_argument("--split", default="test", help="which split's questions (default test)")
    p.add_argument("--limit", type=int, default=64, help="at most this many questions (default 64)")
    p.add_argument("--types", default=None, help="comma-separated question types (default: all)")
    p.add_argument("--metric", choices=["loglik", "accuracy"], default="loglik",
                   help="teacher-forced answer log-likelihood (default) or greedy exact-match accuracy")
    p.add_argument("--mode", choices=["zero", "mean"], default="zero",
                   help="absent streams: zeros, or their mean over the evaluated images")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=8, help="answer length for --metric accuracy")
    p.add_argument("--template", choices=["plain", "phi3", "llama3"],
                   help="conversation template (default: the model's; `plain` drops the question)")
    p.add_argument("--out", required=True, help="output directory (contributions.json, contributions.png)")
    p.add_argument("--json", action="store_true", help="print the JSON result")
    add_device_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from probes.streams import plot_shapley, stream_shapley
    from workbench.commands._common import UserError, check_output, device_and_dtype, open_model
    from workbench.data.dataset import DatasetError, load_qa

    check_output(args.out)
    device, dtype = device_and_dtype(args)
    if args.limit is not None and args.limit < 1:
        raise UserError("--limit must be at least 1")
    if args.batch_size < 1 or args.max_new_tokens < 1:
        raise UserError("--batch-size and --max-new-tokens must be at least 1")
    types = [t.strip() for t in args.types.split(",")] if args.types else None
    try:
        rows = load_qa(args.data, split=args.split, types=types)
    except (DatasetError, OSError) as exc:
        raise UserError(f"--data {args.data}: {exc}") from exc
    if not rows:
        raise UserError(f"--data {args.data}: no questions in split {args.split!r}"
                        + (f" of types {types}" if types else "") + "; check --split/--types")
    rows = rows[: args.limit]
    missing = sorted({r["image"] for r in rows if not Path(r["image"]).is_file()})
    if missing:
        raise UserError(f"--data {args.data}: {len(missing)} image(s) of the selected questions are missing "
                        f"(e.g. {missing[0]}); restore them (`fvl data check {args.data}` lists every bad image) "
                        "or regenerate the data set with `fvl data synth`")
    model, processor = open_model(args, device=str(device), dtype=dtype)
    model = model.to(device=device, dtype=dtype)
    if processor is None:
        raise UserError("this model has no processor (tokenizers); pass a model directory that holds them")
    if model.config.encoder_type != "florence2" or len(model.stream_names) < 2:
        raise UserError(f"this model fuses {model.stream_names}; stream contributions need several streams "
                        "(a Florence-2 encoder with prompts)")
    result = stream_shapley(model, processor, rows, metric=args.metric, mode=args.mode, batch_size=args.batch_size,
                            max_new_tokens=args.max_new_tokens, template=args.template, progress=not args.json)
    result.update(model=args.model or f"preset:{args.preset or args._default_preset}", data=str(args.data),
                  split=args.split, device=str(device), dtype=str(dtype).replace("torch.", ""))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "contributions.json").write_text(json.dumps(result, indent=2) + "\n")
    plot_shapley(result, out / "contributions.png")
    files = [str(out / "contributions.json"), str(out / "contributions.png")]
    if args.json:
        print(json.dumps(result | {"files": files}))
    else:
        players = result["players"]
        print(f"{result['n_rows']} questions, metric {args.metric}, absent streams = {args.mode}")
        print(f"{'type':<12}{'n':>4}{'full':>9}{'empty':>9}  " + "".join(f"{p:>11}" for p in players))
        for g, r in result["groups"].items():
            print(f"{g:<12}{r['n']:>4}{r['full']:>9.4f}{r['empty']:>9.4f}  "
                  + "".join(f"{r['shapley'][p]:>11.4f}" for p in players))
        print(f"wrote {files[0]} and {files[1]}")
    return 0
