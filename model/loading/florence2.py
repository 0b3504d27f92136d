"""Florence-2 weights and config: the remote-code layout -> transformers' native one (pure: dicts in, dicts out).

The official Florence-2 checkpoints (`microsoft/Florence-2-base|large[-ft]`) use the remote-code names
(`vision_tower.convs.0.proj`, `...window_attn.fn.qkv`, `image_projection` stored [in, out], `language_model.model.*`,
a config with `dim_embed`); transformers' native `Florence2ForConditionalGeneration` (and `florence-community/*`)
uses others. `convert_florence2` renames the keys, transposes `image_projection`, renames the config fields, adds
the `<image>` token and pads the vocabulary to a multiple of 64, as transformers' own conversion script does
(florence-vl.md section 8), and rebuilds the fixed tables a checkpoint saved from `named_parameters()` lacks.
"""
from __future__ import annotations

import dataclasses
import math
import re

from model.presets import (FLORENCE2_BASE_TEXT, FLORENCE2_BASE_VISION, FLORENCE2_LARGE_TEXT, FLORENCE2_LARGE_VISION,
                           OFFICIAL_PROMPT_IDS)
from model.loading.errors import CheckpointError, ConversionReport, abbrev

IMAGE_TOKEN = "<image>"
VOCAB_MULTIPLE = 64
FLORENCE2_TEXT_VOCAB = 51289  # BART 50265 + 1000 <loc_i> + task tokens, before <image>
# The (3, 14) task_ids tensor of FlorenceVisionTower.forward, unpadded (florence-vl.md section 2); stream order
# caption, ocr, grounding is the order DBFusion concatenates them after the depth feature.
OFFICIAL_PROMPT_TOKEN_IDS: dict[str, list[int]] = OFFICIAL_PROMPT_IDS
# The cosine table of the temporal embedding: a buffer, so absent from a tower saved from named_parameters().
TEMPORAL_TABLE = "model.multi_modal_projector.visual_temporal_embed.pos_idx_to_embed"

_BLOCK = r"^vision_tower\.blocks\.(\d+)\.(\d+)\."
_NATIVE_BLOCK = r"model.vision_tower.blocks.\1.\2."
FLORENCE2_KEY_RULES: list[tuple[re.Pattern, str]] = [(re.compile(a), b) for a, b in [
    (r"^vision_tower\.convs\.(\d+)\.proj\.", r"model.vision_tower.convs.\1.conv."),
    (r"^vision_tower\.convs\.(\d+)\.norm\.", r"model.vision_tower.convs.\1.norm."),
    (_BLOCK + r"(spatial|channel)_block\.conv([12])\.fn\.dw\.", _NATIVE_BLOCK + r"\3_block.conv\4."),
    (_BLOCK + r"spatial_block\.window_attn\.norm\.", _NATIVE_BLOCK + r"spatial_block.norm1."),
    (_BLOCK + r"spatial_block\.window_attn\.fn\.(qkv|proj)\.", _NATIVE_BLOCK + r"spatial_block.window_attn.\3."),
    (_BLOCK + r"channel_block\.channel_attn\.norm\.", _NATIVE_BLOCK + r"channel_block.norm1."),
    (_BLOCK + r"channel_block\.channel_attn\.fn\.(qkv|proj)\.", _NATIVE_BLOCK + r"channel_block.channel_attn.\3."),
    (_BLOCK + r"(spatial|channel)_block\.ffn\.norm\.", _NATIVE_BLOCK + r"\3_block.norm2."),
    (_BLOCK + r"(spatial|channel)_block\.ffn\.fn\.net\.(fc[12])\.", _NATIVE_BLOCK + r"\3_block.ffn.\4."),
    (r"^image_projection$", r"model.multi_modal_projector.image_projection.weight"),
    (r"^image_proj_norm\.", r"model.multi_modal_projector.image_proj_norm."),
    (r"^image_pos_embed\.", r"model.multi_modal_projector.image_position_embed."),
    (r"^visual_temporal_embed\.", r"model.multi_modal_projector.visual_temporal_embed."),
    (r"^language_model\.model\.", r"model.language_model."),
    (r"^language_model\.lm_head\.", r"lm_head."),
]]
# Present in remote-code checkpoints, unused by the native model (DaViT's classifier norm/head are never on the
# feature path; BART's final_logits_bias is all zeros in Florence-2 and has no native counterpart).
FLORENCE2_DROPPED = [re.compile(p) for p in (r"^vision_tower\.norms\.", r"^vision_tower\.head\.",
                                             r"^language_model\.final_logits_bias$")]
_EMBEDDING_KEYS = ("model.language_model.shared.weight", "model.language_model.encoder.embed_tokens.weight",
                   "model.language_model.decoder.embed_tokens.weight", "lm_head.weight")




