"""FlorenceVLConfig and the named presets.

A Florence-VL model is three transformers configs glued together:
  * `vision_config`  - a native `Florence2Config` (DaViT vision tower + BART encoder; the BART decoder
                       is described by the config but never built, see `model.vision`),
  * `text_config`    - any causal LM config (Llama, Phi-3, ...), the decoder LLM,
  * fusion/projector - DBFusion settings and the projector type.

Presets go from `tiny` (~1M parameters, tests) to the paper's `florence-vl-3b` / `florence-vl-8b`
sizes; real-size presets are meant to be built on the meta device (`build_model(preset, device="meta")`).
"""
from __future__ import annotations

import copy
import hashlib
import json
import math

from transformers import AutoConfig, BartConfig, LlamaConfig, Phi3Config, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec
from transformers.models.florence2.configuration_florence2 import Florence2Config, Florence2VisionConfig

from model.presets import DEFAULT_PROMPTS, FUSIONS, PRESETS, PROJECTORS, TEMPLATES


class FlorenceVLConfig(PreTrainedConfig):
    """Configuration of `FlorenceVLForConditionalGeneration`.

    `encoder_type` selects the vision side: "florence2" (depth + breadth streams, the paper) or any
    encoder registered in `model.encoders` ("davit", "clip", "cvt", "cycle"), configured by `encoder_config`.
    """

    model_type = "florence_vl"
    sub_configs_defaults = {
        "vision_config": Florence2Config,
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
    }

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    encoder_type: str = "florence2"
    encoder_config: dict | None = None
    prompts: dict | None = None
    prompt_token_ids: dict | None = None
    prompt_order: list | None = None  # JSON configs are saved with sorted keys: this keeps the stream order
    fusion: str = "channel"
    projector_type: str = "mlp3x_gelu"
    drop_global_token: bool = False
    attend_prompt_pads: bool = False
    image_token_id: int = 4
    image_size: int = 768
    pad_to_square: bool = False
    template: str = "plain"
    preset: str | None = None
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.prompts is None:
            self.prompts = dict(DEFAULT_PROMPTS)
        if self.prompt_order is None:
            self.prompt_order = list(self.prompts)
        if set(self.prompt_order) != set(self.prompts):
            raise ValueError(f"prompt_order {self.prompt_order} does not name the prompts {list(self.prompts)}")
        self.prompts = {name: self.prompts[name] for name in self.prompt_order}
        if self.fusion not in FUSIONS:
            raise ValueError(f"fusion={self.fusion!r} is not one of {FUSIONS}")
        if self.projector_type not in PROJECTORS:
            raise ValueError(f"projector_type={self.projector_type!r} is not one of {PROJECTORS}")
        if self.template not in TEMPLATES:
            raise ValueError(f"template={self.template!r} is not one of {TEMPLATES}")
        if self.encoder_type == "florence2":
            proj = self.vision_config.vision_config.projection_dim
            d_model = self.vision_config.text_config.d_model
            if proj != d_model:
                raise ValueError(f"Florence-2 projection_dim ({proj}) must equal the BART d_model ({d_model})")
            self.check_position_limits()

    def check_position_limits(self, image_size: int | None = None) -> None:
        """Refuse an image size the Florence-2 position tables cannot hold (ValueError naming the limit)."""
        if self.encoder_type != "florence2":
            return
        ids = self.prompt_token_ids or {}
        lengths = [len(ids[n]) for n in self.prompts if n in ids] or ([1] if self.prompts else [0])
        check_florence2_positions(self.vision_config, image_size or self.image_size, max(lengths))

    # ---- derived quantities -------------------------------------------------------------------
    @property
    def stream_names(self) -> list[str]:
        if self.encoder_type == "florence2":
            return ["depth", *self.prompts.keys()]
        return ["depth"]

    @property
    def stream_width(self) -> int:
        if self.encoder_type == "florence2":
            return self.vision_config.text_config.d_model
        return int((self.encoder_config or {}).get("hidden_size", 64))

    @property
    def fusion_width(self) -> int:
        """Channels entering the projector: (K+1)*D for channel concat, D otherwise."""
        k = len(self.stream_names)
        return self.stream_width * k if self.fusion == "channel" else self.stream_width

    def num_image_tokens(self, image_size: int | None = None) -> int:
        """Image tokens per stream that reach the LLM (token concat multiplies by the stream count)."""
        n = self.grid_size(image_size) ** 2 + (0 if self.drop_global_token else 1)
        return n * len(self.stream_names) if self.fusion == "token" else n

    def grid_size(self, image_size: int | None = None) -> int:
        size = image_size or self.image_size
        if self.encoder_type == "florence2":
            for stride in self.vision_config.vision_config.patch_stride:
                size = (size + stride - 1) // stride if stride > 1 else size
            return size
        from model.encoders import build_encoder

        enc = build_encoder(self.encoder_type, self.encoder_config or {})
        return int(round((enc.num_tokens(size) - 1) ** 0.5))

    def fingerprint(self) -> str:
        """Short hash of the architecture (used by feature stores to refuse mixing models)."""
        volatile = {"transformers_version", "preset", "_name_or_path", "architectures", "dtype", "torch_dtype",
                    "_attn_implementation_autoset", "_attn_implementation"}

        def strip(obj):  # dtype and bookkeeping fields change on save/load, not the architecture
            if isinstance(obj, dict):
                return {k: strip(v) for k, v in obj.items() if k not in volatile}
            return obj

        d = strip(self.to_dict())
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_florence2_positions(florence2_config, image_size: int, prompt_len: int = 0) -> None:
    """Florence-2 has two hard position limits; past them its embedding lookups fail with a bare IndexError.

    * the 2-D image position table (`vision_config.max_position_embeddings`, 50 rows per axis): the patch
      grid side must fit, i.e. image side <= 50 * 32 = 1600 px at Florence-2's total stride 32;
    * the BART encoder's learned positions (`text_config.max_position_embeddings`, 1024): the image tokens
      (grid^2 + the global token) plus the longest task prompt must fit (image side <= 992 px for 14-token prompts).
    """
    vc, tc = florence2_config.vision_config, florence2_config.text_config
    if image_size < 1:
        raise ValueError(f"image_size={image_size} must be a positive number of pixels")
    side, stride = image_size, 1
    for s in vc.patch_stride:
        side, stride = (side + s - 1) // s, stride * s
    table = vc.max_position_embeddings
    if side > table:
        raise ValueError(f"image_size={image_size} gives a {side}x{side} patch grid, but Florence-2's 2-D image position "
                         f"table has {table} entries per axis (max_position_embeddings={table}); at stride {stride} the "
                         f"image side must be <= {table * stride} px - use a smaller image_size")
    n_img, limit = side * side + 1, tc.max_position_embeddings
    if prompt_len and n_img + prompt_len > limit:
        best = math.isqrt(max(limit - 1 - prompt_len, 0)) * stride
        raise ValueError(f"image_size={image_size} gives {n_img} image tokens; with at least {prompt_len} task-prompt tokens "
                         f"the Florence-2 BART encoder needs {n_img + prompt_len} positions but has {limit} "
                         f"(max_position_embeddings={limit}); use image_size <= {best}")


