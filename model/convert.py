"""Official checkpoints -> this project's model, without executing any code from the checkpoint.

Two official layouts are understood (florence-vl.md section 8):

* **Florence-2** (`microsoft/Florence-2-base|large[-ft]`): the remote-code layout (`vision_tower.convs.0.proj`,
  `...window_attn.fn.qkv`, `image_projection` stored [in, out], `language_model.model.*`, config with
  `dim_embed`) or transformers' native layout (`florence-community/*`). `convert_florence2` renames the keys,
  transposes `image_projection`, renames the config fields, adds the `<image>` token and pads the vocabulary
  to a multiple of 64, giving a native `Florence2ForConditionalGeneration` state dict and config.
* **Florence-VL** (LLaVA layout, `jiuhai/florence-vl-{3b,8b}-*`): `model.vision_tower.vision_tower.*` (Florence-2,
  remote-code names), `model.mm_projector.encoder_mlp.*`, `model.layers.*` / `lm_head.*` (Phi-3 or Llama),
  and a `config.json` that is the LLM config plus `mm_*` fields. The Florence-2 part goes through the
  Florence-2 conversion, then onto `FlorenceVLForConditionalGeneration` with the official stream order
  (depth, caption, ocr, grounding), the official hard-coded prompt ids (pads attended, as released) and
  577 or 576 image tokens.

Safety: weights are read from safetensors, or from `pytorch_model.bin` with `torch.load(weights_only=True)`
only (a file that needs arbitrary unpickling is refused). Tokenizers load from local files only and
`trust_remote_code` stays off unless asked for. Every load checks the converted keys against the model:
missing, unexpected or mis-shaped tensors raise `CheckpointError` listing them (`allow_missing=True` is the
explicit escape hatch for missing ones, which then stay randomly initialised and are listed in the report).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from model.config import OFFICIAL_PROMPT_IDS

logger = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"
VOCAB_MULTIPLE = 64
FLORENCE2_TEXT_VOCAB = 51289  # BART 50265 + 1000 <loc_i> + task tokens, before <image>
# The (3, 14) task_ids tensor of FlorenceVisionTower.forward, unpadded (florence-vl.md section 2); stream order
# caption, ocr, grounding is the order DBFusion concatenates them after the depth feature.
OFFICIAL_PROMPT_TOKEN_IDS: dict[str, list[int]] = OFFICIAL_PROMPT_IDS
LLAVA_LLM_TYPES = {"llava_phi": "phi3", "llava_phi3": "phi3", "llava_llama": "llama", "llava": "llama",
                   "llava_mistral": "mistral", "llava_qwen": "qwen2", "llava_qwen2": "qwen2"}
LLAVA_ARCHITECTURES = {"LlavaPhiForCausalLM": "phi3", "LlavaPhi3ForCausalLM": "phi3", "LlavaLlamaForCausalLM": "llama",
                       "LlavaMistralForCausalLM": "mistral", "LlavaQwenForCausalLM": "qwen2"}
# Keys of a LLaVA config.json that describe the multimodal wrapper, not the LLM.
LLAVA_FIELDS = ("mm_", "use_mm_proj", "tune_mm_mlp_adapter", "freeze_mm_mlp_adapter", "unfreeze_mm_vision_tower",
                "image_aspect_ratio", "image_grid_pinpoints", "tokenizer_model_max_length", "tokenizer_padding_side",
                "architectures", "auto_map", "_name_or_path", "model_type", "transformers_version", "torch_dtype",
                "dtype", "florence2_config", "vision_config", "text_config", "mm_vision_tower")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
LAYOUTS = ("florence_vl", "florence2-remote", "florence2-native", "florence-vl-llava")


class CheckpointError(ValueError):
    """A checkpoint that cannot be converted faithfully; the message names the keys/files and the fix."""


@dataclass
class ConversionReport:
    """What a conversion did, kept on the model (`model.conversion_report`) and written as conversion.json."""

    source: str
    layout: str
    loaded: int = 0
    dropped: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    added: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def summary(self) -> str:
        lines = [f"{self.source}: {self.layout} layout, {self.loaded} tensors loaded"]
        if self.dropped:
            lines.append(f"  dropped on purpose ({len(self.dropped)}): {_abbrev(self.dropped)}")
        if self.missing:
            lines.append(f"  MISSING, left randomly initialised ({len(self.missing)}): {_abbrev(self.missing)}")
        lines += [f"  added: {a}" for a in self.added]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _abbrev(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


# =============================================================================================
# Reading files (never unpickling arbitrary objects)
# =============================================================================================
def _torch_load_weights_only(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle.UnpicklingError, RuntimeError, ...
        raise CheckpointError(
            f"refusing to load {path}: it cannot be read with torch.load(weights_only=True) ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}). Loading it would execute arbitrary pickled code. "
            "Convert it to safetensors on a machine you trust (e.g. `safetensors.torch.save_file(state_dict, "
            "'model.safetensors')`) and point --src at that directory") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a flat {{name: tensor}} state dict")
    return obj


def _read_weight_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    if path.suffix in (".bin", ".pt", ".pth"):
        return _torch_load_weights_only(path)
    raise CheckpointError(f"unsupported weight file {path}; expected .safetensors or pytorch_model.bin")


def find_weight_files(directory: str | Path) -> list[Path]:
    """The weight files of a checkpoint directory: safetensors first (single, or shards via the index),
    then pytorch_model.bin (single or sharded)."""
    d = Path(directory)
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = d / index_name
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map", {})
            files = sorted({d / f for f in weight_map.values()})
            absent = [str(f) for f in files if not f.is_file()]
            if absent:
                raise CheckpointError(f"{index} lists shards that are not on disk: {_abbrev(absent)}; "
                                      "download the complete checkpoint")
            return files
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (d / name).is_file():
            return [d / name]
    shards = sorted(d.glob("*.safetensors"))
    if shards:
        return shards
    raise CheckpointError(f"{d} holds no weights (model.safetensors, model.safetensors.index.json or "
                          "pytorch_model.bin); pass the directory that contains them")


def read_state_dict(directory: str | Path) -> dict[str, torch.Tensor]:
    sd: dict[str, torch.Tensor] = {}
    for f in find_weight_files(directory):
        sd.update(_read_weight_file(f))
    return sd


def _read_config(directory: Path) -> dict:
    cfg = directory / "config.json"
    if not cfg.is_file():
        raise CheckpointError(f"{directory} has no config.json; pass a checkpoint directory (Florence-2, "
                              "Florence-VL or one written by `fvl convert` / `fvl train`)")
    try:
        return json.loads(cfg.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{cfg} is not valid JSON ({exc})") from None


# =============================================================================================
# Layout detection and hub resolution
# =============================================================================================
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def detect_layout(path: str | Path) -> str:
    """One of LAYOUTS, read from config.json (and, for Florence-2, the key names)."""
    d = Path(path)
    cfg = _read_config(d)
    model_type = cfg.get("model_type", "")
    if model_type == "florence_vl":
        return "florence_vl"
    if any(k.startswith("mm_") for k in cfg) or str(model_type).startswith("llava"):
        return "florence-vl-llava"
    if model_type == "florence2" or "Florence2ForConditionalGeneration" in (cfg.get("architectures") or []):
        vision = cfg.get("vision_config") or {}
        if "dim_embed" in vision or "auto_map" in cfg:
            return "florence2-remote"
        return "florence2-native"
    raise CheckpointError(
        f"{d}/config.json has model_type {model_type!r}, which is neither Florence-2 (florence2), Florence-VL "
        "(llava_phi / llava_llama with mm_* fields) nor this project's florence_vl; nothing to convert")


def is_official_checkpoint(path) -> bool:
    """True for a local directory in an official layout, or a string that can only be a hub repo id.
    Directories in this project's layout (and anything else) go to transformers' own loader."""
    s = str(path)
    p = Path(s)
    if p.is_dir():
        cfg = p / "config.json"
        if not cfg.is_file():
            return False
        try:
            return json.loads(cfg.read_text()).get("model_type") != "florence_vl"
        except (json.JSONDecodeError, OSError):
            return False
    return not p.exists() and bool(_HUB_ID.match(s))


HUB_PATTERNS = ["*.json", "*.safetensors", "*.bin", "*.model", "*.txt", "*.tiktoken", "vision_tower/*"]


def resolve_source(source: str | Path, revision: str | None = None) -> Path:
    """A local directory as is; a hub repo id through huggingface_hub (cache first, then the network)."""
    p = Path(str(source))
    if p.is_dir():
        return p
    s = str(source)
    if p.exists() or not _HUB_ID.match(s):
        raise CheckpointError(f"{s} is not a checkpoint directory; pass a local directory (or a hub repo id "
                              "such as microsoft/Florence-2-large-ft)")
    import huggingface_hub

    errors = []
    for local_only in (True, False):
        try:
            return Path(huggingface_hub.snapshot_download(s, revision=revision, allow_patterns=HUB_PATTERNS,
                                                          local_files_only=local_only))
        except Exception as exc:  # offline, unknown repo, gated repo, ...
            errors.append(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    raise CheckpointError(
        f"{s} is not a local directory, and downloading the Hugging Face Hub repo {s!r} failed "
        f"({errors[-1]}). Without network access, download it on a machine that has it "
        f"(`hf download {s} --local-dir DIR`, or huggingface_hub.snapshot_download('{s}', local_dir='DIR')), "
        "copy DIR here and pass that local directory instead. If you meant a local directory, check the path.")


# =============================================================================================
# Florence-2: remote-code names -> native names
# =============================================================================================
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


def florence2_remote_to_native(state_dict: dict[str, torch.Tensor]) -> tuple[dict, list[str], list[str]]:
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


def infer_florence2_config(native_sd: dict[str, torch.Tensor]):
    """Recognise Florence-2-base/large from tensor shapes (for checkpoints that ship no Florence-2 config).
    Attention-head counts are not visible in shapes, so only the two published sizes are accepted."""
    from model.config import (FLORENCE2_BASE_TEXT, FLORENCE2_BASE_VISION, FLORENCE2_LARGE_TEXT,
                              FLORENCE2_LARGE_VISION)

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


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """Append rows equal to the mean of the existing ones (a deterministic stand-in for the N(mean, cov) init of
    transformers' resize; the rows are the never-attended <image> placeholder and padding)."""
    if t.shape[0] >= rows:
        return t
    extra = t.float().mean(dim=0, keepdim=True).to(t.dtype).expand(rows - t.shape[0], *t.shape[1:])
    return torch.cat([t, extra], dim=0)


def padded_size(n: int, multiple: int = VOCAB_MULTIPLE) -> int:
    return int(math.ceil(n / multiple) * multiple)


def convert_florence2(state_dict: dict[str, torch.Tensor], config: dict | None, tokenizer=None,
                      source: str = "florence2") -> tuple[object, dict[str, torch.Tensor], ConversionReport]:
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
                                  f"{_abbrev(unexpected)}; this is not a Florence-2 checkpoint in the "
                                  "microsoft/Florence-2 layout")
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
    rows = int(shared.shape[0])
    if f2_config.text_config.vocab_size != rows:
        report.notes.append(f"BART vocab_size {f2_config.text_config.vocab_size} in config, {rows} rows stored: "
                            "using the stored size")
        f2_config.text_config.vocab_size = rows
    if tokenizer is not None:
        if IMAGE_TOKEN not in tokenizer.get_vocab():
            _add_image_token(tokenizer)
            report.added.append(f"{IMAGE_TOKEN} token added to the Florence-2 tokenizer")
        image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    elif remote:  # the remote-code vocabulary has no <image>: it becomes the id after the last row
        image_id = rows
        report.added.append(f"{IMAGE_TOKEN} = id {image_id} (no tokenizer given: the id after the last row)")
    else:  # native checkpoints carry it already
        image_id = f2_config.image_token_id
    new_rows = padded_size(max(rows, image_id + 1))
    if new_rows != rows:
        for k in _EMBEDDING_KEYS:
            native[k] = _pad_rows(native[k], new_rows)
        f2_config.text_config.vocab_size = new_rows
        report.added.append(f"BART vocabulary padded {rows} -> {new_rows} rows (multiple of {VOCAB_MULTIPLE}; new rows "
                            "= mean embedding)")
    f2_config.image_token_id = image_id
    return f2_config, native, report


