"""What a model directory (or hub id) holds, decided once, from its config.json.

Layouts:

  florence_vl          this project's own (`save_model`, `fvl train`, `fvl convert`)
  florence-vl-llava    official Florence-VL (LLaVA code base: llava_phi / llava_llama + mm_* fields)
  florence2-remote     official Florence-2 remote-code layout (microsoft/Florence-2-*)
  florence2-native     transformers' Florence2ForConditionalGeneration (florence-community/*)
  clip, siglip, dinov2, vit, llava
                       other transformers families, opened as feature sources (`model.adapters`)

Nothing here imports torch: `fvl` refuses an unsupported directory before any heavy import.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from model.loading.errors import CheckpointError, UnsupportedModelError

OWN = "florence_vl"
FLORENCE_VL_LLAVA = "florence-vl-llava"
FLORENCE2_REMOTE = "florence2-remote"
FLORENCE2_NATIVE = "florence2-native"
# transformers families -> (model_type values, architecture names) that identify them in config.json
FAMILIES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "clip": (("clip", "clip_vision_model"), ("CLIPModel", "CLIPVisionModel", "CLIPVisionModelWithProjection")),
    "siglip": (("siglip", "siglip_vision_model"), ("SiglipModel", "SiglipVisionModel")),
    "dinov2": (("dinov2",), ("Dinov2Model",)),
    "vit": (("vit",), ("ViTModel",)),
    "llava": (("llava",), ("LlavaForConditionalGeneration",)),
}
LAYOUTS = (OWN, FLORENCE_VL_LLAVA, FLORENCE2_REMOTE, FLORENCE2_NATIVE, *FAMILIES)
SUPPORTED = ("this project's florence_vl, official Florence-VL (llava_phi / llava_llama), Florence-2 (remote-code "
             "or native Florence2ForConditionalGeneration), CLIPModel / CLIPVisionModel, SiglipModel / "
             "SiglipVisionModel, Dinov2Model, ViTModel, LlavaForConditionalGeneration")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HUB_PATTERNS = ["*.json", "*.safetensors", "*.bin", "*.model", "*.txt", "*.tiktoken", "*.jinja", "vision_tower/*"]
_NO_BIN = [p for p in HUB_PATTERNS if p != "*.bin"]


@dataclass(frozen=True)
class Layout:
    """A resolved local directory, what it holds, and its parsed config.json."""

    path: Path
    kind: str
    config: dict

    @property
    def is_family(self) -> bool:
        """Opened through an adapter of `model.adapters` (Florence-2 included), not as a Florence-VL model."""
        return self.kind in FAMILIES or self.kind in (FLORENCE2_REMOTE, FLORENCE2_NATIVE)


def read_config(directory: Path) -> dict:
    cfg = Path(directory) / "config.json"
    if not cfg.is_file():
        raise CheckpointError(f"{directory} has no config.json; pass a model directory (one written by `fvl train` "
                              "/ `fvl convert`, a Florence-2 / Florence-VL checkpoint, or a transformers vision model)")
    try:
        return json.loads(cfg.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{cfg} is not valid JSON ({exc}); the model directory is damaged - save, train or "
                              "convert the model again") from None


def kind_of(cfg: dict, where: str = "config.json") -> str:
    """The layout named by a parsed config.json; an unsupported family is refused by name."""
    model_type = str(cfg.get("model_type", ""))
    architectures = cfg.get("architectures") or []
    if model_type == OWN:
        return OWN
    if any(k.startswith("mm_") for k in cfg) or (model_type.startswith("llava") and model_type != "llava"):
        return FLORENCE_VL_LLAVA
    if model_type == "florence2" or "Florence2ForConditionalGeneration" in architectures:
        vision = cfg.get("vision_config") or {}
        return FLORENCE2_REMOTE if "dim_embed" in vision or "auto_map" in cfg else FLORENCE2_NATIVE
    for family, (types, archs) in FAMILIES.items():
        if model_type in types or any(a in archs for a in architectures):
            return family
    what = model_type or (", ".join(architectures) if architectures else "none")
    raise UnsupportedModelError(f"{where}: model family {what!r} is not supported; supported: {SUPPORTED}")


def is_hub_id(source) -> bool:
    """A string that can only be a hub repo id (not an existing path)."""
    s = str(source)
    return not Path(s).exists() and bool(_HUB_ID.match(s))


def resolve_source(source: str | Path, revision: str | None = None) -> Path:
    """A local directory as is; a hub repo id through huggingface_hub (cache first, then the network)."""
    p = Path(str(source))
    if p.is_dir():
        return p
    s = str(source)
    if not is_hub_id(s):
        raise CheckpointError(f"{s} is not a model directory; pass a local directory (or a hub repo id such as "
                              "microsoft/Florence-2-large-ft)")
    import huggingface_hub

    errors = []
    for local_only in (True, False):
        try:
            # Weights as safetensors where the repo has them (CLIP-style repos also carry a same-size .bin);
            # pytorch_model.bin only for repos without safetensors.
            path = Path(huggingface_hub.snapshot_download(s, revision=revision, allow_patterns=_NO_BIN,
                                                          local_files_only=local_only))
            if any(path.glob("*.safetensors")):
                return path
            return Path(huggingface_hub.snapshot_download(s, revision=revision, allow_patterns=HUB_PATTERNS,
                                                          local_files_only=local_only))
        except Exception as exc:  # offline, unknown repo, gated repo, ...
            errors.append(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    raise CheckpointError(
        f"{s} is not a local directory, and downloading the Hugging Face Hub repo {s!r} failed "
        f"({errors[-1]}). Without network access, download it on a machine that has it "
        f"(`hf download {s} --local-dir DIR`, or huggingface_hub.snapshot_download('{s}', local_dir='DIR')), "
        "copy DIR here and pass that local directory instead. If you meant a local directory, check the path.")


def detect_layout(source: str | Path, revision: str | None = None) -> Layout:
    """Resolve `source` (directory or hub id) and read what it holds - the one place this is decided."""
    path = resolve_source(source, revision)
    cfg = read_config(path)
    return Layout(path=path, kind=kind_of(cfg, str(path / "config.json")), config=cfg)
