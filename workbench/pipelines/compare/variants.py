"""Training of the variants: each encoder once, each VLM once per seed; evaluation and capture.

A *variant* is (encoder kind, encoder training or random, fusion mode, prompt subset). For each:

    encoder   trained once per (kind, objective, budget) with the base seed and shared by every variant and seed
              that uses it - the paper, too, takes its encoders as given and trains only the VLM on top:
              Florence-2 multi-task pretraining (DaViT-only reuses its vision tower), CLIP-style contrastive on
              captions, supervised on a scene label (CvT recipe), cycle-contrast on synthetic videos, or random init
              (a random encoder is drawn anew per seed: its initialisation is part of what the seed varies)
    VLM       per seed: stage 1 (captions) + stage 2 (instructions), vision frozen; the seed sets the
              initialisation and the data order
    eval      exact match on every test question, kept per question (the intervals resample questions)
    capture   mean-pooled streams of the data set, and unpooled token maps of the augmented views (for the
              correspondence score)

Every step is keyed by a fingerprint of the settings it depends on: a rerun reuses finished encoders and
(variant, seed) runs, and refuses (or with `force=True` redoes) a directory made with other settings.
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from model.loading import build_model, load_model
from model.encoders import ENCODERS, build_encoder
from model.presets import DEFAULT_PROMPTS, PRESETS
from model.processing import preprocess_images
from model.training.checkpoints import FINAL_DIR, stage_finished
from model.training.config import TrainConfig
from model.training.cycle_contrast import train_cycle_contrast
from model.training.encoder_objectives import train_clip_style, train_supervised
from model.training.evaluate import evaluate_florence2, evaluate_vqa
from model.training.florence2 import train_florence2
from model.training.vlm import FeatureBank, train_stage
from workbench.capturing import capture_dataset
from workbench.data.dataset import load_scenes, open_dataset
from workbench.data.files import atomic_write_json
from workbench.data.scenes import normalize_answer
from workbench.data.videos import make_videos
from workbench.pipelines.compare.config import CompareConfig, ConfigError, Variant, fingerprint

RESULT_FILE = "result.json"


@dataclass
class Context:
    """What every step of one run needs: the config, where things go, and how to report progress."""

    cfg: CompareConfig
    out: Path
    data_dir: Path
    views_dir: Path
    force: bool
    progress: bool
    log: Callable[[str], None]
    stage: Callable[[str, int | None, str], None]
    device: str | None = None
    # the scenes the encoders pretrain on (their train split): `data_dir` unless the config names a corpus of its own
    encoder_data_dir: Path | None = None
    # image features of a frozen trained encoder do not depend on the seed: computed by the first seed, reused
    banks: dict = field(default_factory=dict)

    @property
    def encoder_corpus(self) -> Path:
        return self.encoder_data_dir or self.data_dir


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def claim_dir(path: Path, fp: str, force: bool, what: str) -> None:
    """Mark `path` as work for settings `fp`. A directory made with other settings is refused (or wiped with
    `force`), so results never mix settings; one made with the same settings is resumed."""
    marker = path / "fingerprint.json"
    old = read_json(marker)
    if old is not None and old.get("fingerprint") != fp:
        if not force:
            raise ConfigError(f"{path} holds {what} made with other settings (fingerprint {old.get('fingerprint')} != "
                              f"{fp}); use a new --out, or --force to redo it")
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    if old is None or old.get("fingerprint") != fp:
        atomic_write_json(marker, {"fingerprint": fp})


def check_encoder_configs(cfg: CompareConfig) -> None:
    """Refuse encoder_config keys the encoder does not know (needs the encoders' defaults, hence not in config)."""
    for i, v in enumerate(cfg.variants):
        if v.encoder == "florence2":
            continue
        known = set(ENCODERS[v.encoder].DEFAULTS) - {"weights"}
        bad = sorted(set(v.encoder_config) - known)
        if bad:
            raise ConfigError(f"variants[{i}] ({v.name}).encoder_config: unknown key(s) {bad} for encoder "
                              f"{v.encoder!r}; known: {sorted(known)}")


# --------------------------------------------------------------------------------------------- encoders
def encoder_config_for(cfg: CompareConfig, v: Variant, seed: int) -> dict:
    """The encoder_config a variant's model is built with: sized to the preset (same stream width as Florence-2's
    d_model; DaViT and the cycle backbone with the preset's DaViT; CLIP patches at Florence-2's stride 32, so
    every encoder gives the same token grid where it can), seeded, then the variant's overrides."""
    if v.encoder == "florence2":
        return {}
    size = int(cfg.data["image_size"])
    width = int(PRESETS[cfg.preset]["bart"]["d_model"])
    pv = PRESETS[cfg.preset]["vision"]
    davit = dict(hidden_size=width, embed_dim=list(pv["embed_dim"]), depths=list(pv["depths"]),
                 num_heads=list(pv["num_heads"]), num_groups=list(pv["num_groups"]), window_size=pv["window_size"],
                 seed=seed)
    if v.encoder == "davit":
        base: dict[str, Any] = davit
    elif v.encoder == "clip":
        base = dict(hidden_size=width, image_size=size, patch_size=32 if size >= 64 else 16, seed=seed)
    elif v.encoder == "cvt":
        base = dict(hidden_size=width, seed=seed)
    else:  # cycle: a DaViT backbone of the preset's size
        base = dict(backbone="davit", backbone_config={k: val for k, val in davit.items() if k != "seed"}, seed=seed)
    base.update(v.encoder_config)
    return base


def encoder_key(cfg: CompareConfig, v: Variant) -> tuple[str, dict]:
    """(directory name, settings) of the trained encoder a variant uses (shared by variants and seeds)."""
    if v.training == "florence2":
        settings = {"objective": "florence2", "preset": cfg.preset, "data": cfg.data, "seed": cfg.seed,
                    "budget": cfg.encoders["florence2"]}
        return f"florence2-pretrain-{fingerprint(settings)[:8]}", settings
    settings = {"objective": v.training, "kind": v.encoder, "config": encoder_config_for(cfg, v, cfg.seed),
                "data": cfg.data, "seed": cfg.seed, "budget": cfg.encoders[v.training]}
    return f"{v.encoder}-{v.training}-{fingerprint(settings)[:8]}", settings


def _loss_summary(hist: list[float]) -> dict:
    return {"first_loss": round(float(hist[0]), 4) if hist else None,
            "final_loss": round(float(hist[-1]), 4) if hist else None, "steps": len(hist)}


def _train_florence2_encoder(ctx: Context, enc_dir: Path) -> dict:
    """Florence-2 multi-task pretraining (caption, OCR, regions) of the preset's Florence-2; saves the extractor
    (vision tower + projector + BART encoder) state as extractor.safetensors."""
    cfg = ctx.cfg
    budget = dict(cfg.encoders["florence2"])
    tasks = tuple(budget.pop("tasks"))
    objective = {k: budget.pop(k) for k in ("split_tasks", "tag_weight", "loss_per") if k in budget}
    model, processor = build_model(cfg.preset, image_size=cfg.data["image_size"], seed=cfg.seed, device=ctx.device)
    tc = TrainConfig(out_dir=str(enc_dir / "run"), stage="florence2", seed=cfg.seed, save_every=0, resume=True,
                     progress=ctx.progress, **budget)
    corpus = ctx.encoder_corpus
    florence2, history = train_florence2(model, processor, corpus, tc, tasks=tasks, **objective)
    state = {k: t.detach().cpu().contiguous().clone() for k, t in model.vision_tower.state_dict().items()}
    save_file(state, str(enc_dir / "extractor.safetensors"))
    # How well the pretrained tower itself reads and describes the comparison's held-out scenes: when a VLM
    # cannot answer reading questions, this says whether the tower or the VLM is what fails.
    own = evaluate_florence2(florence2, processor, ctx.data_dir, cfg.eval["split"], limit=None)
    keys = ("ocr_exact_match_with_text", "caption_token_f1", "region_recall_iou50")
    return {**_loss_summary([h["loss"] for h in history]), "scenes": len(load_scenes(corpus, split="train")),
            "tower_eval": {"split": own["split"], "images": own["n_images"], **{k: own[k] for k in keys}}}


def _train_other_encoder(ctx: Context, v: Variant, enc_dir: Path) -> dict:
    """CLIP-style, supervised or cycle-contrast training of a standalone encoder; saves encoder.safetensors."""
    cfg = ctx.cfg
    budget = dict(cfg.encoders[v.training])
    encoder = build_encoder(v.encoder, encoder_config_for(cfg, v, cfg.seed))
    size = int(cfg.data["image_size"])
    scenes = None  # the cycle objective trains on its own synthetic videos
    if v.training == "cycle":
        videos = make_videos(budget.pop("num_classes"), budget.pop("videos_per_class"), budget.pop("frames"), size,
                             seed=cfg.seed)
        run = train_cycle_contrast(encoder, videos, steps=budget.pop("steps"), lam=budget.pop("lam"),
                                   batch_size=min(budget.pop("batch_size"), len(videos)), seed=cfg.seed,
                                   progress=ctx.progress, **budget)
    else:
        corpus = ctx.encoder_corpus
        rows = load_scenes(corpus, split="train")
        scenes = len(rows)
        pixels = preprocess_images([str(corpus / r["image"]) for r in rows], size)
        if v.training == "clip":
            run = train_clip_style(encoder, pixels, [r["detailed_caption"] for r in rows], steps=budget.pop("steps"),
                                   seed=cfg.seed, progress=ctx.progress, **budget)
        else:
            label = budget.pop("label")
            values = [str(r["labels"][label]) for r in rows]
            classes = sorted(set(values))
            run = train_supervised(encoder, pixels, np.array([classes.index(x) for x in values]),
                                   steps=budget.pop("steps"), num_classes=len(classes), seed=cfg.seed,
                                   progress=ctx.progress, **budget)
    state = {k: t.detach().cpu().contiguous().clone() for k, t in encoder.state_dict().items()}
    save_file(state, str(enc_dir / "encoder.safetensors"))
    return {**_loss_summary(run["history"]["loss"]), "scenes": scenes}


def trained_encoder(ctx: Context, v: Variant) -> tuple[Path | None, dict]:
    """The weights file for a variant's trained encoder (training it on first use), and its record
    {"minutes", "final_loss", ...}; (None, {"minutes": 0}) for a random-init variant."""
    if v.training == "random":
        return None, {"minutes": 0.0, "objective": "random"}
    name, settings = encoder_key(ctx.cfg, v)
    enc_dir = ctx.out / "encoders" / name
    fp = fingerprint(settings)
    done = read_json(enc_dir / "done.json")
    if done is not None and done.get("fingerprint") == fp:
        return enc_dir / done["weights"], done
    claim_dir(enc_dir, fp, ctx.force, "a trained encoder")
    ctx.stage(v.name, None, f"encoder {name}")
    t0 = time.time()
    if v.training == "florence2":
        info, weights = _train_florence2_encoder(ctx, enc_dir), "extractor.safetensors"
    else:
        info, weights = _train_other_encoder(ctx, v, enc_dir), "encoder.safetensors"
    record = {"fingerprint": fp, "weights": weights, "objective": settings["objective"],
              "minutes": round((time.time() - t0) / 60, 3), **info}
    atomic_write_json(enc_dir / "done.json", record)
    return enc_dir / weights, record


def load_encoder_weights(model, v: Variant, weights: Path) -> None:
    """Put trained weights into `model.vision_tower`. A Florence-2 extractor state goes in as is; for DaViT-only
    its vision tower and projector are renamed into the DavitEncoder (the BART encoder is dropped)."""
    state = load_file(str(weights))
    if v.encoder == "davit" and v.training == "florence2":
        state = {("projector." + k[len("multi_modal_projector."):]) if k.startswith("multi_modal_projector.") else k: t
                 for k, t in state.items() if not k.startswith("encoder.")}
    missing, unexpected = model.vision_tower.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"encoder weights {weights} do not fit variant {v.name}: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")


