"""GPU check: one prepared run for a lent GPU machine (torch + transformers, no internet), one JSON object.

Measures, with random weights in bf16 (the GPU's best dtype) and the automatically chosen attention kernel:
* extraction throughput at Florence-2-base and -large sizes, 768 px: fused (one DaViT pass, all three
  prompts in one batched encoder pass) against naive (a full Florence-2 forward per prompt with one decoder
  step, as the official `generate(max_new_tokens=1)` does), in images/s, and their ratio;
* a training step (forward + backward, no optimizer) of the florence-vl-3b size (Florence-2-large features,
  Phi-3.5-mini LLM; projector + LLM trainable as in the released code): tokens/s and model FLOPs utilisation;
* capture throughput: images/s of the real capture path (`workbench.capturing.capture_dataset`: DataLoader
  workers decoding, taps depth + prompt.* + fusion.output mean-pooled into a float16 store) for the
  florence-vl-3b vision side against the naive per-prompt pipeline (decode in-process, the native Florence-2
  once per prompt), on synthetic photo-like JPEGs, and their ratio;
* peak GPU memory per phase.
Each phase runs within a share of `--budget-s` (default 240 s, so the whole check ends inside 5 minutes) and
reports its error instead of aborting the others. `--preset tiny --device cpu` runs the same code in seconds.
"""
from __future__ import annotations

import gc
import sys
import time

import torch

# Dense bf16 tensor-core peaks (FLOP/s) used for model FLOPs utilisation.
PEAK_BF16 = {"H200": 989.4e12, "H100 PCIe": 756.0e12, "H100": 989.4e12, "A100": 312.0e12, "L40S": 362.1e12,
             "L4": 121.0e12, "A10G": 70.0e12}


def add_arguments(parser) -> None:
    parser.add_argument("--preset", choices=["full", "tiny"], default="full",
                        help="full: base/large extraction + florence-vl-3b step; tiny: toy sizes for CPU tests")
    parser.add_argument("--device", default="auto", help="auto, cuda, cuda:N or cpu")
    parser.add_argument("--batch", type=int, default=None, help="images per extraction batch (full 8, tiny 2)")
    parser.add_argument("--train-batch", type=int, default=None, help="sequences per training step (full 2, tiny 2)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per sequence incl. image tokens (full 2048)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per measurement (budget permitting)")
    parser.add_argument("--budget-s", type=float, default=240.0, help="wall-clock budget for all phases")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="checkpoint LLM layers in the step")
    parser.add_argument("--peak-tflops", type=float, default=None, help="override the bf16 peak used for MFU")
    parser.add_argument("--parts", default="extraction,train,capture",
                        help="comma list: extraction, train, capture")
    parser.add_argument("--images", type=int, default=None, help="images for the capture throughput (full 64, tiny 4)")
    parser.add_argument("--capture-workers", type=int, default=None,
                        help="DataLoader workers decoding images in the capture case (full 8, tiny 2)")


# ---- helpers --------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_memory(device: torch.device) -> None:
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 3) if device.type == "cuda" else None


def _time(fn, device: torch.device, repeats: int, deadline: float) -> tuple[float, object]:
    """Median seconds of `fn` over up to `repeats` runs after one warm-up, stopping at `deadline`."""
    out = fn()  # warm-up (kernel selection, caches)
    _sync(device)
    times = []
    while len(times) < repeats and (not times or time.perf_counter() < deadline):
        start = time.perf_counter()
        out = fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2], out


