"""`run_compare`: the whole comparison, resumable, with progress that names the variant, the seed and the stage.

Order of work: the data and the augmented views (once); per variant, the encoder (once, shared) and then one
VLM per seed (train, evaluate, capture); the shared text side; the cheap measures of every (variant, seed);
then the claims, the measures' rank correlations and the outputs. Every finished step is cached on disk under
a fingerprint of its settings, so an interrupted run resumes where it stopped.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from tqdm.auto import tqdm
from transformers.utils import logging as hf_logging

from workbench.data.files import atomic_write_json
from workbench.data.synth import SynthError, synth_scenes
from workbench.pipelines.compare.config import CompareConfig, ConfigError, load_config
from workbench.pipelines.compare.measures import measure_variant_seed, text_side, views_dir
from workbench.pipelines.compare.orderings import Evidence, compute_orderings, full_variant
from workbench.pipelines.compare.outputs import write_outputs
from workbench.pipelines.compare.proxies import proxy_table
from workbench.pipelines.compare.variants import Context, check_encoder_configs, run_variant_seed, store_dirs
from workbench.pipelines.compare.views import make_views
from workbench.store import FeatureStore


def _restrict(cfg: CompareConfig, only: Sequence[str] | None) -> CompareConfig:
    if not only:
        return cfg
    names = {v.name for v in cfg.variants}
    unknown = [n for n in only if n not in names]
    if unknown:
        raise ConfigError(f"--only: no variant named {unknown}; the config has {[v.name for v in cfg.variants]}")
    ref = cfg.align["reference"]
    if ref not in only:
        raise ConfigError(f"--only: include the alignment reference variant {ref!r} (its LLM gives the text side)")
    return CompareConfig(**{**cfg.__dict__, "variants": [v for v in cfg.variants if v.name in only]})


def _check_device(device: str | None) -> str | None:
    if device in (None, "cpu"):
        return device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: no CUDA device is visible here; use --device cpu")
    return device


class _Progress:
    """One bar over the (variant, seed) runs; its description names the variant, the seed and the stage."""

    def __init__(self, total: int, enabled: bool, log: Callable[[str], None]):
        self.bar = tqdm(total=total, desc="compare", unit="run", disable=not enabled)
        self.log = log

    def stage(self, variant: str, seed: int | None, stage: str) -> None:
        where = variant if seed is None else f"{variant} seed {seed}"
        self.bar.set_description(f"{where}: {stage}")
        self.log(f"[compare] {where}: {stage}")

    def done(self) -> None:
        self.bar.update(1)


def _synth(cfg: CompareConfig, data_dir: Path, n: int, seed: int, splits, progress: bool) -> None:
    try:
        synth_scenes(data_dir, n, seed=seed, image_size=cfg.data["image_size"], splits=splits, progress=progress,
                     log=None, text_size=cfg.data.get("text_size"), words=cfg.data.get("words"))
    except SynthError as exc:
        raise ConfigError(f"data: {exc} (the data in {data_dir} was made with other settings; use a new --out)") from None


def _prepare_data(cfg: CompareConfig, out: Path, progress: bool) -> tuple[Path, Path, Path]:
    """(scenes of the comparison, scenes the encoders pretrain on, views for the correspondence score)."""
    data_dir = out / "data"
    _synth(cfg, data_dir, cfg.data["n"], cfg.data["seed"], cfg.data["splits"], progress)
    encoder_dir = data_dir
    corpus = cfg.data.get("encoder_scenes")
    if corpus is not None:  # every scene trains: the encoders are never evaluated on this corpus
        encoder_dir = out / "encoder-data"
        _synth(cfg, encoder_dir, corpus["n"], corpus["seed"], [1.0], progress)
    m = cfg.measures
    vdir = make_views(data_dir, views_dir(out), m["split"], tuple(m["crop"]), m["flip"], cfg.data["seed"])
    return data_dir, encoder_dir, vdir


def _train_all(ctx: Context, bar: _Progress) -> dict[str, list[dict]]:
    records: dict[str, list[dict]] = {}
    for v in ctx.cfg.variants:
        records[v.name] = []
        for seed in ctx.cfg.seeds:
            records[v.name].append(run_variant_seed(ctx, v, seed))
            bar.done()
    return records


def _measure_all(ctx: Context, bar: _Progress) -> dict[str, list[dict]]:
    cfg = ctx.cfg
    ref = cfg.variant(cfg.align["reference"])
    items = list(FeatureStore(store_dirs(cfg, ctx.out, ref, cfg.seeds[0])[0]).items)
    bar.stage(ref.name, cfg.seeds[0], "text side of the alignment loss")
    text = text_side(ctx, items)
    full = full_variant(cfg)
    return {v.name: [measure_variant_seed(ctx, v, s, text, items, with_streams=(full is not None and v == full))
                     for s in cfg.seeds] for v in cfg.variants}


def run_compare(config: CompareConfig | str | Path | Mapping[str, Any], out: str | Path, *,
                only: Sequence[str] | None = None, force: bool = False, progress: bool = True,
                device: str | None = None, log: Callable[[str], None] | None = print) -> dict:
    """Run (or finish) a comparison into OUT; returns {"seeds", "orderings", "untestable", "proxies", "variants",
    "encoders", "files", "meta"}. `only` restricts the run to some variants (claims whose roles are missing are listed as
    untestable); `force` redoes directories made with other settings instead of refusing them."""
    cfg = _restrict(config if isinstance(config, CompareConfig) else load_config(config), only)
    check_encoder_configs(cfg)
    device = _check_device(device)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a directory")
    out.mkdir(parents=True, exist_ok=True)
    say = log or (lambda s: None)
    old_threads, bars_were_on = torch.get_num_threads(), hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t_start = time.time()
    bar = _Progress(len(cfg.variants) * len(cfg.seeds), progress, say)
    try:
        data_dir, encoder_dir, vdir = _prepare_data(cfg, out, progress)
        ctx = Context(cfg, out, data_dir, vdir, force, progress, say, bar.stage, device, encoder_data_dir=encoder_dir)
        records = _train_all(ctx, bar)
        measures = _measure_all(ctx, bar)
        ev = Evidence(cfg, records, measures)
        orderings, untestable = compute_orderings(cfg, ev)
        proxies = proxy_table(cfg, ev)
        first = records[cfg.variants[0].name][0]["vqa"]
        meta = {"name": cfg.name, "preset": cfg.preset, "data": cfg.data, "seed": cfg.seed, "seeds": cfg.seeds,
                "device": device or "cpu", "threads": torch.get_num_threads(),
                "minutes": round((time.time() - t_start) / 60, 3), "n_questions": first["n"].get("overall"),
                "questions_per_type": first["n"], "chance": first.get("chance"),
                "text_side": f"last layer of variant {cfg.align['reference']!r}'s LLM (seed {cfg.seeds[0]})",
                "variants": [v.name for v in cfg.variants]}
        files = write_outputs(cfg, out, ev, orderings, untestable, proxies, meta)
        atomic_write_json(out / "config.json", cfg.to_dict())
        say(f"[compare] wrote {files['markdown']} ({meta['minutes']:.2f} min)")
        return json.loads(Path(files["json"]).read_text())  # what the JSON file holds, NaN-free
    finally:
        bar.bar.close()
        torch.set_num_threads(old_threads)
        if bars_were_on:
            hf_logging.enable_progress_bar()
