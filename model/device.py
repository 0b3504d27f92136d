"""Device, dtype and attention-implementation choices made in one place.

Why a module of its own: the same three decisions (which device, which dtype, which attention kernel)
are needed by loading, training, capture and the GPU benchmark, and they must never differ between
them. Rules:

* attention: `flash_attention_2` only when a CUDA device is the target AND the flash-attn package is
  installed; otherwise `sdpa` (numerically equal to eager on CPU, see florence-vl.md section 13).
  The package is looked up with `importlib.util.find_spec`, which locates it without importing it,
  and only when CUDA is available, so a CPU run never imports (or even searches for) flash-attn.
* dtype: bfloat16 on GPUs that support it, float16 on older GPUs, float32 on CPU/MPS.
"""
from __future__ import annotations

import importlib.util

import torch

ATTN_IMPLEMENTATIONS = ("flash_attention_2", "sdpa", "eager")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """"auto"/None -> the first CUDA device when one is present, else the CPU; anything else as given."""
    if device is None or (isinstance(device, str) and device == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} was requested but CUDA is not available on this machine; "
                         "pass --device cpu (or auto)")
    return dev


def flash_attn_available(device: str | torch.device | None = None) -> bool:
    """True when flash-attn could serve `device` (CUDA only). Never imports flash_attn."""
    if device is not None and torch.device(device).type != "cuda":
        return False
    if not torch.cuda.is_available():
        return False
    return importlib.util.find_spec("flash_attn") is not None


def choose_attn_implementation(device: str | torch.device | None = None) -> str:
    """flash_attention_2 on CUDA with flash-attn installed, else sdpa."""
    dev = resolve_device(device)
    return "flash_attention_2" if dev.type == "cuda" and flash_attn_available(dev) else "sdpa"


def choose_dtype(device: str | torch.device | None = None) -> torch.dtype:
    """bfloat16 on GPUs that support it, float16 on other GPUs, float32 elsewhere."""
    dev = resolve_device(device)
    if dev.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """'bf16' / 'bfloat16' / torch.bfloat16 -> torch.bfloat16; None and 'auto' -> None."""
    if name is None or isinstance(name, torch.dtype):
        return name
    if name == "auto":
        return None
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of: auto, {', '.join(sorted(set(DTYPES)))}")
    return DTYPES[name]


def apply_attn_implementation(model, implementation: str | None = None,
                              device: str | torch.device | None = None) -> str:
    """Switch a built transformers model (ours included) to `implementation` (chosen for `device` when None).

    Falls back to sdpa if the requested kernel cannot be used (e.g. flash-attn missing), so callers can
    always ask for the best one. Florence-2's DaViT always stays on sdpa: its channel attention treats the
    token count as the head dimension (thousands at 768 px), far beyond flash-attn's limit of 256.
    Returns the implementation in effect for the language parts."""
    impl = implementation or choose_attn_implementation(device)
    if impl not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation {impl!r} is not one of {ATTN_IMPLEMENTATIONS}")
    if getattr(getattr(model, "config", None), "_attn_implementation", None) != impl:
        try:
            model.set_attn_implementation(impl)
        except (ImportError, ValueError):
            if impl == "sdpa":
                raise
            impl = "sdpa"
            model.set_attn_implementation(impl)
    if impl == "flash_attention_2":
        for module in model.modules():
            if type(module).__name__ == "Florence2VisionBackbone":
                module.config._attn_implementation = "sdpa"
    return impl


def describe(device: str | torch.device | None = None) -> dict:
    """What this machine offers, for benchmark reports."""
    dev = resolve_device(device)
    info = {"device": str(dev), "attn_implementation": choose_attn_implementation(dev),
            "dtype": str(choose_dtype(dev)).replace("torch.", ""), "torch": torch.__version__}
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    bf16=torch.cuda.is_bf16_supported(), cuda=torch.version.cuda)
    return info
