"""FlorenceVLForConditionalGeneration: Florence-2 depth + breadth features -> DBFusion -> projector -> LLM.

LLaVA-style: the processor expands `<image>` into N image-token ids; `forward` replaces those positions
of the LLM's input embeddings with the N projected image tokens (`masked_scatter`) and runs any
transformers causal LM (Llama, Phi-3, ...). Labels are -100 outside answers, so the loss covers only
answer tokens. `generate` computes the image features once per request and hands `inputs_embeds` to the
LLM's own `generate`, which keeps a KV cache.

Named hook points (`tap_points()`, used by `workbench.taps`): the vision tower's stages and blocks,
`stream_hooks[<stream>]` (taps `depth`, `prompt.<name>`), the per-prompt encoder layers
(`prompt.<name>.layer{i}`), `fusion.hook_input` (`fusion.input`), `mm_projector` (`fusion.output`) and the
LLM decoder layers (`llm.layer{i}`).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from model.config import FlorenceVLConfig
from model.fusion import DBFusion, Projector
from model.hooks import HookPoint
from model.sources import TapPoint
from model.vision import Florence2DepthBreadth, set_activation_checkpointing


def build_vision_encoder(config: FlorenceVLConfig) -> nn.Module:
    if config.encoder_type == "florence2":
        return Florence2DepthBreadth(config.vision_config, list(config.prompts), config.prompt_token_ids,
                                     attend_prompt_pads=config.attend_prompt_pads,
                                     drop_global_token=config.drop_global_token)
    from model.encoders import build_encoder

    return build_encoder(config.encoder_type, dict(config.encoder_config or {}))


class FlorenceVLPreTrainedModel(PreTrainedModel):
    config_class = FlorenceVLConfig
    config: FlorenceVLConfig
    base_model_prefix = ""
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _no_split_modules = ["LlamaDecoderLayer", "Phi3DecoderLayer", "BartEncoderLayer", "Florence2VisionBlock"]

    def _init_weights(self, module):
        # Sub-models (DaViT, BART encoder, the LLM) initialise themselves; only our projector is ours.
        if isinstance(module, nn.Linear) and getattr(module, "_florence_vl_projector", False):
            nn.init.normal_(module.weight, std=self.config.initializer_range)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


class FlorenceVLForConditionalGeneration(FlorenceVLPreTrainedModel):
    def __init__(self, config: FlorenceVLConfig):
        super().__init__(config)
        self.vision_tower = build_vision_encoder(config)
        self.stream_names = list(config.stream_names)
        self.stream_hooks = nn.ModuleDict({name: HookPoint() for name in self.stream_names})
        self.fusion = DBFusion(config.fusion, self.stream_names)
        self.mm_projector = Projector(config.projector_type, config.fusion_width, config.text_config.hidden_size)
        for m in self.mm_projector.modules():
            if isinstance(m, nn.Linear):
                m._florence_vl_projector = True
        self.language_model = AutoModelForCausalLM.from_config(config.text_config)
        self.post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """transformers' loader for a directory in this project's layout, with the prompt buffers restored.

        The one way to open any model directory (official Florence-2 / Florence-VL checkpoints, hub ids, other
        transformers families) is `model.loading.load_model`; this alias refuses other layouts with that advice
        instead of mis-reading them."""
        config_file = Path(str(pretrained_model_name_or_path)) / "config.json"
        if config_file.is_file():
            try:
                model_type = json.loads(config_file.read_text()).get("model_type")
            except (json.JSONDecodeError, UnicodeDecodeError):
                model_type = None
            if model_type not in (None, FlorenceVLConfig.model_type):
                raise ValueError(f"{pretrained_model_name_or_path} holds a {model_type!r} model, not this project's "
                                 "layout; open it with model.loading.load_model(path), which converts official "
                                 "checkpoints and wraps other families")
        model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        (model[0] if isinstance(model, tuple) else model).restore_buffers()  # tuple: output_loading_info=True
        return model

    def restore_buffers(self) -> None:
        """Rebuild non-persistent buffers (the tokenised prompts), which loading leaves uninitialised."""
        if hasattr(self.vision_tower, "set_prompts") and self.config.prompt_token_ids:
            self.vision_tower.set_prompts(self.config.prompt_token_ids)

    # ---- taps ---------------------------------------------------------------------------------------
    def tap_points(self) -> dict[str, TapPoint]:
        """Every named feature of this model with its hook point, in a stable order (`model.sources`)."""
        has_global = not self.config.drop_global_token
        vt = self.vision_tower
        points = {name: TapPoint(module, "seq" if name.startswith("vision.layer") else "map",
                                 has_global=name.startswith("vision.layer"))
                  for name, module in vt.tap_modules().items()}
        points["depth"] = TapPoint(self.stream_hooks["depth"], "tokens", has_global)
        layer_points = vt.prompt_layer_points() if hasattr(vt, "prompt_layer_points") else {}
        for name in self.stream_names[1:]:
            points.update({tap: TapPoint(module, "tokens", has_global) for tap, module in layer_points.items()
                           if tap.startswith(f"prompt.{name}.layer")})
            points[f"prompt.{name}"] = TapPoint(self.stream_hooks[name], "tokens", has_global)
        fused_kind = "seq" if self.config.fusion == "token" else "tokens"
        points["fusion.input"] = TapPoint(self.fusion.hook_input, fused_kind, has_global)
        points["fusion.output"] = TapPoint(self.mm_projector, fused_kind, has_global)
        inner = getattr(self.language_model, "model", self.language_model)
        for i, layer in enumerate(getattr(inner, "layers", [])):
            points[f"llm.layer{i}"] = TapPoint(layer, "seq")
        return points

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The vision part of the model, what every tap but `llm.*` needs (the feature-source protocol)."""
        return self.get_image_features(pixel_values)

    # ---- embeddings plumbing (lets transformers resize / tie the LLM's embeddings) -------------
    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.language_model.get_output_embeddings()

    # ---- image side -------------------------------------------------------------------------------
    def image_streams(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        """Depth and breadth streams {name: (B, N, D)}, each passed through its hook point."""
        streams = self.vision_tower(pixel_values.to(self.vision_dtype))
        return {name: self.stream_hooks[name](streams[name]) for name in self.stream_names}

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Projected image tokens in the LLM's space, (B, N_img, H)."""
        fused = self.fusion(self.image_streams(pixel_values))
        return self.mm_projector(fused.to(self.mm_projector.encoder_mlp[0].weight.dtype))

    @property
    def vision_dtype(self) -> torch.dtype:
        for p in self.vision_tower.parameters():
            return p.dtype
        return torch.float32

    def set_trainable(self, vision: bool = False, projector: bool = True, llm: bool = True) -> None:
        """Choose what trains: stage 1 of the paper may tune everything, stage 2 tunes projector + LLM."""
        self.vision_tower.requires_grad_(vision)
        self.mm_projector.requires_grad_(projector)
        self.language_model.requires_grad_(llm)

    def _set_gradient_checkpointing(self, enable: bool = True, gradient_checkpointing_func=None):
        pass  # handled in activation_checkpointing_enable below

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None, **_):
        """Checkpoint the LLM's layers and the vision side's blocks (non-reentrant)."""
        set_activation_checkpointing(self.language_model, True)
        if hasattr(self.vision_tower, "set_vision_checkpointing"):
            self.vision_tower.set_vision_checkpointing(True)

    def activation_checkpointing_disable(self):
        set_activation_checkpointing(self.language_model, False)
        if hasattr(self.vision_tower, "set_vision_checkpointing"):
            self.vision_tower.set_vision_checkpointing(False)

    gradient_checkpointing_enable = activation_checkpointing_enable  # the pre-5.x name, kept for callers
    gradient_checkpointing_disable = activation_checkpointing_disable

    # ---- text side ------------------------------------------------------------------------------
    def merge_image_features(self, input_ids: torch.Tensor, image_features: torch.Tensor | None) -> torch.Tensor:
        """LLM input embeddings with `<image>` positions replaced by projected image tokens."""
        embeds = self.get_input_embeddings()(input_ids)
        mask = input_ids == self.config.image_token_id
        n_slots = int(mask.sum())
        if image_features is None:
            if n_slots:
                raise ValueError(f"input_ids contain {n_slots} <image> tokens but no pixel_values were given")
            return embeds
        if n_slots * embeds.shape[-1] != image_features.numel():
            raise ValueError(
                f"image placeholders ({n_slots} tokens) do not match the image features "
                f"({image_features.shape[0]} images x {image_features.shape[1]} tokens); build inputs with the "
                "model's processor, whose num_image_tokens must equal config.num_image_tokens()")
        return embeds.masked_scatter(mask.unsqueeze(-1), image_features.to(embeds.dtype))

    def forward(self, input_ids: torch.LongTensor | None = None, pixel_values: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, labels: torch.LongTensor | None = None,
                image_features: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                **kwargs) -> CausalLMOutputWithPast:
        if inputs_embeds is None:
            if image_features is None and pixel_values is not None:
                image_features = self.get_image_features(pixel_values)
            inputs_embeds = self.merge_image_features(input_ids, image_features)
        return self.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels,
                                   **kwargs)

    @torch.no_grad()
    def generate(self, input_ids: torch.LongTensor, pixel_values: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, image_features: torch.Tensor | None = None,
                 **generate_kwargs) -> torch.LongTensor:
        """Generate answer tokens (only the new ones). Image features are computed once per call."""
        generate_kwargs.pop("labels", None)  # a processor batch may carry (all-ignored) labels
        if image_features is None and pixel_values is not None:
            image_features = self.get_image_features(pixel_values)
        inputs_embeds = self.merge_image_features(input_ids, image_features)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        generate_kwargs.setdefault("pad_token_id", self.config.text_config.pad_token_id)
        return self.language_model.generate(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                            **generate_kwargs)


AutoConfig.register("florence_vl", FlorenceVLConfig, exist_ok=True)
AutoModelForImageTextToText.register(FlorenceVLConfig, FlorenceVLForConditionalGeneration, exist_ok=True)