def _add_image_token(tokenizer) -> None:
    from transformers import AddedToken

    tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)


# =============================================================================================
# Loading weights into a model with full key checking
# =============================================================================================
@contextmanager
def _default_dtype(dtype: torch.dtype | None):
    old = torch.get_default_dtype()
    if dtype is not None and dtype.is_floating_point:
        torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def check_keys(expected: dict[str, torch.Size], state_dict: dict[str, torch.Tensor], source: str,
               allow_missing: bool = False) -> list[str]:
    """Raise CheckpointError on unexpected or mis-shaped tensors, and on missing ones unless allowed.
    Returns the missing keys."""
    missing = sorted(k for k in expected if k not in state_dict)
    unexpected = sorted(k for k in state_dict if k not in expected)
    shapes = sorted(f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k])}"
                    for k in state_dict if k in expected and tuple(state_dict[k].shape) != tuple(expected[k]))
    problems = []
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensors (the model has no place for them): {_abbrev(unexpected)}")
    if shapes:
        problems.append(f"{len(shapes)} tensors with the wrong shape: {_abbrev(shapes, 6)}")
    if missing and not allow_missing:
        problems.append(f"{len(missing)} missing tensors: {_abbrev(missing)}")
    if problems:
        hint = ("; pass allow_missing=True (--allow-missing) to leave missing tensors randomly initialised"
                if missing and not allow_missing and not unexpected and not shapes else "")
        raise CheckpointError(f"{source} does not match the model, refusing a partial load: " + "; ".join(problems) + hint)
    return missing