def _peak_flops(device: torch.device, override_tflops: float | None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_properties(device).name
    for key, value in PEAK_BF16.items():  # ordered: "H100 PCIe" before "H100"
        if key in name:
            return value
    return None


def _random_init_(model: torch.nn.Module, seed: int = 0) -> None:
    """Fast, stable random weights on the device: N(0, 0.02) matrices, unit norms, zero biases."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0 if "norm" in name and name.endswith("weight") else 0.0)
            else:
                p.normal_(0.0, 0.02)



def _build_uninitialised(config, device, dtype):
    """A Florence-VL model built straight on ``device`` in ``dtype`` (no CPU copy, no init pass), then
    filled with random values: real-size models fit on the GPU without a detour through host memory."""
    from transformers.initialization import no_init_weights

    from model.florence_vl import FlorenceVLForConditionalGeneration

    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device), no_init_weights():
            model = FlorenceVLForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(old)
    _random_init_(model)
    return model

def _sizes(preset: str):
    """{size name: Florence2Config} and the Florence-VL config for the training step."""
    from model.config import preset_config
    from model.presets import OFFICIAL_PROMPT_IDS

    if preset == "full":
        f2 = {"base": preset_config("base").vision_config, "large": preset_config("florence-vl-3b").vision_config}
        train = preset_config("florence-vl-3b", prompt_token_ids=OFFICIAL_PROMPT_IDS, attend_prompt_pads=True)
        return f2, train, 768, OFFICIAL_PROMPT_IDS
    ids = {"caption": [0] + list(range(5, 16)) + [2], "ocr": [0] + list(range(20, 28)) + [2],
           "grounding": [0] + list(range(30, 42)) + [2]}
    special = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    f2 = {"tiny": preset_config("tiny").vision_config}
    train = preset_config("tiny", llm_special_ids=special, prompt_token_ids=ids, attend_prompt_pads=True)
    return f2, train, 128, ids


# ---- phase 1: extraction ----------------------------------------------------------------------------
def _naive(native, px: torch.Tensor, prompt_ids: dict[str, list[int]], n_img: int) -> dict[str, torch.Tensor]:
    """A full Florence-2 forward per prompt (DaViT + encoder + one decoder step each)."""
    bsz, dev = px.shape[0], px.device
    image_id = native.config.image_token_id
    start = native.config.text_config.decoder_start_token_id
    out = {}
    for name, ids in prompt_ids.items():
        input_ids = torch.tensor([[image_id] * n_img + list(ids)], device=dev).expand(bsz, -1)
        dec = torch.full((bsz, 1), start, device=dev)
        out[name] = native(input_ids=input_ids, pixel_values=px, decoder_input_ids=dec).encoder_last_hidden_state[:, :n_img]
    return out


def extraction(f2_config, prompt_ids, image_size: int, batch: int, device, dtype, attn: str, repeats: int,
               deadline: float) -> dict:
    from transformers import Florence2ForConditionalGeneration

    from model.device import apply_attn_implementation
    from model.vision import Florence2DepthBreadth, extractor_state_dict_to_florence2

    _reset_memory(device)
    with torch.device(device):
        extractor = Florence2DepthBreadth(f2_config, list(prompt_ids), prompt_ids).to(dtype).eval()
    _random_init_(extractor)
    with torch.device(device):
        native = Florence2ForConditionalGeneration(f2_config).to(dtype).eval()
    native.load_state_dict(extractor_state_dict_to_florence2(extractor.state_dict()), strict=False)
    native.tie_weights()
    px = torch.randn(batch, 3, image_size, image_size, device=device, dtype=dtype)
    n_img = extractor.num_tokens(image_size)
    fallback = None

    def use(impl: str) -> str:
        used = apply_attn_implementation(native, impl)
        # the extractor is a plain nn.Module: give its BART encoder and DaViT the native model's choices
        extractor.encoder.config._attn_implementation = native.config.text_config._attn_implementation
        extractor.vision_tower.config._attn_implementation = native.model.vision_tower.config._attn_implementation
        return used

    used = use(attn)
    with torch.inference_mode():
        try:
            extractor(px[:1])
            _naive(native, px[:1], prompt_ids, n_img)
        except Exception as exc:  # e.g. a flash-attn build that rejects these shapes: measure on sdpa instead
            if used == "sdpa":
                raise
            fallback = f"{used} failed ({type(exc).__name__}: {str(exc)[:200]}); measured with sdpa"
            used = use("sdpa")
        share = max(1.0, (deadline - time.perf_counter()) / 2)
        fused_s, fused = _time(lambda: extractor(px), device, repeats, time.perf_counter() + share)
        naive_s, naive = _time(lambda: _naive(native, px, prompt_ids, n_img), device, repeats, deadline)
        diff = max(float((fused[k].float() - naive[k].float()).abs().max()) for k in naive)
    result = {"image_size": image_size, "batch": batch, "prompts": len(prompt_ids), "attn_implementation": used,
              "params_m": round(sum(p.numel() for p in extractor.parameters()) / 1e6, 1),
              "fused_images_s": round(batch / fused_s, 3), "naive_images_s": round(batch / naive_s, 3),
              "speedup": round(naive_s / fused_s, 3), "max_abs_diff_vs_naive": round(diff, 5),
              "peak_mem_gib": _peak_gib(device)}
    if fallback:
        result["attn_fallback"] = fallback
    del extractor, native, fused, naive, px
    return result


# ---- phase 3: capture throughput --------------------------------------------------------------------
CAPTURE_TAPS = ["depth", "prompt.*", "fusion.output"]


def _capture_model(preset: str, device, dtype):
    """(model, processor, prompt ids) with random weights on `device` in `dtype`: the florence-vl-3b vision
    side (Florence-2-large DaViT + BART encoder, fusion, projector) with a one-layer LLM, since no captured
    tap reads the LLM; or the tiny preset."""
    from model.loading.build import build_config, build_processor
    from model.processing import build_florence2_tokenizer, build_llm_tokenizer

    llm_tok, f2_tok = build_llm_tokenizer(), build_florence2_tokenizer()
    config = build_config("florence-vl-3b" if preset == "full" else "tiny", llm_tok, f2_tok)
    if preset == "full":
        config.text_config.num_hidden_layers = 1
    model = _build_uninitialised(config, device, dtype)
    return model.eval(), build_processor(config, llm_tok, f2_tok), dict(config.prompt_token_ids)


def _synthetic_images(folder, n: int, size: tuple[int, int], seed: int = 0) -> list:
    """`n` photo-like JPEGs (smooth colour fields with fine noise) of `size` (w, h) in `folder`; their paths."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        coarse = Image.fromarray((rng.random((8, 8, 3)) * 255).astype(np.uint8)).resize(size, Image.BICUBIC)
        noisy = np.asarray(coarse, dtype=np.int16) + rng.integers(-12, 13, (size[1], size[0], 3))
        path = folder / f"img{i:05d}.jpg"
        Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


def capture_throughput(preset: str, n_images: int, batch: int, workers: int, device, dtype, deadline: float) -> dict:
    """Images/s of `workbench.capturing.capture_dataset` (DataLoader workers decode and preprocess, taps
    depth + prompt.* + fusion.output mean-pooled, float16 store) against the naive per-prompt pipeline
    (decode in this process, then the native Florence-2 once per prompt, as `_naive`), on the same images."""
    import tempfile
    from pathlib import Path

    from PIL import Image
    from transformers import Florence2ForConditionalGeneration

    from model.vision import extractor_state_dict_to_florence2
    from workbench.capturing import capture_dataset
    from workbench.data.dataset import open_dataset

    _reset_memory(device)
    model, processor, prompt_ids = _capture_model(preset, device, dtype)
    tower = model.vision_tower
    with torch.device(device):
        native = Florence2ForConditionalGeneration(model.config.vision_config).to(dtype).eval()
    native.load_state_dict(extractor_state_dict_to_florence2(tower.state_dict()), strict=False)
    native.tie_weights()
    n_img = tower.num_tokens(model.config.image_size)
    size = (640, 480) if preset == "full" else (64, 48)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "images").mkdir()
        paths = _synthetic_images(Path(tmp) / "images", n_images, size)
        dataset = open_dataset(Path(tmp) / "images")
        kw = dict(model_id=f"benchmark:{preset}", weights="random", batch_size=batch, workers=workers,
                  forward_batch=batch, progress=False)
        capture_dataset(model, processor, dataset, CAPTURE_TAPS, "mean", Path(tmp) / "warm", limit=batch, **kw)
        _sync(device)
        start = time.perf_counter()
        report = capture_dataset(model, processor, dataset, CAPTURE_TAPS, "mean", Path(tmp) / "store", **kw)
        _sync(device)
        capture_s = time.perf_counter() - start

        def naive(chunk):
            px = processor.images([Image.open(p).convert("RGB") for p in chunk])
            return _naive(native, px.to(device=device, dtype=dtype), prompt_ids, n_img)

        with torch.inference_mode():
            naive(paths[:batch])  # warm-up
            _sync(device)
            start, done = time.perf_counter(), 0
            for i in range(0, n_images, batch):
                naive(paths[i:i + batch])
                done += len(paths[i:i + batch])
                if time.perf_counter() > deadline:
                    break
            _sync(device)
            naive_s = time.perf_counter() - start
    result = {"preset": "florence-vl-3b (vision side)" if preset == "full" else "tiny", "images": n_images,
              "image_size": model.config.image_size, "batch": batch, "workers": workers, "taps": CAPTURE_TAPS,
              "pool": "mean", "store_dtype": "float16", "captured": report.captured,
              "failed": report.failed, "capture_images_s": round(n_images / capture_s, 3),
              "naive_images": done, "naive_images_s": round(done / naive_s, 3),
              "speedup": round((n_images / capture_s) / (done / naive_s), 3), "peak_mem_gib": _peak_gib(device)}
    del model, native
    return result