# --------------------------------------------------------------------------------------------- one VLM
def seed_dir(out: Path, v: Variant, seed: int) -> Path:
    return out / v.name / f"seed-{seed}"


def store_dirs(cfg: CompareConfig, out: Path, v: Variant, seed: int) -> tuple[Path, Path]:
    """(store, views store) of a (variant, seed). The captured taps (depth, prompt streams, fusion.input) come
    from the frozen encoder only, so a trained encoder's are the same for every seed: captured once, under a
    fingerprint of what they depend on; a random encoder's differ per seed and live in the seed's directory."""
    if v.training == "random":
        base = seed_dir(out, v, seed)
        return base / "store", base / "views_store"
    key = fingerprint({"encoder": encoder_key(cfg, v)[1], "variant": v.to_dict(), "data": cfg.data,
                       "measures": cfg.measures, "preset": cfg.preset})[:8]
    return out / v.name / f"store-{key}", out / v.name / f"views-store-{key}"


def run_settings(cfg: CompareConfig, v: Variant, seed: int) -> dict:
    """Everything a (variant, seed) result depends on; its fingerprint keys the reuse of finished runs."""
    enc = encoder_key(cfg, v)[1] if v.training != "random" else {"objective": "random"}
    return {"variant": v.to_dict(), "encoder_config": encoder_config_for(cfg, v, seed), "encoder": enc,
            "preset": cfg.preset, "data": cfg.data, "seed": seed, "training": cfg.training, "eval": cfg.eval,
            "measures": cfg.measures}


