"""One stage-2 training step (forward + backward) of the LLM side: our loss, which runs the LM head only
at label positions, against the loss over the model's full logits (the LM head at every position).

The batch is what stage 2 of the recipe trains on: synthetic scenes' questions packed as independent
turns (`encode_independent_turns`, phi3 template), image features from the feature bank's place (the
fused streams of the model's own vision side, computed once, outside both timings). Both sides run on
the same model and batch, interleaved so both see the same machine load; the minimum of each is
reported, with the loss difference (the two must agree). The same step under CPU bf16 autocast is
timed beside them (`bf16_s`, `bf16_speedup` over fp32): the evidence for leaving it off on CPU.

The optimizer step is compared the same way: torch's fused AdamW (what the training loop uses on CPU
and CUDA) against the unfused one, on the trainable parameters of stage 2 and of the Florence-2 stage
(the recipe's longest), with the largest difference between the two updates from the same state
(the same rule: float rounding only)."""
from __future__ import annotations

import time

from model.loading import build_model
from model.processing import IGNORE_INDEX, packed_attention_mask
from model.training.florence2 import build_florence2
from model.training.loop import token_loss_sum
from model.training.vlm import VLMTask
from workbench.data.scenes import generate_scene


def add_arguments(parser) -> None:
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch", type=int, default=16, help="conversations per step (the recipe's 16)")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved repeats; the minimum of each is reported")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")


def full_logits_loss(model, batch):
    """The reference: the model's own forward (LM head at every position), then the summed token loss."""
    feats = model.mm_projector(batch["fused"])
    mask = batch["attention_mask"]
    if batch.get("segments") is not None:
        impl = model.language_model.config._attn_implementation or "sdpa"
        mask = packed_attention_mask(batch["segments"], impl, feats.dtype)
    logits = model(input_ids=batch["input_ids"], attention_mask=mask, image_features=feats,
                   position_ids=batch.get("position_ids")).logits
    return token_loss_sum(logits, batch["labels"])


def optimizer_steps(params: list, repeats: int) -> dict:
    """Fused vs unfused AdamW: the minimum step time of each (interleaved, same gradients) and the
    largest parameter difference after one step of each from the same start."""
    import torch

    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
    start = [p.detach().clone() for p in params]

    def fresh(fused: bool):
        with torch.no_grad():
            for p, s, g in zip(params, start, grads):
                p.copy_(s)
                p.grad = g.clone()
        return torch.optim.AdamW(params, lr=1e-3, fused=fused)

    after = {}
    for fused in (True, False):
        fresh(fused).step()
        after[fused] = [p.detach().clone() for p in params]
    diff = max(float((a - b).abs().max()) for a, b in zip(after[True], after[False]))
    opts = {"fused": fresh(True), "unfused": torch.optim.AdamW(params, lr=1e-3, fused=False)}
    times: dict[str, list[float]] = {"fused": [], "unfused": []}
    for repeat in range(repeats + 1):  # the first round warms up
        for name, opt in opts.items():
            start_t = time.perf_counter()
            opt.step()
            if repeat:
                times[name].append(time.perf_counter() - start_t)
    fused_s, unfused_s = min(times["fused"]), min(times["unfused"])
    return {"tensors": len(params), "parameters": sum(p.numel() for p in params),
            # four significant figures: a tiny model's optimizer step takes ~1e-4 s, where five decimals
            # would round away the digits the speedup is computed from
            "fused_s": float(f"{fused_s:.4g}"), "unfused_s": float(f"{unfused_s:.4g}"),
            "speedup": round(unfused_s / fused_s, 3), "max_update_diff": diff}


def run(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    model, processor = build_model(args.preset, image_size=192, seed=0)
    processor.template = model.config.template = "phi3"
    model.set_trainable(vision=False, projector=True, llm=True)
    model.train()
    scenes = [generate_scene(seed, 192) for seed in range(args.batch)]
    samples = [processor.encode_independent_turns([(q.question, q.answer) for q in s.qa], template="phi3")
               for s in scenes]
    batch = processor.collate(samples, padding_side="right")
    with torch.no_grad():
        pixels = processor.images([s.image for s in scenes])
        batch["fused"] = model.fusion(model.image_streams(pixels)).float()
    task = VLMTask(model)

    def ours():
        return task(**batch)

    def full_logits():
        return full_logits_loss(model, batch)

    def ours_bf16():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return task(**batch)

    times: dict[str, list[float]] = {"ours": [], "full": [], "bf16": []}
    losses: dict[str, float] = {}
    for repeat in range(args.repeats + 1):  # the first round warms up
        for name, fn in (("ours", ours), ("full", full_logits), ("bf16", ours_bf16)):
            model.zero_grad(set_to_none=True)
            start = time.perf_counter()
            loss = fn()
            loss.backward()
            elapsed = time.perf_counter() - start
            losses[name] = float(loss.detach())
            if repeat:
                times[name].append(elapsed)
    ours_s, full_s = min(times["ours"]), min(times["full"])
    labels = batch["labels"][:, 1:]

    optimizer = {"stage2": optimizer_steps([p for p in model.parameters() if p.requires_grad], args.repeats),
                 "florence2": optimizer_steps(list(build_florence2(model, seed=0).parameters()), args.repeats)}
    return {"preset": args.preset, "batch": args.batch, "tokens": int(batch["input_ids"].numel()),
            "label_tokens": int((labels != IGNORE_INDEX).sum()), "threads": args.threads,
            "ours_s": round(ours_s, 4), "full_logits_s": round(full_s, 4), "speedup": round(full_s / ours_s, 3),
            "loss_rel_diff": abs(losses["ours"] - losses["full"]) / max(abs(losses["full"]), 1e-12),
            # the same step under CPU bf16 autocast: why the loop leaves it off on CPU (`use_bf16`)
            "bf16_s": round(min(times["bf16"]), 4), "bf16_speedup": round(ours_s / min(times["bf16"]), 3),
            "bf16_loss_rel_diff": abs(losses["bf16"] - losses["ours"]) / max(abs(losses["ours"]), 1e-12),
            "optimizer": optimizer}
