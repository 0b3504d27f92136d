"""The comparison config: which variants, which seeds, which budgets (configs/compare.json).

Why a module of its own: validating a config must answer fast (before torch loads) and must name the bad field,
so `fvl compare --config FILE --check` and the app can read configs without the training stack. Keys that
depend on the encoders' own defaults are checked by `variants.check_encoder_configs` before any work starts.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

from model.presets import PRESETS
from workbench.data.scenes import LABEL_NAMES, check_text_size, check_words

ENCODER_KINDS = ("florence2", "davit", "clip", "cvt", "cycle")
FUSIONS = ("channel", "token", "average")
PROMPT_NAMES = ("caption", "ocr", "grounding")
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


class ConfigError(ValueError):
    """A bad comparison config; the message names the field and the fix."""


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
    """A whole comparison: shared data and budgets, the seeds, and the variants (see configs/compare.json).

    `seed` fixes what the seeds share (the data and the encoders' pretraining, which the paper also takes as
    given); each of `seeds` is one training of every VLM (initialisation and data order)."""

    name: str
    preset: str
    data: dict
    seed: int
    seeds: list[int]
    threads: int | None
    encoders: dict
    training: dict
    eval: dict
    probe: dict
    align: dict
    measures: dict
    stats: dict
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
    "seeds": 3,
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
    "probe": {"taps": ["fusion.input"], "labels": ["word", "n_objects", "main_color"], "folds": 3,
              "Cs": [0.01, 0.1, 1.0, 10.0], "select": "inner"},
    "align": {"steps": 100, "batch_size": 16, "lr": 1e-3, "held_out": 0.25, "reference": None,
              "caption": "detailed"},
    # correspondence: two random crops (scale range, optional mirror) of each scene of `split`
    "measures": {"split": "test", "crop": [0.7, 0.95], "flip": True},
    "stats": {"bootstrap": 2000, "level": 0.95},
}
_TRAIN_KEYS = {"max_steps", "epochs", "batch_size", "micro_batch_size", "lr", "warmup_ratio", "weight_decay",
               "max_grad_norm", "min_lr_ratio"}
# independent_turns: each synthetic question trains as a lone question about its image (the recipe's setting)
_VLM_KEYS = _TRAIN_KEYS | {"independent_turns"}
# Optional data keys (absent: the generator's defaults, and the same fingerprints as configs without them):
# the reading vocabulary, the font size range as fractions of the image side, and the encoders' own pretraining
# scenes {"n", "seed"} (drawn by the same generator with another seed; absent: the encoders train on the train split).
_DATA_OPTIONAL = {"words", "text_size", "encoder_scenes"}
_ENCODER_KEYS = {
    # split_tasks: one (image, task) pair per sample; tag_weight: the dense region-tag loss; loss_per: "token" or
    # "sequence" normalisation of the seq2seq loss (model.training.florence2.train_florence2)
    "florence2": _TRAIN_KEYS | {"tasks", "split_tasks", "tag_weight", "loss_per"},
    "clip": {"steps", "batch_size", "lr", "embed_dim", "text_tower", "pooling"},
    "supervised": {"steps", "batch_size", "lr", "label", "pooling"},
    "cycle": {"steps", "batch_size", "lr", "lam", "num_classes", "videos_per_class", "frames", "pooling"},
}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")
_RESERVED = ("data", "encoders", "views")


def fingerprint(obj: Any) -> str:
    """A short stable hash of JSON-able settings: the key under which a finished step is reused."""
    text = obj if isinstance(obj, str) else json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


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
        if section.get(key) is not None and not (isinstance(section[key], (int, float)) and section[key] > 0):
            raise ConfigError(f"{field_name}.{key}: expected a positive number, got {section[key]!r}")


def _read_raw(source: str | Path | Mapping[str, Any]) -> tuple[dict, str]:
    if isinstance(source, Mapping):
        return dict(source), "config"
    path = Path(source)
    if not path.is_file():
        raise ConfigError(f"--config {path}: no such file; pass a JSON file such as configs/compare.json")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno} ({exc.msg})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the config must be a JSON object with a 'variants' list")
    return raw, str(path)


def _seeds(raw: Any, base: int) -> list[int]:
    """`seeds`: a count (base, base+1, ...) or an explicit list of distinct seeds."""
    if isinstance(raw, list):
        seeds = [_check_int("seeds[]", s, 0) for s in raw]
        if not seeds or len(set(seeds)) != len(seeds):
            raise ConfigError(f"seeds: expected a non-empty list of distinct integers, got {raw!r}")
        return seeds
    return [base + i for i in range(_check_int("seeds", raw, 1))]


def load_config(source: str | Path | Mapping[str, Any]) -> CompareConfig:
    """Read and validate a comparison config (a JSON file or a dict). Missing sections take the defaults above;
    an unknown encoder, fusion, prompt, label, tap or key is a `ConfigError` naming the field."""
    raw, where = _read_raw(source)
    allowed = set(_DEFAULTS) | {"variants", "notes"}
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown top-level key(s) {unknown}; allowed: {sorted(allowed)}")
    preset = raw.get("preset", _DEFAULTS["preset"])
    if preset not in PRESETS:
        raise ConfigError(f"preset: unknown preset {preset!r}; choose one of {list(PRESETS)}")
    if preset not in SMALL_PRESETS:
        raise ConfigError(f"preset: {preset!r} is a real-size preset; the comparison trains from scratch - "
                          f"choose one of {list(SMALL_PRESETS)}")
    data = _data_section(raw.get("data"))
    seed = _check_int("seed", raw.get("seed", _DEFAULTS["seed"]), 0)
    seeds = _seeds(raw.get("seeds", _DEFAULTS["seeds"]), seed)
    threads = raw.get("threads", None)
    if threads is not None:
        _check_int("threads", threads, 1)
    variants = _parse_variants(raw.get("variants"))
    align = _align_section(raw.get("align"), variants)
    notes = raw.get("notes", "")
    if not isinstance(notes, str):
        raise ConfigError("notes: expected a string")
    return CompareConfig(name=str(raw.get("name", _DEFAULTS["name"])), preset=preset, data=data, seed=seed,
                         seeds=seeds, threads=threads, encoders=_encoders_section(raw.get("encoders")),
                         training=_training_section(raw.get("training")), eval=_eval_section(raw.get("eval")),
                         probe=_probe_section(raw.get("probe")), align=align,
                         measures=_measures_section(raw.get("measures")), stats=_stats_section(raw.get("stats")),
                         variants=variants, notes=notes)


def _data_section(given: Any) -> dict:
    data = _merge_section("data", given, _DEFAULTS["data"], set(_DEFAULTS["data"]) | _DATA_OPTIONAL)
    for key, check in (("words", check_words), ("text_size", check_text_size)):
        if data.get(key) is not None:
            try:
                data[key] = list(check(data[key]))
            except ValueError as exc:  # the generator's message starts with the key's name
                raise ConfigError(f"data.{exc}") from None
    _check_int("data.n", data["n"], 20)
    _check_int("data.image_size", data["image_size"], 64)
    _check_int("data.seed", data["seed"], 0)
    splits = data["splits"]
    if not (isinstance(splits, list) and len(splits) == 3 and all(isinstance(s, (int, float)) and s > 0 for s in splits)):
        raise ConfigError(f"data.splits: expected three positive fractions [train, val, test], got {splits!r}")
    if data.get("encoder_scenes") is not None:
        _check_encoder_scenes(data["encoder_scenes"], data["seed"])
    return data


def _check_encoder_scenes(given: Any, data_seed: int) -> None:
    """`data.encoder_scenes` {"n", "seed"}: a corpus of its own for pretraining the encoders. Why: the paper's
    Florence-2 learnt to read from far more images than the VLM is tuned on; a tower pretrained on the few
    hundred scenes of the train split memorises their words instead. The seed must differ from `data.seed`,
    or the corpus would repeat the comparison's own scenes, test split included."""
    example = '{"n": 4000, "seed": 1}'
    if not isinstance(given, dict) or set(given) != {"n", "seed"}:
        raise ConfigError(f"data.encoder_scenes: expected {example}, got {given!r}")
    _check_int("data.encoder_scenes.n", given["n"], 20)
    _check_int("data.encoder_scenes.seed", given["seed"], 0)
    if given["seed"] == data_seed:
        raise ConfigError(f"data.encoder_scenes.seed: {given['seed']} is data.seed too, so the encoders would see "
                          f"the test scenes; choose another seed")