def build_and_load(model_cls, config, state_dict: dict[str, torch.Tensor], source: str, *,
                   dtype: torch.dtype | None = None, allow_missing: bool = False,
                   report: ConversionReport | None = None):
    """Instantiate `model_cls(config)` and load `state_dict` into it, after checking every key on a meta-device
    copy (no memory spent before the check). Initialisation is skipped when nothing is missing."""
    from transformers.initialization import no_init_weights

    with torch.device("meta"):
        meta = model_cls(config)
    expected = {k: v.shape for k, v in meta.state_dict().items()}
    tied = _tied_aliases(meta)
    del meta
    for alias, src in tied.items():
        if alias not in state_dict and src in state_dict:
            state_dict[alias] = state_dict[src]
    missing = check_keys(expected, state_dict, source, allow_missing)
    if dtype is None:  # like transformers' dtype="auto": keep what the checkpoint stores
        dtype = stored_dtype(state_dict)
    config.dtype = dtype
    with _default_dtype(dtype):
        if missing:
            model = model_cls(config)
        else:
            with no_init_weights():
                model = model_cls(config)
    result = model.load_state_dict(state_dict, strict=False)
    if result.unexpected_keys:  # cannot happen after check_keys; kept as a guard
        raise CheckpointError(f"{source}: unexpected tensors {_abbrev(result.unexpected_keys)}")
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    if report is not None:
        report.loaded = len([k for k in state_dict if k in expected])
        report.missing = missing
    if missing:
        logger.warning("%s: %d tensors missing and left randomly initialised: %s", source, len(missing), _abbrev(missing))
    return model.eval()


