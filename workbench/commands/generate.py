"""`fvl generate`: answer a prompt about one image with a trained or random-init model.

    fvl generate --model runs/recipe/finetune/model --image photo.png --prompt "How many shapes?"
    fvl generate --preset tiny --image packaged:astronaut --device cuda --dtype bfloat16 --json

`--max-new-tokens` is bounded by the LLM's position table (prompt and image tokens included) and refused
up front when it does not fit; a long generation shows a token progress bar on stderr.
"""
from __future__ import annotations

import json

PROGRESS_FROM = 64  # generations of at least this many new tokens show a progress bar


def register(sub) -> None:
    from workbench.commands._common import add_device_args, add_model_args

    p = sub.add_parser("generate", help="generate text for an image and a prompt",
                       description=__doc__.split("\n\n", 1)[0])
    add_model_args(p)
    p.add_argument("--image", required=True, help="image file, or packaged:NAME for an image shipped in a pip package")
    p.add_argument("--prompt", default="What is in the image?", help="the question (ignored by the plain template)")
    p.add_argument("--max-new-tokens", type=int, default=32,
                   help="answer length limit; at most what the model's position table leaves (default 32)")
    p.add_argument("--template", choices=["plain", "phi3", "llama3"], help="override the model's template")
    add_device_args(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def _check_options(args) -> None:
    """Refuse bad option values before any heavy import."""
    from model.device import check_device_text, check_dtype_text
    from workbench.commands._common import UserError, check_model_arg

    check_model_arg(args)
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens {args.max_new_tokens}: must be at least 1")
    try:
        check_device_text(args.device)
        check_dtype_text(args.dtype)
    except ValueError as exc:
        raise UserError(str(exc)) from None


def _load_image(args):
    from workbench.commands._common import UserError
    from workbench.data.images import ImageError, load_image, packaged_image

    try:
        if args.image.startswith("packaged:"):
            return packaged_image(args.image.split(":", 1)[1])
        return load_image(args.image)
    except (ImageError, KeyError, FileNotFoundError) as exc:
        # The reader's advice to "lower min_side" is for `fvl data check --min-side`; generate has no such
        # option (the processor applies the same minimum), so it asks for a larger image instead.
        message = str(exc).replace("remove it or lower min_side", "use a larger image")
        raise UserError(f"--image {args.image}: {message}") from None


def check_new_tokens(model, prompt_tokens: int, max_new_tokens: int) -> None:
    """Refuse a generation that cannot fit in the LLM's position table (prompt and image tokens included)."""
    from workbench.commands._common import UserError

    text_config = getattr(getattr(model, "config", None), "text_config", None)
    limit = getattr(text_config, "max_position_embeddings", None)
    if limit is None:
        return
    room = int(limit) - int(prompt_tokens)
    if room < 1:
        raise UserError(f"--prompt: the prompt with its image tokens takes {prompt_tokens} positions, the model's "
                        f"position table holds {limit}; use a shorter prompt")
    if max_new_tokens > room:
        raise UserError(f"--max-new-tokens {max_new_tokens}: the model's position table holds {limit} positions "
                        f"and the prompt with its image tokens takes {prompt_tokens}; choose at most {room}")


def _token_bar(total: int, enabled: bool):
    """A transformers streamer that advances a tqdm bar by one per generated token (None when disabled)."""
    if not enabled:
        return None
    from tqdm.auto import tqdm
    from transformers.generation.streamers import BaseStreamer

    class TokenBar(BaseStreamer):
        def __init__(self):
            self.bar = tqdm(total=total, desc="generate", unit="tok")
            self.prompt_seen = False

        def put(self, value):
            if not self.prompt_seen:  # generate() first hands over the prompt
                self.prompt_seen = True
                return
            self.bar.update(1)

        def end(self):
            self.bar.close()

    return TokenBar()


def run(args) -> int:
    import time

    _check_options(args)
    image = _load_image(args)
    import torch

    from model.device import resolve_device, resolve_dtype
    from workbench.commands._common import UserError, open_model

    try:
        device = resolve_device(args.device)
        dtype = resolve_dtype(args.dtype, device)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    model, processor = open_model(args, device=str(device), dtype=dtype)
    if processor is None or not hasattr(model, "merge_image_features"):
        raise UserError("generate needs a Florence-VL model with its processor (tokenizers); pass a directory "
                        "written by `fvl train` or `fvl convert`, or --preset NAME")
    model.to(device=device, dtype=dtype)
    batch = processor([image], [args.prompt], template=args.template)
    check_new_tokens(model, batch["input_ids"].shape[1], args.max_new_tokens)
    streamer = _token_bar(args.max_new_tokens, args.max_new_tokens >= PROGRESS_FROM)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=batch["input_ids"].to(device),
                             pixel_values=batch["pixel_values"].to(device=device, dtype=dtype),
                             attention_mask=batch["attention_mask"].to(device), max_new_tokens=args.max_new_tokens,
                             do_sample=False, streamer=streamer)
    seconds = time.perf_counter() - start
    text = processor.decode(out[0], template=args.template)
    if args.json:
        print(json.dumps({"text": text, "new_tokens": int(out.shape[1]), "seconds": round(seconds, 3),
                          "device": str(device), "dtype": str(dtype).replace("torch.", "")}))
    else:
        print(text if text else "(the model ended the answer at once: random-init models often do; train one with `fvl train`)")
    return 0
