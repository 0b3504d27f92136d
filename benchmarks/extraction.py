"""Fused depth+breadth extraction (one DaViT pass, all prompts in one batched encoder pass) against the
naive way (native Florence2ForConditionalGeneration once per prompt, plus once for V), same weights."""
from __future__ import annotations

import time

import torch


def add_arguments(parser) -> None:
    parser.add_argument("--preset", default="base")
    parser.add_argument("--image-size", type=int, default=None, help="square image side (default: the preset's)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2, help="timed repeats; the minimum is reported")
    parser.add_argument("--threads", type=int, default=None)


def _best(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def run(args) -> dict:
    from model.loading import build_config
    from model.presets import REAL_SIZE_PRESETS
    from model.processing import build_florence2_tokenizer, build_llm_tokenizer
    from model.reference import native_from_extractor, naive_streams
    from model.vision import Florence2DepthBreadth

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.preset in REAL_SIZE_PRESETS:
        config = build_config(args.preset)
    else:
        config = build_config(args.preset, build_llm_tokenizer(), build_florence2_tokenizer())
    size = args.image_size or config.image_size
    torch.manual_seed(0)
    extractor = Florence2DepthBreadth(config.vision_config, list(config.prompts), config.prompt_token_ids).eval()
    native = native_from_extractor(extractor)
    px = torch.randn(args.batch, 3, size, size)
    with torch.inference_mode():
        extractor(px[:1, :, :64, :64] if size > 64 else px)  # warm-up
        fused_s, fused = _best(lambda: extractor(px), args.repeats)
        naive_s, naive = _best(lambda: naive_streams(native, px, config.prompt_token_ids), args.repeats)
    max_abs_diff = max(float((fused[k] - naive[k]).abs().max()) for k in naive)
    return {"preset": args.preset, "image_size": size, "batch": args.batch, "prompts": len(config.prompts),
            "threads": torch.get_num_threads(), "fused_s": round(fused_s, 4), "naive_s": round(naive_s, 4),
            "speedup": round(naive_s / fused_s, 3), "max_abs_diff": max_abs_diff}
