"""Cost of capturing taps: the same forward with and without `capture` (all default taps, mean pooling),
interleaved in one run so both see the same machine load. TransformerLens reports 1.05x on CPU for its cache."""
from __future__ import annotations

import time

import torch


def add_arguments(parser) -> None:
    parser.add_argument("--preset", default="small")
    parser.add_argument("--taps", default="default", help="tap patterns (default: the default tap set)")
    parser.add_argument("--pool", default="mean")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)


def run(args) -> dict:
    from model.builder import build_model
    from workbench.taps import capture, resolve

    model, _ = build_model(args.preset)
    names = resolve(model, args.taps)
    size = model.config.image_size
    px = torch.randn(args.batch, 3, size, size)
    plain, captured = [], []
    with torch.inference_mode():
        model.get_image_features(px)  # warm-up
        for _ in range(args.repeats):
            start = time.perf_counter()
            model.get_image_features(px)
            plain.append(time.perf_counter() - start)
            start = time.perf_counter()
            with capture(model, names, pool=args.pool):
                model.get_image_features(px)
            captured.append(time.perf_counter() - start)
    plain_s, capture_s = min(plain), min(captured)
    return {"preset": args.preset, "batch": args.batch, "pool": args.pool, "taps": len(names),
            "plain_s": round(plain_s, 4), "capture_s": round(capture_s, 4), "ratio": round(capture_s / plain_s, 4)}