def build_variant_model(cfg: CompareConfig, v: Variant, seed: int, device: str | None = None):
    """(model, processor) of a variant, random init from `seed`."""
    kwargs: dict[str, Any] = dict(image_size=cfg.data["image_size"], fusion=v.fusion, seed=seed, device=device)
    if v.encoder == "florence2":
        kwargs["prompts"] = {p: DEFAULT_PROMPTS[p] for p in v.prompts}
    else:
        kwargs.update(encoder_type=v.encoder, encoder_config=encoder_config_for(cfg, v, seed))
    return build_model(cfg.preset, **kwargs)


def _bank(ctx: Context, v: Variant, model, processor) -> FeatureBank:
    """The feature bank for a VLM: shared by the seeds of a variant whose encoder is trained (frozen, the same
    weights for every seed, and fusion has no parameters); a random encoder differs per seed, so its own."""
    bank = FeatureBank(model, processor, progress=False)
    if v.training == "random":
        return bank
    shared = ctx.banks.setdefault(v.name, bank)
    if shared is not bank:
        bank.index, bank.features = dict(shared.index), shared.features
        ctx.banks[v.name] = bank  # later additions (test images) land in the newest bank; keep that one
    return bank


def _train_vlm(ctx: Context, v: Variant, seed: int, sdir: Path, model, processor):
    """Stage 1 (captions) and stage 2 (instructions), vision frozen (features computed once per image).
    A finished stage is reused; an interrupted one resumes from its checkpoint."""
    if stage_finished(sdir / "finetune"):
        model, processor = load_model(sdir / "finetune" / FINAL_DIR, device=ctx.device)
        return model, processor, _bank(ctx, v, model, processor)
    bank = None
    for stage, file in (("pretrain", "pretrain.json"), ("finetune", "instruct.json")):
        stage_dir = sdir / stage
        if stage_finished(stage_dir):
            model, processor = load_model(stage_dir / FINAL_DIR, device=ctx.device)
            bank = None
            continue
        ctx.stage(v.name, seed, f"VLM {stage}")
        if bank is None:
            bank = _bank(ctx, v, model, processor)
        tc = TrainConfig(out_dir=str(stage_dir), stage=stage, seed=seed, save_every=0, resume=True,
                         progress=ctx.progress, **ctx.cfg.training[stage])
        train_stage(model, processor, ctx.data_dir / file, tc, bank=bank)
    return model, processor, bank