def make_llm_config(llm: dict) -> PreTrainedConfig:
    kw = dict(llm)
    model_type = kw.pop("model_type", "llama")
    cls = {"llama": LlamaConfig, "phi3": Phi3Config}.get(model_type)
    if cls is None:
        return AutoConfig.for_model(model_type, **kw)
    return cls(**kw)


def preset_config(name: str, *, florence2_vocab: int | None = None, llm_vocab: int | None = None,
                  image_token_id: int | None = None, llm_special_ids: dict | None = None,
                  florence2_special_ids: dict | None = None, **overrides) -> FlorenceVLConfig:
    """Build a `FlorenceVLConfig` for a named preset.

    Vocabulary sizes and special-token ids come from the tokenizers (for in-process presets) and are
    passed here so that config and tokenizers always agree. `overrides` set top-level fields
    (fusion, projector_type, drop_global_token, prompts, encoder_type, encoder_config, ...).
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    p = copy.deepcopy(PRESETS[name])
    bart = dict(p["bart"])
    if florence2_vocab is not None:
        bart["vocab_size"] = florence2_vocab
    bart.setdefault("vocab_size", 1024)
    if florence2_special_ids:
        bart.update(florence2_special_ids)
    vision = Florence2VisionConfig(**p["vision"])
    text = BartConfig(**bart)
    llm = dict(p["llm"])
    if llm_vocab is not None:
        llm["vocab_size"] = llm_vocab
    llm.setdefault("vocab_size", 1024)
    if llm_special_ids:
        llm.update(llm_special_ids)
    llm_config = make_llm_config(llm)
    florence2 = Florence2Config(vision_config=vision, text_config=text,
                                image_token_id=min(bart["vocab_size"] - 1, 51289))
    fields = dict(image_size=p["image_size"], projector_type=p["projector_type"], template=p["template"])
    fields.update(overrides)
    if image_token_id is None:
        image_token_id = llm["vocab_size"] - 1
    return FlorenceVLConfig(vision_config=florence2, text_config=llm_config, image_token_id=image_token_id,
                            preset=name, **fields)
