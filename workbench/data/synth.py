"""Write a synthetic scenes dataset to a directory (`fvl data synth --kind scenes`).

Layout of DIR (every file is a pure function of the arguments, so the same arguments give
byte-identical files):

    images/<id>.png        the scenes
    scenes.jsonl           one row per image: all ground truth, `split`, `image`
    pretrain.json          LLaVA format, train split: "<image>" -> detailed caption
    instruct.json          LLaVA format, train split: multi-turn QA, "<image>\\n" opens turn one
    qa.jsonl               one QA per row (all splits) for VQA evaluation
    florence2_tasks.json   rows {id, image, split, task, target} for Florence-2 style training
    labels.csv             id, split and the probe labels
    manifest.json          arguments, generator version, counts, sha256 of scenes.jsonl

Resumable: images are written atomically (temp file, then rename) and the text files and the
manifest only at the end, so an interrupted run is finished by rerunning the same command
(images already on disk are kept; their truth is recomputed without drawing). A complete
DIR with the same arguments is left untouched; other arguments into a used DIR are refused.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import random
import tempfile
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from workbench.data import scenes as scenes_mod

SPLIT_NAMES = ("train", "val", "test")
PROGRESS_FILE = ".synth-in-progress.json"
OUTPUT_FILES = ("scenes.jsonl", "pretrain.json", "instruct.json", "qa.jsonl", "florence2_tasks.json", "labels.csv")
FLORENCE2_TASKS = ("<CAPTION>", "<DETAILED_CAPTION>", "<OCR>", "<OD>", "<DENSE_REGION_CAPTION>")
PNG_COMPRESS_LEVEL = 1  # noisy backgrounds barely compress; level 1 is ~3x faster than 6 for 3% more bytes


class SynthError(ValueError):
    """Bad arguments or an output directory that cannot be used; the message says what to do."""


@dataclass(frozen=True)
class SynthResult:
    out: Path
    status: str  # "created", "resumed" or "complete" (nothing to do)
    n: int
    split_counts: dict[str, int]
    fingerprint: str


def parse_splits(text: str | Sequence[float]) -> tuple[float, ...]:
    """"0.8,0.1,0.1" -> (0.8, 0.1, 0.1): 1 to 3 non-negative fractions (train, val, test) summing to 1."""
    try:
        parts = [float(p) for p in text.split(",")] if isinstance(text, str) else [float(p) for p in text]
    except ValueError:
        raise SynthError(f"--splits {text!r} is not a list of numbers; write e.g. 0.8,0.1,0.1") from None
    if not 1 <= len(parts) <= len(SPLIT_NAMES) or any(p < 0 for p in parts) or abs(sum(parts) - 1) > 1e-6:
        raise SynthError(f"--splits {text!r} must be 1-3 non-negative fractions (train,val,test) that sum to 1, e.g. 0.8,0.1,0.1")
    return tuple(parts)


def assign_splits(n: int, fractions: Sequence[float], seed: int) -> list[str]:
    """Split name per index: a seeded permutation cut at the rounded cumulative fractions."""
    bounds = np.rint(np.cumsum(fractions) * n).astype(int)
    bounds[-1] = n
    order = np.random.default_rng([seed, 7]).permutation(n)
    out = [""] * n
    start = 0
    for name, stop in zip(SPLIT_NAMES, bounds):
        for i in order[start:stop]:
            out[int(i)] = name
        start = stop
    return out


def scene_seed(seed: int, index: int) -> int:
    """Per-image seed: 63 bits from SeedSequence((seed, index)), so images never share a stream."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0]) & (2**63 - 1)


def scene_id(index: int, n: int) -> str:
    return f"scene_{index:0{max(6, len(str(n - 1)))}d}"


_PARAM_DEFAULTS: dict[str, Any] = {"text_size": [float(v) for v in scenes_mod.TEXT_SIZE_RANGE]}
# Parameters recorded only when chosen (absent = the generator's default).
_OPTIONAL_PARAMS = ("words",)


