"""`fvl capture`: capture taps over a data set into a resumable, verified feature store.

Rerun the same command after an interruption to resume; failed items are recorded with their error, and
the items of damaged or missing shards are captured again. Under `torchrun --nproc_per_node=N fvl capture
...` each rank writes its own shards. Every option is checked before the model loads or the store is
created. Exit status: the number of items recorded as failed (this run's and earlier runs' failures of
the same selection; capped at 100), 0 when every item is stored, 2 for a refused input. Rerun with
--retry-failed to try failed items again.
"""
from __future__ import annotations

import json
from pathlib import Path

DEVICE_HELP = "auto (the first GPU when there is one), cpu, cuda or cuda:N"
DTYPE_HELP = "auto (bfloat16 or float16 on a GPU, float32 on the CPU), float32, bfloat16 or float16"


def register(sub) -> None:
    from workbench.commands._common import add_model_args
    from workbench.data.dataset import add_image_folder_option

    p = sub.add_parser("capture", help="capture features over a data set into a feature store")
    add_model_args(p)
    p.add_argument("--data", required=True, help="a synthetic data directory, a LLaVA or COCO JSON file, or an "
                                                 "image folder (labels from its metadata.jsonl)")
    add_image_folder_option(p)
    p.add_argument("--taps", default="default", help="comma-separated names or globs ('all', 'default', 'prompt.*')")
    p.add_argument("--pool", default="mean", help="none, mean, global or grid<k> (e.g. grid4)")
    p.add_argument("--out", required=True, help="the feature store directory (created or resumed)")
    p.add_argument("--split", default=None, help="only this split (train, val, test)")
    p.add_argument("--limit", type=int, default=None, help="at most this many items (0 or more)")
    p.add_argument("--batch-size", type=int, default=8, help="images decoded per DataLoader batch (default 8)")
    p.add_argument("--shard-size", type=int, default=256, help="items per shard file (default 256)")
    p.add_argument("--workers", type=int, default=0,
                   help="DataLoader processes decoding images (default 0: in this process)")
    p.add_argument("--forward-batch", type=int, default=1,
                   help="images per forward (default 1: features independent of batching); N > 1 forwards fixed "
                        "groups of N items by position, faster on a GPU and still bit-identical on resume")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"], help=DTYPE_HELP)
    p.add_argument("--question", default="Describe the image.", help="text prompt for llm.* taps")
    p.add_argument("--retry-failed", action="store_true", help="retry items that failed in an earlier run")
    p.add_argument("--json", action="store_true", help="print a JSON report")
    p.set_defaults(func=run, resumable=True)


def check_args(args) -> None:
    """Refuse bad numbers and outputs before anything is loaded or created."""
    from workbench.commands._common import UserError, check_model_arg, check_output

    for flag, value, least in (("--batch-size", args.batch_size, 1), ("--shard-size", args.shard_size, 1),
                               ("--workers", args.workers, 0), ("--forward-batch", args.forward_batch, 1)):
        if value < least:
            raise UserError(f"{flag} {value}: must be at least {least}")
    if args.limit is not None and args.limit < 0:
        raise UserError(f"--limit {args.limit}: must be 0 or more (leave it out to capture every item)")
    if not (args.device in ("auto", "cpu", "cuda") or args.device.startswith("cuda:")):
        raise UserError(f"--device {args.device}: choose {DEVICE_HELP}")
    check_model_arg(args)
    data = Path(args.data)
    data_root = (data if data.is_dir() else data.parent).resolve()
    out = Path(args.out).resolve()
    if data.exists() and (out == data_root or data_root in out.parents):
        raise UserError(f"--out {args.out} is inside the data set {args.data}; choose a directory outside it "
                        "(a store inside a data set would be read as part of it)")
    check_output(args.out)


def resolve_device(args):
    """(torch device, torch dtype) from --device and --dtype, refused by name when not available here."""
    from model.device import choose_dtype, parse_dtype
    from model.device import resolve_device as _resolve
    from workbench.commands._common import UserError

    try:
        device = _resolve(args.device)
    except (ValueError, RuntimeError) as exc:
        raise UserError(f"--device {args.device}: {exc}") from exc
    if device.type == "cuda":
        import torch

        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {args.device}: this machine has {torch.cuda.device_count()} CUDA "
                            "device(s); pass cuda:0 .. cuda:N-1 or --device auto")
    return device, parse_dtype(args.dtype) or choose_dtype(device)


def run(args) -> int:
    from workbench.commands._common import UserError, model_id, open_model

    check_args(args)  # before torch loads: a bad option is refused in well under a second
    from model.tokens import PoolError, parse_pool
    from workbench.data.dataset import open_dataset
    from workbench.data.files import OutputError, describe_os_error
    from workbench.store import StoreError, model_fingerprint

    try:
        parse_pool(args.pool)
    except PoolError as exc:
        raise UserError(f"--pool {args.pool}: {exc}") from exc
    device, dtype = resolve_device(args)
    try:
        dataset = open_dataset(args.data, image_folder=args.image_folder)
    except (FileNotFoundError, ValueError) as exc:
        raise UserError(f"--data {args.data}: {exc}") from exc
    model, processor = open_model(args)
    if processor is None:
        raise UserError("this model has no processor; pass a model directory that holds its tokenizers")
    fingerprint = model_fingerprint(model, getattr(args, "model", None))
    model = model.to(device=device, dtype=dtype).eval()
    from workbench.capturing import capture_dataset
    from workbench.taps import TapError

    try:
        report = capture_dataset(model, processor, dataset, args.taps, args.pool, args.out, model_id=model_id(args),
                                 weights=fingerprint, batch_size=args.batch_size,
                                 shard_size=args.shard_size, question=args.question, split=args.split,
                                 limit=args.limit, retry_failed=args.retry_failed, workers=args.workers,
                                 forward_batch=args.forward_batch)
    except OutputError as exc:
        raise UserError(str(exc)) from exc
    except (TapError, StoreError, ValueError) as exc:
        raise UserError(str(exc)) from exc
    except OSError as exc:
        raise UserError(f"--out {args.out}: {describe_os_error(exc)}") from exc
    _print(args, report)
    return min(report.failed_in_store, 100)


def _print(args, report) -> None:
    if args.json:
        print(json.dumps(report.to_dict()))
        return
    print(f"{report.captured} captured, {report.skipped} already stored, {report.failed} failed "
          f"-> {args.out} ({report.seconds:.1f} s)")
    if report.recaptured:
        print(f"  {report.recaptured} items of damaged or missing shards were captured again")
    for item_id, err in list(report.errors.items())[:10]:
        print(f"  failed {item_id}: {err}")
    if report.failed_in_store > report.failed:
        print(f"  {report.failed_in_store - report.failed} items failed in an earlier run; "
              "rerun with --retry-failed to try them again")