def _encoders_section(given: Any) -> dict:
    given = given or {}
    if not isinstance(given, dict):
        raise ConfigError("encoders: expected an object {objective: budget}")
    bad = sorted(set(given) - set(_DEFAULTS["encoders"]))
    if bad:
        raise ConfigError(f"encoders: unknown objective(s) {bad}; choose from {sorted(_DEFAULTS['encoders'])}")
    encoders = {}
    for obj, defaults in _DEFAULTS["encoders"].items():
        encoders[obj] = _merge_section(f"encoders.{obj}", given.get(obj), defaults, _ENCODER_KEYS[obj])
        _check_budget(f"encoders.{obj}", encoders[obj])
    if encoders["florence2"].get("loss_per", "token") not in ("token", "sequence"):
        raise ConfigError(f"encoders.florence2.loss_per: {encoders['florence2']['loss_per']!r} is not 'token' or "
                          "'sequence'")
    if encoders["supervised"]["label"] not in LABEL_NAMES:
        raise ConfigError(f"encoders.supervised.label: unknown label {encoders['supervised']['label']!r}; "
                          f"choose from {list(LABEL_NAMES)}")
    return encoders


def _training_section(given: Any) -> dict:
    given = given or {}
    if not isinstance(given, dict) or set(given) - {"pretrain", "finetune"}:
        raise ConfigError(f"training: expected {{'pretrain': {{...}}, 'finetune': {{...}}}}, got keys "
                          f"{sorted(given) if isinstance(given, dict) else given!r}")
    training = {}
    for stage in ("pretrain", "finetune"):
        training[stage] = _merge_section(f"training.{stage}", given.get(stage), _DEFAULTS["training"][stage],
                                         _VLM_KEYS)
        _check_budget(f"training.{stage}", training[stage])
    return training


