"""Capture taps over a data set into a resumable, verified feature store.

The path of one image from `fvl capture` to the bytes on disk touches six project files:

    workbench/cli.py                 `fvl` parses the command line and dispatches
    workbench/commands/capture.py    checks the options, opens the model and the data set
    workbench/capturing.py           `capture_dataset`: decode + preprocess in DataLoader workers, one
                                     forward per item on the model's device
    workbench/taps.py                `capture`: hooks on the tap points, pooling (`model.tokens`)
    workbench/store/writer.py        `StoreWriter`: the item's row in the shard buffer, the shard's
                                     bytes and digest, its index rows
    workbench/data/files.py          `atomic_write_bytes`: temp file, fsync, rename

(plus the model's own code: its processor, which decodes the file with `workbench.data.images`, and its
forward.) Rerunning the same call after an interruption
skips what is stored and re-captures the items of shards found missing or truncated; a failing item is
recorded with its error and the run goes on. Under torchrun each rank takes every WORLD_SIZE-th item and
writes its own shards.

Determinism: the features of an item are the same bits whatever else was in its batch, for any batch
size, shard size and kill point. Batching changes the numbers: on CPU the matrix products of the DaViT
blocks take other code paths for other batch sizes, so the first differences appear in `vision.block1`
(~1e-7 in float32) and grow to ~1e-6 by the prompt taps, enough to flip a float16 rounding in 4 of 40
items (`prompt.caption.layer0`, batches of 4 against 1). So the model runs one item per forward;
decoding and preprocessing stay batched in the DataLoader. Measured cost (default taps, mean pooling,
1 thread, best of 4-6 interleaved runs of 8 images): 1.19x at the `small` preset (384 px: 0.95 s batched,
1.13 s one by one), 2.1x at `tiny` (128 px: 0.072 s against 0.151 s), where per-call overhead dominates;
`fvl bench capture-overhead` reports it as `per_item_ratio`. The promise is per machine setup: the
same device, dtype and thread count (another BLAS or a GPU rounds differently).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from model.tokens import parse_pool
from workbench.store import (FeatureStore, StoreMismatchError, StoreWriter, dataset_fingerprint, fingerprint,
                             model_fingerprint, source_bytes)
from workbench.store.manifest import MANIFEST
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
    recaptured: int = 0  # items of damaged or missing shards captured again
    seconds: float = 0.0
    errors: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def dist_rank_world() -> tuple[int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def needs_llm(tap_names: list[str]) -> bool:
    return any(n.startswith("llm.") for n in tap_names)


class ImageItems(torch.utils.data.Dataset):
    """Item i -> (i, pixel values (3, H, W) or None, error or None); runs in DataLoader workers."""

    def __init__(self, items: list, processor):
        self.items, self.processor = items, processor

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        try:
            return i, self.processor.images([self.items[i].image_path])[0], None
        except Exception as exc:  # recorded as a failed item, never silently dropped
            return i, None, f"{type(exc).__name__}: {exc}"


def _as_list(batch: list) -> list:
    return batch


def forward(model, pixels: torch.Tensor, tap_names: list[str], pool: str,
            llm_inputs: dict | None = None) -> dict[str, torch.Tensor]:
    """The taps of a batch of pixel values (B, 3, H, W) from one forward, float32 on the CPU."""
    param = next(model.parameters())
    px = pixels.to(device=param.device, dtype=param.dtype, non_blocking=True)
    with torch.inference_mode():
        if llm_inputs is not None:
            ids = llm_inputs["input_ids"].expand(len(px), -1).to(param.device)
            mask = llm_inputs["attention_mask"].expand(len(px), -1).to(param.device)
            with capture(model, tap_names, pool=pool, dtype=torch.float32, attention_mask=mask) as cache:
                model(input_ids=ids, attention_mask=mask, pixel_values=px)
        else:
            with capture(model, tap_names, pool=pool, dtype=torch.float32) as cache:
                model.image_features(px)
    return {n: cache[n] for n in tap_names}


def forward_item(model, pixels: torch.Tensor, tap_names: list[str], pool: str,
                 llm_inputs: dict | None = None) -> dict[str, torch.Tensor]:
    """One item's taps (batch dimension removed) from one forward of that item alone."""
    return {n: t[0] for n, t in forward(model, pixels.unsqueeze(0), tap_names, pool, llm_inputs).items()}


def _llm_inputs(processor, tap_names: list[str], question: str) -> dict | None:
    if not needs_llm(tap_names):
        return None
    if not callable(processor):
        raise ValueError("llm.* taps need the model's text processor (a tokenizer) to encode --question; "
                         "this model's processor has none: capture vision taps only")
    return processor(None, [question], padding_side="right")


