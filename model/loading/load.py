"""`load_model`: the one way to open a model directory or hub id, whatever it holds.

    model, processor = load_model("runs/demo/model")              # this project's layout
    model, processor = load_model("jiuhai/florence-vl-3b-sft")    # official Florence-VL, converted on the fly
    source, processor = load_model("openai/clip-vit-large-patch14-336")  # a feature source (model.adapters)

The layout is detected once (`model.loading.layout`); official checkpoints go through the pure converters
(`model.loading.convert`, `model.loading.florence2`) and are built here, with every key checked on a meta-device
copy first: missing, unexpected or mis-shaped tensors are an error naming them, never a silently re-initialised
model. Other transformers families (and Florence-2 on its own) come back as adapters with a processor built
from their own image processor.
"""
from __future__ import annotations

import json
import logging
import pickle
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError

from model.adapters.base import AdapterProcessor
from model.adapters.florence2 import Florence2Adapter
from model.adapters.registry import open_family
from model.device import apply_attn_implementation, parse_dtype
from model.florence_vl import FlorenceVLForConditionalGeneration
from model.loading.convert import convert_florence2_with_llm, convert_florence_vl, load_tokenizer, task_prompt_ids
from model.loading.errors import CheckpointError, ConversionReport, abbrev
from model.loading.florence2 import convert_florence2
from model.loading.layout import (FAMILIES, FLORENCE2_NATIVE, FLORENCE2_REMOTE, FLORENCE_VL_LLAVA, OWN, Layout,
                                  detect_layout)
from model.loading.weights import check_keys, read_state_dict, stored_dtype
from model.processing import FlorenceVLProcessor

logger = logging.getLogger(__name__)
OFFICIAL_OPTIONS = ("tokens", "vision_tower", "allow_missing", "trust_remote_code", "llm_preset", "prompt_token_ids",
                    "template", "image_size")


def load_model(source: str | Path, *, device: str | torch.device | None = None, dtype=None,
               attn_implementation: str | None = None, revision: str | None = None, **options):
    """(model, processor) for a directory or hub id.

    this project's layout -> (FlorenceVLForConditionalGeneration, FlorenceVLProcessor or None)
    official Florence-VL  -> the same, converted (options: tokens 577|576, vision_tower, allow_missing,
                             trust_remote_code, prompt_token_ids, template, image_size)
    Florence-2            -> (Florence2Adapter, AdapterProcessor); with llm_preset=NAME a Florence-VL model
                             whose projector and LLM are random-init from that preset
    CLIP, SigLIP, DINOv2, ViT, LLaVA -> (adapter, AdapterProcessor); see `model.adapters`
    dtype: a torch dtype or a name ("bfloat16", "auto"); None keeps what the checkpoint stores."""
    unknown = sorted(set(options) - set(OFFICIAL_OPTIONS))
    if unknown:
        raise TypeError(f"load_model: unknown options {unknown}; known: {', '.join(OFFICIAL_OPTIONS)}")
    dtype = parse_dtype(dtype) if isinstance(dtype, str) else dtype
    layout = detect_layout(source, revision)
    if layout.kind == OWN:
        model, processor = _load_own(layout.path, dtype), None
        if (layout.path / "processor_config.json").is_file():
            processor = FlorenceVLProcessor.from_pretrained(layout.path)
    elif layout.kind == FLORENCE_VL_LLAVA or options.get("llm_preset"):
        model, processor = _load_official(layout, dtype, **options)
    elif layout.kind in (FLORENCE2_REMOTE, FLORENCE2_NATIVE):
        _only(options, ("trust_remote_code", "prompt_token_ids"), layout)
        model, processor = _open_florence2(layout, dtype, **options)
    else:
        _only(options, (), layout)
        model, processor = _open_family(layout, dtype)
    _finish(model, device, attn_implementation)
    return model, processor


def _only(options: dict, allowed: tuple[str, ...], layout: Layout) -> None:
    extra = sorted(k for k, v in options.items() if k not in allowed and v not in (None, False))
    if extra:
        raise CheckpointError(f"{layout.path} is a {layout.kind} model; the options {extra} apply only to "
                              "Florence-VL checkpoints")


def _finish(model, device, attn: str | None) -> None:
    if device is not None and str(device) != "auto":
        model.to(device)
    if isinstance(model, FlorenceVLForConditionalGeneration) or attn is not None:
        apply_attn_implementation(model, attn, next(model.parameters()).device)
    model.eval()