# ---- phase 2: a training step ---------------------------------------------------------------------
def _vision_flops(model, px: torch.Tensor) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model.image_streams(px[:1])
    return float(counter.get_total_flops()) * px.shape[0]


def train_step(config, batch: int, seq_len: int, device, dtype, attn: str, repeats: int, deadline: float,
               checkpointing: bool, peak: float | None) -> dict:
    from model.device import apply_attn_implementation

    _reset_memory(device)
    t0 = time.perf_counter()
    model = _build_uninitialised(config, device, dtype)
    used = apply_attn_implementation(model, attn)
    model.set_trainable(vision=False, projector=True, llm=True)
    if checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    build_s = time.perf_counter() - t0
    n_img = config.num_image_tokens()
    if seq_len <= n_img + 2:
        raise ValueError(f"--seq-len {seq_len} leaves no text after {n_img} image tokens")
    vocab = config.text_config.vocab_size
    g = torch.Generator(device="cpu").manual_seed(0)
    text = torch.randint(3, min(vocab - 1, 30000), (batch, seq_len - n_img - 1), generator=g)
    ids = torch.cat([torch.full((batch, 1), config.text_config.bos_token_id or 1),
                     torch.full((batch, n_img), config.image_token_id), text], dim=1).to(device)
    labels = ids.clone()
    labels[:, : 1 + n_img] = -100
    mask = torch.ones_like(ids)
    px = torch.randn(batch, 3, config.image_size, config.image_size, device=device, dtype=dtype)
    losses = []

    def step():
        out = model(input_ids=ids, pixel_values=px, attention_mask=mask, labels=labels)
        out.loss.backward()
        losses.append(float(out.loss.detach()))
        for p in model.parameters():
            p.grad = None

    fallback = None
    try:
        step()
    except Exception as exc:  # a flash-attn build that rejects the step: measure on sdpa instead
        if used == "sdpa":
            raise
        fallback = f"{used} failed ({type(exc).__name__}: {str(exc)[:200]}); measured with sdpa"
        for p in model.parameters():
            p.grad = None
        used = apply_attn_implementation(model, "sdpa")
    step_s, _ = _time(step, device, repeats, deadline)
    peak_mem = _peak_gib(device)
    model.eval()
    llm = model.language_model
    n_embed = llm.get_input_embeddings().weight.numel()
    llm_params = sum(p.numel() for p in llm.parameters()) - n_embed
    proj_params = sum(p.numel() for p in model.mm_projector.parameters())
    cfg = config.text_config
    tokens = batch * seq_len
    # PaLM-style model FLOPs: 6N per token for weights (fwd+bwd) + 12 L H S per token for attention,
    # the projector over the image tokens (fwd+bwd), the frozen vision tower forward only.
    llm_flops = tokens * (6 * llm_params + 12 * cfg.num_hidden_layers * cfg.hidden_size * seq_len)
    proj_flops = 6 * proj_params * batch * n_img
    vision_flops = _vision_flops(model, px)
    total = llm_flops + proj_flops + vision_flops
    achieved = total / step_s
    result = {"preset": config.preset, "batch": batch, "seq_len": seq_len, "image_tokens": n_img,
              "attn_implementation": used, "gradient_checkpointing": checkpointing, "optimizer": "none (fwd+bwd)",
              "params_b": round(sum(p.numel() for p in model.parameters()) / 1e9, 4),
              "trainable_params_b": round(sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e9, 4),
              "build_s": round(build_s, 2), "step_s": round(step_s, 4), "tokens_s": round(tokens / step_s, 1),
              "model_tflops_per_step": round(total / 1e12, 6), "achieved_tflops": round(achieved / 1e12, 4),
              "mfu": round(achieved / peak, 4) if peak else None,
              "peak_tflops": round(peak / 1e12, 1) if peak else None,
              "loss": round(losses[-1], 4), "loss_finite": bool(torch.isfinite(torch.tensor(losses)).all()),
              "peak_mem_gib": peak_mem}
    if fallback:
        result["attn_fallback"] = fallback
    del model, ids, labels, px
    return result