def _model_info(model) -> tuple[str, dict[str, Any]]:
    """(config hash, what the manifest says about the model) for this project's models and adapters."""
    cfg = model.config
    config_hash = cfg.fingerprint() if hasattr(cfg, "fingerprint") else fingerprint(cfg.to_dict())
    info = {"family": getattr(model, "family", "") or "florence-vl"}
    for key in ("preset", "encoder_type", "fusion", "image_size", "drop_global_token"):
        if hasattr(cfg, key):
            info[key] = getattr(cfg, key)
    if hasattr(cfg, "stream_names"):
        info.update(streams=cfg.stream_names, image_tokens=cfg.num_image_tokens(), grid=cfg.grid_size())
    return config_hash, info


def store_manifest(model, processor, tap_names: list[str], pool: str, *, dataset_fingerprint: str, model_id: str,
                   weights: str, dtype: str = "float16", question: str = DEFAULT_QUESTION,
                   dataset_root: str = "", forward_batch: int = 1) -> dict:
    """Manifest for a store: per-item tap shapes after pooling (from one blank image through the same
    per-item forward), and what the features come from. `model_id` and `dataset_root` are informative:
    the same weights and data under other paths resume into the store."""
    from PIL import Image

    blank = processor.images([Image.new("RGB", (64, 64), (128, 128, 128))])[0]
    for n in tap_names:  # llm taps depend on the prompt length: only pooled forms are fixed-size
        if n.startswith("llm.") and pool == "none":
            raise ValueError(f"tap {n} has a prompt-dependent length; store it with --pool mean or global")
    probe = forward_item(model, blank, tap_names, pool, _llm_inputs(processor, tap_names, question))
    config_hash, info = _model_info(model)
    views = {"fusion.input": {k: list(v) for k, v in fusion_views(model).items()}} if "fusion.input" in tap_names else {}
    return {"model_id": model_id, "model_fingerprint": weights, "config_hash": config_hash,
            "taps": {n: {"shape": list(probe[n].shape)} for n in tap_names}, "pool": pool, "dtype": dtype,
            "dataset_fingerprint": dataset_fingerprint, "dataset_root": dataset_root, "views": views,
            "model": info, "question": question if needs_llm(tap_names) else None, "forward_batch": forward_batch}


