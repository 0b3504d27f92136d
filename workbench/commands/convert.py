"""`fvl convert`: official Florence-2 / Florence-VL checkpoints -> this project's layout.

Converting once and loading the result is faster and clearer than converting on every load, and the
written conversion.json records what was renamed, dropped or added. No code from the checkpoint runs.
"""
from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser(
        "convert", help="convert an official Florence-2 / Florence-VL checkpoint into this project's layout",
        description="Convert a Florence-VL checkpoint (LLaVA layout, e.g. jiuhai/florence-vl-8b-sft) into a directory "
                    "loadable by `fvl` (model.loading.load_model), or a Florence-2 checkpoint (microsoft/Florence-2-*) "
                    "into transformers' native Florence-2 layout. Weights are read from safetensors or with "
                    "torch.load(weights_only=True); nothing is unpickled or executed.")
    p.add_argument("--src", required=True, help="checkpoint directory, or a hub repo id (needs network access)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--kind", choices=["auto", "florence2", "florence-vl"], default="auto",
                   help="what --src is (default: detected from its config.json)")
    p.add_argument("--tokens", type=int, choices=[577, 576], default=577,
                   help="image tokens per image: 577 keeps Florence-2's global token, 576 drops it (the paper's count)")
    p.add_argument("--vision-tower", metavar="DIR",
                   help="local Florence-2 directory (config, tokenizer, and weights if --src lacks them); default: "
                        "--src/vision_tower or mm_vision_tower when it is a local directory")
    p.add_argument("--llm-preset", metavar="NAME",
                   help="Florence-2 only: write a Florence-VL directory with a RANDOM-INIT LLM and projector of this preset")
    p.add_argument("--dtype", default="auto", help="auto (keep the stored dtype), float32, bfloat16 or float16")
    p.add_argument("--template", choices=["plain", "phi3", "llama3"],
                   help="conversation template (default: phi3 / llama3 by LLM, plain for *pretrain* checkpoints)")
    p.add_argument("--image-size", type=int, help="image side in pixels (default: preprocessor_config.json, else 768)")
    p.add_argument("--allow-missing", action="store_true",
                   help="load even if tensors are missing (they stay randomly initialised and are listed)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow tokenizers/configs that need the checkpoint's own Python code (off by default)")
    p.set_defaults(func=run)


def run(args) -> int:
    from workbench.commands._common import UserError, check_output

    check_output(args.out)  # before torch and transformers load

    from model.device import parse_dtype
    from model.loading import CheckpointError, convert_checkpoint

    try:
        dtype = parse_dtype(args.dtype)
        report = convert_checkpoint(args.src, args.out, kind=args.kind, tokens=args.tokens,
                                    vision_tower=args.vision_tower, trust_remote_code=args.trust_remote_code,
                                    allow_missing=args.allow_missing, llm_preset=args.llm_preset, dtype=dtype,
                                    template=args.template, image_size=args.image_size)
    except (CheckpointError, ValueError, FileNotFoundError) as exc:
        raise UserError(str(exc)) from None
    print(report.summary())
    print(f"written: {args.out} (report: {args.out}/conversion.json)")
    return 0