def _capture(ctx: Context, v: Variant, store: Path, model, processor, dataset, taps: list[str], pool: str) -> None:
    """Capture into `store` unless a finished capture is there (marked `<store>.done`). A shared store left
    half-written by another seed's model is redone: the store refuses to mix models, and the features are the
    same."""
    done = store.with_name(store.name + ".done")
    if done.is_file():
        return
    if store.exists() and store.parent.name == v.name:
        shutil.rmtree(store)
    report = capture_dataset(model, processor, dataset, taps, pool, str(store), model_id=f"compare:{v.name}",
                             batch_size=32, progress=ctx.progress)
    if report.failed:
        raise RuntimeError(f"capture of variant {v.name} into {store} failed on {report.failed} item(s): "
                           f"{dict(list(report.errors.items())[:3])}")
    atomic_write_json(done, {"items": report.total})


def run_variant_seed(ctx: Context, v: Variant, seed: int) -> dict:
    """Train, evaluate and capture one variant under one seed (reusing a finished run with the same settings).
    Returns its record (also OUT/<variant>/seed-<seed>/result.json)."""
    cfg = ctx.cfg
    sdir = seed_dir(ctx.out, v, seed)
    fp = fingerprint(run_settings(cfg, v, seed))
    done = read_json(sdir / RESULT_FILE)
    if done is not None and done.get("fingerprint") == fp:
        ctx.log(f"[compare] {v.name} seed {seed}: finished earlier, reusing it")
        return done
    weights, enc_record = trained_encoder(ctx, v)
    claim_dir(sdir, fp, ctx.force, f"variant {v.name!r} seed {seed}")
    t0 = time.time()
    model, processor = build_variant_model(cfg, v, seed, ctx.device)
    if weights is not None:
        load_encoder_weights(model, v, weights)
    model, processor, bank = _train_vlm(ctx, v, seed, sdir, model, processor)
    vlm_minutes = round((time.time() - t0) / 60, 3)
    ctx.stage(v.name, seed, "evaluate")
    with torch.inference_mode():
        vqa = evaluate_vqa(model, processor, ctx.data_dir, cfg.eval["split"], limit=cfg.eval["limit"], bank=bank,
                           max_new_tokens=cfg.eval["max_new_tokens"], progress=ctx.progress,
                           return_predictions=True)
    ctx.stage(v.name, seed, "capture")
    taps = ["depth", *[f"prompt.{p}" for p in v.prompts], "fusion.input"]
    store, views = store_dirs(cfg, ctx.out, v, seed)  # resumable: a store finished by an earlier seed is kept
    _capture(ctx, v, store, model, processor, open_dataset(ctx.data_dir), taps, "mean")
    _capture(ctx, v, views, model, processor, open_dataset(ctx.views_dir), ["fusion.input"], "none")
    preds = vqa.pop("predictions")
    record = {"fingerprint": fp, "variant": v.to_dict(), "seed": seed,
              "encoder": {k: val for k, val in enc_record.items() if k != "fingerprint"},
              "vqa": vqa, "questions": [p["id"] for p in preds], "types": [p["type"] for p in preds],
              "correct": [int(_same(p["prediction"], p["answer"])) for p in preds],
              "vlm_minutes": vlm_minutes, "encoder_minutes": float(enc_record.get("minutes", 0.0))}
    atomic_write_json(sdir / RESULT_FILE, record)
    return record


def _same(prediction: str, answer: str) -> bool:
    """The exact-match rule of `evaluate_vqa` (normalised answers), applied per question."""
    return normalize_answer(prediction) == normalize_answer(answer)