def _params(kind: str, n: int, seed: int, image_size: int, splits: Sequence[float],
            text_size: Sequence[float], words: tuple[str, ...] | None = None) -> dict[str, Any]:
    params = {"kind": kind, "n": n, "seed": seed, "image_size": image_size, "splits": list(splits),
              "text_size": [float(v) for v in text_size], "generator": scenes_mod.GENERATOR_VERSION}
    if words is not None:  # recorded only when chosen, so manifests of the default vocabulary stay as they were
        params["words"] = list(words)
    return params


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; outputs are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _make_one(job: tuple) -> dict[str, Any]:
    """Truth row for one image; draws and saves it unless the PNG is already there."""
    index, seed, image_size, image_path, split, text_size, words = job
    path = Path(image_path)
    exists = path.is_file() and path.stat().st_size > 0
    scene = scenes_mod.generate_scene(seed, image_size, render=not exists, text_size=text_size, words=words)
    if scene.image is not None:
        buf = io.BytesIO()
        scene.image.save(buf, "PNG", compress_level=PNG_COMPRESS_LEVEL)
        _atomic_write(path, buf.getvalue())
    row = {"id": path.stem, "image": f"images/{path.name}", "split": split, "index": index}
    row.update(scene.to_dict())
    return row


def _check_out_dir(out: Path, params: dict[str, Any]) -> str:
    """'fresh', 'resume' or 'complete' for `out`; SynthError when `out` holds something else."""
    manifest = out / "manifest.json"
    progress = out / PROGRESS_FILE
    for marker in (manifest, progress):
        if marker.is_file():
            try:
                old = json.loads(marker.read_text())
            except (OSError, json.JSONDecodeError) as exc:
                raise SynthError(f"{marker} is unreadable ({exc}); remove {out} or choose another --out") from None
            if not isinstance(old, dict) or old.get("kind", params["kind"]) != params["kind"] or "seed" not in old:
                raise SynthError(f"--out {out} holds another kind of data set ({marker.name} of "
                                 f"{old.get('kind') if isinstance(old, dict) else 'unknown'!r}), not a synth output; "
                                 "choose an empty or new directory")
            # datasets written before a parameter existed were made with its default
            keys = list(params) + [k for k in _OPTIONAL_PARAMS if k in old and k not in params]
            old_params = {k: old.get(k, _PARAM_DEFAULTS.get(k)) for k in keys}
            new_params = {k: params.get(k) for k in keys}
            if old_params != new_params:
                diff = ", ".join(f"{k}={old_params[k]!r} (now {new_params[k]!r})" for k in keys
                                 if old_params[k] != new_params[k])
                raise SynthError(f"{out} already holds a dataset made with different arguments: {diff}. "
                                 f"Rerun with the same arguments, choose another --out, or remove {out}")
            if marker == manifest and _is_complete(out, old):
                return "complete"
            return "resume"
    if out.exists() and not out.is_dir():
        raise SynthError(f"--out {out} is a file; give a directory path")
    if out.is_dir() and any(out.iterdir()):
        raise SynthError(f"--out {out} is not empty and is not a synth output directory; choose an empty or new directory")
    return "fresh"


