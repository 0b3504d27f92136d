"""Reading checkpoint tensors without ever unpickling arbitrary objects, and checking them against a model.

safetensors files are read as they are; `pytorch_model.bin` only through `torch.load(weights_only=True)`, so a
file that needs arbitrary unpickling is refused instead of executed. torch is imported inside the functions:
`model.loading` stays cheap to import.
"""
from __future__ import annotations

import json
from pathlib import Path

from model.loading.errors import CheckpointError, abbrev


def torch_load_weights_only(path: Path) -> dict:
    import torch

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


def read_weight_file(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except SafetensorError as exc:
            raise CheckpointError(f"{path} is unreadable ({exc}); the file is truncated or corrupt - copy or save "
                                  "the model again") from None
    if path.suffix in (".bin", ".pt", ".pth"):
        return torch_load_weights_only(path)
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
                raise CheckpointError(f"{index} lists shards that are not on disk: {abbrev(absent)}; "
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


def read_state_dict(directory: str | Path) -> dict:
    sd: dict = {}
    for f in find_weight_files(directory):
        sd.update(read_weight_file(f))
    return sd


def stored_dtype(state_dict: dict):
    """The floating dtype holding most of the checkpoint's elements (float32 when none is floating)."""
    import torch

    counts: dict = {}
    for t in state_dict.values():
        if t.is_floating_point():
            counts[t.dtype] = counts.get(t.dtype, 0) + t.numel()
    return max(counts, key=counts.get) if counts else torch.float32


def check_keys(expected: dict, state_dict: dict, source: str, allow_missing: bool = False) -> list[str]:
    """Raise CheckpointError on unexpected or mis-shaped tensors, and on missing ones unless allowed.
    Returns the missing keys."""
    missing = sorted(k for k in expected if k not in state_dict)
    unexpected = sorted(k for k in state_dict if k not in expected)
    shapes = sorted(f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k])}"
                    for k in state_dict if k in expected and tuple(state_dict[k].shape) != tuple(expected[k]))
    problems = []
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensors (the model has no place for them): {abbrev(unexpected)}")
    if shapes:
        problems.append(f"{len(shapes)} tensors with the wrong shape: {abbrev(shapes, 6)}")
    if missing and not allow_missing:
        problems.append(f"{len(missing)} missing tensors: {abbrev(missing)}")
    if problems:
        hint = ("; pass allow_missing=True (--allow-missing) to leave missing tensors randomly initialised"
                if missing and not allow_missing and not unexpected and not shapes else "")
        raise CheckpointError(f"{source} does not match the model, refusing a partial load: " + "; ".join(problems) + hint)
    return missing