def _eval_section(given: Any) -> dict:
    ev = _merge_section("eval", given, _DEFAULTS["eval"])
    if ev["split"] not in ("train", "val", "test"):
        raise ConfigError(f"eval.split: {ev['split']!r} is not train, val or test")
    if ev["limit"] is not None:
        _check_int("eval.limit", ev["limit"], 1)
    return ev


def _probe_section(given: Any) -> dict:
    probe = _merge_section("probe", given, _DEFAULTS["probe"])
    if not probe["taps"]:
        raise ConfigError("probe.taps: give at least one tap")
    for tap in probe["taps"]:
        if tap not in PROBE_TAPS:
            raise ConfigError(f"probe.taps: unknown tap {tap!r}; choose from {list(PROBE_TAPS)}")
    if not probe["labels"]:
        raise ConfigError("probe.labels: give at least one label")
    for label in probe["labels"]:
        if label not in LABEL_NAMES:
            raise ConfigError(f"probe.labels: unknown label {label!r}; choose from {list(LABEL_NAMES)}")
    _check_int("probe.folds", probe["folds"], 2)
    if probe["select"] not in ("inner", "cv"):
        raise ConfigError(f"probe.select: {probe['select']!r} is not 'inner' or 'cv'")
    return probe


def _align_section(given: Any, variants: list[Variant]) -> dict:
    align = _merge_section("align", given, _DEFAULTS["align"])
    _check_int("align.steps", align["steps"], 1)
    _check_int("align.batch_size", align["batch_size"], 2)
    if align["caption"] not in ("detailed", "short"):
        raise ConfigError(f"align.caption: {align['caption']!r} is not 'detailed' or 'short'")
    if align["reference"] is None:
        align["reference"] = variants[0].name
    elif align["reference"] not in {v.name for v in variants}:
        raise ConfigError(f"align.reference: no variant named {align['reference']!r}; "
                          f"choose one of {[v.name for v in variants]}")
    return align


def _measures_section(given: Any) -> dict:
    m = _merge_section("measures", given, _DEFAULTS["measures"])
    if m["split"] not in ("train", "val", "test"):
        raise ConfigError(f"measures.split: {m['split']!r} is not train, val or test")
    crop = m["crop"]
    if not (isinstance(crop, list) and len(crop) == 2 and all(isinstance(c, (int, float)) for c in crop)
            and 0.3 <= crop[0] <= crop[1] <= 1.0):
        raise ConfigError(f"measures.crop: expected [min, max] crop scales with 0.3 <= min <= max <= 1, got {crop!r}")
    if not isinstance(m["flip"], bool):
        raise ConfigError(f"measures.flip: expected true or false, got {m['flip']!r}")
    return m


def _stats_section(given: Any) -> dict:
    s = _merge_section("stats", given, _DEFAULTS["stats"])
    _check_int("stats.bootstrap", s["bootstrap"], 200)
    if not (isinstance(s["level"], float) and 0.5 < s["level"] < 1):
        raise ConfigError(f"stats.level: expected a coverage between 0.5 and 1 such as 0.95, got {s['level']!r}")
    return s


def _parse_variants(raw: Any) -> list[Variant]:
    if not isinstance(raw, list) or not raw:
        raise ConfigError("variants: expected a non-empty list of {name, encoder, encoder_training, fusion, prompts}")
    out: list[Variant] = []
    for i, v in enumerate(raw):
        out.append(_parse_variant(i, v, {x.name for x in out}))
    return out


def _parse_variant(i: int, v: Any, taken: set[str]) -> Variant:
    where = f"variants[{i}]"
    if not isinstance(v, dict):
        raise ConfigError(f"{where}: expected an object")
    keys = {"name", "encoder", "encoder_training", "fusion", "prompts", "encoder_config"}
    unknown = sorted(set(v) - keys)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(keys)}")
    name = v.get("name")
    if not isinstance(name, str) or not _NAME_RE.match(name) or name in _RESERVED:
        raise ConfigError(f"{where}.name: {name!r} must be 1-64 letters, digits, '_', '.', '+' or '-' (it names a "
                          f"directory), and not one of {list(_RESERVED)}")
    if name in taken:
        raise ConfigError(f"{where}.name: {name!r} is used twice; variant names must be unique")
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
    # keep the canonical prompt order (fusion order = caption, ocr, grounding)
    ordered = tuple(p for p in PROMPT_NAMES if p in prompts)
    return Variant(name, enc, training, fusion, ordered, dict(enc_cfg))


def configs_dir() -> Path:
    """The repository's configs/ folder (compare.json, compare_quick.json)."""
    return Path(__file__).resolve().parents[3] / "configs"


def shipped_config(quick: bool = False) -> Path:
    path = configs_dir() / ("compare_quick.json" if quick else "compare.json")
    if not path.is_file():
        raise ConfigError(f"the shipped config {path} is missing; pass --config FILE")
    return path
