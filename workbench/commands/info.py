"""`fvl info`: parameter counts by component, for any preset (real sizes are built on the meta device)."""
from __future__ import annotations

import json


from workbench.commands._common import add_model_args, check_model_arg, open_model, preset_name


def register(sub) -> None:
    p = sub.add_parser("info", help="parameter counts by component (vision_tower, florence2_encoder, projector, llm)")
    add_model_args(p, default_preset="tiny")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def parameter_counts(model) -> dict:
    """Counts by component. The Florence-2 BART decoder is not part of Florence-VL (only the encoder
    produces breadth features), so it is reported separately and excluded from the total."""
    vt = model.vision_tower
    out: dict = {}
    if hasattr(vt, "encoder"):
        out["vision_tower"] = count(vt.vision_tower) + count(vt.multi_modal_projector)
        out["florence2_encoder"] = count(vt.encoder)
    else:
        out["vision_tower"] = count(vt)
        out["florence2_encoder"] = 0
    out["projector"] = count(model.mm_projector)
    out["llm"] = count(model.language_model)
    out["total"] = out["vision_tower"] + out["florence2_encoder"] + out["projector"] + out["llm"]
    if hasattr(vt, "encoder"):
        import torch
        from transformers.models.bart.modeling_bart import BartDecoder

        with torch.device("meta"):
            decoder = BartDecoder(model.config.vision_config.text_config)
        # The decoder shares the token embedding with the encoder, so it is not counted twice.
        dec = count(decoder) - decoder.embed_tokens.weight.numel()
        out["florence2_decoder_excluded"] = dec
        out["florence2_total_with_decoder"] = out["vision_tower"] + out["florence2_encoder"] + dec
    return out


def run(args) -> int:
    check_model_arg(args)  # refuses an unknown preset or a missing directory before torch loads
    if args.model:
        model, _ = open_model(args)
        name = args.model
    else:
        from model.loading import build_model

        name = preset_name(args)
        model, _ = build_model(name, device="meta")
    counts = parameter_counts(model)
    cfg = model.config
    result = {"model": name, **counts, "llm_type": cfg.text_config.model_type, "streams": cfg.stream_names,
              "fusion": cfg.fusion, "projector_type": cfg.projector_type, "image_size": cfg.image_size,
              "image_tokens": cfg.num_image_tokens(),
              "note": "total excludes the Florence-2 BART decoder, which Florence-VL never runs"}
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            shown = f"{value / 1e6:,.2f}M" if isinstance(value, int) and key not in ("image_size", "image_tokens") else value
            print(f"{key:>30}: {shown}")
    return 0