# ---- this project's layout ----------------------------------------------------------------------
def _load_own(path: Path, dtype) -> FlorenceVLForConditionalGeneration:
    """`from_pretrained`, except that weights which do not fit are an error naming them, never a model with
    silently re-initialised parts; an unreadable or pickled weight file is refused with what to do instead."""
    kwargs = {"dtype": dtype} if dtype is not None else {}
    try:
        model, info = FlorenceVLForConditionalGeneration.from_pretrained(
            path, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"refusing to load the weights in {path}: pytorch_model.bin is not a plain tensor file (it cannot be read "
            "with torch.load(weights_only=True)); unpickling it could run arbitrary code. Save the model again with "
            "save_model / `fvl train` (safetensors), or convert the file on a machine you trust") from None
    except SafetensorError as exc:
        raise CheckpointError(f"the weights in {path} are unreadable ({exc}); model.safetensors is truncated or corrupt "
                              "- copy or save the model again") from None
    _refuse_misfits(path, info, "its config.json")
    return model


def _refuse_misfits(path: Path, info: dict, what: str) -> None:
    problems = []
    if info.get("missing_keys"):
        problems.append(f"missing tensors: {', '.join(sorted(info['missing_keys'])[:8])}")
    if info.get("unexpected_keys") and what == "its config.json":
        problems.append(f"unexpected tensors: {', '.join(sorted(info['unexpected_keys'])[:8])}")
    if info.get("mismatched_keys"):
        problems.append("wrong shapes: " + ", ".join(f"{k} is {tuple(a)} in the file but {tuple(b)} in the model"
                                                     for k, a, b in sorted(info["mismatched_keys"])[:8]))
    if problems:
        raise CheckpointError(f"the weights in {path} do not fit {what} ({'; '.join(problems)}); the checkpoint is "
                              "incomplete or belongs to another model - save or convert it again")


