"""The app's inputs, and the guard that keeps it inside its data root.

The app is a local web server: whoever can reach its port can make it read files. So every path
it opens (the store, the run directory beside it, the data set, the images a data set names, a model
directory) is resolved (symlinks included) and must lie under one configured data root (`--root`, else
env FVL_DATA_ROOT, else the current directory); anything else is refused with a message that says
which flag to change. It lives among the pipelines because both `fvl app` (which checks the paths
before starting a server) and the Streamlit views use it; nothing here imports streamlit. The run
directory layout the app reads is `workbench.pipelines.rundir`.
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from workbench.pipelines.rundir import RESULTS

ENV_ROOT = "FVL_DATA_ROOT"
ENV_STORE = "FVL_APP_STORE"
MAX_UPLOAD_MB = 10
MAX_UPLOAD_PIXELS = 25_000_000  # 5000 x 5000: far above any model input, cheap to refuse before decoding


class PathRefused(ValueError):
    """A path outside the data root, or one that does not exist; the message says what to pass."""


def default_root() -> Path:
    return Path(os.environ.get(ENV_ROOT) or os.getcwd())


def resolve_under_root(path: str | os.PathLike[str], root: str | os.PathLike[str], what: str,
                       must_exist: bool = True) -> Path:
    """`path` (relative paths are taken from the root) resolved, symlinks followed, and checked to lie
    under `root`. Raises PathRefused naming `what` and the fix."""
    root_r = Path(root).expanduser().resolve()
    p = Path(path).expanduser()
    full = (p if p.is_absolute() else root_r / p).resolve()
    if full != root_r and root_r not in full.parents:
        raise PathRefused(f"{what} {path} is outside the data root {root_r}; the app only opens files under its root "
                          f"- move the data there, or start the app with --root DIR (or {ENV_ROOT}=DIR) above it")
    if must_exist and not full.exists():
        raise PathRefused(f"{what} {path} does not exist (looked at {full}); pass an existing directory under {root_r}")
    return full


def confine_images(paths: Mapping[str, str | os.PathLike[str]], root: str | os.PathLike[str]
                   ) -> tuple[dict[str, str], dict[str, str]]:
    """Split a data set's image paths (item id -> path) into (inside, refused): a data set may name
    images by `../` paths or absolute paths, and the app must not show a file outside its root just
    because a data set lists it. Inside paths are returned resolved; refused ones map to the reason.
    Every view that displays data-set images passes them through here first."""
    inside: dict[str, str] = {}
    refused: dict[str, str] = {}
    for item, path in paths.items():
        try:
            inside[item] = str(resolve_under_root(path, root, f"image of item {item!r}", must_exist=False))
        except PathRefused as exc:
            refused[item] = str(exc)
    return inside, refused


def refused_summary(refused: Mapping[str, str], show: int = 3) -> str:
    """One message for the images a view did not show because they lie outside the root."""
    items = list(refused)
    more = f" and {len(items) - show} more" if len(items) > show else ""
    return (f"{len(items)} image(s) not shown because they lie outside the data root "
            f"({', '.join(items[:show])}{more}); " + next(iter(refused.values())).split("; ", 1)[-1])


@dataclass
class AppConfig:
    """The app's inputs after checking: every path is absolute and under `root`."""
    root: Path
    store: Path | None = None
    run_dir: Path | None = None
    data: Path | None = None
    image_folder: Path | None = None
    model: Path | None = None
    warnings: list[str] = field(default_factory=list)

    def result_path(self, kind: str) -> Path | None:
        """The results file of `kind` in the run directory, or None when the app has no run directory."""
        if self.run_dir is None:
            return None
        return self.run_dir / RESULTS[kind][0]

    def result(self, kind: str) -> Path | None:
        """The results file of `kind` when it exists."""
        p = self.result_path(kind)
        return p if p is not None and p.is_file() else None

    def how_to_make(self, kind: str) -> str:
        """The command that writes the results file of `kind` for this store."""
        run = str(self.run_dir) if self.run_dir else "RUN"
        store = str(self.store) if self.store else "STORE"
        return f"`{RESULTS[kind][1].format(run=run, store=store)}` (or `fvl demo --out {run}` for all of them)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="app.py", description="Streamlit explorer over a Florence-VL feature store")
    p.add_argument("--store", default=None, help=f"feature store directory (default: env {ENV_STORE})")
    p.add_argument("--root", default=None, help=f"data root; only paths under it are opened (default: env {ENV_ROOT} or the current directory)")
    p.add_argument("--run", default=None, help="run directory with results files (default: the store's parent)")
    p.add_argument("--data", default=None, help="data set of the store's images (default: RUN/data, or the store manifest's 'data')")
    p.add_argument("--image-folder", default=None, help="for a LLaVA or COCO --data file: the folder its image "
                                                         "paths are relative to (under the root too)")
    p.add_argument("--model", default=None, help="model directory for live mode (default: RUN/model, or the manifest's model id)")
    return p


