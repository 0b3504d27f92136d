"""Probe the store: linear probes of every stored tap for every usable label, as one library call.

`fvl probe`, the demo, the report, the app and the notebooks call `probe_store` and `write_probe_outputs`,
so "which taps, which labels, how they are pooled and grouped" is decided in one place. Errors are
`ProbeSetupError` (a ValueError) whose message names the option as `fvl probe` spells it and the fix.

Also here, because every analysis over a store needs them: `select_taps` (tap names, globs and views, as
`fvl capture` accepts them) and `store_has_global` (whether token 0 of a stored token map is a global
token, so a mean over tokens leaves it out as capture-time pooling does).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

MAX_CLASSES = 50


class ProbeSetupError(ValueError):
    """A probe request that cannot run as given; the message names the option and the fix."""


def _split(text: str | Sequence[str] | None) -> list[str]:
    if text is None:
        return []
    parts = text.split(",") if isinstance(text, str) else list(text)
    return [t.strip() for t in parts if t and t.strip()]


def _glob(pattern: str) -> re.Pattern:
    """fnmatch's * and ?, everything else literal: `fusion.input[*]` matches the views `fusion.input[ocr]`..."""
    return re.compile("".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern) + r"\Z")


def select_taps(store, spec: str | Sequence[str] | None, option: str = "--taps") -> list[str]:
    """Stored taps and views named by ``spec``: exact names, globs (`prompt.*`, `vision.stage*`,
    `fusion.input[*]`), `all`; none given (or `default`): every tap except the prompt-dependent `llm.*`.
    A name or glob that matches nothing is refused with the store's taps."""
    known = list(store.taps) + list(store.view_names)
    patterns = _split(spec)
    if not patterns:
        return [t for t in store.taps if not t.startswith("llm.")]
    out: list[str] = []
    for pattern in patterns:
        if pattern == "all":
            matched = list(store.taps)
        elif pattern == "default":
            matched = [t for t in store.taps if not t.startswith("llm.")]
        elif pattern in known:
            matched = [pattern]
        else:
            rx = _glob(pattern)
            matched = [t for t in known if rx.match(t)]
        if not matched:
            raise ProbeSetupError(f"{option} {pattern}: matches no stored tap; the store has {known}")
        out += [m for m in matched if m not in out]
    return out


def store_has_global(store, tap: str) -> bool:
    """Whether token 0 of ``tap``'s stored token maps is a global token: the manifest says so per tap when
    it records it; otherwise unpooled (`--pool none`) token taps of a model that keeps its global token."""
    base = tap.split("[", 1)[0]
    entry = (store.manifest.get("taps") or {}).get(base) or {}
    if "has_global" in entry:
        return bool(entry["has_global"])
    model = store.manifest.get("model") or {}
    return store.manifest.get("pool") == "none" and len(entry.get("shape") or ()) == 2 \
        and not base.startswith(("vision.", "llm.")) and not model.get("drop_global_token", False)


def load_vectors(store, tap: str, pool: str = "mean", items: list[str] | None = None,
                 batch_size: int = 1024) -> np.ndarray:
    """One tap of ``items`` (default: all) as (n, d) float32 vectors, pooled batch by batch as at capture
    (`model.tokens.to_vectors`), so unpooled token maps never sit in memory whole."""
    from model.tokens import to_vectors

    has_global = store_has_global(store, tap)
    parts = [to_vectors(x, has_global=has_global, how=pool)
             for _, x in store.iter_batches(tap, batch_size, items, dtype="float32")]
    if not parts:
        raise ProbeSetupError(f"--taps {tap}: no stored items to read")
    return np.concatenate(parts)


