"""Cost of capturing taps: the same forward with and without `capture` (all default taps, mean pooling),
interleaved in one run so both see the same machine load. TransformerLens reports 1.05x on CPU for its cache.

Also the cost of the capture's determinism: `workbench.capturing` forwards one item at a time, because
batched matrix products round differently from single ones (see its module docstring). `per_item_s` is
the same batch as `--batch` single-image forwards under `capture`; `per_item_ratio` its cost against the
batched capture.
"""
from __future__ import annotations

import time

import torch


def add_arguments(parser) -> None:
    parser.add_argument("--preset", default="small")
    parser.add_argument("--taps", default="default", help="tap patterns (default: the default tap set)")
    parser.add_argument("--pool", default="mean")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run(args) -> dict:
    from model.loading import build_model
    from workbench.taps import capture, resolve

    model, _ = build_model(args.preset)
    names = resolve(model, args.taps)
    size = model.config.image_size
    px = torch.randn(args.batch, 3, size, size)

    def captured(x):
        with capture(model, names, pool=args.pool):
            model.image_features(x)

    plain, batched, single = [], [], []
    with torch.inference_mode():
        model.image_features(px)  # warm-up
        for _ in range(args.repeats):
            plain.append(_timed(lambda: model.image_features(px)))
            batched.append(_timed(lambda: captured(px)))
            single.append(_timed(lambda: [captured(px[i:i + 1]) for i in range(args.batch)]))
    plain_s, capture_s, per_item_s = min(plain), min(batched), min(single)
    return {"preset": args.preset, "batch": args.batch, "pool": args.pool, "taps": len(names),
            "plain_s": round(plain_s, 4), "capture_s": round(capture_s, 4), "ratio": round(capture_s / plain_s, 4),
            "per_item_s": round(per_item_s, 4), "per_item_ratio": round(per_item_s / capture_s, 4)}