def stored_dtype(state_dict: dict[str, torch.Tensor]) -> torch.dtype:
    """The floating dtype holding most of the checkpoint's elements (float32 when none is floating)."""
    counts: dict[torch.dtype, int] = {}
    for t in state_dict.values():
        if t.is_floating_point():
            counts[t.dtype] = counts.get(t.dtype, 0) + t.numel()
    return max(counts, key=counts.get) if counts else torch.float32


def _tied_aliases(model) -> dict[str, str]:
    """{state-dict key: key it shares storage with} for tensors that are the same Parameter."""
    seen: dict[int, str] = {}
    aliases = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            aliases[name] = seen[id(p)]
        else:
            seen[id(p)] = name
    return aliases


# =============================================================================================
# Florence-VL (LLaVA layout) -> FlorenceVLForConditionalGeneration
# =============================================================================================
TOWER_PREFIX = "model.vision_tower.vision_tower."


def llava_llm_config(cfg: dict, state_dict: dict | None = None):
    """The LLM config inside a LLaVA config.json (llava_phi -> phi3, llava_llama -> llama)."""
    from transformers import AutoConfig

    model_type = LLAVA_LLM_TYPES.get(cfg.get("model_type", ""))
    if model_type is None:
        for arch in cfg.get("architectures") or []:
            model_type = model_type or LLAVA_ARCHITECTURES.get(arch)
    if model_type is None and state_dict is not None:
        if any(".self_attn.qkv_proj." in k for k in state_dict):
            model_type = "phi3"
        elif any(".self_attn.q_proj." in k for k in state_dict):
            model_type = "llama"
    if model_type is None:
        raise CheckpointError(f"cannot tell the LLM of model_type {cfg.get('model_type')!r}; expected llava_phi or "
                              "llava_llama (Florence-VL 3B / 8B)")
    fields = {k: v for k, v in cfg.items() if not any(k == f or (f.endswith("_") and k.startswith(f))
                                                     for f in LLAVA_FIELDS)}
    return AutoConfig.for_model(model_type, **fields)


def _find_tower_dir(src: Path, cfg: dict, vision_tower: str | Path | None) -> Path | None:
    if vision_tower is not None:
        p = Path(vision_tower)
        if not (p / "config.json").is_file():
            raise CheckpointError(f"--vision-tower {p} is not a Florence-2 directory (no config.json)")
        return p
    if (src / "vision_tower" / "config.json").is_file():
        return src / "vision_tower"
    mm = cfg.get("mm_vision_tower")
    if mm and Path(str(mm)).is_dir() and (Path(str(mm)) / "config.json").is_file():
        return Path(str(mm))
    return None


def _florence2_config_dict(cfg: dict, tower_dir: Path | None) -> dict | None:
    if tower_dir is not None:
        tcfg = _read_config(tower_dir)
        if tcfg.get("vision_config") and tcfg.get("text_config"):
            return tcfg
    if isinstance(cfg.get("florence2_config"), dict):
        return cfg["florence2_config"]
    vision = cfg.get("vision_config")
    if isinstance(vision, dict) and ("dim_embed" in vision or "embed_dim" in vision):
        text = cfg.get("text_config")
        if isinstance(text, dict) and "d_model" in text:
            return {"vision_config": vision, "text_config": text}
    return None