def _is_complete(out: Path, manifest: dict[str, Any]) -> bool:
    if not all((out / name).is_file() for name in OUTPUT_FILES):
        return False
    if _sha256(out / "scenes.jsonl") != manifest.get("fingerprint"):
        return False
    images = out / "images"
    n = int(manifest["n"])
    return all((images / f"{scene_id(i, n)}.png").is_file() for i in range(n))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class _Writers:
    """Streams every output file to a temp name in DIR; `commit()` renames them into place."""

    def __init__(self, out: Path):
        self.out = out
        self.files = {name: open(out / f".{name}.tmp", "w", encoding="utf-8", newline="\n") for name in OUTPUT_FILES}
        self.first = {name: True for name in OUTPUT_FILES}
        for name in ("pretrain.json", "instruct.json", "florence2_tasks.json"):
            self.files[name].write("[")
        self.csv = csv.writer(self.files["labels.csv"], lineterminator="\n")
        self.csv.writerow(["id", "split", *scenes_mod.LABEL_NAMES])

    def json_item(self, name: str, obj: Any) -> None:
        # One item per line so that a JSON error's line number points at one sample.
        self.files[name].write(("\n" if self.first[name] else ",\n") + json.dumps(obj, ensure_ascii=False))
        self.first[name] = False

    def jsonl(self, name: str, obj: Any) -> None:
        self.files[name].write(json.dumps(obj, ensure_ascii=False) + "\n")

    def add(self, row: dict[str, Any]) -> None:
        rid, image, split = row["id"], row["image"], row["split"]
        self.jsonl("scenes.jsonl", row)
        self.csv.writerow([rid, split, *(row["labels"][k] for k in scenes_mod.LABEL_NAMES)])
        for k, qa in enumerate(row["qa"]):
            self.jsonl("qa.jsonl", {"id": f"{rid}-q{k}", "image_id": rid, "image": image, "question": qa["question"],
                                    "answer": qa["answer"], "type": qa["type"], "split": split})
        targets = (row["caption"], row["detailed_caption"], row["ocr"], row["od"], row["regions"])
        for task, target in zip(FLORENCE2_TASKS, targets):
            self.json_item("florence2_tasks.json", {"id": rid, "image": image, "split": split, "task": task, "target": target})
        if split != "train":
            return
        self.json_item("pretrain.json", {"id": rid, "image": image, "conversations": [
            {"from": "human", "value": "<image>"}, {"from": "gpt", "value": row["detailed_caption"]}]})
        # Question order is shuffled per image (seeded by its id): with one fixed order a small LLM
        # learns "turn 3 is a colour" and ignores the question, then fails on single questions.
        qas = list(row["qa"])
        random.Random(rid).shuffle(qas)
        turns = []
        for k, qa in enumerate(qas):
            turns.append({"from": "human", "value": ("<image>\n" if k == 0 else "") + qa["question"]})
            turns.append({"from": "gpt", "value": qa["answer"]})
        self.json_item("instruct.json", {"id": rid, "image": image, "conversations": turns})

    def commit(self) -> None:
        for name in ("pretrain.json", "instruct.json", "florence2_tasks.json"):
            self.files[name].write("\n]\n")
        for name, f in self.files.items():
            f.close()
            os.replace(self.out / f".{name}.tmp", self.out / name)

    def abort(self) -> None:
        for name, f in self.files.items():
            f.close()
            (self.out / f".{name}.tmp").unlink(missing_ok=True)