def florence2_remote_to_native(state_dict: dict) -> tuple[dict, list[str], list[str]]:
    """Rename remote-code Florence-2 keys to native ones (image_projection transposed).
    Returns (native state dict, dropped keys, unexpected keys)."""
    out, dropped, unexpected = {}, [], []
    for key, value in state_dict.items():
        if any(p.search(key) for p in FLORENCE2_DROPPED):
            if key.endswith("final_logits_bias") and value.abs().max().item() != 0:
                raise CheckpointError(f"{key} is non-zero; the native Florence-2 has no final_logits_bias, so "
                                      "this checkpoint cannot be converted exactly")
            dropped.append(key)
            continue
        for pattern, repl in FLORENCE2_KEY_RULES:
            if pattern.search(key):
                new = pattern.sub(repl, key)
                out[new] = value.t().contiguous() if key == "image_projection" else value
                break
        else:
            unexpected.append(key)
    return out, dropped, unexpected

def _is_remote_florence2(state_dict: dict) -> bool:
    return any(k.startswith("vision_tower.convs.") or k == "image_projection" for k in state_dict)


def _config_fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()


def florence2_config_from_dict(cfg: dict):
    """A native `Florence2Config` from a remote-code (dim_embed, image_pos_embed, ...) or native config dict."""
    from transformers import BartConfig
    from transformers.models.florence2.configuration_florence2 import Florence2Config, Florence2VisionConfig

    vision = dict(cfg.get("vision_config") or {})
    text = dict(cfg.get("text_config") or {})
    if not vision or not text:
        raise CheckpointError("the Florence-2 config needs both vision_config and text_config")
    if "dim_embed" in vision:  # remote-code field names
        vision["embed_dim"] = vision.pop("dim_embed")
        pos = vision.pop("image_pos_embed", None) or {}
        if pos and pos.get("type", "learned_abs_2d") != "learned_abs_2d":
            raise CheckpointError(f"image_pos_embed type {pos.get('type')!r} has no native counterpart")
        if "max_pos_embeddings" in pos:
            vision["max_position_embeddings"] = pos["max_pos_embeddings"]
        temporal = vision.pop("visual_temporal_embedding", None) or {}
        if temporal and temporal.get("type", "COSINE") != "COSINE":
            raise CheckpointError(f"visual_temporal_embedding type {temporal.get('type')!r} has no native counterpart")
        if "max_temporal_embeddings" in temporal:
            vision["max_temporal_embeddings"] = temporal["max_temporal_embeddings"]
        source = vision.pop("image_feature_source", None)
        if source is not None and list(source) != ["spatial_avg_pool", "temporal_avg_pool"]:
            raise CheckpointError(f"image_feature_source {source} differs from the native projector's fixed "
                                  "[spatial_avg_pool, temporal_avg_pool]")
    vision_fields = _config_fields(Florence2VisionConfig)
    text_fields = _config_fields(BartConfig)
    vision = {k: v for k, v in vision.items() if k in vision_fields and k not in ("transformers_version", "dtype")}
    text = {k: v for k, v in text.items() if k in text_fields and k not in ("transformers_version", "dtype",
                                                                           "architectures")}
    image_token_id = cfg.get("image_token_id", text.get("vocab_size", FLORENCE2_TEXT_VOCAB))
    return Florence2Config(vision_config=Florence2VisionConfig(**vision), text_config=BartConfig(**text),
                           image_token_id=image_token_id)


def infer_florence2_config(native_sd: dict):
    """Recognise Florence-2-base/large from tensor shapes (for checkpoints that ship no Florence-2 config).
    Attention-head counts are not visible in shapes, so only the two published sizes are accepted."""
    try:
        embed_dim = tuple(native_sd[f"model.vision_tower.convs.{i}.conv.weight"].shape[0] for i in range(4))
        d_model = native_sd["model.multi_modal_projector.image_projection.weight"].shape[0]
    except KeyError:
        return None
    depths = tuple(1 + max((int(m.group(1)) for k in native_sd
                            if (m := re.match(rf"model\.vision_tower\.blocks\.{s}\.(\d+)\.", k))), default=-1)
                   for s in range(4))
    enc_layers = 1 + max((int(m.group(1)) for k in native_sd
                          if (m := re.match(r"model\.language_model\.encoder\.layers\.(\d+)\.", k))), default=-1)
    for vision, text in ((FLORENCE2_LARGE_VISION, FLORENCE2_LARGE_TEXT), (FLORENCE2_BASE_VISION, FLORENCE2_BASE_TEXT)):
        if (tuple(vision["embed_dim"]) == embed_dim and tuple(vision["depths"]) == depths
                and text["d_model"] == d_model and text["encoder_layers"] == enc_layers):
            text = dict(text, vocab_size=_embedding_rows(native_sd) or text["vocab_size"])
            vision = dict(vision, drop_path_rate=0.1)
            return {"vision_config": dict(vision, embed_dim=list(embed_dim)), "text_config": text}
    return None


def _embedding_rows(native_sd: dict) -> int | None:
    for k in _EMBEDDING_KEYS:
        if k in native_sd:
            return int(native_sd[k].shape[0])
    return None


