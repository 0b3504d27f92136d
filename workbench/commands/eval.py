"""`fvl eval`: score a checkpoint.

    fvl eval vqa --model runs/recipe/finetune/model --data runs/recipe/data --json
    fvl eval vqa --model runs/s2/checkpoint-150 --data DATA --split val --predictions preds.jsonl
    fvl eval florence2 --model runs/recipe/florence2/model --data runs/recipe/data --json

`vqa` answers the synthetic QA greedily and scores exact match (after normalisation) per type
(count, color, shape, position, reading, existence) and overall, beside each type's chance level.
`florence2` scores a native Florence-2 (a `florence2/` folder, or a model directory holding one):
OCR exact match, caption token F1 and region box recall at IoU 0.5.
Both run on `--device auto|cpu|cuda|cuda:N` in `--dtype auto|float32|bfloat16|float16`.
"""
from __future__ import annotations

import argparse


def _add_device_args(p: argparse.ArgumentParser) -> None:
    from workbench.commands._common import add_device_args

    add_device_args(p)


def _device_and_dtype(args):
    """(torch device, torch dtype) of --device / --dtype, refused by name when unusable here."""
    from model.device import check_device_text, check_dtype_text, resolve_device, resolve_dtype
    from workbench.commands._common import UserError

    try:
        check_device_text(args.device)
        check_dtype_text(args.dtype)
        device = resolve_device(args.device)
        return device, resolve_dtype(args.dtype, device)
    except ValueError as exc:
        raise UserError(str(exc)) from None


def _check_counts(args, names: tuple[str, ...]) -> None:
    from workbench.commands._common import UserError

    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')} {value}: must be at least 1")


