"""The registry of encoder kinds, and saving / loading an encoder (safetensors + a JSON config)."""
from __future__ import annotations

import json
from pathlib import Path

from model.encoders.base import VisionEncoder
from model.encoders.kinds import ClipEncoder, CvtEncoder, CycleEncoder, DavitEncoder

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
