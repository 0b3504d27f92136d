"""`fvl capture`: capture taps over a data set into a resumable feature store.

Rerun the same command after an interruption to resume; failed items are recorded with their error.
Under `torchrun --nproc_per_node=N fvl capture ...` each rank writes its own shards.
Exit status: the number of items recorded as failed (this run's and earlier runs' failures of the same
selection; capped at 100), 0 when every item is stored. Rerun with --retry-failed to try them again.
"""
from __future__ import annotations

import json


def register(sub) -> None:
    from workbench.commands._common import add_model_args

    p = sub.add_parser("capture", help="capture features over a data set into a feature store")
    add_model_args(p)
    p.add_argument("--data", required=True, help="a synthetic data directory, a LLaVA JSON file, or an image folder")
    p.add_argument("--taps", default="default", help="comma-separated names or globs ('all', 'default', 'prompt.*')")
    p.add_argument("--pool", default="mean", help="none, mean, global or grid<k> (e.g. grid4)")
    p.add_argument("--out", required=True, help="the feature store directory (created or resumed)")
    p.add_argument("--split", default=None, help="only this split (train, val, test)")
    p.add_argument("--limit", type=int, default=None, help="at most this many items")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--shard-size", type=int, default=256)
    p.add_argument("--question", default="Describe the image.", help="text prompt for llm.* taps")
    p.add_argument("--retry-failed", action="store_true", help="retry items that failed in an earlier run")
    p.add_argument("--json", action="store_true", help="print a JSON report")
    p.set_defaults(func=run)


def run(args) -> int:
    from workbench.capture import capture_dataset
    from workbench.cli import UserError
    from workbench.commands._common import open_model
    from workbench.data.dataset import open_dataset
    from workbench.store import StoreError
    from workbench.taps import TapError, parse_pool

    try:
        parse_pool(args.pool)
    except TapError as exc:
        raise UserError(f"--pool {args.pool}: {exc}") from exc
    try:
        dataset = open_dataset(args.data)
    except (FileNotFoundError, ValueError) as exc:
        raise UserError(f"--data {args.data}: {exc}") from exc
    model, processor = open_model(args)
    if processor is None:
        raise UserError("this model has no processor; pass a model directory that holds its tokenizers")
    model_id = args.model or f"preset:{args.preset or args._default_preset}"
    try:
        report = capture_dataset(model, processor, dataset, args.taps, args.pool, args.out, model_id=model_id,
                                 batch_size=args.batch_size, shard_size=args.shard_size, question=args.question,
                                 split=args.split, limit=args.limit, retry_failed=args.retry_failed)
    except (TapError, StoreError, ValueError) as exc:
        raise UserError(str(exc)) from exc
    summary = report.to_dict()
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"{report.captured} captured, {report.skipped} already stored, {report.failed} failed "
              f"-> {args.out} ({report.seconds:.1f} s)")
        for item_id, err in list(report.errors.items())[:10]:
            print(f"  failed {item_id}: {err}")
        if report.failed_in_store > report.failed:
            print(f"  {report.failed_in_store - report.failed} items failed in an earlier run; "
                  "rerun with --retry-failed to try them again")
    return min(report.failed_in_store, 100)