def _qa_stats(counts: dict[str, dict[str, int]], words: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Per QA type: number of questions, chance (uniform guess) and the majority-answer rate."""
    chance = dict(scenes_mod.CHANCE)
    if words is not None:
        chance["reading"] = scenes_mod.reading_chance(words)
    stats = {}
    for qtype in scenes_mod.QA_TYPES:
        c = counts.get(qtype, {})
        total = sum(c.values())
        stats[qtype] = {"n": total, "chance": round(chance[qtype], 6),
                        "majority": round(max(c.values()) / total, 6) if total else None}
    return stats


def synth_scenes(out: str | Path, n: int, seed: int = 0, image_size: int = 384,
                 splits: Sequence[float] | str = (0.8, 0.1, 0.1), workers: int | None = None,
                 progress: bool = True, log: Callable[[str], None] | None = print,
                 text_size: Sequence[float] | None = None, words: Sequence[str] | None = None) -> SynthResult:
    """Generate `n` scenes into `out` (see the module docstring for the layout).

    `text_size`: (min, max) font size as a fraction of the image side (default
    `scenes.TEXT_SIZE_RANGE`). `words`: the reading vocabulary (default `scenes.WORDS`); the
    manifest's reading chance follows it.

    `workers` processes draw and encode the PNGs (None: up to 8, one per CPU). On 2 cores two
    workers double the rate, because PNG encoding, not drawing, is the bottleneck. The
    output is the same bytes for any worker count.
    """
    out = Path(out)
    fractions = parse_splits(splits)
    if n < 1:
        raise SynthError(f"--n must be at least 1, got {n}")
    if seed < 0:
        raise SynthError(f"--seed must be a non-negative integer, got {seed}")
    if image_size < scenes_mod.MIN_IMAGE_SIZE:
        raise SynthError(f"--image-size {image_size} is too small for legible words; use at least {scenes_mod.MIN_IMAGE_SIZE}")
    try:
        text_size = scenes_mod.check_text_size(scenes_mod.TEXT_SIZE_RANGE if text_size is None else text_size)
    except ValueError as exc:
        raise SynthError(f"--text-size: {exc}") from None
    try:
        words = None if words is None else scenes_mod.check_words(list(words))
    except ValueError as exc:
        raise SynthError(f"--words: {exc}") from None
    if workers is None:
        workers = min(8, os.cpu_count() or 1)
    params = _params("scenes", n, seed, image_size, fractions, text_size, words)
    state = _check_out_dir(out, params)
    if state == "complete":
        manifest = json.loads((out / "manifest.json").read_text())
        if log:
            log(f"{out} is already complete ({n} scenes, same arguments); nothing to do")
        return SynthResult(out, "complete", n, manifest["split_counts"], manifest["fingerprint"])
    (out / "images").mkdir(parents=True, exist_ok=True)
    for stale in (out / "images").glob(".*.tmp"):  # left by a run killed mid-write
        stale.unlink()
    (out / "manifest.json").unlink(missing_ok=True)  # only a finished run has a manifest
    (out / PROGRESS_FILE).write_text(json.dumps(params, indent=2) + "\n")

    split_of = assign_splits(n, fractions, seed)
    jobs = [(i, scene_seed(seed, i), image_size, str(out / "images" / f"{scene_id(i, n)}.png"), split_of[i], text_size,
             words) for i in range(n)]
    writers = _Writers(out)
    qa_counts: dict[str, dict[str, int]] = {}
    try:
        for row in _run_jobs(jobs, workers, progress):
            writers.add(row)
            for qa in row["qa"]:
                bucket = qa_counts.setdefault(qa["type"], {})
                bucket[qa["answer"]] = bucket.get(qa["answer"], 0) + 1
        writers.commit()
    except BaseException:
        writers.abort()
        raise
    split_counts = {name: split_of.count(name) for name in SPLIT_NAMES[:len(fractions)]}
    manifest = dict(params)
    manifest.update({
        "fingerprint": _sha256(out / "scenes.jsonl"),
        "split_counts": split_counts,
        "files": ["images/", *OUTPUT_FILES],
        "label_names": list(scenes_mod.LABEL_NAMES),
        "qa_types": _qa_stats(qa_counts, words),
    })
    _atomic_write(out / "manifest.json", (json.dumps(manifest, indent=2) + "\n").encode())
    (out / PROGRESS_FILE).unlink(missing_ok=True)
    status = "resumed" if state == "resume" else "created"
    if log:
        log(f"wrote {n} scenes to {out} ({', '.join(f'{k} {v}' for k, v in split_counts.items())}); {status}")
    return SynthResult(out, status, n, split_counts, manifest["fingerprint"])


def _run_jobs(jobs: list, workers: int, progress: bool) -> Iterator[dict[str, Any]]:
    from tqdm.auto import tqdm

    bar = tqdm(total=len(jobs), desc="scenes", unit="img", disable=not progress)
    try:
        if workers <= 1 or len(jobs) < 64:
            for job in jobs:
                yield _make_one(job)
                bar.update()
            return
        # Ordered imap keeps the output order (and so the bytes) independent of the worker count.
        with get_context("spawn" if os.name == "nt" else "forkserver").Pool(workers) as pool:
            for row in pool.imap(_make_one, jobs, chunksize=16):
                yield row
                bar.update()
    finally:
        bar.close()
