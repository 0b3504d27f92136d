"""Capture taps over a dataset into a resumable feature store.

The path of one image: `open_dataset` item -> `load_image` -> `processor.images` -> the model forward
inside `taps.capture` -> pooled tensors -> `StoreWriter.add` -> float16 safetensors shards + index.
Rerunning the same call after an interruption skips what is stored; a failing item is recorded with
its error and the run goes on. Under torchrun each rank takes every WORLD_SIZE-th item and writes
its own shards.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from workbench.taps import capture, fusion_views, resolve

DEFAULT_QUESTION = "Describe the image."


@dataclass
class CaptureReport:
    store: str
    total: int = 0
    skipped: int = 0
    captured: int = 0
    failed: int = 0
    failed_in_store: int = 0  # this run's items recorded as failed, including failures of earlier runs
    seconds: float = 0.0
    errors: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def dist_rank_world() -> tuple[int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def needs_llm(tap_names: list[str]) -> bool:
    return any(n.startswith("llm.") for n in tap_names)


def run_taps(model, processor, images: list, tap_names: list[str], pool: str, question: str = DEFAULT_QUESTION,
             dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """One batched forward inside `capture`; returns {tap: (B, ...)} on the CPU."""
    pixel_values = processor.images(images)
    with torch.inference_mode():
        if needs_llm(tap_names):
            batch = processor(None, [question] * len(images), padding_side="right")
            with capture(model, tap_names, pool=pool, dtype=dtype, attention_mask=batch["attention_mask"]) as cache:
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=pixel_values)
        else:
            with capture(model, tap_names, pool=pool, dtype=dtype) as cache:
                model.get_image_features(pixel_values)
    return {n: cache[n] for n in tap_names}


def store_manifest(model, tap_names: list[str], pool: str, dataset_fingerprint: str, model_id: str,
                   dtype: str = "float16", question: str = DEFAULT_QUESTION, dataset_root: str = "") -> dict:
    """Manifest for a store: per-item tap shapes after pooling, found with one tiny forward.
    `dataset_root` records where the images came from (informative only: a moved data set with the
    same fingerprint still resumes into the store)."""
    shapes = {}
    probe = tap_shapes_after_pool(model, tap_names, pool)
    for name in tap_names:
        shapes[name] = {"shape": list(probe[name])}
    cfg = model.config
    views = {"fusion.input": {k: list(v) for k, v in fusion_views(model).items()}} if "fusion.input" in tap_names else {}
    return {"model_id": model_id, "config_hash": cfg.fingerprint(), "taps": shapes, "pool": pool, "dtype": dtype,
            "dataset_fingerprint": dataset_fingerprint, "dataset_root": dataset_root, "views": views,
            "model": {"preset": cfg.preset, "encoder_type": cfg.encoder_type, "streams": cfg.stream_names,
                      "fusion": cfg.fusion, "image_size": cfg.image_size, "image_tokens": cfg.num_image_tokens(),
                      "grid": cfg.grid_size(), "drop_global_token": cfg.drop_global_token},
            "question": question if needs_llm(tap_names) else None}


def tap_shapes_after_pool(model, tap_names: list[str], pool: str) -> dict[str, tuple]:
    """Per-item shape of every tap after pooling (batch dimension removed)."""
    size = model.config.image_size
    px = torch.zeros(1, 3, size, size)
    with torch.inference_mode():
        if needs_llm(tap_names):
            n_img = model.config.num_image_tokens()
            ids = torch.full((1, n_img + 4), model.config.image_token_id, dtype=torch.long)
            ids[0, -4:] = 1
            with capture(model, tap_names, pool=pool) as cache:
                model(input_ids=ids, pixel_values=px)
        else:
            with capture(model, tap_names, pool=pool) as cache:
                model.get_image_features(px)
    shapes = {n: tuple(cache[n].shape[1:]) for n in tap_names}
    for n in tap_names:  # llm taps depend on the prompt length: only pooled forms are fixed-size
        if n.startswith("llm.") and pool in ("none",):
            raise ValueError(f"tap {n} has a prompt-dependent length; store it with --pool mean or global")
    return shapes


def capture_dataset(model, processor, dataset, taps: list[str] | str, pool: str, out: str, *, model_id: str,
                    batch_size: int = 8, shard_size: int = 256, question: str = DEFAULT_QUESTION,
                    split: str | None = None, limit: int | None = None, retry_failed: bool = False,
                    progress: bool = True) -> CaptureReport:
    """Capture `taps` for every item of `dataset` into the store at `out` (resumable)."""
    from workbench.data.images import load_image
    from workbench.store import StoreWriter

    tap_names = resolve(model, taps)
    items = dataset.split(split) if split else list(dataset)
    if limit is not None:
        items = items[:limit]
    rank, world = dist_rank_world()
    mine = [it for i, it in enumerate(items) if i % world == rank]
    root = getattr(dataset, "root", None)
    manifest = store_manifest(model, tap_names, pool, getattr(dataset, "fingerprint", "") or "", model_id,
                              question=question, dataset_root=str(Path(root).resolve()) if root else "")
    report = CaptureReport(store=str(out), total=len(mine))
    start = time.perf_counter()
    with StoreWriter(out, manifest, rank=rank, world_size=world, shard_size=shard_size,
                     retry_failed=retry_failed) as writer:
        done = writer.done_ids()
        todo = [it for it in mine if it.id not in done]
        report.skipped = len(mine) - len(todo)
        bar = tqdm(total=len(todo), desc=f"capture rank {rank}" if world > 1 else "capture", unit="img",
                   disable=not progress)
        for b in range(0, len(todo), batch_size):
            batch = todo[b:b + batch_size]
            loaded = []
            for it in batch:
                try:
                    loaded.append((it, load_image(it.image_path)))
                except Exception as exc:  # recorded, never silently dropped
                    writer.add_failure(it.id, f"{type(exc).__name__}: {exc}", labels=it.labels)
                    report.failed += 1
                    report.errors[it.id] = str(exc)
            groups = [loaded] if loaded else []
            while groups:
                group = groups.pop(0)
                try:
                    feats = run_taps(model, processor, [img for _, img in group], tap_names, pool, question)
                except Exception as exc:
                    if len(group) > 1:  # isolate the failing item
                        groups = [[g] for g in group] + groups
                        continue
                    it = group[0][0]
                    writer.add_failure(it.id, f"{type(exc).__name__}: {exc}", labels=it.labels)
                    report.failed += 1
                    report.errors[it.id] = str(exc)
                    continue
                for row, (it, _) in enumerate(group):
                    writer.add(it.id, {n: feats[n][row] for n in tap_names}, labels=it.labels)
                    report.captured += 1
            bar.update(len(batch))
        bar.close()
    report.seconds = round(time.perf_counter() - start, 3)
    from workbench.store import FeatureStore

    failed_ids = set(FeatureStore(out).failed)
    report.failed_in_store = sum(1 for it in mine if it.id in failed_ids)
    return report