def check_capture_args(batch_size: int, shard_size: int, limit: int | None, workers: int,
                       forward_batch: int = 1) -> None:
    """Numeric options, refused before anything is created."""
    for name, value in (("batch_size", batch_size), ("shard_size", shard_size), ("forward_batch", forward_batch)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be 0 or more (or None for every item), got {limit}")
    if workers < 0:
        raise ValueError(f"workers must be 0 (decode in this process) or more, got {workers}")


def _check_resume(out: Path, dataset, dataset_fp: str) -> None:
    """Name the items that changed when a store is resumed with another version of its data set."""
    if not (out / MANIFEST).is_file():
        return
    store = FeatureStore(out, verify=False)
    stored_fp = store.manifest.get("dataset_fingerprint")
    if store.manifest.get("format_version", 1) >= 2 and stored_fp and stored_fp != dataset_fp:
        changes = store.data_changes(dataset, extra_ok=False) or ["its ids or paths differ"]
        raise StoreMismatchError(
            f"{out} was captured from another version of this data set: {'; '.join(changes)}. Capture into a "
            f"new --out directory, or delete {out} to capture again from scratch."
        )


def capture_dataset(model, processor, dataset, taps: list[str] | str, pool: str, out: str | os.PathLike, *,
                    model_id: str, weights: str | None = None, batch_size: int = 8,
                    shard_size: int = 256, question: str = DEFAULT_QUESTION, split: str | None = None,
                    limit: int | None = None, retry_failed: bool = False, workers: int = 0,
                    forward_batch: int = 1, progress: bool = True) -> CaptureReport:
    """Capture `taps` for every item of `dataset` into the store at `out` (resumable; see the module doc).

    The model runs where its parameters are (move it with `.to(device, dtype)` first); `batch_size` items
    are decoded per DataLoader batch by `workers` processes (pinned memory on CUDA). `weights` is the
    weights' fingerprint (default: `workbench.store.model_fingerprint` of the model, read from the
    directory `model_id` names when it is one).

    `forward_batch=1` (the default) forwards each item alone: features independent of batching. With
    N > 1 the items of this rank are forwarded in fixed groups of N by position (items 0..N-1, N..2N-1,
    ...), so a resume recomputes whole groups and stores only what is missing: bit-identical for any
    kill point and shard size, at batched speed (the store records N; resuming with another N is
    refused)."""
    check_capture_args(batch_size, shard_size, limit, workers, forward_batch)
    parse_pool(pool)
    out = Path(out)
    tap_names = resolve(model, taps)
    items = list(dataset.split(split) if split else dataset)
    items = items[:limit] if limit is not None else items
    rank, world = dist_rank_world()
    mine = [it for i, it in enumerate(items) if i % world == rank]
    root = getattr(dataset, "root", None)
    dataset_fp = dataset_fingerprint(dataset)
    _check_resume(out, dataset, dataset_fp)
    weights = weights or model_fingerprint(model, model_id if Path(model_id).is_dir() else None)
    manifest = store_manifest(model, processor, tap_names, pool, dataset_fingerprint=dataset_fp, model_id=model_id,
                              weights=weights, question=question, forward_batch=forward_batch,
                              dataset_root=str(Path(root).resolve()) if root else "")
    report = CaptureReport(store=str(out), total=len(mine))
    start = time.perf_counter()
    with StoreWriter(out, manifest, rank=rank, world_size=world, shard_size=shard_size,
                     retry_failed=retry_failed) as writer:
        done = writer.done_ids()
        todo = [i for i, it in enumerate(mine) if it.id not in done]
        report.skipped = len(mine) - len(todo)
        damaged = FeatureStore(out, verify=False).items_in_shards(writer.damaged) if writer.damaged else set()
        report.recaptured = len({mine[i].id for i in todo} & damaged)
        loads = _load_batches(todo, batch_size, forward_batch)
        _run(model, processor, mine, set(todo), loads, tap_names, pool, _llm_inputs(processor, tap_names, question),
             writer, report, grouped=forward_batch > 1, workers=workers, progress=progress,
             desc=f"capture rank {rank}" if world > 1 else "capture")
    report.seconds = round(time.perf_counter() - start, 3)
    failed_ids = set(FeatureStore(out, verify=False).failed)
    report.failed_in_store = sum(1 for it in mine if it.id in failed_ids)
    return report


def _load_batches(todo: list[int], batch_size: int, forward_batch: int) -> list[list[int]]:
    """Positions to decode per DataLoader batch: `batch_size` missing items at a time, or (grouped) every
    item of each fixed group of `forward_batch` positions that holds a missing item."""
    if forward_batch == 1:
        return [todo[i:i + batch_size] for i in range(0, len(todo), batch_size)]
    groups = sorted({i // forward_batch for i in todo})
    return [list(range(g * forward_batch, (g + 1) * forward_batch)) for g in groups]


def _run(model, processor, mine: list, todo: set[int], loads: list[list[int]], tap_names: list[str], pool: str,
         llm_inputs: dict | None, writer: StoreWriter, report: CaptureReport, *, grouped: bool, workers: int,
         progress: bool, desc: str) -> None:
    """Decode in the DataLoader, forward each item alone (or each fixed group), hand missing items'
    features to the writer."""
    on_cuda = next(model.parameters()).device.type == "cuda"
    loads = [[i for i in batch if i < len(mine)] for batch in loads]
    loader = torch.utils.data.DataLoader(ImageItems(mine, processor), batch_sampler=loads, num_workers=workers,
                                         collate_fn=_as_list, pin_memory=on_cuda)
    with tqdm(total=len(todo), desc=desc, unit="img", disable=not progress) as bar:
        for batch in loader:
            for group in ([batch] if grouped else [[entry] for entry in batch]):
                results = _forward_group(model, group, tap_names, pool, llm_inputs)
                for i, feats, error in results:
                    if i not in todo:
                        continue  # computed only so that its group is the same as in an uninterrupted run
                    it = mine[i]
                    if error is not None:
                        writer.add_failure(it.id, error, labels=it.labels)
                        report.failed += 1
                        report.errors[it.id] = error
                    else:
                        writer.add(it.id, feats, labels=it.labels, source_bytes=source_bytes(it.image_path))
                        report.captured += 1
                    bar.update(1)


def _forward_group(model, group: list, tap_names: list[str], pool: str, llm_inputs: dict | None) -> list:
    """[(position, per-item features or None, error or None)] for a group decoded by the DataLoader. A
    group whose forward fails is split to find the failing items, then the rest is forwarded together
    again (the same rest on every run, so resumes stay bit-identical)."""
    out = [(i, None, error) for i, _, error in group if error is not None]
    ok = [(i, px) for i, px, error in group if error is None]
    while ok:
        try:
            feats = forward(model, torch.stack([px for _, px in ok]), tap_names, pool, llm_inputs)
        except Exception as exc:  # one bad item must not stop the run
            if len(ok) == 1:
                return out + [(ok[0][0], None, f"{type(exc).__name__}: {exc}")]
            bad = {i: err for i, px in ok if (err := _single_error(model, px, tap_names, pool, llm_inputs))}
            if not bad:  # only the batch fails (e.g. out of memory): record the error for each item
                return out + [(i, None, f"{type(exc).__name__}: {exc}") for i, _ in ok]
            out += [(i, None, err) for i, err in bad.items()]
            ok = [(i, px) for i, px in ok if i not in bad]
            continue
        return out + [(i, {n: t[k] for n, t in feats.items()}, None) for k, (i, _) in enumerate(ok)]
    return out


def _single_error(model, px: torch.Tensor, tap_names: list[str], pool: str, llm_inputs: dict | None) -> str | None:
    try:
        forward_item(model, px, tap_names, pool, llm_inputs)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None