def pad_rows(t, rows: int):
    """Append rows equal to the mean of the existing ones (a deterministic stand-in for the N(mean, cov) init of
    transformers' resize; the rows are the never-attended <image> placeholder and padding)."""
    import torch

    if t.shape[0] >= rows:
        return t
    extra = t.float().mean(dim=0, keepdim=True).to(t.dtype).expand(rows - t.shape[0], *t.shape[1:])
    return torch.cat([t, extra], dim=0)


def padded_size(n: int, multiple: int = VOCAB_MULTIPLE) -> int:
    return int(math.ceil(n / multiple) * multiple)



def rebuild_fixed_tables(native: dict, f2_config, report: ConversionReport) -> None:
    """Put back the tables that are not trained but fixed by the config, when the checkpoint lacks them.

    Why: the official Florence-VL training script saves `vision_tower/pytorch_model.bin` from
    `named_parameters()`, so buffers are absent: the cosine table of `visual_temporal_embed` (a function of
    the config alone, rebuilt here with transformers' own module) and BART's `final_logits_bias` (all zeros
    in Florence-2, and absent from the native model, so nothing to put back)."""
    from transformers.models.florence2.modeling_florence2 import Florence2VisionPositionalEmbeddingCosine1D

    if TEMPORAL_TABLE not in native:
        native[TEMPORAL_TABLE] = Florence2VisionPositionalEmbeddingCosine1D(f2_config).pos_idx_to_embed.detach().clone()
        report.rebuilt.append(f"{TEMPORAL_TABLE} (cosine table, {tuple(native[TEMPORAL_TABLE].shape)})")


def convert_florence2(state_dict: dict, config: dict | None, tokenizer=None,
                      source: str = "florence2") -> tuple[object, dict, ConversionReport]:
    """Florence-2 weights (remote-code or native names) -> (native Florence2Config, native state dict, report).

    Adds `<image>` (to the tokenizer when given, else as the id after the last embedding row) and pads the
    BART vocabulary to a multiple of 64, as transformers' conversion script does."""
    remote = _is_remote_florence2(state_dict)
    report = ConversionReport(source=source, layout="florence2-remote" if remote else "florence2-native")
    if remote:
        native, dropped, unexpected = florence2_remote_to_native(state_dict)
        report.dropped += dropped
        if unexpected:
            raise CheckpointError(f"{source}: {len(unexpected)} Florence-2 tensors match no known remote-code name: "
                                  f"{abbrev(unexpected)}; this is not a Florence-2 checkpoint in the "
                                  "microsoft/Florence-2 layout")
        if not any(k.endswith("final_logits_bias") for k in state_dict):
            report.notes.append("language_model.final_logits_bias absent (a checkpoint saved from named_parameters); "
                                "Florence-2's is all zeros and the native model has none: nothing to rebuild")
    else:
        native = dict(state_dict)
    # tied BART embeddings may be stored once
    shared = next((native[k] for k in _EMBEDDING_KEYS if k in native), None)
    if shared is None:
        raise CheckpointError(f"{source}: no BART token embedding (language_model.model.shared.weight) found")
    for k in _EMBEDDING_KEYS:
        native.setdefault(k, shared)
    if config is None:
        config = infer_florence2_config(native)
        if config is None:
            raise CheckpointError(f"{source}: no Florence-2 config was found and the tensor shapes match neither "
                                  "Florence-2-base nor -large; pass the Florence-2 directory (with its config.json) "
                                  "as --vision-tower DIR")
        report.notes.append("Florence-2 config inferred from tensor shapes (published base/large sizes)")
    f2_config = florence2_config_from_dict(config)
    rebuild_fixed_tables(native, f2_config, report)
    rows = int(shared.shape[0])
    if f2_config.text_config.vocab_size != rows:
        report.notes.append(f"BART vocab_size {f2_config.text_config.vocab_size} in config, {rows} rows stored: "
                            "using the stored size")
        f2_config.text_config.vocab_size = rows
    f2_config.image_token_id = _image_token_id(tokenizer, remote, rows, f2_config, report)
    new_rows = padded_size(max(rows, f2_config.image_token_id + 1))
    if new_rows != rows:
        for k in _EMBEDDING_KEYS:
            native[k] = pad_rows(native[k], new_rows)
        f2_config.text_config.vocab_size = new_rows
        report.added.append(f"BART vocabulary padded {rows} -> {new_rows} rows (multiple of {VOCAB_MULTIPLE}; new rows "
                            "= mean embedding)")
    return f2_config, native, report


def _image_token_id(tokenizer, remote: bool, rows: int, f2_config, report: ConversionReport) -> int:
    if tokenizer is not None:
        if IMAGE_TOKEN not in tokenizer.get_vocab():
            add_image_token(tokenizer)
            report.added.append(f"{IMAGE_TOKEN} token added to the Florence-2 tokenizer")
        return tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if remote:  # the remote-code vocabulary has no <image>: it becomes the id after the last row
        report.added.append(f"{IMAGE_TOKEN} = id {rows} (no tokenizer given: the id after the last row)")
        return rows
    return f2_config.image_token_id  # native checkpoints carry it already


def add_image_token(tokenizer) -> None:
    from transformers import AddedToken

    tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
