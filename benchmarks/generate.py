"""Decoding speed of FlorenceVL.generate against the bare LLM's generate on the same precomputed
input embeddings (image features computed once, outside both timings): the overhead of our wrapper."""
from __future__ import annotations

import time

import torch


def add_arguments(parser) -> None:
    parser.add_argument("--preset", default="small")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7, help="interleaved repeats; the minimum of each is reported")


def run(args) -> dict:
    from model.loading import build_model

    model, processor = build_model(args.preset)
    image = torch.zeros(1, 3, model.config.image_size, model.config.image_size)
    ids, _ = processor.encode_conversation([("Describe the image.", None)])
    input_ids = torch.tensor([ids])
    mask = torch.ones_like(input_ids)
    gen = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
               pad_token_id=model.config.text_config.pad_token_id)
    with torch.inference_mode():
        feats = model.get_image_features(image)
        embeds = model.merge_image_features(input_ids, feats)

        def ours():
            return model.generate(input_ids=input_ids, attention_mask=mask, image_features=feats, **gen)

        def llm_only():
            return model.language_model.generate(inputs_embeds=embeds, attention_mask=mask, **gen)

        ours(), llm_only()  # warm-up
        times = {"ours": [], "llm": []}
        for _ in range(args.repeats):  # interleaved so both see the same machine load
            for name, fn in (("ours", ours), ("llm", llm_only)):
                start = time.perf_counter()
                out = fn()
                times[name].append(time.perf_counter() - start)
                assert out.shape[1] == args.new_tokens
    ours_s, llm_s = min(times["ours"]), min(times["llm"])
    return {"preset": args.preset, "new_tokens": args.new_tokens, "prompt_tokens": int(input_ids.shape[1]),
            "ours_tok_s": round(args.new_tokens / ours_s, 2), "llm_only_tok_s": round(args.new_tokens / llm_s, 2),
            "ratio": round(llm_s / ours_s, 4)}