def usable_labels(labels: dict, names: list[str], tasks: dict[str, str], n_folds: int
                  ) -> tuple[list[str], dict[str, str]]:
    """Labels worth probing, and why the others are skipped (constant, mostly missing, id-like)."""
    from probes.folds import detect_task, missing_mask

    keep, skipped = [], {}
    for name in names:
        y = np.asarray(labels[name])
        valid = y[~missing_mask(y)]
        if valid.size < 2 * n_folds:
            skipped[name] = f"only {valid.size} values for {n_folds} folds"
            continue
        distinct = np.unique(valid.astype(str)).size
        if distinct < 2:
            skipped[name] = "constant"
            continue
        task = tasks.get(name) or detect_task(y)
        if task == "classification" and (distinct > MAX_CLASSES or 2 * distinct > valid.size):
            skipped[name] = (f"{distinct} classes for {valid.size} values (id-like or free text; "
                             f"pass --regression {name} if numeric)")
            continue
        keep.append(name)
    return keep, skipped


def _tasks(labels: dict, regression: list[str], classification: list[str]) -> dict[str, str]:
    """--regression / --classification overrides, each label checked to exist and (regression) be numeric."""
    from probes.folds import missing_mask

    for option, names in (("--regression", regression), ("--classification", classification)):
        for name in names:
            if name not in labels:
                raise ProbeSetupError(f"{option} {name}: no such label; the store has {sorted(labels)}")
    both = sorted(set(regression) & set(classification))
    if both:
        raise ProbeSetupError(f"--regression and --classification both name {both}; give each label once")
    for name in regression:
        y = np.asarray(labels[name])
        valid = y[~missing_mask(y)]
        try:
            valid.astype(np.float64)
        except (TypeError, ValueError):
            bad = next(v for v in valid.tolist() if not _is_number(v))
            raise ProbeSetupError(f"--regression {name}: label {name!r} is not numeric (e.g. {bad!r}); probe it "
                                  f"as classes (leave it out of --regression) or pick a numeric label") from None
    return {**{n: "regression" for n in regression}, **{n: "classification" for n in classification}}


