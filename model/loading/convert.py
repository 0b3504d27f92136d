"""Official checkpoints -> this project's model: a directory in, (config, tensors, processor, report) out.

Pure: no model is built here (`model.loading.load` builds and checks), and no code from the checkpoint runs.

* **Florence-VL** (LLaVA layout, `jiuhai/florence-vl-{3b,8b}-*`): `model.vision_tower.vision_tower.*` (Florence-2,
  remote-code names) or a separate `vision_tower/` directory, `model.mm_projector.encoder_mlp.*`,
  `model.layers.*` / `lm_head.*` (Phi-3 or Llama), and a `config.json` that is the LLM config plus `mm_*` fields.
  The Florence-2 part goes through `model.loading.florence2`, then onto `FlorenceVLForConditionalGeneration`'s
  names with the official stream order (depth, caption, ocr, grounding), the official hard-coded prompt ids
  (pads attended, as released) and 577 or 576 image tokens. The processor uses the "official" token convention
  (`model.processing`), so the converted model sees the token sequences it was trained on.
* **Florence-2 + a preset LLM** (explicitly asked for): the Florence-2 tower with a random-init projector and LLM.
"""
from __future__ import annotations

import json
from pathlib import Path

from model.config import FlorenceVLConfig
from model.loading.build import build_config
from model.loading.errors import CheckpointError, ConversionReport, abbrev
from model.loading.florence2 import (FLORENCE2_TEXT_VOCAB, IMAGE_TOKEN, OFFICIAL_PROMPT_TOKEN_IDS, add_image_token,
                                     convert_florence2, pad_rows, padded_size)
from model.loading.layout import read_config
from model.loading.weights import read_state_dict
from model.presets import DEFAULT_PROMPTS, REAL_SIZE_PRESETS
from model.processing import FlorenceVLProcessor, build_llm_tokenizer
from model.vision import florence2_state_dict_to_extractor

TOWER_PREFIX = "model.vision_tower.vision_tower."
LLAVA_LLM_TYPES = {"llava_phi": "phi3", "llava_phi3": "phi3", "llava_llama": "llama", "llava": "llama",
                   "llava_mistral": "mistral", "llava_qwen": "qwen2", "llava_qwen2": "qwen2"}
LLAVA_ARCHITECTURES = {"LlavaPhiForCausalLM": "phi3", "LlavaPhi3ForCausalLM": "phi3", "LlavaLlamaForCausalLM": "llama",
                       "LlavaMistralForCausalLM": "mistral", "LlavaQwenForCausalLM": "qwen2"}
# Keys of a LLaVA config.json that describe the multimodal wrapper, not the LLM.
LLAVA_FIELDS = ("mm_", "use_mm_proj", "tune_mm_mlp_adapter", "freeze_mm_mlp_adapter", "unfreeze_mm_vision_tower",
                "image_aspect_ratio", "image_grid_pinpoints", "tokenizer_model_max_length", "tokenizer_padding_side",
                "architectures", "auto_map", "_name_or_path", "model_type", "transformers_version", "torch_dtype",
                "dtype", "florence2_config", "vision_config", "text_config", "mm_vision_tower")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def llava_llm_config(cfg: dict, state_dict: dict | None = None):
    """The LLM config inside a LLaVA config.json (llava_phi -> phi3, llava_llama -> llama)."""
    from transformers import AutoConfig

    model_type = LLAVA_LLM_TYPES.get(cfg.get("model_type", ""))
    if model_type is None:
        for arch in cfg.get("architectures") or []:
            model_type = model_type or LLAVA_ARCHITECTURES.get(arch)
    if model_type is None and state_dict is not None:
        if any(".self_attn.qkv_proj." in k for k in state_dict):
            model_type = "phi3"
        elif any(".self_attn.q_proj." in k for k in state_dict):
            model_type = "llama"
    if model_type is None:
        raise CheckpointError(f"cannot tell the LLM of model_type {cfg.get('model_type')!r}; expected llava_phi or "
                              "llava_llama (Florence-VL 3B / 8B)")
    fields = {k: v for k, v in cfg.items() if not any(k == f or (f.endswith("_") and k.startswith(f))
                                                     for f in LLAVA_FIELDS)}
    return AutoConfig.for_model(model_type, **fields)


