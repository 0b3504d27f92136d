"""Build, save and load a Florence-VL model together with its processor.

`build_model("tiny")` gives a random-init model and the in-process tokenizers it was sized for;
real-size presets build on the meta device (`device="meta"`) for inspection without allocating memory.
`save_model` / `load_model` round-trip a directory holding `config.json`, `model.safetensors` and the
processor (both tokenizers), so every checkpoint the project trains can be reopened offline.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from model.config import DEFAULT_PROMPTS, OFFICIAL_PROMPT_IDS, PRESETS, REAL_SIZE_PRESETS, FlorenceVLConfig, preset_config
from model.florence_vl import FlorenceVLForConditionalGeneration
from model.processing import FlorenceVLProcessor, build_florence2_tokenizer, build_llm_tokenizer


def tokenize_prompts(config: FlorenceVLConfig, florence2_tokenizer) -> dict[str, list[int]]:
    return {name: florence2_tokenizer(text, add_special_tokens=True)["input_ids"] for name, text in config.prompts.items()}


def build_config(preset: str, llm_tokenizer=None, florence2_tokenizer=None, **overrides) -> FlorenceVLConfig:
    """Preset config sized to the given (or in-process) tokenizers."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    if preset in REAL_SIZE_PRESETS and llm_tokenizer is None:
        config = preset_config(preset, **overrides)  # published vocabulary sizes
        config.image_token_id = config.text_config.vocab_size - 1
        if set(config.prompts) <= set(OFFICIAL_PROMPT_IDS) and config.prompts == {k: DEFAULT_PROMPTS[k] for k in config.prompts}:
            config.prompt_token_ids = {k: OFFICIAL_PROMPT_IDS[k] for k in config.prompts}
        return config
    llm_tokenizer = llm_tokenizer or build_llm_tokenizer()
    florence2_tokenizer = florence2_tokenizer or build_florence2_tokenizer()
    special = dict(pad_token_id=llm_tokenizer.pad_token_id, bos_token_id=llm_tokenizer.bos_token_id,
                   eos_token_id=llm_tokenizer.eos_token_id)
    config = preset_config(preset, llm_vocab=len(llm_tokenizer), florence2_vocab=len(florence2_tokenizer),
                           image_token_id=llm_tokenizer.convert_tokens_to_ids("<image>"), llm_special_ids=special,
                           **overrides)
    config.vision_config.image_token_id = florence2_tokenizer.convert_tokens_to_ids("<image>")
    config.prompt_token_ids = tokenize_prompts(config, florence2_tokenizer)
    config.check_position_limits()  # now with the real prompt lengths
    return config


def build_processor(config: FlorenceVLConfig, llm_tokenizer=None, florence2_tokenizer=None) -> FlorenceVLProcessor:
    return FlorenceVLProcessor(llm_tokenizer or build_llm_tokenizer(), florence2_tokenizer or build_florence2_tokenizer(),
                               image_size=config.image_size, num_image_tokens=config.num_image_tokens(),
                               template=config.template, pad_to_square=config.pad_to_square)


def build_model(preset: str = "tiny", *, device: str | torch.device | None = None, seed: int | None = 0,
                **overrides) -> tuple[FlorenceVLForConditionalGeneration, FlorenceVLProcessor | None]:
    """Random-init model for a preset, plus its processor (None for real-size presets on meta).

    `overrides` set config fields such as fusion="token", projector_type="linear", drop_global_token=True,
    prompts={...}, encoder_type="clip", encoder_config={...}, image_size=...
    """
    if device == "meta" or (device is None and preset in REAL_SIZE_PRESETS):
        config = build_config(preset, **overrides)
        with torch.device("meta"):
            model = FlorenceVLForConditionalGeneration(config)
        return model, None
    llm_tok, f2_tok = build_llm_tokenizer(), build_florence2_tokenizer()
    config = build_config(preset, llm_tok, f2_tok, **overrides)
    if seed is not None:
        torch.manual_seed(seed)
    model = FlorenceVLForConditionalGeneration(config)
    if device is not None:
        model.to(device)
    model.eval()
    return model, build_processor(config, llm_tok, f2_tok)


def save_model(model: FlorenceVLForConditionalGeneration, processor: FlorenceVLProcessor | None, path: str | Path) -> Path:
    """Save weights (safetensors), config and processor into one directory."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    if processor is not None:
        processor.save_pretrained(path)
    return path


def load_model(path: str | Path, *, device: str | torch.device | None = None, dtype: torch.dtype | None = None):
    """Load a model directory written by `save_model` (or `fvl train`); returns (model, processor)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a model directory (no config.json); pass a directory written by "
                                "`fvl train` / save_model, or use --preset NAME for a random-init model")
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path / 'config.json'} is not valid JSON ({exc}); the model directory is damaged - "
                         "save, train or convert the model again") from None
    if cfg.get("model_type") != "florence_vl":
        from model.convert import load_official  # official Florence-2 / Florence-VL layouts

        return load_official(path, device=device, dtype=dtype)
    kwargs = {"dtype": dtype} if dtype is not None else {}
    model = _from_pretrained_checked(path, kwargs)
    if device is not None:
        model.to(device)
    model.eval()
    processor = FlorenceVLProcessor.from_pretrained(path) if (path / "processor_config.json").is_file() else None
    return model, processor


def _from_pretrained_checked(path: Path, kwargs: dict) -> FlorenceVLForConditionalGeneration:
    """`from_pretrained`, except that weights which do not fit are an error naming them, never a model with
    silently re-initialised parts; an unreadable or pickled weight file is refused with what to do instead."""
    import pickle

    from safetensors import SafetensorError

    from model.convert import CheckpointError

    try:
        model, info = FlorenceVLForConditionalGeneration.from_pretrained(
            path, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"refusing to load the weights in {path}: pytorch_model.bin is not a plain tensor file (it cannot be read "
            "with torch.load(weights_only=True)); unpickling it could run arbitrary code. Save the model again with "
            "save_model / `fvl train` (safetensors), or convert the file on a machine you trust") from None
    except SafetensorError as exc:
        raise CheckpointError(f"the weights in {path} are unreadable ({exc}); model.safetensors is truncated or corrupt "
                              "- copy or save the model again") from None
    problems = []
    if info["missing_keys"]:
        problems.append(f"missing tensors: {', '.join(sorted(info['missing_keys'])[:8])}")
    if info["unexpected_keys"]:
        problems.append(f"unexpected tensors: {', '.join(sorted(info['unexpected_keys'])[:8])}")
    if info["mismatched_keys"]:
        problems.append("wrong shapes: " + ", ".join(f"{k} is {tuple(a)} in the file but {tuple(b)} in the model"
                                                     for k, a, b in sorted(info["mismatched_keys"])[:8]))
    if problems:
        raise CheckpointError(f"the weights in {path} do not fit its config.json ({'; '.join(problems)}); the "
                              "checkpoint is incomplete or belongs to another model - save or convert it again")
    return model
