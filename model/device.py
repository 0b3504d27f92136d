"""Device, dtype and attention-implementation choices made in one place.

Why a module of its own: the same three decisions (which device, which dtype, which attention kernel)
are needed by loading, training, capture, generation, evaluation and the GPU benchmark, and they must
never differ between them. Rules:

* device: `--device auto|cpu|cuda|cuda:N`; auto is the first CUDA device when one is present, else the
  CPU. CUDA asked for where there is none (or an index past the last GPU) is refused by name.
* dtype: `--dtype auto|float32|bfloat16|float16`; auto is bfloat16 on GPUs that support it, float16 on
  older GPUs, float32 on the CPU.
* attention: `flash_attention_2` only when a CUDA device is the target AND the flash-attn package is
  installed; otherwise `sdpa` (numerically equal to eager on CPU, see florence-vl.md section 13).
  The package is looked up with `importlib.util.find_spec`, which locates it without importing it,
  and only when CUDA is available, so a CPU run never imports (or even searches for) flash-attn.

The option texts are checked without torch (`check_device_text`, `check_dtype_text`), so a command
refuses a bad value before any heavy import; torch is imported inside the functions that need it.
"""
from __future__ import annotations

import importlib.util
import re

ATTN_IMPLEMENTATIONS = ("flash_attention_2", "sdpa", "eager")
DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
_DTYPE_ALIASES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
                  "float16": "float16", "fp16": "float16", "half": "float16"}
_DEVICE_TEXT = re.compile(r"auto|cpu|cuda(:\d+)?")


def check_device_text(text: str, option: str = "--device") -> str:
    """`text` when it names a device this workbench runs on, else ValueError naming the option and the
    choices. Needs no torch."""
    if not isinstance(text, str) or not _DEVICE_TEXT.fullmatch(text):
        raise ValueError(f"{option} {text}: not a device; choose {DEVICE_CHOICES}")
    return text


def check_dtype_text(text: str, option: str = "--dtype") -> str:
    """`text` when it names a dtype (or auto), else ValueError naming the option and the choices."""
    if text != "auto" and text not in _DTYPE_ALIASES:
        raise ValueError(f"{option} {text}: not a dtype; choose {', '.join(DTYPE_CHOICES)}")
    return text


def resolve_device(device=None, option: str = "--device"):
    """"auto"/None -> the first CUDA device when one is present, else the CPU; "cpu", "cuda", "cuda:N"
    (or a torch.device) as given, refused when CUDA is not there or N is past the last GPU."""
    import torch

    if device is None or (isinstance(device, str) and device == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device, str):
        check_device_text(device, option)
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{option} {device}: CUDA was requested but CUDA is not available on this machine; "
                         "pass --device cpu (or auto)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"{option} {device}: this machine has {torch.cuda.device_count()} CUDA device(s); "
                         f"choose cuda:0 to cuda:{torch.cuda.device_count() - 1}, or auto")
    return dev


def resolve_dtype(dtype: str | None, device=None, option: str = "--dtype"):
    """"auto"/None -> `choose_dtype(device)`; "float32" / "bfloat16" / "float16" (or fp32, bf16, fp16)
    -> that torch dtype."""
    import torch

    if dtype is None or dtype == "auto":
        return choose_dtype(device)
    if isinstance(dtype, torch.dtype):
        return dtype
    check_dtype_text(dtype, option)
    return parse_dtype(dtype)


def flash_attn_available(device=None) -> bool:
    """True when flash-attn could serve `device` (CUDA only). Never imports flash_attn."""
    import torch

    if device is not None and torch.device(device).type != "cuda":
        return False
    if not torch.cuda.is_available():
        return False
    return importlib.util.find_spec("flash_attn") is not None


def choose_attn_implementation(device=None) -> str:
    """flash_attention_2 on CUDA with flash-attn installed, else sdpa."""
    dev = resolve_device(device)
    return "flash_attention_2" if dev.type == "cuda" and flash_attn_available(dev) else "sdpa"


def choose_dtype(device=None):
    """bfloat16 on GPUs that support it, float16 on other GPUs, float32 elsewhere."""
    import torch

    dev = resolve_device(device)
    if dev.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def parse_dtype(name):
    """'bf16' / 'bfloat16' / torch.bfloat16 -> torch.bfloat16; None and 'auto' -> None."""
    import torch

    if name is None or isinstance(name, torch.dtype):
        return name
    if name == "auto":
        return None
    if name not in _DTYPE_ALIASES:
        raise ValueError(f"unknown dtype {name!r}; choose one of: auto, {', '.join(sorted(_DTYPE_ALIASES))}")
    return getattr(torch, _DTYPE_ALIASES[name])


def apply_attn_implementation(model, implementation: str | None = None, device=None) -> str:
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


def describe(device=None) -> dict:
    """What this machine offers, for benchmark reports."""
    import torch

    dev = resolve_device(device)
    info = {"device": str(dev), "attn_implementation": choose_attn_implementation(dev),
            "dtype": str(choose_dtype(dev)).replace("torch.", ""), "torch": torch.__version__}
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    bf16=torch.cuda.is_bf16_supported(), cuda=torch.version.cuda)
    return info