def _find_tower_dir(src: Path, cfg: dict, vision_tower: str | Path | None) -> Path | None:
    if vision_tower is not None:
        p = Path(vision_tower)
        if not (p / "config.json").is_file():
            raise CheckpointError(f"--vision-tower {p} is not a Florence-2 directory (no config.json)")
        return p
    if (src / "vision_tower" / "config.json").is_file():
        return src / "vision_tower"
    mm = cfg.get("mm_vision_tower")
    if mm and Path(str(mm)).is_dir() and (Path(str(mm)) / "config.json").is_file():
        return Path(str(mm))
    return None


def _florence2_config_dict(cfg: dict, tower_dir: Path | None) -> dict | None:
    if tower_dir is not None:
        tcfg = read_config(tower_dir)
        if tcfg.get("vision_config") and tcfg.get("text_config"):
            return tcfg
    if isinstance(cfg.get("florence2_config"), dict):
        return cfg["florence2_config"]
    vision = cfg.get("vision_config")
    if isinstance(vision, dict) and ("dim_embed" in vision or "embed_dim" in vision):
        text = cfg.get("text_config")
        if isinstance(text, dict) and "d_model" in text:
            return {"vision_config": vision, "text_config": text}
    return None


def load_tokenizer(directory: Path | None, trust_remote_code: bool):
    """The tokenizer in `directory` (local files only; None when it holds none). Checkpoint code runs only with
    trust_remote_code, which the user must ask for."""
    if directory is None or not any((directory / f).is_file() for f in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    # AutoTokenizer reads config.json (llava_*/florence2 model types it does not know) and warns about it
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return AutoTokenizer.from_pretrained(str(directory), local_files_only=True, trust_remote_code=trust_remote_code)
    except Exception as exc:
        hint = ("" if trust_remote_code else "; if it needs the checkpoint's own code, review that code and pass "
                "--trust-remote-code (trust_remote_code=True)")
        raise CheckpointError(f"the tokenizer files in {directory} could not be loaded ({type(exc).__name__}: "
                              f"{str(exc)[:300]}){hint}; or remove them to convert without a processor") from None
    finally:
        hf_logging.set_verbosity(verbosity)


def _image_size(*dirs: Path | None) -> int | None:
    for d in dirs:
        if d is None or not (d / "preprocessor_config.json").is_file():
            continue
        pcfg = json.loads((d / "preprocessor_config.json").read_text())
        for key in ("crop_size", "size"):
            v = pcfg.get(key)
            if isinstance(v, dict) and ("height" in v or "shortest_edge" in v):
                return int(v.get("height", v.get("shortest_edge")))
            if isinstance(v, int):
                return v
    return None


def task_prompt_ids(f2_rows: int, f2_tokenizer, override: dict | None) -> tuple[dict, str]:
    """(the three task prompts as Florence-2 token ids, a note saying where they came from): the caller's, the
    official hard-coded ids for the real Florence-2 vocabulary, or the checkpoint's own tokenizer."""
    if override is not None:
        return {k: list(v) for k, v in override.items()}, "prompt ids given by the caller"
    if f2_rows >= FLORENCE2_TEXT_VOCAB:
        return {k: list(v) for k, v in OFFICIAL_PROMPT_TOKEN_IDS.items()}, \
            "prompts = the official hard-coded Florence-VL ids (caption, ocr, grounding), pads attended"
    if f2_tokenizer is not None:
        ids = {k: f2_tokenizer(t, add_special_tokens=True)["input_ids"] for k, t in DEFAULT_PROMPTS.items()}
        return ids, "prompts tokenised with the checkpoint's Florence-2 tokenizer"
    raise CheckpointError(f"the Florence-2 vocabulary has {f2_rows} rows (not Florence-2's {FLORENCE2_TEXT_VOCAB}) and no "
                          "Florence-2 tokenizer was found, so the task prompts cannot be tokenised; put the Florence-2 "
                          "tokenizer files next to its config.json (or pass --vision-tower DIR holding them)")


def _tokens_to_drop_global(tokens: int) -> bool:
    if tokens not in (576, 577):
        raise CheckpointError(f"tokens={tokens}: choose 577 (global token + 24x24 patches, what Florence-2 returns) or "
                              "576 (patches only, the count the paper reports)")
    return tokens == 576


def _llm_image_token(state_dict: dict, llm_config, llm_tokenizer, report: ConversionReport) -> int:
    """Give the LLM an <image> id (LLaVA used the out-of-vocabulary index -200) and grow embeddings if needed."""
    emb_key, head_key = "language_model.model.embed_tokens.weight", "language_model.lm_head.weight"
    rows = int(state_dict[emb_key].shape[0])
    if llm_tokenizer is not None:
        if IMAGE_TOKEN not in llm_tokenizer.get_vocab():
            add_image_token(llm_tokenizer)
            report.added.append(f"{IMAGE_TOKEN} token added to the LLM tokenizer")
        image_id = llm_tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    else:
        image_id = rows
    report.added.append(f"LLM {IMAGE_TOKEN} id = {image_id}")
    if image_id >= rows:
        new_rows = padded_size(image_id + 1)
        state_dict[emb_key] = pad_rows(state_dict[emb_key], new_rows)
        if head_key in state_dict:
            state_dict[head_key] = pad_rows(state_dict[head_key], new_rows)
        llm_config.vocab_size = new_rows
        report.added.append(f"LLM vocabulary padded {rows} -> {new_rows} rows (new rows = mean embedding)")
    else:
        llm_config.vocab_size = rows
    return image_id


def _template_for(llm_type: str, src: Path) -> str:
    """Stage-1 ("pretrain") checkpoints were trained on the plain template, SFT ones on the LLM's chat template."""
    if "pretrain" in src.name.lower():
        return "plain"
    return {"phi3": "phi3", "llama": "llama3"}.get(llm_type, "plain")




def _tower_state_dict(src: Path, cfg: dict, sd: dict, vision_tower, report: ConversionReport):
    """The Florence-2 weights (remote-code names) and the directory holding its config / tokenizer.

    Stage-1 checkpoints keep the tower only in `vision_tower/pytorch_model.bin`, saved from `named_parameters()`;
    `convert_florence2` rebuilds the fixed tables such a file lacks."""
    tower_dir = _find_tower_dir(src, cfg, vision_tower)
    tower_sd = {k[len(TOWER_PREFIX):]: v for k, v in sd.items() if k.startswith(TOWER_PREFIX)}
    stray = sorted(k for k in sd if k.startswith("model.vision_tower.") and not k.startswith(TOWER_PREFIX))
    if stray:
        raise CheckpointError(f"{src}: vision tower tensors outside {TOWER_PREFIX}*: {abbrev(stray)}")
    if tower_sd:
        if tower_dir is not None and vision_tower is not None:
            report.notes.append(f"the checkpoint's own Florence-2 weights are used; {tower_dir} supplied config/tokenizer")
    elif tower_dir is not None:
        tower_sd = read_state_dict(tower_dir)
        report.notes.append(f"Florence-2 weights read from {tower_dir}")
    else:
        raise CheckpointError(
            f"{src} holds no Florence-2 weights ({TOWER_PREFIX}*) and no vision tower directory was found; pass "
            f"--vision-tower DIR (vision_tower=DIR), a local copy of {cfg.get('mm_vision_tower', 'the Florence-2 tower')}")
    return tower_sd, tower_dir


def _llm_state_dict(src: Path, sd: dict, report: ConversionReport) -> dict:
    """Projector and LLM tensors in this project's names."""
    ours = {}
    for k, v in sd.items():
        if k.startswith("model.vision_tower."):
            continue
        if k.endswith("rotary_emb.inv_freq"):
            report.dropped.append(k)
        elif k.startswith("model.mm_projector."):
            ours["mm_projector." + k[len("model.mm_projector."):]] = v
        elif k.startswith("model."):
            ours["language_model.model." + k[len("model."):]] = v
        elif k.startswith("lm_head."):
            ours["language_model." + k] = v
        else:
            ours["(unmapped) " + k] = v  # reported as unexpected by the key check
    if "language_model.model.embed_tokens.weight" not in ours:
        raise CheckpointError(f"{src}: no LLM token embedding (model.embed_tokens.weight); not a LLaVA checkpoint")
    return ours


def _check_widths(src: Path, cfg: dict, ours: dict, d_model: int) -> None:
    mm_hidden = int(cfg.get("mm_hidden_size", d_model))
    if mm_hidden != d_model:
        raise CheckpointError(f"{src}: mm_hidden_size {mm_hidden} differs from the Florence-2 d_model {d_model}")
    proj_in = ours.get("mm_projector.encoder_mlp.0.weight")
    streams = 1 + len(DEFAULT_PROMPTS)
    if proj_in is not None and proj_in.shape[1] != streams * d_model:
        raise CheckpointError(f"{src}: the projector takes {proj_in.shape[1]} channels, but channel fusion of "
                              f"{streams} streams x {d_model} gives {streams * d_model}")


def convert_florence_vl(src: Path, *, tokens: int = 577, vision_tower: str | Path | None = None,
                        trust_remote_code: bool = False, prompt_token_ids: dict | None = None,
                        template: str | None = None, image_size: int | None = None):
    """Florence-VL LLaVA-layout directory -> (FlorenceVLConfig, state dict in our names, processor or None, report)."""
    cfg = read_config(src)
    sd = read_state_dict(src)
    report = ConversionReport(source=str(src), layout="florence-vl-llava")
    tower_sd, tower_dir = _tower_state_dict(src, cfg, sd, vision_tower, report)
    f2_tokenizer = load_tokenizer(tower_dir, trust_remote_code)
    f2_config, native, f2_report = convert_florence2(tower_sd, _florence2_config_dict(cfg, tower_dir), f2_tokenizer,
                                                     source=f"{src} (vision tower)")
    report.dropped += [TOWER_PREFIX + k for k in f2_report.dropped]
    report.rebuilt += f2_report.rebuilt
    report.added += f2_report.added
    report.notes += f2_report.notes
    n_decoder = sum(1 for k in native if k.startswith("model.language_model.decoder.") or k == "lm_head.weight")
    if n_decoder:
        report.notes.append(f"Florence-2 BART decoder and lm_head ({n_decoder} tensors) not kept: features need only "
                            "the encoder")
    ours = {"vision_tower." + k: v for k, v in florence2_state_dict_to_extractor(native).items()}
    ours.update(_llm_state_dict(src, sd, report))
    llm_config = llava_llm_config(cfg, sd)
    if "language_model.lm_head.weight" not in ours and getattr(llm_config, "tie_word_embeddings", False):
        ours["language_model.lm_head.weight"] = ours["language_model.model.embed_tokens.weight"]
    llm_tokenizer = load_tokenizer(src, trust_remote_code)
    if getattr(llm_config, "pad_token_id", None) is None and llm_tokenizer is not None \
            and llm_tokenizer.pad_token_id is not None:
        llm_config.pad_token_id = llm_tokenizer.pad_token_id  # LLaVA added <pad> to Llama-3 (inferred)
        report.notes.append(f"LLM pad_token_id {llm_config.pad_token_id} taken from the tokenizer")
    image_token_id = _llm_image_token(ours, llm_config, llm_tokenizer, report)
    _check_widths(src, cfg, ours, f2_config.text_config.d_model)
    prompt_ids, prompt_note = task_prompt_ids(f2_config.text_config.vocab_size, f2_tokenizer, prompt_token_ids)
    drop_global = _tokens_to_drop_global(tokens)
    report.notes += [prompt_note,
                     f"{tokens} image tokens per image ({'global token dropped' if drop_global else 'global token kept'})"]
    config = FlorenceVLConfig(
        vision_config=f2_config, text_config=llm_config, prompts=dict(DEFAULT_PROMPTS), prompt_token_ids=prompt_ids,
        attend_prompt_pads=True, drop_global_token=drop_global, fusion="channel",
        projector_type=cfg.get("mm_projector_type", "mlp3x_gelu"), image_token_id=image_token_id,
        image_size=image_size or _image_size(src, tower_dir) or 768,
        pad_to_square=cfg.get("image_aspect_ratio", "square") == "pad",
        template=template or _template_for(llm_config.model_type, src))
    processor, why = _make_processor(config, llm_tokenizer, f2_tokenizer, cfg.get("tokenizer_model_max_length"),
                                     convention="official")
    if processor is None:
        report.notes.append(f"no processor: {why}")
    else:
        report.notes.append("processor: official token convention (BOS only where the tokenizer adds one, no EOS "
                            "after a plain answer, LLaVA's square-pad colour)")
    return config, ours, processor, report


def _make_processor(config, llm_tokenizer, f2_tokenizer, max_length=None, convention: str = "official"):
    if llm_tokenizer is None:
        return None, "the checkpoint directory holds no LLM tokenizer files"
    if f2_tokenizer is None:
        return None, ("no Florence-2 tokenizer (none in vision_tower/ or --vision-tower DIR); the model still runs "
                      "with the official prompt ids")
    kw = {"max_length": int(max_length)} if max_length else {}
    return FlorenceVLProcessor(llm_tokenizer, f2_tokenizer, image_size=config.image_size,
                               num_image_tokens=config.num_image_tokens(), template=config.template,
                               pad_to_square=config.pad_to_square, convention=convention, **kw), ""


def convert_florence2_with_llm(src: Path, llm_preset: str, *, tokens: int = 577, trust_remote_code: bool = False,
                               prompt_token_ids: dict | None = None, image_size: int | None = None):
    """Florence-2 directory + a random-init LLM/projector of a preset (explicitly requested by the caller)."""
    f2_tokenizer = load_tokenizer(src, trust_remote_code)
    f2_config, native, report = convert_florence2(read_state_dict(src), read_config(src), f2_tokenizer, source=str(src))
    llm_tok = None if llm_preset in REAL_SIZE_PRESETS else build_llm_tokenizer()
    preset = build_config(llm_preset, llm_tok) if llm_tok is not None else build_config(llm_preset)
    prompt_ids, note = task_prompt_ids(f2_config.text_config.vocab_size, f2_tokenizer, prompt_token_ids)
    config = FlorenceVLConfig(
        vision_config=f2_config, text_config=preset.text_config, prompts=dict(DEFAULT_PROMPTS),
        prompt_token_ids=prompt_ids, attend_prompt_pads=True, drop_global_token=_tokens_to_drop_global(tokens),
        projector_type=preset.projector_type, image_token_id=preset.image_token_id,
        image_size=image_size or _image_size(src) or 768, template=preset.template)
    ours = {"vision_tower." + k: v for k, v in florence2_state_dict_to_extractor(native).items()}
    report.notes += [note, f"mm_projector and language_model are RANDOM-INIT from preset {llm_preset!r} (requested)"]
    processor, why = _make_processor(config, llm_tok, f2_tokenizer, convention="project")
    if processor is None:
        report.notes.append(f"no processor: {why}")
    return config, ours, processor, report