def is_store(path: Path) -> bool:
    try:
        m = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(m, dict) and "taps" in m and "model_id" in m


def is_dataset(path: Path) -> bool:
    return (path / "scenes.jsonl").is_file() or (path.is_dir() and any(path.glob("*.png")))


def is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file()


def find_stores(root: Path, max_depth: int = 4, limit: int = 50) -> list[Path]:
    """Feature stores under `root` (breadth-first, hidden folders skipped), for the store picker."""
    root = Path(root).resolve()
    found: list[Path] = []
    level = [root]
    for _ in range(max_depth + 1):
        nxt: list[Path] = []
        for d in level:
            if is_store(d):
                found.append(d)
                if len(found) >= limit:
                    return found
                continue
            try:
                nxt += sorted(c for c in d.iterdir() if c.is_dir() and not c.name.startswith(".")
                              and not c.is_symlink())
            except OSError:
                continue
        level = nxt
    return found


def _manifest(store: Path) -> dict[str, Any]:
    try:
        return json.loads((store / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def make_config(argv: list[str] | None = None) -> AppConfig:
    """Parse the app's arguments (those after `--` in `streamlit run app.py -- ...`) and check paths.

    Raises PathRefused for a path outside the root or missing. The run directory, data set and
    model default to what lies beside the store; defaults that fail the root check are dropped
    with a warning instead of refused (the user did not ask for them)."""
    args, _ = build_parser().parse_known_args(argv)
    root = Path(args.root).expanduser() if args.root else default_root()
    if not root.is_dir():
        raise PathRefused(f"--root {root} is not a directory; pass an existing data root")
    cfg = AppConfig(root=root.resolve())
    store = args.store or os.environ.get(ENV_STORE)
    if store:
        cfg.store = resolve_under_root(store, cfg.root, "--store")
        if not is_store(cfg.store):
            raise PathRefused(f"--store {store} is not a feature store (no manifest.json with taps); pass the --out "
                              "directory of `fvl capture` or RUN/store of `fvl demo`")
    if args.run:
        cfg.run_dir = resolve_under_root(args.run, cfg.root, "--run")
    elif cfg.store is not None:
        parent = cfg.store.parent
        if parent == cfg.root or cfg.root in parent.parents:
            cfg.run_dir = parent
    manifest = _manifest(cfg.store) if cfg.store else {}
    if args.image_folder:
        cfg.image_folder = resolve_under_root(args.image_folder, cfg.root, "--image-folder")
    if args.data:
        cfg.data = resolve_under_root(args.data, cfg.root, "--data")
    else:
        for cand in ([cfg.run_dir / "data"] if cfg.run_dir else []) + ([Path(manifest["data"])] if manifest.get("data") else []):
            try:
                p = resolve_under_root(cand, cfg.root, "data set")
            except PathRefused as exc:
                if cand.exists():
                    cfg.warnings.append(str(exc))
                continue
            if is_dataset(p):
                cfg.data = p
                break
    if args.model:
        cfg.model = resolve_under_root(args.model, cfg.root, "--model")
        if not is_model_dir(cfg.model):
            raise PathRefused(f"--model {args.model} is not a model directory (no config.json); pass a directory "
                              "written by `fvl train` or `fvl demo` (RUN/model)")
    else:
        cands = [cfg.run_dir / "model"] if cfg.run_dir else []
        mid = str(manifest.get("model_id") or "")
        if mid and not mid.startswith("preset:"):
            mp = Path(mid)
            cands.append(mp if mp.is_absolute() else (cfg.store.parent / mp if cfg.store else mp))
            if not mp.is_absolute():
                cands.append(Path(os.getcwd()) / mp)
        for cand in cands:
            try:
                p = resolve_under_root(cand, cfg.root, "model")
            except PathRefused as exc:
                if cand.exists():
                    cfg.warnings.append(str(exc))
                continue
            for sub in (p, p / "model"):  # a recipe directory keeps its final model in model/
                if is_model_dir(sub):
                    cfg.model = sub
                    break
            if cfg.model is not None:
                break
    return cfg


def model_preset(manifest: dict[str, Any]) -> str | None:
    """The preset a store's features come from (for a random-init model when no model dir exists)."""
    mid = str(manifest.get("model_id") or "")
    if mid.startswith("preset:"):
        return mid.split(":", 1)[1]
    return (manifest.get("model") or {}).get("preset")


def read_json(path: Path) -> Any:
    """A results file; raises ValueError naming the file when it is not valid JSON."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}); rewrite it with the command "
                         "that made it") from None
