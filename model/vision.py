"""Depth and breadth features on transformers' native Florence-2 classes.

`Florence2DepthBreadth` runs the DaViT vision tower ONCE per image, projects it to the depth feature V
(B, N, D) with Florence-2's own multimodal projector, then runs the Florence-2 BART encoder over
[V ; prompt_k] for ALL K task prompts in ONE batched pass (prompts right-padded and masked, so BART's
absolute positions of the image tokens never move). The image positions of each prompt's encoder output
are the breadth features V'_k. Only the encoder is built: the BART decoder is never needed for features.

Submodule names mirror `Florence2ForConditionalGeneration` (`vision_tower`, `multi_modal_projector`,
and `encoder` = `language_model.encoder`), so native checkpoints load by a prefix rename
(`florence2_state_dict_to_extractor`).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.models.bart.modeling_bart import BartEncoder
from transformers.models.florence2.modeling_florence2 import Florence2MultiModalProjector, Florence2VisionBackbone

from model.config import check_florence2_positions
from model.hooks import HookPoint, davit_block_taps
from model.tokens import split_prompts


def set_activation_checkpointing(model, enabled: bool) -> None:
    """Turn a transformers model's activation checkpointing on (non-reentrant) or off, under the name this
    transformers version uses (`activation_checkpointing_*`; older 5.x releases: `gradient_checkpointing_*`)."""
    if enabled:
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()


class Florence2DepthBreadth(nn.Module):
    """Florence-2 vision tower + BART encoder producing {"depth": V, prompt_name: V'_k, ...}."""

    def __init__(self, florence2_config, prompt_names: list[str], prompt_token_ids: dict[str, list[int]] | None = None,
                 attend_prompt_pads: bool = False, drop_global_token: bool = False):
        super().__init__()
        self.config = florence2_config
        self.vision_tower = Florence2VisionBackbone(florence2_config.vision_config)
        self.multi_modal_projector = Florence2MultiModalProjector(florence2_config)
        self.encoder = BartEncoder(florence2_config.text_config)
        self.prompt_names = list(prompt_names)
        self.attend_prompt_pads = attend_prompt_pads
        self.drop_global_token = drop_global_token
        self.stream_names = ["depth", *self.prompt_names]
        self.hidden_size = florence2_config.text_config.d_model
        self.pad_token_id = florence2_config.text_config.pad_token_id
        ids, mask = self._pad_prompts(prompt_token_ids or {})
        self.register_buffer("prompt_ids", ids, persistent=False)
        self.register_buffer("prompt_mask", mask, persistent=False)
        # Hook points for the taps prompt.{name}.layer{i}: the batched encoder runs every prompt as its own
        # rows, so each prompt's image positions after each layer are handed to a pass-through module.
        n_layers = florence2_config.text_config.encoder_layers
        self.layer_points = nn.ModuleDict({name: nn.ModuleList(HookPoint() for _ in range(n_layers))
                                           for name in self.prompt_names})
        self._vision_checkpointing = False

    # ---- prompts ------------------------------------------------------------------------------
    def _pad_prompts(self, prompt_token_ids: dict[str, list[int]]):
        if not self.prompt_names:
            return torch.zeros(0, 1, dtype=torch.long), torch.zeros(0, 1, dtype=torch.long)
        missing = [n for n in self.prompt_names if n not in prompt_token_ids]
        if missing:
            # Filled later by set_prompts(); forward refuses to run until then.
            return torch.zeros(0, 1, dtype=torch.long), torch.zeros(0, 1, dtype=torch.long)
        seqs = [list(prompt_token_ids[n]) for n in self.prompt_names]
        length = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), length), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), length), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
            mask[i, : len(s)] = 1
        return ids, mask

    def set_prompts(self, prompt_token_ids: dict[str, list[int]]) -> None:
        """Set the tokenised task prompts (right-padded to a common length)."""
        ids, mask = self._pad_prompts(prompt_token_ids)
        device = self.multi_modal_projector.image_projection.weight.device
        self.prompt_ids = ids.to(device) if device.type != "meta" else ids
        self.prompt_mask = mask.to(device) if device.type != "meta" else mask

    # ---- the vision tower ---------------------------------------------------------------------
    def set_vision_checkpointing(self, enabled: bool) -> None:
        """Gradient checkpointing for DaViT blocks (BART uses transformers' own)."""
        self._vision_checkpointing = enabled
        for stage in self.vision_tower.blocks:
            for block in stage:
                if enabled and not hasattr(block, "_plain_forward"):
                    block._plain_forward = block.forward
                    block.forward = _checkpointed(block._plain_forward)
                elif not enabled and hasattr(block, "_plain_forward"):
                    block.forward = block._plain_forward
                    del block._plain_forward
        set_activation_checkpointing(self.encoder, enabled)

    def depth(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """V = Florence-2 projected image tokens, (B, 1 + h*w, D), global token first."""
        # A clear ValueError naming the limit instead of an IndexError deep inside an embedding lookup.
        prompt_len = self.prompt_ids.shape[1] if self.prompt_ids.shape[0] else 0
        check_florence2_positions(self.config, max(pixel_values.shape[-2:]), prompt_len)
        feats = self.vision_tower(pixel_values).last_hidden_state
        return self.multi_modal_projector(feats)

    def breadth(self, depth: torch.Tensor, prompt_names: list[str] | None = None) -> torch.Tensor:
        """All prompts in one batched BART encoder pass -> (B, K, N, D) image positions."""
        if self.prompt_ids.shape[0] != len(self.prompt_names):
            raise RuntimeError("the Florence-2 prompts are not tokenised yet; call set_prompts() "
                               "(build_model() and from_pretrained() do this for you)")
        idx = list(range(len(self.prompt_names))) if prompt_names is None else \
            [self.prompt_names.index(n) for n in prompt_names]
        ids, mask = self.prompt_ids[idx], self.prompt_mask[idx]
        bsz, n_img, dim = depth.shape
        k, length = ids.shape
        prompt_emb = self.encoder.embed_tokens(ids).to(depth.dtype)  # (K, L, D)
        inputs = torch.cat([depth.unsqueeze(1).expand(bsz, k, n_img, dim),
                            prompt_emb.unsqueeze(0).expand(bsz, k, length, dim)], dim=2).reshape(bsz * k, n_img + length, dim)
        prompt_mask = torch.ones_like(mask) if self.attend_prompt_pads else mask
        attn = torch.cat([torch.ones(k, n_img, dtype=mask.dtype, device=mask.device), prompt_mask], dim=1)
        attn = attn.unsqueeze(0).expand(bsz, k, n_img + length).reshape(bsz * k, -1)
        names = [self.prompt_names[i] for i in idx]
        hooked = any(point._forward_hooks for name in names for point in self.layer_points[name])
        out = self.encoder(inputs_embeds=inputs, attention_mask=attn, output_hidden_states=hooked)
        if hooked:  # hidden_states[0] is the input embedding; [i + 1] is the output of layer i
            for i, hidden in enumerate(out.hidden_states[1:]):
                per_prompt = split_prompts(hidden, k, n_img)
                for j, name in enumerate(names):
                    view = per_prompt[:, j, 1:] if self.drop_global_token else per_prompt[:, j]
                    self.layer_points[name][i](view)
        return split_prompts(out.last_hidden_state, k, n_img)

    def forward(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        depth = self.depth(pixel_values)
        streams = {"depth": depth}
        if self.prompt_names:
            breadth = self.breadth(depth)
            for i, name in enumerate(self.prompt_names):
                streams[name] = breadth[:, i]
        if self.drop_global_token:
            streams = {k: v[:, 1:] for k, v in streams.items()}
        return streams

    # ---- introspection for taps ---------------------------------------------------------------
    def num_tokens(self, image_size: int) -> int:
        size = image_size
        for stride in self.config.vision_config.patch_stride:
            size = (size + stride - 1) // stride
        return size * size + (0 if self.drop_global_token else 1)

    def tap_modules(self) -> dict[str, nn.Module]:
        """`vision.stage{s}` (last block of stage s), `vision.block{j}` (every block, numbered across stages).
        Hooks go on the blocks themselves: a hook on the stage's ModuleList would never fire."""
        return davit_block_taps(self.vision_tower.blocks)

    def prompt_layer_points(self) -> dict[str, nn.Module]:
        """`prompt.{name}.layer{i}` -> its hook point (image positions of prompt `name` after encoder layer i)."""
        return {f"prompt.{name}.layer{i}": point for name in self.prompt_names
                for i, point in enumerate(self.layer_points[name])}


def _checkpointed(fn):
    def forward(hidden_states):
        if torch.is_grad_enabled() and hidden_states.requires_grad:
            return checkpoint(fn, hidden_states, use_reentrant=False)
        return fn(hidden_states)

    return forward


# ---- native Florence-2 <-> extractor weights ----------------------------------------------------
NATIVE_PREFIXES = {
    "model.vision_tower.": "vision_tower.",
    "model.multi_modal_projector.": "multi_modal_projector.",
    "model.language_model.encoder.": "encoder.",
}


def florence2_state_dict_to_extractor(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map a native `Florence2ForConditionalGeneration` state dict onto `Florence2DepthBreadth`.

    Decoder and lm_head weights are dropped (features need only the encoder). The shared token
    embedding may be stored once as `model.language_model.shared.weight` (tied weights)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        for src, dst in NATIVE_PREFIXES.items():
            if key.startswith(src):
                out[dst + key[len(src):]] = value
                break
    if "encoder.embed_tokens.weight" not in out:
        for shared in ("model.language_model.shared.weight", "model.language_model.encoder.embed_tokens.weight",
                       "lm_head.weight"):
            if shared in state_dict:
                out["encoder.embed_tokens.weight"] = state_dict[shared]
                break
    return out


def extractor_state_dict_to_florence2(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of `florence2_state_dict_to_extractor` (for the naive baseline and round trips)."""
    inverse = {v: k for k, v in NATIVE_PREFIXES.items()}
    out = {}
    for key, value in state_dict.items():
        for src, dst in inverse.items():
            if key.startswith(src):
                out[dst + key[len(src):]] = value
    if "encoder.embed_tokens.weight" in state_dict:
        out["model.language_model.shared.weight"] = state_dict["encoder.embed_tokens.weight"]
    return out
