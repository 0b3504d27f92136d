"""`fvl generate`: answer a prompt about one image with a trained or random-init model."""
from __future__ import annotations

import json


def register(sub) -> None:
    from workbench.commands._common import add_model_args

    p = sub.add_parser("generate", help="generate text for an image and a prompt")
    add_model_args(p)
    p.add_argument("--image", required=True, help="image file, or packaged:NAME for an image shipped in a pip package")
    p.add_argument("--prompt", default="What is in the image?", help="the question (ignored by the plain template)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--template", choices=["plain", "phi3", "llama3"], help="override the model's template")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    import time

    import torch

    from workbench.cli import UserError
    from workbench.commands._common import open_model

    if args.max_new_tokens < 1:
        raise UserError("--max-new-tokens must be at least 1")
    model, processor = open_model(args)
    if processor is None:
        raise UserError("this model has no processor (tokenizers); pass a directory that holds them")
    from workbench.data.images import ImageError, load_image, packaged_image

    try:
        image = packaged_image(args.image.split(":", 1)[1]) if args.image.startswith("packaged:") else load_image(args.image)
    except (ImageError, KeyError, FileNotFoundError) as exc:
        raise UserError(f"--image {args.image}: {exc}") from exc
    batch = processor([image], [args.prompt], template=args.template)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
                             attention_mask=batch["attention_mask"], max_new_tokens=args.max_new_tokens, do_sample=False)
    seconds = time.perf_counter() - start
    text = processor.decode(out[0], template=args.template)
    if args.json:
        print(json.dumps({"text": text, "new_tokens": int(out.shape[1]), "seconds": round(seconds, 3)}))
    else:
        print(text if text else "(the model ended the answer at once: random-init models often do; train one with `fvl train`)")
    return 0
