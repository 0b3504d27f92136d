"""LLaVA-format conversation data: a JSON list of samples plus an image folder.

This is the format of LLaVA's and the official Florence-VL's training files:

    [{"id": "...", "image": "relative/path.jpg",
      "conversations": [{"from": "human", "value": "<image>\\nQuestion?"},
                        {"from": "gpt", "value": "Answer."}, ...]}, ...]

`read_llava` validates every sample and fails with a message that names the file and the
sample (or the line and column of a JSON syntax error), so a broken row in a 600k-sample file
is found at once. JSON Lines (`.jsonl`, one sample per line) is accepted too.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

IMAGE_TOKEN = "<image>"
ROLES = ("human", "gpt")
_KNOWN_KEYS = {"id", "image", "conversations"}


class LlavaFormatError(ValueError):
    """A LLaVA file that cannot be used; the message names the file, the sample and the fix."""


@dataclass
class Sample:
    id: str
    image_path: Path | None  # None for text-only samples
    conversations: list[dict[str, str]]
    metadata: dict[str, Any] = field(default_factory=dict)  # any other keys of the sample
    image: str | None = None  # the "image" entry as written (relative to the image folder)


def _load_json(path: Path) -> list[Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LlavaFormatError(f"LLaVA file {path} does not exist; check the path") from None
    except UnicodeDecodeError as exc:
        raise LlavaFormatError(f"LLaVA file {path} is not UTF-8 text ({exc}); re-save it as UTF-8 JSON") from None
    if path.suffix == ".jsonl":
        rows = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise LlavaFormatError(f"{path}: line {lineno}, column {exc.colno}: invalid JSON ({exc.msg}); "
                                       "fix that line (JSON Lines needs one complete object per line)") from None
        return rows
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise LlavaFormatError(f"{path}: line {exc.lineno}, column {exc.colno} (char {exc.pos}): invalid JSON "
                               f"({exc.msg}); fix the file there") from None
    if not isinstance(data, list):
        raise LlavaFormatError(f"{path}: the top level is a {type(data).__name__}, but a LLaVA file is a JSON list "
                               "of samples [{\"id\", \"image\", \"conversations\"}, ...]")
    return data


def _validate(row: Any, k: int, path: Path) -> tuple[str, list[dict[str, str]]]:
    where = f"{path}: sample {k}"
    if not isinstance(row, dict):
        raise LlavaFormatError(f"{where} is a {type(row).__name__}, not an object with id/image/conversations")
    if "id" in row:
        where += f" (id {row['id']!r})"
    sid = row.get("id")
    if not isinstance(sid, (str, int)) or isinstance(sid, bool) or str(sid) == "":
        raise LlavaFormatError(f"{where} has no usable \"id\" (a non-empty string or integer); add one")
    conv = row.get("conversations")
    if not isinstance(conv, list) or not conv:
        raise LlavaFormatError(f"{where} needs a non-empty \"conversations\" list of {{\"from\", \"value\"}} turns")
    for t, turn in enumerate(conv):
        if not isinstance(turn, dict) or turn.get("from") not in ROLES or not isinstance(turn.get("value"), str):
            raise LlavaFormatError(f"{where}, turn {t}: expected {{\"from\": \"human\"|\"gpt\", \"value\": str}}, "
                                   f"got {json.dumps(turn)[:120]}")
    if "image" in row and not isinstance(row["image"], str):
        raise LlavaFormatError(f"{where}: \"image\" must be one path string, got {type(row['image']).__name__}")
    return str(sid), [{"from": t["from"], "value": t["value"]} for t in conv]


def read_llava(path: str | Path, image_folder: str | Path | None = None, check_images: bool = True,
               unique_ids: bool = False) -> list[Sample]:
    """Samples of a LLaVA JSON/JSONL file; images are resolved against `image_folder`
    (default: the file's directory). With `check_images`, a missing image file is an error
    that names the sample id and the path looked at. Repeated ids are allowed (some public
    mixes have them) unless `unique_ids`.
    """
    path = Path(path)
    root = Path(image_folder) if image_folder is not None else path.parent
    if image_folder is not None and not root.is_dir():
        raise LlavaFormatError(f"image folder {root} does not exist; pass the folder the \"image\" paths are relative to")
    samples: list[Sample] = []
    seen: dict[str, int] = {}
    for k, row in enumerate(_load_json(path)):
        sid, conv = _validate(row, k, path)
        if unique_ids and sid in seen:
            raise LlavaFormatError(f"{path}: sample {k} repeats id {sid!r} of sample {seen[sid]}; ids must be unique")
        seen.setdefault(sid, k)
        image_rel = row.get("image")
        image_path = None
        if image_rel is not None:
            image_path = root / image_rel
            if check_images and not image_path.is_file():
                raise LlavaFormatError(f"{path}: sample {sid!r}: image file {image_path} not found; "
                                       f"fix its \"image\" entry or pass the right image folder")
        meta = {key: value for key, value in row.items() if key not in _KNOWN_KEYS}
        samples.append(Sample(sid, image_path, conv, meta, image_rel))
    return samples


def write_llava(samples: Iterable[Sample], path: str | Path, image_folder: str | Path | None = None) -> Path:
    """Write samples as a LLaVA JSON list (one sample per line); image paths are written
    relative to `image_folder` (default: the file's directory)."""
    path = Path(path)
    root = Path(image_folder) if image_folder is not None else path.parent
    rows = []
    for s in samples:
        row: dict[str, Any] = {"id": s.id}
        if s.image_path is not None:
            try:
                row["image"] = Path(s.image_path).resolve().relative_to(root.resolve()).as_posix()
            except ValueError:  # outside the folder: keep it absolute so it still resolves
                row["image"] = str(Path(s.image_path).resolve())
        row["conversations"] = s.conversations
        row.update(s.metadata)
        rows.append(row)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("[\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n]\n", encoding="utf-8")
    return path