def register(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a checkpoint: VQA accuracy per type, Florence-2 task metrics",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    esub = p.add_subparsers(dest="eval_command", metavar="TASK")
    v = esub.add_parser("vqa", help="exact-match VQA per question type on a synthetic dataset")
    from workbench.commands._common import add_model_args

    add_model_args(v, default_preset="tiny")
    v.add_argument("--data", required=True, help="a `fvl data synth` directory (qa.jsonl)")
    v.add_argument("--split", default="test", help="split to score (default test)")
    v.add_argument("--limit", type=int, default=None, help="score only the first N questions")
    v.add_argument("--batch-size", type=int, default=64, help="questions per generate call (default 64)")
    v.add_argument("--max-new-tokens", type=int, default=8, help="answer length limit (default 8)")
    v.add_argument("--template", choices=("plain", "phi3", "llama3"), default=None,
                   help="chat template (default: the model's; phi3 for a plain-template model)")
    v.add_argument("--predictions", default=None, metavar="FILE", help="also write every prediction as JSON lines")
    v.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    _add_device_args(v)
    v.add_argument("--json", action="store_true", help="print one JSON object")
    v.set_defaults(func=run_vqa)

    f = esub.add_parser("florence2", help="OCR exact match, caption token F1, region recall of a Florence-2")
    f.add_argument("--model", required=True,
                   help="a native Florence-2 directory, or a model directory with a florence2/ folder")
    f.add_argument("--data", required=True, help="a `fvl data synth` directory (florence2_tasks.json)")
    f.add_argument("--split", default="test", help="split to score (default test)")
    f.add_argument("--limit", type=int, default=100, help="images to score, 0 = all (default 100)")
    f.add_argument("--caption-task", default="<DETAILED_CAPTION>",
                   help="caption task scored by token F1: the one the model was trained on (default <DETAILED_CAPTION>)")
    f.add_argument("--image-size", type=int, default=None,
                   help="input side (default: the one recorded with the checkpoint)")
    f.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    _add_device_args(f)
    f.add_argument("--json", action="store_true", help="print one JSON object")
    f.set_defaults(func=run_florence2)
    p.set_defaults(func=lambda args: (p.print_help(), 0)[1])


def _check_data(path: str, needed: str):
    from pathlib import Path

    from workbench.commands._common import UserError

    d = Path(path)
    if not (d / needed).is_file():
        raise UserError(f"--data {d}: no {needed} there; pass a directory made by `fvl data synth --kind scenes`")
    return d


def run_vqa(args) -> int:
    import json

    from workbench.commands._common import UserError, check_model_arg, check_output, open_model

    check_model_arg(args)
    _check_counts(args, ("limit", "batch_size", "max_new_tokens", "threads"))
    data = _check_data(args.data, "qa.jsonl")
    if args.predictions:
        check_output(args.predictions, "--predictions")
    device, dtype = _device_and_dtype(args)
    import torch

    from model.training.evaluate import evaluate_vqa

    if args.threads:
        torch.set_num_threads(args.threads)
    model, processor = open_model(args, device=str(device), dtype=dtype)
    if processor is None or not hasattr(model, "mm_projector"):
        raise UserError("VQA needs a Florence-VL model with its processor; pass --model DIR written by `fvl train` "
                        "or `fvl convert`, or --preset NAME")
    model.to(device=device, dtype=dtype)
    limit = model.config.text_config.max_position_embeddings
    if args.max_new_tokens >= limit:
        raise UserError(f"--max-new-tokens {args.max_new_tokens}: the model's position table holds {limit} "
                        "positions (prompt included); choose far fewer")
    try:
        result = evaluate_vqa(model, processor, data, args.split, template=args.template, batch_size=args.batch_size,
                              max_new_tokens=args.max_new_tokens, limit=args.limit, progress=not args.json,
                              return_predictions=bool(args.predictions))
    except ValueError as exc:
        raise UserError(str(exc)) from exc
    preds = result.pop("predictions", None)
    result.update(device=str(device), dtype=str(dtype).replace("torch.", ""))
    if args.predictions:
        from workbench.data.files import atomic_write_text, describe_os_error

        try:
            atomic_write_text(args.predictions, "".join(json.dumps(row) + "\n" for row in preds or []))
        except OSError as exc:
            raise UserError(f"--predictions {args.predictions}: {describe_os_error(exc)}") from None
    if args.json:
        print(json.dumps(result))
    else:
        for t, acc in result["accuracy"].items():
            chance = result["chance"].get(t)
            extra = f"  chance {chance:.3f}  margin {acc - chance:+.3f}" if chance is not None else ""
            print(f"{t:>10}: {acc:.3f}  (n={result['n'][t]}){extra}")
    return 0


def run_florence2(args) -> int:
    import json
    from pathlib import Path

    from workbench.commands._common import UserError

    _check_counts(args, ("image_size", "threads"))
    if args.limit < 0:
        raise UserError(f"--limit {args.limit}: must be 0 (all images) or more")
    data = _check_data(args.data, "florence2_tasks.json")
    device, dtype = _device_and_dtype(args)
    import torch

    from model.training.evaluate import evaluate_florence2
    from model.training.florence2 import FLORENCE2_DIR, load_florence2

    if args.threads:
        torch.set_num_threads(args.threads)
    path = Path(args.model)
    if (path / FLORENCE2_DIR / "config.json").is_file():
        path = path / FLORENCE2_DIR
    if not (path / "config.json").is_file():
        raise UserError(f"--model {args.model}: not a Florence-2 directory; pass OUT/model (or OUT/model/florence2) "
                        "written by `fvl train florence2`")
    florence2, tokenizer = load_florence2(path)
    florence2.to(device=device, dtype=dtype)
    size = args.image_size
    if size is None and (path / "florence2_image_size.json").is_file():
        size = json.loads((path / "florence2_image_size.json").read_text())["image_size"]
    if size is None:
        raise UserError(f"--model {path}: no recorded image size; pass --image-size")
    from model.processing import FlorenceVLProcessor, build_llm_tokenizer

    processor = FlorenceVLProcessor(build_llm_tokenizer(), tokenizer, image_size=int(size), num_image_tokens=1)
    try:
        result = evaluate_florence2(florence2, processor, data, args.split, limit=args.limit or None,
                                    caption_task=args.caption_task, progress=not args.json)
    except ValueError as exc:
        raise UserError(str(exc)) from exc
    result.update(device=str(device), dtype=str(dtype).replace("torch.", ""))
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:>22}: {v}")
    return 0