def save_model(model: FlorenceVLForConditionalGeneration, processor, path: str | Path) -> Path:
    """Save weights (safetensors), config and processor into one directory that `load_model` reopens."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    if processor is not None:
        processor.save_pretrained(path)
    return path


# ---- official checkpoints -------------------------------------------------------------------------
def _load_official(layout: Layout, dtype, *, tokens: int = 577, vision_tower=None, allow_missing: bool = False,
                   trust_remote_code: bool = False, llm_preset: str | None = None, prompt_token_ids=None,
                   template: str | None = None, image_size: int | None = None):
    src = layout.path
    if layout.kind == FLORENCE_VL_LLAVA:
        if llm_preset:
            raise CheckpointError("--llm-preset only applies to Florence-2 checkpoints; a Florence-VL checkpoint has its LLM")
        config, sd, processor, report = convert_florence_vl(
            src, tokens=tokens, vision_tower=vision_tower, trust_remote_code=trust_remote_code,
            prompt_token_ids=prompt_token_ids, template=template, image_size=image_size)
    elif layout.kind in (FLORENCE2_REMOTE, FLORENCE2_NATIVE):
        config, sd, processor, report = convert_florence2_with_llm(
            src, llm_preset, tokens=tokens, trust_remote_code=trust_remote_code,
            prompt_token_ids=prompt_token_ids, image_size=image_size)
        allow_missing = True  # the LLM and projector are random by request
    else:
        raise CheckpointError(f"--llm-preset applies to Florence-2 checkpoints; {src} is a {layout.kind} model")
    report.layout = layout.kind
    model = build_and_load(FlorenceVLForConditionalGeneration, config, sd, str(src), dtype=dtype,
                           allow_missing=allow_missing, report=report)
    model.conversion_report = report
    if processor is None:
        logger.warning("%s: no processor (%s)", src, next((n for n in report.notes if n.startswith("no processor")), ""))
    return model, processor


def load_florence2(source: str | Path, *, dtype=None, trust_remote_code: bool = False):
    """A Florence-2 directory (remote-code or native) -> (native Florence2ForConditionalGeneration, tokenizer, report)."""
    from transformers import Florence2ForConditionalGeneration

    layout = detect_layout(source)
    if layout.kind not in (FLORENCE2_REMOTE, FLORENCE2_NATIVE):
        raise CheckpointError(f"{layout.path} is a {layout.kind} model, not Florence-2")
    tokenizer = load_tokenizer(layout.path, trust_remote_code)
    f2_config, native, report = convert_florence2(read_state_dict(layout.path), layout.config, tokenizer,
                                                  source=str(layout.path))
    model = build_and_load(Florence2ForConditionalGeneration, f2_config, native, str(layout.path), dtype=dtype,
                           report=report)
    model.conversion_report = report
    return model, tokenizer, report


def _open_florence2(layout: Layout, dtype, *, trust_remote_code: bool = False, prompt_token_ids=None):
    model, tokenizer, report = load_florence2(layout.path, dtype=dtype, trust_remote_code=trust_remote_code)
    try:
        prompts, note = task_prompt_ids(model.config.text_config.vocab_size, tokenizer, prompt_token_ids)
    except CheckpointError as exc:
        prompts, note = {}, f"no prompt.* taps: {exc}"
    report.notes.append(note)
    adapter = Florence2Adapter(model, prompts)
    adapter.conversion_report = report
    return adapter, _adapter_processor(layout)


def _open_family(layout: Layout, dtype):
    adapter, info = open_family(layout.kind, layout.path, layout.config, dtype=dtype)
    _refuse_misfits(layout.path, info, f"a {layout.kind} model")
    return adapter, _adapter_processor(layout)


def _adapter_processor(layout: Layout) -> AdapterProcessor:
    if not (layout.path / "preprocessor_config.json").is_file():
        raise CheckpointError(f"{layout.path} has no preprocessor_config.json; the {layout.kind} model's own image "
                              "processor is needed to preprocess images - copy it from the model's hub repo")
    return AdapterProcessor.from_directory(layout.path, with_tokenizer=layout.kind == "llava")


# ---- building a model from converted tensors ---------------------------------------------------------
@contextmanager
def _default_dtype(dtype: torch.dtype | None):
    old = torch.get_default_dtype()
    if dtype is not None and dtype.is_floating_point:
        torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_and_load(model_cls, config, state_dict: dict, source: str, *,
                   dtype: torch.dtype | None = None, allow_missing: bool = False,
                   report: ConversionReport | None = None):
    """Instantiate `model_cls(config)` and load `state_dict` into it, after checking every key on a meta-device
    copy (no memory spent before the check). Initialisation is skipped when nothing is missing."""
    from transformers.initialization import no_init_weights

    with torch.device("meta"):
        meta = model_cls(config)
    expected = {k: v.shape for k, v in meta.state_dict().items()}
    tied = _tied_aliases(meta)
    del meta
    for alias, src in tied.items():
        if alias not in state_dict and src in state_dict:
            state_dict[alias] = state_dict[src]
    missing = check_keys(expected, state_dict, source, allow_missing)
    if dtype is None:  # like transformers' dtype="auto": keep what the checkpoint stores
        dtype = stored_dtype(state_dict)
    config.dtype = dtype
    with _default_dtype(dtype):
        if missing:
            model = model_cls(config)
        else:
            with no_init_weights():
                model = model_cls(config)
    result = model.load_state_dict(state_dict, strict=False)
    if result.unexpected_keys:  # cannot happen after check_keys; kept as a guard
        raise CheckpointError(f"{source}: unexpected tensors {abbrev(result.unexpected_keys)}")
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    if report is not None:
        report.loaded = len([k for k in state_dict if k in expected])
        report.missing = missing
    if missing:
        logger.warning("%s: %d tensors missing and left randomly initialised: %s", source, len(missing), abbrev(missing))
    return model.eval()


def _tied_aliases(model) -> dict[str, str]:
    """{state-dict key: key it shares storage with} for tensors that are the same Parameter."""
    seen: dict[int, str] = {}
    aliases = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            aliases[name] = seen[id(p)]
        else:
            seen[id(p)] = name
    return aliases




def convert_checkpoint(src, out, *, kind: str = "auto", dtype=None, **options) -> ConversionReport:
    """Convert `src` (directory or hub id) and write `out`: this project's layout (loadable by `load_model`), or,
    for a Florence-2 checkpoint without `llm_preset`, transformers' native Florence-2 layout. Writes
    conversion.json with the report. `options` as for `load_model`."""
    if kind not in ("auto", "florence2", "florence-vl"):
        raise CheckpointError(f"kind {kind!r} is not auto, florence2 or florence-vl")
    layout = detect_layout(src)
    if layout.kind == OWN:
        raise CheckpointError(f"{layout.path} is already in this project's layout; open it with load_model")
    if layout.kind in FAMILIES:
        raise CheckpointError(f"{layout.path} is a {layout.kind} model; nothing to convert - pass it to --model as is")
    is_f2 = layout.kind in (FLORENCE2_REMOTE, FLORENCE2_NATIVE)
    if kind == "florence2" and not is_f2:
        raise CheckpointError(f"{layout.path} is a {layout.kind} checkpoint, not Florence-2; use --kind auto or florence-vl")
    if kind == "florence-vl" and is_f2:
        raise CheckpointError(f"{layout.path} is a Florence-2 checkpoint ({layout.kind}), not Florence-VL; use --kind florence2")
    out = Path(out)
    if out.resolve() == layout.path.resolve():
        raise CheckpointError("--out must differ from --src")
    dtype = parse_dtype(dtype) if isinstance(dtype, str) else dtype
    if is_f2 and not options.get("llm_preset"):
        model, tokenizer, report = load_florence2(layout.path, dtype=dtype,
                                                  trust_remote_code=options.get("trust_remote_code", False))
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(out)
        else:
            report.notes.append("no tokenizer files in the source: none written")
        report.notes.append("written in transformers' native Florence-2 layout (Florence2ForConditionalGeneration); "
                            "add --llm-preset NAME for a Florence-VL directory")
    else:
        model, processor = _load_official(layout, dtype, **options)
        report = model.conversion_report
        save_model(model, processor, out)
    (out / "conversion.json").write_text(json.dumps(report.to_dict(), indent=2))
    return report