def run(args) -> dict:
    from model.device import choose_attn_implementation, choose_dtype, describe, resolve_device

    start = time.perf_counter()
    device = resolve_device(args.device)
    dtype = choose_dtype(device)
    attn = choose_attn_implementation(device)
    full = args.preset == "full"
    batch = args.batch or (8 if full else 2)
    train_batch = args.train_batch or 2
    seq_len = args.seq_len or (2048 if full else 64)
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    unknown = parts - {"extraction", "train", "capture"}
    if unknown:
        raise ValueError(f"--parts {sorted(unknown)}: choose from extraction, train, capture")
    f2_configs, train_config, image_size, prompt_ids = _sizes(args.preset)
    result: dict = {"benchmark": "gpu", "preset": args.preset, **describe(device),
                    "dtype": str(dtype).replace("torch.", ""), "attn_implementation": attn}
    n_phases = len(f2_configs) * ("extraction" in parts) + ("train" in parts) + ("capture" in parts)
    budget_end = start + args.budget_s
    phase = 0
    if "extraction" in parts:
        result["extraction"] = {}
        for name, f2 in f2_configs.items():
            deadline = time.perf_counter() + (budget_end - time.perf_counter()) / max(1, n_phases - phase)
            try:
                result["extraction"][name] = extraction(f2, prompt_ids, image_size, batch, device, dtype, attn,
                                                        args.repeats, deadline)
            except Exception as exc:  # report and go on: a lent GPU run is one shot
                result["extraction"][name] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
            phase += 1
    if "train" in parts:
        deadline = time.perf_counter() + (budget_end - time.perf_counter()) / max(1, n_phases - phase)
        try:
            result["train"] = train_step(train_config, train_batch, seq_len, device, dtype, attn, args.repeats,
                                         deadline, args.gradient_checkpointing,
                                         _peak_flops(device, args.peak_tflops))
        except Exception as exc:
            result["train"] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        phase += 1
    if "capture" in parts:
        try:
            workers = args.capture_workers if args.capture_workers is not None else (8 if full else 2)
            result["capture"] = capture_throughput(args.preset, args.images or (64 if full else 4), batch, workers,
                                                   device, dtype, budget_end)
        except Exception as exc:
            result["capture"] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
    _reset_memory(device)
    result["total_s"] = round(time.perf_counter() - start, 2)
    ratios = [v["speedup"] for v in result.get("extraction", {}).values() if "speedup" in v]
    result["fused_vs_naive_speedup"] = ratios
    result["flash_attn_imported"] = any(m == "flash_attn" or m.startswith("flash_attn.") for m in sys.modules)
    return result
