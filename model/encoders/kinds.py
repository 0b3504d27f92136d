"""The encoder kinds: a CLIP-style ViT, CvT, the DaViT tower alone, and the cycle-contrast encoder.

Built on transformers' native classes (CLIPVisionModel, CvtModel, Florence2VisionBackbone +
Florence2MultiModalProjector); random init is the untrained encoder, seeded by `config["seed"]`.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn

from model.encoders.base import VisionEncoder, _conv_out, _merge_config, _ProjectedTokens, _seeded
from model.hooks import HookPoint, davit_block_taps

# ----------------------------------------------------------------------------- CLIP-style ViT

class ClipEncoder(VisionEncoder):
    """transformers' CLIPVisionModel; depth = all last-layer tokens (CLS first), projected to hidden_size.

    Other image sizes than config image_size work through interpolate_pos_encoding.
    Taps: vision.layer{i} (B, T, C) on the encoder layers.
    """

    kind = "clip"
    DEFAULTS = dict(hidden_size=64, image_size=64, patch_size=16, width=64, layers=2, heads=4, mlp=128,
                    seed=0, weights=None, hf_config={})

    def __init__(self, config: dict | None = None):
        from transformers import CLIPVisionConfig, CLIPVisionModel

        cfg = _merge_config(self.kind, self.DEFAULTS, config)
        super().__init__(cfg)
        if cfg["width"] % cfg["heads"]:
            raise ValueError(f"clip encoder: width={cfg['width']} must be divisible by heads={cfg['heads']}")
        hf = CLIPVisionConfig(hidden_size=cfg["width"], intermediate_size=cfg["mlp"], num_hidden_layers=cfg["layers"],
                              num_attention_heads=cfg["heads"], image_size=cfg["image_size"],
                              patch_size=cfg["patch_size"], **cfg["hf_config"])
        with _seeded(cfg["seed"]):
            self.model = CLIPVisionModel(hf)
            self.projection = _ProjectedTokens(cfg["width"], cfg["hidden_size"])
        self.hidden_size = int(cfg["hidden_size"])
        self.stream_names = ["depth"]

    def _layers(self) -> nn.ModuleList:
        root = getattr(self.model, "vision_model", self.model)  # transformers <5 nested the tower
        return root.encoder.layers

    def num_tokens(self, image_size: int) -> int:
        p = self.config["patch_size"]
        if image_size < p:
            raise ValueError(f"clip encoder: image_size={image_size} is smaller than patch_size={p}")
        return (image_size // p) ** 2 + 1

    def forward(self, pixel_values: Tensor) -> dict[str, Tensor]:
        x = self._check_pixels(pixel_values)
        interpolate = tuple(x.shape[-2:]) != (self.config["image_size"],) * 2
        out = self.model(pixel_values=x, interpolate_pos_encoding=interpolate)
        return OrderedDict(depth=self.projection(out.last_hidden_state))

    def tap_modules(self) -> dict[str, nn.Module]:
        taps = {f"vision.layer{i}": layer for i, layer in enumerate(self._layers())}
        return taps


# ----------------------------------------------------------------------------- CvT

class CvtEncoder(VisionEncoder):
    """transformers' CvtModel; depth = final-stage map flattened with the CLS token first, projected.

    transformers' CvtStage indexes its drop-path list by the stage number, so any stage with
    depth[i] <= i raises IndexError at construction. Such a stage is built safely here (with a
    padded depth, then truncated to the asked depth) when its drop_path_rate is 0 - every layer's
    rate is then 0 anyway - and refused with a clear error otherwise. (Also note: transformers
    applies one rate to the whole stage, and its DropPath sits after the residual add.)
    Taps: vision.stage{s} (B, C_s, H_s, W_s) on a HookPoint fed by encoder.stages.{s}'s map output.
    """

    kind = "cvt"
    DEFAULTS = dict(hidden_size=64, embed_dim=[16, 32, 64], num_heads=[1, 2, 4], depth=[1, 2, 3],
                    drop_path_rate=[0.0, 0.0, 0.0], patch_sizes=[7, 3, 3], patch_stride=[4, 2, 2],
                    patch_padding=[2, 1, 1], seed=0, weights=None, hf_config={})

    def __init__(self, config: dict | None = None):
        from transformers import CvtConfig, CvtModel

        cfg = _merge_config(self.kind, self.DEFAULTS, config)
        super().__init__(cfg)
        depth = [int(d) for d in cfg["depth"]]
        n = len(depth)
        rates = cfg["drop_path_rate"]
        rates = [float(rates)] * n if isinstance(rates, (int, float)) else [float(r) for r in rates]
        cfg["drop_path_rate"] = rates
        for key in ("embed_dim", "num_heads", "drop_path_rate", "patch_sizes", "patch_stride", "patch_padding"):
            if len(cfg[key]) != n:
                raise ValueError(f"cvt encoder: {key} has {len(cfg[key])} entries but depth has {n}; give one per stage")
        for i, (d, r) in enumerate(zip(depth, rates)):
            if d < 1:
                raise ValueError(f"cvt encoder: depth[{i}]={d}; every stage needs at least one layer")
            if d <= i and r > 0:
                raise ValueError(
                    f"cvt encoder: depth[{i}]={d} <= {i} with drop_path_rate[{i}]={r} > 0 hits a transformers CvtStage bug "
                    f"(drop_path_rates[stage] IndexError); use depth[{i}] >= {i + 1} (e.g. depth=[1, 2, 3]) or "
                    f"drop_path_rate[{i}]=0")
        padded = [max(d, i + 1) for i, d in enumerate(depth)]
        hf_kwargs = dict(embed_dim=list(cfg["embed_dim"]), num_heads=list(cfg["num_heads"]), depth=padded,
                         drop_path_rate=rates, patch_sizes=list(cfg["patch_sizes"]),
                         patch_stride=list(cfg["patch_stride"]), patch_padding=list(cfg["patch_padding"]),
                         mlp_ratio=[4.0] * n, attention_drop_rate=[0.0] * n, drop_rate=[0.0] * n, qkv_bias=[True] * n,
                         cls_token=[False] * (n - 1) + [True], qkv_projection_method=["dw_bn"] * n,
                         kernel_qkv=[3] * n, padding_kv=[1] * n, stride_kv=[2] * n, padding_q=[1] * n, stride_q=[1] * n)
        hf_kwargs.update(cfg["hf_config"])
        hf = CvtConfig(**hf_kwargs)
        with _seeded(cfg["seed"]):
            self.model = CvtModel(hf, add_pooling_layer=False)
            for stage, d in zip(self.model.encoder.stages, depth):
                if len(stage.layers) != d:
                    stage.layers = nn.Sequential(*list(stage.layers)[:d])
            self.model.config.depth = depth
            self.stage_taps = nn.ModuleList(HookPoint() for _ in range(n))
            self.projection = _ProjectedTokens(cfg["embed_dim"][-1], cfg["hidden_size"])
        self.hidden_size = int(cfg["hidden_size"])
        self.stream_names = ["depth"]

    def _side(self, image_size: int) -> int:
        s = image_size
        for k, st, p in zip(self.config["patch_sizes"], self.config["patch_stride"], self.config["patch_padding"]):
            s = _conv_out(s, k, st, p)
        if s < 1:
            raise ValueError(f"cvt encoder: image_size={image_size} is too small for {len(self.config['depth'])} stages")
        return s

    def num_tokens(self, image_size: int) -> int:
        return self._side(image_size) ** 2 + 1

    def forward(self, pixel_values: Tensor) -> dict[str, Tensor]:
        # The stage loop of CvtEncoder.forward, with a HookPoint after each stage so hooks can read and patch.
        h = self._check_pixels(pixel_values)
        cls = None
        for stage, tap in zip(self.model.encoder.stages, self.stage_taps):
            h, cls = stage(h)
            h = tap(h)
        tokens = h.flatten(2).transpose(1, 2)
        first = cls if cls is not None else tokens.mean(1, keepdim=True)
        return OrderedDict(depth=self.projection(torch.cat([first, tokens], 1)))

    def tap_modules(self) -> dict[str, nn.Module]:
        taps = {f"vision.stage{s}": tap for s, tap in enumerate(self.stage_taps)}
        return taps


# ----------------------------------------------------------------------------- DaViT alone (depth only)

class DavitEncoder(VisionEncoder):
    """Florence-2's DaViT tower + its multimodal projector, no BART: the paper's depth-only ablation.

    depth = [mean token ; h*w tokens] after 2-D position + temporal embedding, Linear, LayerNorm,
    exactly Florence-2's V. hidden_size = projection_dim (BART d_model in the full model).
    Taps: vision.stage{s} on vision_tower.blocks.{s}.{depths[s]-1}; vision.block{j} on every block.
    """

    kind = "davit"
    DEFAULTS = dict(hidden_size=64, embed_dim=[16, 32, 64, 128], depths=[1, 1, 2, 1], num_heads=[1, 2, 4, 8],
                    num_groups=[1, 2, 4, 8], window_size=4, drop_path_rate=0.0, seed=0, weights=None, hf_config={})

    def __init__(self, config: dict | None = None):
        from transformers import BartConfig, Florence2Config, Florence2VisionConfig
        from transformers.models.florence2.modeling_florence2 import (
            Florence2MultiModalProjector,
            Florence2VisionBackbone,
        )

        cfg = _merge_config(self.kind, self.DEFAULTS, config)
        super().__init__(cfg)
        n = len(cfg["depths"])
        for key in ("embed_dim", "num_heads", "num_groups"):
            if len(cfg[key]) != n:
                raise ValueError(f"davit encoder: {key} has {len(cfg[key])} entries but depths has {n}; give one per stage")
        vision = Florence2VisionConfig(depths=list(cfg["depths"]), embed_dim=list(cfg["embed_dim"]),
                                       num_heads=list(cfg["num_heads"]), num_groups=list(cfg["num_groups"]),
                                       window_size=cfg["window_size"], drop_path_rate=cfg["drop_path_rate"],
                                       projection_dim=cfg["hidden_size"], **cfg["hf_config"])
        # The projector reads Florence2Config; projection_dim must equal BART d_model (florence-vl.md section 11).
        text = BartConfig(vocab_size=8, d_model=cfg["hidden_size"], encoder_layers=1, decoder_layers=1,
                          encoder_attention_heads=1, decoder_attention_heads=1, encoder_ffn_dim=8, decoder_ffn_dim=8,
                          pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2)
        full = Florence2Config(vision_config=vision, text_config=text, image_token_id=7)
        with _seeded(cfg["seed"]):
            self.vision_tower = Florence2VisionBackbone(full.vision_config)
            self.projector = Florence2MultiModalProjector(full)
        self.hidden_size = int(cfg["hidden_size"])
        self.stream_names = ["depth"]

    def stage_sides(self, image_size: int) -> list[int]:
        vc = self.vision_tower.config
        sides, s = [], image_size
        for k, st, p in zip(vc.patch_size, vc.patch_stride, vc.patch_padding):
            s = _conv_out(s, k, st, p)
            sides.append(s)
        if s < 1:
            raise ValueError(f"davit encoder: image_size={image_size} is too small for {len(sides)} stages")
        return sides

    def num_tokens(self, image_size: int) -> int:
        return self.stage_sides(image_size)[-1] ** 2 + 1

    def forward(self, pixel_values: Tensor) -> dict[str, Tensor]:
        x = self._check_pixels(pixel_values)
        limit = self.vision_tower.config.max_position_embeddings
        side = max(self.stage_sides(max(x.shape[-2:]))[-1], 1)
        if side > limit:
            raise ValueError(f"davit encoder: a {tuple(x.shape[-2:])} image gives a {side}-wide final map but the "
                             f"projector's position table holds {limit}; use smaller images")
        features = self.vision_tower(x).last_hidden_state
        return OrderedDict(depth=self.projector(features))

    def tap_modules(self) -> dict[str, nn.Module]:
        return davit_block_taps(self.vision_tower.blocks)


# ----------------------------------------------------------------------------- cycle-contrast encoder

def mlp_head(in_dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, in_dim), nn.ReLU(), nn.Linear(in_dim, out_dim))


class CycleEncoder(VisionEncoder):
    """A small backbone (davit, clip or cvt kind) meant to be trained with the cross-video
    cycle-consistency contrastive objective (model.training.cycle_contrast.train_cycle_contrast).

    The forward interface and taps are the backbone's; `objective_heads` holds the two MLP heads of the
    objective (intra-video "intra" and cross-video "cycle", as in the paper) so they are saved with it.
    """

    kind = "cycle"
    DEFAULTS = dict(backbone="davit", backbone_config={}, hidden_size=64, head_dim=32, seed=0, weights=None)

    def __init__(self, config: dict | None = None):
        cfg = _merge_config(self.kind, self.DEFAULTS, config)
        super().__init__(cfg)
        if cfg["backbone"] not in ("davit", "clip", "cvt"):
            raise ValueError(f"cycle encoder: backbone={cfg['backbone']!r}; choose davit, clip or cvt")
        bcfg = dict(cfg["backbone_config"])
        bcfg.setdefault("seed", cfg["seed"])
        # hidden_size lives at the top level like every other kind (FlorenceVLConfig reads it there)
        if bcfg.setdefault("hidden_size", cfg["hidden_size"]) != cfg["hidden_size"]:
            raise ValueError(f"cycle encoder: hidden_size={cfg['hidden_size']} but backbone_config hidden_size="
                             f"{bcfg['hidden_size']}; give it once, at the top level")
        self.backbone = BACKBONES[cfg["backbone"]](bcfg)
        self.hidden_size = self.backbone.hidden_size
        self.stream_names = list(self.backbone.stream_names)
        with _seeded(cfg["seed"] + 1):
            self.objective_heads = nn.ModuleDict(dict(intra=mlp_head(self.hidden_size, cfg["head_dim"]),
                                                      cycle=mlp_head(self.hidden_size, cfg["head_dim"])))

    def num_tokens(self, image_size: int) -> int:
        return self.backbone.num_tokens(image_size)

    def forward(self, pixel_values: Tensor) -> dict[str, Tensor]:
        return self.backbone(pixel_values)

    def tap_modules(self) -> dict[str, nn.Module]:
        return self.backbone.tap_modules()



BACKBONES: dict[str, type[VisionEncoder]] = {"clip": ClipEncoder, "cvt": CvtEncoder, "davit": DavitEncoder}