def _load_tokenizer(directory: Path | None, trust_remote_code: bool):
    if directory is None or not any((directory / f).is_file() for f in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    # AutoTokenizer reads config.json (llava_*/florence2 model types it does not know) and warns about it
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return AutoTokenizer.from_pretrained(str(directory), local_files_only=True, trust_remote_code=trust_remote_code)
    except Exception as exc:
        hint = ("" if trust_remote_code else "; if it needs the checkpoint's own code, review that code and pass "
                "--trust-remote-code (trust_remote_code=True)")
        raise CheckpointError(f"the tokenizer files in {directory} could not be loaded ({type(exc).__name__}: "
                              f"{str(exc)[:300]}){hint}; or remove them to convert without a processor") from None
    finally:
        hf_logging.set_verbosity(verbosity)


def _image_size(*dirs: Path | None) -> int | None:
    for d in dirs:
        if d is None or not (d / "preprocessor_config.json").is_file():
            continue
        pcfg = json.loads((d / "preprocessor_config.json").read_text())
        for key in ("crop_size", "size"):
            v = pcfg.get(key)
            if isinstance(v, dict) and ("height" in v or "shortest_edge" in v):
                return int(v.get("height", v.get("shortest_edge")))
            if isinstance(v, int):
                return v
    return None


def _prompt_ids(f2_rows: int, f2_tokenizer, override: dict | None) -> tuple[dict, str]:
    from model.config import DEFAULT_PROMPTS

    if override is not None:
        return {k: list(v) for k, v in override.items()}, "prompt ids given by the caller"
    if f2_rows >= FLORENCE2_TEXT_VOCAB:
        return {k: list(v) for k, v in OFFICIAL_PROMPT_TOKEN_IDS.items()}, \
            "prompts = the official hard-coded Florence-VL ids (caption, ocr, grounding), pads attended"
    if f2_tokenizer is not None:
        ids = {k: f2_tokenizer(t, add_special_tokens=True)["input_ids"] for k, t in DEFAULT_PROMPTS.items()}
        return ids, "prompts tokenised with the checkpoint's Florence-2 tokenizer"
    raise CheckpointError(f"the Florence-2 vocabulary has {f2_rows} rows (not Florence-2's {FLORENCE2_TEXT_VOCAB}) and no "
                          "Florence-2 tokenizer was found, so the task prompts cannot be tokenised; put the Florence-2 "
                          "tokenizer files next to its config.json (or pass --vision-tower DIR holding them)")


def _tokens_to_drop_global(tokens: int) -> bool:
    if tokens not in (576, 577):
        raise CheckpointError(f"tokens={tokens}: choose 577 (global token + 24x24 patches, what Florence-2 returns) or "
                              "576 (patches only, the count the paper reports)")
    return tokens == 576


def _llm_image_token(state_dict: dict, llm_config, llm_tokenizer, report: ConversionReport) -> int:
    """Give the LLM an <image> id (LLaVA used the out-of-vocabulary index -200) and grow embeddings if needed."""
    emb_key, head_key = "language_model.model.embed_tokens.weight", "language_model.lm_head.weight"
    rows = int(state_dict[emb_key].shape[0])
    if llm_tokenizer is not None:
        if IMAGE_TOKEN not in llm_tokenizer.get_vocab():
            _add_image_token(llm_tokenizer)
            report.added.append(f"{IMAGE_TOKEN} token added to the LLM tokenizer")
        image_id = llm_tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    else:
        image_id = rows
    report.added.append(f"LLM {IMAGE_TOKEN} id = {image_id}")
    if image_id >= rows:
        new_rows = padded_size(image_id + 1)
        state_dict[emb_key] = _pad_rows(state_dict[emb_key], new_rows)
        if head_key in state_dict:
            state_dict[head_key] = _pad_rows(state_dict[head_key], new_rows)
        llm_config.vocab_size = new_rows
        report.added.append(f"LLM vocabulary padded {rows} -> {new_rows} rows (new rows = mean embedding)")
    else:
        llm_config.vocab_size = rows
    return image_id


def _template_for(llm_type: str, src: Path) -> str:
    """Stage-1 ("pretrain") checkpoints were trained on the plain template, SFT ones on the LLM's chat template."""
    if "pretrain" in src.name.lower():
        return "plain"
    return {"phi3": "phi3", "llama": "llama3"}.get(llm_type, "plain")


def convert_florence_vl(src: Path, *, tokens: int = 577, vision_tower: str | Path | None = None,
                        trust_remote_code: bool = False, prompt_token_ids: dict | None = None,
                        template: str | None = None, image_size: int | None = None):
    """Florence-VL LLaVA-layout directory -> (FlorenceVLConfig, state dict in our names, processor or None, report)."""
    from model.config import DEFAULT_PROMPTS, FlorenceVLConfig
    from model.vision import florence2_state_dict_to_extractor

    cfg = _read_config(src)
    sd = read_state_dict(src)
    report = ConversionReport(source=str(src), layout="florence-vl-llava")
    tower_dir = _find_tower_dir(src, cfg, vision_tower)
    tower_sd = {k[len(TOWER_PREFIX):]: v for k, v in sd.items() if k.startswith(TOWER_PREFIX)}
    stray = sorted(k for k in sd if k.startswith("model.vision_tower.") and not k.startswith(TOWER_PREFIX))
    if stray:
        raise CheckpointError(f"{src}: vision tower tensors outside {TOWER_PREFIX}*: {_abbrev(stray)}")
    if tower_sd:
        if tower_dir is not None and (vision_tower is not None):
            report.notes.append(f"the checkpoint's own Florence-2 weights are used; {tower_dir} supplied config/tokenizer")
    elif tower_dir is not None:
        tower_sd = read_state_dict(tower_dir)
        report.notes.append(f"Florence-2 weights read from {tower_dir}")
    else:
        raise CheckpointError(
            f"{src} holds no Florence-2 weights ({TOWER_PREFIX}*) and no vision tower directory was found; pass "
            f"--vision-tower DIR (vision_tower=DIR), a local copy of {cfg.get('mm_vision_tower', 'the Florence-2 tower')}")
    f2_tokenizer = _load_tokenizer(tower_dir, trust_remote_code)
    f2_config, native, f2_report = convert_florence2(tower_sd, _florence2_config_dict(cfg, tower_dir), f2_tokenizer,
                                                     source=f"{src} (vision tower)")
    report.dropped += [TOWER_PREFIX + k for k in f2_report.dropped]
    report.added += f2_report.added
    report.notes += f2_report.notes
    ours: dict[str, torch.Tensor] = {}
    extractor = florence2_state_dict_to_extractor(native)
    n_decoder = sum(1 for k in native if k.startswith("model.language_model.decoder.") or k == "lm_head.weight")
    if n_decoder:
        report.notes.append(f"Florence-2 BART decoder and lm_head ({n_decoder} tensors) not kept: features need only "
                            "the encoder")
    for k, v in extractor.items():
        ours["vision_tower." + k] = v
    # projector and LLM
    llm_config = llava_llm_config(cfg, sd)
    for k, v in sd.items():
        if k.startswith("model.vision_tower."):
            continue
        if k.endswith("rotary_emb.inv_freq"):
            report.dropped.append(k)
        elif k.startswith("model.mm_projector."):
            ours["mm_projector." + k[len("model.mm_projector."):]] = v
        elif k.startswith("model."):
            ours["language_model.model." + k[len("model."):]] = v
        elif k.startswith("lm_head."):
            ours["language_model." + k] = v
        else:
            ours["(unmapped) " + k] = v  # reported as unexpected by the key check
    if "language_model.model.embed_tokens.weight" not in ours:
        raise CheckpointError(f"{src}: no LLM token embedding (model.embed_tokens.weight); not a LLaVA checkpoint")
    if "language_model.lm_head.weight" not in ours and getattr(llm_config, "tie_word_embeddings", False):
        ours["language_model.lm_head.weight"] = ours["language_model.model.embed_tokens.weight"]
    llm_tokenizer = _load_tokenizer(src, trust_remote_code)
    if getattr(llm_config, "pad_token_id", None) is None and llm_tokenizer is not None \
            and llm_tokenizer.pad_token_id is not None:
        llm_config.pad_token_id = llm_tokenizer.pad_token_id  # LLaVA added <pad> to Llama-3 (inferred)
        report.notes.append(f"LLM pad_token_id {llm_config.pad_token_id} taken from the tokenizer")
    image_token_id = _llm_image_token(ours, llm_config, llm_tokenizer, report)
    d_model = f2_config.text_config.d_model
    mm_hidden = int(cfg.get("mm_hidden_size", d_model))
    if mm_hidden != d_model:
        raise CheckpointError(f"{src}: mm_hidden_size {mm_hidden} differs from the Florence-2 d_model {d_model}")
    proj_in = ours.get("mm_projector.encoder_mlp.0.weight")
    streams = 1 + len(DEFAULT_PROMPTS)
    if proj_in is not None and proj_in.shape[1] != streams * d_model:
        raise CheckpointError(f"{src}: the projector takes {proj_in.shape[1]} channels, but channel fusion of "
                              f"{streams} streams x {d_model} gives {streams * d_model}")
    prompt_ids, prompt_note = _prompt_ids(f2_config.text_config.vocab_size, f2_tokenizer, prompt_token_ids)
    report.notes.append(prompt_note)
    drop_global = _tokens_to_drop_global(tokens)
    report.notes.append(f"{tokens} image tokens per image ({'global token dropped' if drop_global else 'global token kept'})")
    llm_type = llm_config.model_type
    config = FlorenceVLConfig(
        vision_config=f2_config, text_config=llm_config, prompts=dict(DEFAULT_PROMPTS), prompt_token_ids=prompt_ids,
        attend_prompt_pads=True, drop_global_token=drop_global, fusion="channel",
        projector_type=cfg.get("mm_projector_type", "mlp3x_gelu"), image_token_id=image_token_id,
        image_size=image_size or _image_size(src, tower_dir) or 768,
        pad_to_square=cfg.get("image_aspect_ratio", "square") == "pad",
        template=template or _template_for(llm_type, src))
    processor, why = _make_processor(config, llm_tokenizer, f2_tokenizer, cfg.get("tokenizer_model_max_length"))
    if processor is None:
        report.notes.append(f"no processor: {why}")
    return config, ours, processor, report


def _make_processor(config, llm_tokenizer, f2_tokenizer, max_length=None):
    from model.processing import FlorenceVLProcessor

    if llm_tokenizer is None:
        return None, "the checkpoint directory holds no LLM tokenizer files"
    if f2_tokenizer is None:
        return None, ("no Florence-2 tokenizer (none in vision_tower/ or --vision-tower DIR); the model still runs "
                      "with the official prompt ids")
    kw = {"max_length": int(max_length)} if max_length else {}
    return FlorenceVLProcessor(llm_tokenizer, f2_tokenizer, image_size=config.image_size,
                               num_image_tokens=config.num_image_tokens(), template=config.template,
                               pad_to_square=config.pad_to_square, **kw), ""


def convert_florence2_with_llm(src: Path, llm_preset: str, *, tokens: int = 577, trust_remote_code: bool = False,
                               prompt_token_ids: dict | None = None, image_size: int | None = None):
    """Florence-2 directory + a random-init LLM/projector of a preset (explicitly requested by the caller)."""
    from model.builder import build_config
    from model.config import DEFAULT_PROMPTS, REAL_SIZE_PRESETS, FlorenceVLConfig
    from model.processing import build_llm_tokenizer
    from model.vision import florence2_state_dict_to_extractor

    f2_tokenizer = _load_tokenizer(src, trust_remote_code)
    sd = read_state_dict(src)
    f2_config, native, report = convert_florence2(sd, _read_config(src), f2_tokenizer, source=str(src))
    llm_tok = None if llm_preset in REAL_SIZE_PRESETS else build_llm_tokenizer()
    preset = build_config(llm_preset, llm_tok) if llm_tok is not None else build_config(llm_preset)
    prompt_ids, note = _prompt_ids(f2_config.text_config.vocab_size, f2_tokenizer, prompt_token_ids)
    config = FlorenceVLConfig(
        vision_config=f2_config, text_config=preset.text_config, prompts=dict(DEFAULT_PROMPTS),
        prompt_token_ids=prompt_ids, attend_prompt_pads=True, drop_global_token=_tokens_to_drop_global(tokens),
        projector_type=preset.projector_type, image_token_id=preset.image_token_id,
        image_size=image_size or _image_size(src) or 768, template=preset.template)
    ours = {"vision_tower." + k: v for k, v in florence2_state_dict_to_extractor(native).items()}
    report.notes += [note, f"mm_projector and language_model are RANDOM-INIT from preset {llm_preset!r} (requested)"]
    processor, why = _make_processor(config, llm_tok, f2_tokenizer)
    if processor is None:
        report.notes.append(f"no processor: {why}")
    return config, ours, processor, report


# =============================================================================================
# Public entry points
# =============================================================================================
def load_florence2(path: str | Path, *, dtype: torch.dtype | None = None, trust_remote_code: bool = False):
    """A Florence-2 directory (remote-code or native) -> (native Florence2ForConditionalGeneration, tokenizer, report)."""
    from transformers import Florence2ForConditionalGeneration

    src = resolve_source(path)
    tokenizer = _load_tokenizer(src, trust_remote_code)
    f2_config, native, report = convert_florence2(read_state_dict(src), _read_config(src), tokenizer, source=str(src))
    model = build_and_load(Florence2ForConditionalGeneration, f2_config, native, str(src), dtype=dtype, report=report)
    model.conversion_report = report
    return model, tokenizer, report


def _load_official_parts(path, *, tokens: int = 577, vision_tower=None, trust_remote_code: bool = False,
                         allow_missing: bool = False, llm_preset: str | None = None, dtype: torch.dtype | None = None,
                         prompt_token_ids: dict | None = None, template: str | None = None,
                         image_size: int | None = None, revision: str | None = None):
    from model.florence_vl import FlorenceVLForConditionalGeneration

    src = resolve_source(path, revision)
    layout = detect_layout(src)
    if layout == "florence_vl":
        return None, None, ConversionReport(source=str(src), layout=layout), src
    if layout == "florence-vl-llava":
        if llm_preset:
            raise CheckpointError("--llm-preset only applies to Florence-2 checkpoints; a Florence-VL checkpoint has its LLM")
        config, sd, processor, report = convert_florence_vl(
            src, tokens=tokens, vision_tower=vision_tower, trust_remote_code=trust_remote_code,
            prompt_token_ids=prompt_token_ids, template=template, image_size=image_size)
        report.layout = layout
    else:
        if not llm_preset:
            raise CheckpointError(
                f"{src} is a Florence-2 checkpoint ({layout}): it has the vision tower but no LLM. For features use "
                "model.convert.load_florence2(path) or `fvl convert --kind florence2` (native transformers layout); "
                "to wrap it into a Florence-VL model with a random-init LLM pass llm_preset=NAME (--llm-preset NAME)")
        config, sd, processor, report = convert_florence2_with_llm(
            src, llm_preset, tokens=tokens, trust_remote_code=trust_remote_code,
            prompt_token_ids=prompt_token_ids, image_size=image_size)
        allow_missing = True  # the LLM and projector are random by request
    model = build_and_load(FlorenceVLForConditionalGeneration, config, sd, str(src), dtype=dtype,
                           allow_missing=allow_missing, report=report)
    model.conversion_report = report
    return model, processor, report, src


def load_official_model(path, *args, **kwargs):
    """`FlorenceVLForConditionalGeneration.from_pretrained` for official layouts (and hub ids).

    Keyword arguments: dtype (or torch_dtype), attn_implementation, tokens (577|576), vision_tower,
    allow_missing, trust_remote_code, llm_preset, prompt_token_ids, template, image_size, revision, device_map
    (a single device)."""
    if args:
        raise TypeError("positional model arguments are not supported when converting an official checkpoint")
    dtype = kwargs.pop("dtype", kwargs.pop("torch_dtype", None))
    if isinstance(dtype, str):
        from model.device import parse_dtype

        dtype = parse_dtype(dtype)
    attn = kwargs.pop("attn_implementation", None)
    device = kwargs.pop("device_map", None) or kwargs.pop("device", None)
    for harmless in ("low_cpu_mem_usage", "local_files_only", "use_safetensors", "cache_dir", "token"):
        kwargs.pop(harmless, None)
    allowed = {"tokens", "vision_tower", "allow_missing", "trust_remote_code", "llm_preset", "prompt_token_ids",
               "template", "image_size", "revision"}
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise TypeError(f"unsupported arguments for an official checkpoint: {unknown}; supported: {sorted(allowed)}")
    model, _processor, _report, src = _load_official_parts(path, dtype=dtype, **kwargs)
    if model is None:  # a hub repo in this project's own layout
        from model.florence_vl import FlorenceVLForConditionalGeneration

        extra = {"dtype": dtype} if dtype is not None else {}
        model = FlorenceVLForConditionalGeneration.from_pretrained(src, **extra)
    _finish(model, device, attn)
    return model


def _finish(model, device, attn):
    from model.device import apply_attn_implementation

    if device is not None and not isinstance(device, dict) and device != "auto":
        model.to(device)
    dev = next(model.parameters()).device
    apply_attn_implementation(model, attn, dev)
    model.eval()


def load_official(path, *, device: str | torch.device | None = None, dtype: torch.dtype | None = None, **kwargs):
    """-> (FlorenceVLForConditionalGeneration, FlorenceVLProcessor or None); used by `model.builder.load_model`."""
    attn = kwargs.pop("attn_implementation", None)
    model, processor, report, src = _load_official_parts(path, dtype=dtype, **kwargs)
    if model is None:
        from model.builder import load_model

        return load_model(src, device=device, dtype=dtype)
    _finish(model, device, attn)
    if processor is None:
        logger.warning("%s: no processor returned (%s)", src,
                       next((n for n in report.notes if n.startswith("no processor")), ""))
    return model, processor


def convert_checkpoint(src, out, *, kind: str = "auto", tokens: int = 577, vision_tower=None,
                       trust_remote_code: bool = False, allow_missing: bool = False, llm_preset: str | None = None,
                       dtype: torch.dtype | None = None, template: str | None = None,
                       image_size: int | None = None) -> ConversionReport:
    """Convert `src` (directory or hub id) and write `out`: this project's layout (loadable by
    `model.builder.load_model`), or, for `kind="florence2"` without `llm_preset`, transformers' native
    Florence-2 layout. Writes conversion.json with the report."""
    if kind not in ("auto", "florence2", "florence-vl"):
        raise CheckpointError(f"kind {kind!r} is not auto, florence2 or florence-vl")
    local = resolve_source(src)
    layout = detect_layout(local)
    if layout == "florence_vl":
        raise CheckpointError(f"{local} is already in this project's layout; load it with model.builder.load_model")
    is_f2 = layout.startswith("florence2")
    if kind == "florence2" and not is_f2:
        raise CheckpointError(f"{local} is a {layout} checkpoint, not Florence-2; use --kind auto or florence-vl")
    if kind == "florence-vl" and is_f2:
        raise CheckpointError(f"{local} is a Florence-2 checkpoint ({layout}), not Florence-VL; use --kind florence2")
    out = Path(out)
    if out.resolve() == local.resolve():
        raise CheckpointError("--out must differ from --src")
    if is_f2 and not llm_preset:
        model, tokenizer, report = load_florence2(local, dtype=dtype, trust_remote_code=trust_remote_code)
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(out)
        else:
            report.notes.append("no tokenizer files in the source: none written")
        report.notes.append("written in transformers' native Florence-2 layout (Florence2ForConditionalGeneration); "
                            "add --llm-preset NAME for a Florence-VL directory")
    else:
        from model.builder import save_model

        model, processor, report, _ = _load_official_parts(
            local, tokens=tokens, vision_tower=vision_tower, trust_remote_code=trust_remote_code,
            allow_missing=allow_missing, llm_preset=llm_preset, dtype=dtype, template=template, image_size=image_size)
        save_model(model, processor, out)
    (out / "conversion.json").write_text(json.dumps(report.to_dict(), indent=2))
    return report
