"""Vision encoders other than Florence-2's full depth+breadth extractor, behind one interface.

Why: Florence-VL's claim is about *which* visual features feed the LLM (depth + breadth from
Florence-2). To test it the workbench swaps the vision side for other encoders - a CLIP-style ViT,
CvT, the DaViT tower alone (the paper's depth-only ablation) and a cycle-contrast video encoder -
and trains each with its own objective. Every encoder here returns an ordered dict of token
streams {name: (B, N, D)} with a global token first (N = h*w + 1, like Florence-2's V) and names
the modules whose forward output is each tap, so `workbench.taps` and the fusion/LLM code never
need to know which encoder they hold.

Built on transformers' native classes (CLIPVisionModel, CvtModel, Florence2VisionBackbone +
Florence2MultiModalProjector); random init is the untrained encoder, seeded by `config["seed"]`.
"""
from __future__ import annotations

import copy
import json
import math
import re
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

# ImageNet statistics, as the Florence-2 processor uses.
IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)
POOLINGS = ("mean", "global", "patch_mean")


# ----------------------------------------------------------------------------- inputs and helpers

def as_pixel_values(images, size: int | None = None) -> Tensor:
    """Turn images into normalised float pixel values (B, 3, H, W).

    Accepts uint8 arrays/tensors (B, H, W, 3) (e.g. video frames from workbench.data.videos), which are
    scaled to [0, 1] and normalised with ImageNet mean/std, or float tensors (B, 3, H, W), which are
    taken as already normalised. `size` resizes (bilinear) to a square.
    """
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images))
    if not isinstance(images, Tensor):
        raise TypeError(f"images must be a numpy array or torch tensor, got {type(images).__name__}")
    if images.dtype == torch.uint8:
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"uint8 images must have shape (B, H, W, 3), got {tuple(images.shape)}")
        x = images.permute(0, 3, 1, 2).float() / 255.0
        mean = torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGE_STD).view(1, 3, 1, 1)
        x = (x - mean) / std
    elif images.is_floating_point():
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"float images must be normalised pixel values (B, 3, H, W), got {tuple(images.shape)}")
        x = images
    else:
        raise TypeError(f"images must be uint8 (B, H, W, 3) or float (B, 3, H, W), got dtype {images.dtype}")
    if size is not None and tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x


def pool_tokens(tokens: Tensor, pooling: str = "mean") -> Tensor:
    """(B, N, D) -> (B, D). `global` = token 0 (CLS / mean token), `patch_mean` = mean of tokens 1..N-1."""
    if pooling == "mean":
        return tokens.mean(1)
    if pooling == "global":
        return tokens[:, 0]
    if pooling == "patch_mean":
        return tokens[:, 1:].mean(1)
    raise ValueError(f"pooling={pooling!r} is unknown; choose from {POOLINGS}")


def _conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def _merge_config(kind: str, defaults: dict, config: dict | None) -> dict:
    config = dict(config or {})
    unknown = sorted(set(config) - set(defaults))
    if unknown:
        raise ValueError(f"encoder kind {kind!r}: unknown config key(s) {unknown}; valid keys are {sorted(defaults)}")
    merged = copy.deepcopy(defaults)
    merged.update(config)
    return merged


def _seeded(seed: int):
    """Fork the global RNG so building an encoder is reproducible and leaves the caller's RNG alone."""
    class _Ctx:
        def __enter__(self):
            self._fork = torch.random.fork_rng(devices=[])
            self._fork.__enter__()
            torch.manual_seed(int(seed))

        def __exit__(self, *exc):
            return self._fork.__exit__(*exc)
    return _Ctx()


class TapPoint(nn.Identity):
    """An identity module called on a tensor inside forward, so a hook on it sees (and may replace)
    exactly that tensor. Used where the library module returns a tuple (CvtStage returns (map, cls))."""


# ----------------------------------------------------------------------------- the interface