def _is_number(value: Any) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def fold_range(n_items: int, n_groups: int) -> tuple[int, int]:
    """The folds a store allows: at least 2, at most one group per fold and two rows per fold."""
    return 2, max(2, min(n_groups, n_items // 2))


@dataclass
class ProbeRun:
    """What `probe_store` did: the matrix, the labels it skipped and why, the settings it records."""
    matrix: Any
    skipped: dict[str, str]
    settings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = self.matrix.to_dict()
        d["settings"].update(self.settings, skipped_labels=self.skipped)
        return d


def probe_store(store, *, taps: str | Sequence[str] | None = None, labels: str | Sequence[str] | None = None,
                folds: int = 5, cs: Sequence[float] | None = None, select: str = "inner", control: bool = True,
                pca: int | str | None = "auto", pool: str = "mean", group_by: str | None = None,
                types: str | None = None, regression: Sequence[str] = (), classification: Sequence[str] = (),
                precondition: bool | str = "auto", seed: int = 0, device: str = "cpu",
                progress: bool = True) -> ProbeRun:
    """Probe ``store``'s taps (names or globs) for its labels with grouped CV (groups: the item id, or the
    ``group_by`` label), a C sweep with ``select``, and control tasks. Token maps are pooled with ``pool``
    (the global token left out of a mean, as at capture). Labels that cannot be probed are skipped with a
    reason; options that cannot work are refused with `ProbeSetupError`."""
    from probes.linear import DEFAULT_CS, resolve_device

    if not store.items:
        raise ProbeSetupError(f"--store {store.path} holds no captured items; run `fvl capture` first")
    tap_names = select_taps(store, taps)
    all_labels = store.labels()
    wanted = _split(labels) or list(all_labels)
    missing = [n for n in wanted if n not in all_labels]
    if missing:
        raise ProbeSetupError(f"--labels: {missing} not in the store; it has {sorted(all_labels)}")
    for option, name in (("--group-by", group_by), ("--types", types)):
        if name and name not in all_labels:
            raise ProbeSetupError(f"{option} {name}: no such label; labels: {sorted(all_labels)}")
    groups = np.asarray(all_labels[group_by]).astype(str) if group_by else np.asarray(store.items)
    lo, hi = fold_range(len(store.items), np.unique(groups).size)
    if not lo <= folds <= hi:
        raise ProbeSetupError(f"--folds {folds}: use {lo}..{hi} (this store has {len(store.items)} items in "
                              f"{np.unique(groups).size} groups; every fold needs test rows)")
    tasks = _tasks(all_labels, _split(regression), _split(classification))
    names, skipped = usable_labels(all_labels, [n for n in wanted if n not in (group_by, types)], tasks, folds)
    if not names:
        raise ProbeSetupError(f"no usable labels to probe (skipped: {skipped}); pass --labels with per-item labels")
    try:
        dev = resolve_device(device)
    except ValueError as exc:
        raise ProbeSetupError(f"--device {device}: {exc}") from None
    kwargs = dict(types=np.asarray(all_labels[types]).astype(str) if types else None,
                  tasks={k: v for k, v in tasks.items() if k in names}, Cs=list(cs or DEFAULT_CS), n_folds=folds,
                  select=select, control=control, pca=pca, seed=seed, precondition=precondition, device=dev)
    matrix = _probe_taps(store, tap_names, pool, {n: all_labels[n] for n in names}, groups, progress, kwargs)
    return ProbeRun(matrix, skipped, {"store": str(store.path), "taps_requested": _split(taps) or "default"})


def _probe_taps(store, tap_names: list[str], pool: str, labels: dict, groups: np.ndarray, progress: bool,
                kwargs: dict):
    """One `probe_matrix` per tap, merged: one tap's features in memory at a time. The folds, inner splits
    and control labels depend only on the labels, groups and seed, so the result equals one call over all
    taps."""
    from tqdm.auto import tqdm

    from probes.linear import ProbeMatrix, probe_matrix

    matrix = None
    for tap in tqdm(tap_names, desc="probe taps", unit="tap", delay=2.0, disable=not progress or len(tap_names) < 2):
        x = load_vectors(store, tap, pool)
        try:
            part = probe_matrix({tap: x}, labels, groups, progress=progress, **kwargs)
        except ValueError as exc:
            raise ProbeSetupError(str(exc)) from exc
        if matrix is None:
            matrix = ProbeMatrix([], part.labels, {}, part.settings)
        matrix.taps.append(tap)
        matrix.results.update(part.results)
    matrix.settings["pool"] = pool
    return matrix


def save_probes(store, run: ProbeRun, out: str | Path, pool: str = "mean") -> list[Path]:
    """One `probes.estimator.LinearProbe` per classification probe of ``run``, fitted on every labelled row
    at the C its folds chose most often, saved under ``out/probes/<tap>/<label>/`` with the tap, label,
    pooling and store it came from, so attribution (`fvl attribute --probe-file`) reuses the probe the
    matrix measured instead of fitting another."""
    from probes.estimator import LinearProbe
    from probes.folds import missing_mask

    labels, saved, cache = store.labels(), [], {}
    stored_pool = store.manifest.get("pool")
    capture_pool = pool if stored_pool in (None, "none") else stored_pool   # what capture must do to match
    for (tap, label), r in run.matrix.results.items():
        if r.task != "classification":
            continue
        if tap not in cache:
            cache.clear()
            cache[tap] = load_vectors(store, tap, pool)
        y = np.asarray(labels[label])
        keep = ~missing_mask(y)
        probe = LinearProbe(C=r.best_C, max_iter=1000).fit(cache[tap][keep], y[keep].astype(str))
        saved.append(probe.save(Path(out) / "probes" / _safe(tap) / _safe(label), tap=tap, label=label,
                                pool=capture_pool, store=str(store.path), accuracy=r.score_mean))
    return saved


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def write_probe_outputs(run: ProbeRun, out: str | Path) -> list[Path]:
    """probe.json (the matrix and settings), probe.md (the table) and probe.png (the figure) in ``out``,
    each written atomically."""
    from probes.plots import plot_probe_matrix, save
    from workbench.data.files import atomic_write_json, atomic_write_text

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "probe.json", out / "probe.md", out / "probe.png"]
    atomic_write_json(files[0], run.to_dict())
    atomic_write_text(files[1], run.matrix.to_markdown() + "\n")
    save(plot_probe_matrix(run.matrix), files[2])
    return files
