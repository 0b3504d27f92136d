"""Random-init Florence-VL models and their processors from the presets.

`build_model("tiny")` gives a random-init model and the in-process tokenizers it was sized for;
real-size presets build on the meta device (`device="meta"`) for inspection without allocating memory.
"""
from __future__ import annotations

import torch

from model.config import FlorenceVLConfig, preset_config
from model.florence_vl import FlorenceVLForConditionalGeneration
from model.presets import DEFAULT_PROMPTS, OFFICIAL_PROMPT_IDS, PRESETS, REAL_SIZE_PRESETS
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
    """The processor of a preset model: this project's token convention (see `model.processing`)."""
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