class VisionEncoder(nn.Module):
    """One interface for every vision encoder feeding Florence-VL and the taps.

    stream_names: ordered stream names; single-stream encoders give ["depth"].
    hidden_size: channel width D of every stream.
    forward(pixel_values (B, 3, H, W)) -> OrderedDict {stream: (B, N, D)}, token 0 global.
    tap_modules(): tap name -> module whose forward output is that tap (hook-able, actually called):
        vision.stage{s} (B, C, H, W) and/or vision.block{j} / vision.layer{i}. The `depth` tap is the
        forward output itself; Florence-VL hooks it at its own stream hook point.
    """

    kind: str = ""
    stream_names: list[str] = ["depth"]
    hidden_size: int = 0

    def __init__(self, config: dict):
        super().__init__()
        self.config = config  # JSON-able; with `kind` it rebuilds this encoder (save_encoder/load_encoder)

    def num_tokens(self, image_size: int) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, pixel_values: Tensor) -> dict[str, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def tap_modules(self) -> dict[str, nn.Module]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _check_pixels(self, pixel_values: Tensor) -> Tensor:
        if not isinstance(pixel_values, Tensor) or pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
            shape = tuple(pixel_values.shape) if isinstance(pixel_values, Tensor) else type(pixel_values).__name__
            raise ValueError(f"{self.kind} encoder: pixel_values must be a float tensor (B, 3, H, W), got {shape}; "
                             "use model.encoders.as_pixel_values(images) to convert uint8 (B, H, W, 3) images")
        if not pixel_values.is_floating_point():
            raise ValueError(f"{self.kind} encoder: pixel_values must be float (normalised), got {pixel_values.dtype}; "
                             "use model.encoders.as_pixel_values(images)")
        param = next(self.parameters())
        return pixel_values.to(device=param.device, dtype=param.dtype)

    def pooled(self, pixel_values: Tensor, pooling: str = "mean", stream: str = "depth") -> Tensor:
        """(B, D) summary of one stream: what the training objectives and probes consume."""
        return pool_tokens(self(pixel_values)[stream], pooling)

    @torch.no_grad()
    def tap_shapes(self, image_size: int, batch: int = 1) -> dict[str, tuple]:
        """Shapes of every tap for a square image, found by one forward on a dummy input."""
        shapes: dict[str, tuple] = {}
        handles = []
        for name, module in self.tap_modules().items():
            def hook(_m, _inp, out, name=name):
                out = out[0] if isinstance(out, (tuple, list)) else out
                shapes[name] = tuple(out.shape)
            handles.append(module.register_forward_hook(hook))
        was_training = self.training
        try:
            self.eval()
            param = next(self.parameters())
            self(torch.zeros(batch, 3, image_size, image_size, device=param.device, dtype=param.dtype))
        finally:
            self.train(was_training)
            for h in handles:
                h.remove()
        missing = sorted(set(self.tap_modules()) - set(shapes))
        if missing:
            raise RuntimeError(f"{self.kind} encoder: taps {missing} never fired; their modules are not called in forward")
        return shapes


class _ProjectedTokens(nn.Module):
    """Linear(C -> D) then LayerNorm(D): the same order as Florence-2's image projection, so every
    encoder's depth stream lives on a comparable scale when fused."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim)
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.norm(self.linear(tokens))


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
    Taps: vision.stage{s} (B, C_s, H_s, W_s) on a TapPoint fed by encoder.stages.{s}'s map output.
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
            self.stage_taps = nn.ModuleList(TapPoint() for _ in range(n))
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
        # The stage loop of CvtEncoder.forward, with a TapPoint after each stage so hooks can read and patch.
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
        taps: dict[str, nn.Module] = {}
        j = 0
        for s, blocks in enumerate(self.vision_tower.blocks):
            for block in blocks:
                taps[f"vision.block{j}"] = block
                j += 1
            taps[f"vision.stage{s}"] = blocks[len(blocks) - 1]
        return taps


# ----------------------------------------------------------------------------- cycle-contrast encoder

def _mlp_head(in_dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, in_dim), nn.ReLU(), nn.Linear(in_dim, out_dim))


class CycleEncoder(VisionEncoder):
    """A small backbone (davit, clip or cvt kind) meant to be trained with the cross-video
    cycle-consistency contrastive objective (model.cycle_contrast.train_cycle_contrast).

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
        self.backbone = ENCODERS[cfg["backbone"]](bcfg)
        self.hidden_size = self.backbone.hidden_size
        self.stream_names = list(self.backbone.stream_names)
        with _seeded(cfg["seed"] + 1):
            self.objective_heads = nn.ModuleDict(dict(intra=_mlp_head(self.hidden_size, cfg["head_dim"]),
                                                      cycle=_mlp_head(self.hidden_size, cfg["head_dim"])))

    def num_tokens(self, image_size: int) -> int:
        return self.backbone.num_tokens(image_size)

    def forward(self, pixel_values: Tensor) -> dict[str, Tensor]:
        return self.backbone(pixel_values)

    def tap_modules(self) -> dict[str, nn.Module]:
        return self.backbone.tap_modules()


# ----------------------------------------------------------------------------- registry, save, load

ENCODERS: dict[str, type[VisionEncoder]] = {"clip": ClipEncoder, "cvt": CvtEncoder, "davit": DavitEncoder,
                                            "cycle": CycleEncoder}


def build_encoder(kind: str, config: dict | None = None) -> VisionEncoder:
    """Build an encoder of `kind` from a config dict (missing keys take the tiny defaults).

    `config["seed"]` fixes the random init; `config["weights"]` (a directory written by save_encoder,
    or a .safetensors file) loads trained weights. There are no hub downloads.
    """
    if kind not in ENCODERS:
        raise ValueError(f"unknown encoder kind {kind!r}; choose from {sorted(ENCODERS)}")
    config = dict(config or {})
    if config.pop("pretrained", False) and not config.get("weights"):
        raise ValueError(f"encoder kind {kind!r}: pretrained=True needs config['weights'] = a directory written by "
                         "model.encoders.save_encoder (no hub weights are available offline)")
    encoder = ENCODERS[kind](config)
    if encoder.config.get("weights"):
        _load_weights(encoder, encoder.config["weights"])
    return encoder


def save_encoder(encoder: VisionEncoder, directory: str | Path) -> Path:
    """Write encoder.json (kind + config) and encoder.safetensors into `directory`."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = dict(encoder.config, weights=None)
    (directory / "encoder.json").write_text(json.dumps({"kind": encoder.kind, "config": config}, indent=2))
    state = {k: v.detach().contiguous().cpu() for k, v in encoder.state_dict().items()}
    tmp = directory / "encoder.safetensors.tmp"
    save_file(state, str(tmp))
    tmp.replace(directory / "encoder.safetensors")
    return directory


def load_encoder(directory: str | Path) -> VisionEncoder:
    """Rebuild an encoder saved by save_encoder."""
    directory = Path(directory)
    meta = directory / "encoder.json"
    if not meta.is_file():
        raise FileNotFoundError(f"{meta} not found; pass a directory written by model.encoders.save_encoder")
    info = json.loads(meta.read_text())
    return build_encoder(info["kind"], dict(info["config"], weights=str(directory)))


def _load_weights(encoder: VisionEncoder, path: str | Path) -> None:
    from safetensors.torch import load_file

    path = Path(path)
    file = path / "encoder.safetensors" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"encoder weights {file} not found; give a save_encoder directory or a .safetensors file")
    missing, unexpected = encoder.load_state_dict(load_file(str(file)), strict=False)
    if missing or unexpected:
        raise ValueError(f"weights {file} do not fit this {encoder.kind} encoder config: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}; build with the config saved beside the weights")


# ----------------------------------------------------------------------------- text side (CLIP-style)

class WordTokenizer:
    """A whitespace/punctuation word tokenizer with a vocabulary built in-process from the captions.

    Why: CLIP-style training needs a text tower but the workbench has no downloadable tokenizer; the
    synthetic captions use a tiny closed vocabulary, so a word-level vocab is exact and fast.
    """

    PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"

    def __init__(self, vocab: dict[str, int]):
        for tok in (self.PAD, self.UNK, self.BOS, self.EOS):
            if tok not in vocab:
                raise ValueError(f"vocab lacks the special token {tok!r}; build it with WordTokenizer.fit(texts)")
        self.vocab = dict(vocab)
        self.pad_id, self.unk_id = vocab[self.PAD], vocab[self.UNK]
        self.bos_id, self.eos_id = vocab[self.BOS], vocab[self.EOS]

    @staticmethod
    def words(text: str) -> list[str]:
        return re.findall(r"[a-z0-9]+|[^\sa-z0-9]", text.lower())

    @classmethod
    def fit(cls, texts: Sequence[str]) -> "WordTokenizer":
        vocab = {cls.PAD: 0, cls.UNK: 1, cls.BOS: 2, cls.EOS: 3}
        for text in texts:
            for w in cls.words(text):
                vocab.setdefault(w, len(vocab))
        return cls(vocab)

    def __len__(self) -> int:
        return len(self.vocab)

    def __call__(self, texts: Sequence[str], max_length: int = 32) -> tuple[Tensor, Tensor]:
        """(input_ids, attention_mask), both (B, L); <bos> words <eos>, right-padded, truncated to max_length."""
        if isinstance(texts, str):
            raise TypeError("texts must be a list of strings, not one string")
        if max_length < 3:
            raise ValueError(f"max_length={max_length} must be >= 3 (bos, one word, eos)")
        rows = []
        for text in texts:
            ids = [self.vocab.get(w, self.unk_id) for w in self.words(text)][: max_length - 2]
            rows.append([self.bos_id, *ids, self.eos_id])
        length = max(len(r) for r in rows)
        ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        return ids, mask


class TextTower(nn.Module):
    """Caption encoder for CLIP-style training: a tiny transformers CLIPTextModel ("clip", pooled at
    <eos> like CLIP) or a masked bag of embeddings ("bag"); both end in a linear map to embed_dim."""

    def __init__(self, vocab_size: int, embed_dim: int = 32, kind: str = "clip", width: int = 32, layers: int = 2,
                 heads: int = 2, max_length: int = 32, pad_id: int = 0, eos_id: int = 3):
        super().__init__()
        self.kind = kind
        if kind == "clip":
            from transformers import CLIPTextConfig, CLIPTextModel

            cfg = CLIPTextConfig(vocab_size=vocab_size, hidden_size=width, intermediate_size=2 * width,
                                 num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=max_length,
                                 pad_token_id=pad_id, bos_token_id=2, eos_token_id=eos_id)
            self.model = CLIPTextModel(cfg)
        elif kind == "bag":
            self.embed = nn.Embedding(vocab_size, width, padding_idx=pad_id)
        else:
            raise ValueError(f"text tower kind={kind!r}; choose 'clip' or 'bag'")
        self.proj = nn.Linear(width, embed_dim)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        if self.kind == "clip":
            hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            eos = attention_mask.sum(1) - 1  # <eos> is the last real token (causal mask: it sees them all)
            pooled = hidden[torch.arange(len(hidden), device=hidden.device), eos]
        else:
            m = attention_mask.unsqueeze(-1).float()
            pooled = (self.embed(input_ids) * m).sum(1) / m.sum(1).clamp_min(1.0)
        return self.proj(pooled)


def clip_loss(image_emb: Tensor, text_emb: Tensor, logit_scale: Tensor) -> Tensor:
    """Symmetric InfoNCE over a batch of matched pairs (row i of each is a pair)."""
    image_emb = F.normalize(image_emb, dim=-1)
    text_emb = F.normalize(text_emb, dim=-1)
    logits = logit_scale.exp() * image_emb @ text_emb.t()
    target = torch.arange(len(logits), device=logits.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


# ----------------------------------------------------------------------------- training functions

def _check_pairs(name: str, pixels: Tensor, other_len: int, other_name: str) -> None:
    if len(pixels) != other_len:
        raise ValueError(f"{name}: {len(pixels)} images but {other_len} {other_name}; give one per image")
    if len(pixels) < 2:
        raise ValueError(f"{name}: need at least 2 images, got {len(pixels)}")


def train_clip_style(encoder: VisionEncoder, images, captions: Sequence[str], steps: int = 50, *,
                     text_tower: str | nn.Module = "clip", tokenizer: Callable | None = None, embed_dim: int = 32,
                     batch_size: int = 16, lr: float = 1e-3, pooling: str = "global", max_length: int = 32,
                     init_temperature: float = 0.07, seed: int = 0, progress: bool = True) -> dict:
    """CLIP-style contrastive training of `encoder` against a small text tower on image-caption pairs.

    Loss: symmetric InfoNCE with a learnable temperature (logit scale initialised to 1/0.07 and
    clamped at 100, as CLIP). The image embedding is a linear map of the pooled depth stream.
    `tokenizer(texts, max_length) -> (ids, mask)`; by default a WordTokenizer fitted on the captions.
    Returns {"history": {"loss", "temperature", "retrieval_acc"} per step, "text_tower", "tokenizer",
    "image_proj", "logit_scale"}; retrieval_acc = in-batch image->text top-1.
    """
    pixels = as_pixel_values(images)
    captions = list(captions)
    _check_pairs("train_clip_style", pixels, len(captions), "captions")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = tokenizer or WordTokenizer.fit(captions)
        if isinstance(text_tower, str):
            text_tower = TextTower(len(tokenizer), embed_dim, kind=text_tower, max_length=max_length,
                                   pad_id=getattr(tokenizer, "pad_id", 0), eos_id=getattr(tokenizer, "eos_id", 3))
        image_proj = nn.Linear(encoder.hidden_size, embed_dim)
        logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))
    ids, mask = tokenizer(captions, max_length=max_length)
    params = [*encoder.parameters(), *text_tower.parameters(), *image_proj.parameters(), logit_scale]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    history: dict[str, list[float]] = {"loss": [], "temperature": [], "retrieval_acc": []}
    encoder.train(), text_tower.train()
    bs = min(batch_size, len(pixels))
    for _ in tqdm(range(steps), desc="clip-style", disable=not progress):
        idx = torch.randperm(len(pixels), generator=gen)[:bs]
        img = image_proj(encoder.pooled(pixels[idx], pooling))
        txt = text_tower(ids[idx], mask[idx])
        loss = clip_loss(img, txt, logit_scale)
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            logit_scale.clamp_(0.0, math.log(100.0))
            sims = F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).t()
            # a hit when the retrieved caption's text equals the true one (duplicates count as correct)
            pred = sims.argmax(1)
            hits = [captions[int(idx[int(p)])] == captions[int(idx[i])] for i, p in enumerate(pred)]
        history["loss"].append(float(loss.detach()))
        history["temperature"].append(float(1.0 / logit_scale.detach().exp()))
        history["retrieval_acc"].append(float(np.mean(hits)))
    encoder.eval(), text_tower.eval()
    return {"history": history, "text_tower": text_tower, "tokenizer": tokenizer, "image_proj": image_proj,
            "logit_scale": logit_scale}


def train_supervised(encoder: VisionEncoder, images, labels, steps: int = 50, *, batch_size: int = 32,
                     lr: float = 1e-3, pooling: str = "mean", num_classes: int | None = None, seed: int = 0,
                     progress: bool = True) -> dict:
    """Supervised training: a linear head on pooled depth tokens, cross-entropy (CvT-style recipe, tiny).

    Returns {"history": {"loss", "accuracy"} per step (batch accuracy), "head"}.
    """
    pixels = as_pixel_values(images)
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    _check_pairs("train_supervised", pixels, len(labels), "labels")
    if labels.min() < 0:
        raise ValueError("train_supervised: labels must be class indices >= 0")
    num_classes = int(num_classes or int(labels.max()) + 1)
    if labels.max() >= num_classes:
        raise ValueError(f"train_supervised: label {int(labels.max())} >= num_classes={num_classes}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = nn.Linear(encoder.hidden_size, num_classes)
    opt = torch.optim.AdamW([*encoder.parameters(), *head.parameters()], lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    history: dict[str, list[float]] = {"loss": [], "accuracy": []}
    encoder.train()
    bs = min(batch_size, len(pixels))
    for _ in tqdm(range(steps), desc="supervised", disable=not progress):
        idx = torch.randperm(len(pixels), generator=gen)[:bs]
        logits = head(encoder.pooled(pixels[idx], pooling))
        loss = F.cross_entropy(logits, labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        history["loss"].append(float(loss.detach()))
        history["accuracy"].append(float((logits.argmax(1) == labels[idx]).float().mean()))
    encoder.eval()
    return {"history": history, "head": head}


@torch.no_grad()
def evaluate_supervised(encoder: VisionEncoder, head: nn.Module, images, labels, pooling: str = "mean",
                        batch_size: int = 64) -> float:
    """Accuracy of encoder + head (from train_supervised) on held-out images."""
    pixels = as_pixel_values(images)
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    encoder.eval()
    preds = [head(encoder.pooled(pixels[i:i + batch_size], pooling)).argmax(1) for i in range(0, len(pixels), batch_size)]
    return float((torch.cat(preds) == labels).float().mean())
