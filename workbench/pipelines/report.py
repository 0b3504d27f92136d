"""The demo report: RUN/report.md with its PNG figures under RUN/figures/.

It reads only what the pipeline wrote (the run layout of `workbench.pipelines.demo`), so it can be rewritten
at any time (`fvl demo --out RUN` reruns just this step when the rest is complete) and a section
whose inputs are missing says which command makes them instead of failing.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from workbench.data.files import atomic_write_text
from workbench.pipelines.rundir import app_command

FIG_DIR = "figures"


def _figure(w: float, h: float):
    """A matplotlib Figure on an Agg canvas (no pyplot state: safe in threads and inside the app)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> str:
    from probes.plots import save

    save(fig, path, dpi=110)
    return f"{FIG_DIR}/{path.name}"


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def markdown_table(rows: list[dict[str, Any]], cols: list[str] | None = None, digits: int = 3) -> str:
    """A Markdown table of `rows` (dicts) over `cols` (default: the first row's keys); floats to `digits`."""
    if not rows:
        return "_(none)_\n"
    cols = cols or list(rows[0])

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.{digits}f}"
        return "-" if v is None else str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- figures
def fig_samples(data_dir: Path, out: Path, n: int = 8) -> str | None:
    from workbench.data.dataset import load_scenes
    from workbench.data.images import load_image

    rows = load_scenes(data_dir)[:n]
    if not rows:
        return None
    fig = _figure(2.2 * len(rows), 2.6)
    axes = fig.subplots(1, len(rows), squeeze=False)[0]
    for ax, r in zip(axes, rows):
        ax.imshow(load_image(data_dir / r["image"]))
        lab = r.get("labels", {})
        ax.set_title(f"{lab.get('main_color')} {lab.get('main_shape')}\ntext: {lab.get('word')}", fontsize=8)
        ax.axis("off")
    return _save(fig, out)


def fig_probe(matrix: dict[str, Any], out: Path) -> str:
    """Probe score per tap and label, annotated with selectivity (`probes.plots.plot_probe_matrix`)."""
    from probes.plots import plot_probe_matrix

    return _save(plot_probe_matrix(matrix), out)


def fig_attribution(run: Path, records: list[dict[str, Any]], out: Path) -> str | None:
    from probes.attribution import token_grid
    from workbench.pipelines.compute import overlay
    from workbench.data.images import load_image

    recs = [r for r in records if (r.get("pixels") or {}).get("heat") is not None][:6]
    if not recs:
        return None
    streams = list((recs[0].get("streams") or {}).get("token_maps") or {})
    cols = 2 + len(streams)
    fig = _figure(2.1 * cols, 2.3 * len(recs))
    axes = fig.subplots(len(recs), cols, squeeze=False)
    for i, r in enumerate(recs):
        img = np.asarray(load_image(run / r["image"]).resize((224, 224)))
        axes[i, 0].imshow(img)
        axes[i, 0].set_title(f"{r['question'][:34]}\n→ {r['answer']}", fontsize=7)
        axes[i, 1].imshow(overlay(img, np.abs(np.asarray(r["pixels"]["heat"]))))
        axes[i, 1].set_title("pixels |IG|", fontsize=7)
        s = r.get("streams") or {}
        for k, name in enumerate(streams):
            ax = axes[i, 2 + k]
            try:
                ax.imshow(overlay(img, token_grid(np.asarray(s["token_maps"][name]))))
            except (KeyError, ValueError):
                pass
            ax.set_title(f"{name} {s.get('shares', {}).get(name, 0):.0%}", fontsize=7)
        for ax in axes[i]:
            ax.axis("off")
    return _save(fig, out)


def fig_feature_maps(store_path: Path, data_dir: Path, out: Path, n_images: int = 3) -> str | None:
    """PCA-as-RGB maps of V and of the last layer of each prompt, one shared PCA per image
    (`probes.projection.pca_rgb_many`, drawn by `probes.plots.plot_pca_rgb_grid`)."""
    from probes.plots import plot_pca_rgb_grid
    from probes.projection import pca_rgb_many
    from workbench.pipelines.compute import dataset_images, spatial_taps, to_grid
    from workbench.data.images import load_image
    from workbench.store import FeatureStore

    store = FeatureStore(store_path)
    spatial = spatial_taps(store.manifest)
    cols = [t for t in ["depth"] + [t for t in spatial if t.startswith("prompt.") and ".layer" not in t] if t in spatial]
    if len(cols) < 2:
        return None
    items = store.items[:n_images]
    paths = dataset_images(data_dir, items)
    if len(paths) < len(items):
        return None
    pool = str(store.manifest.get("pool"))
    grid = {}
    for item in items:
        grids = {t: to_grid(store.load(t, [item], dtype="float32")[0], pool) for t in cols}
        grid[item] = pca_rgb_many(grids, background="none")
    fig = plot_pca_rgb_grid(grid, col_names=cols, images=[np.asarray(load_image(paths[i])) for i in items])
    return _save(fig, out)


def fig_umap(store_path: Path, umap: dict[str, Any], out: Path, label: str = "main_color") -> list[str]:
    """One scatter per embedded tap, coloured by a label (`probes.plots.plot_embedding`)."""
    from probes.plots import plot_embedding
    from workbench.store import FeatureStore

    store = FeatureStore(store_path)
    labels = store.labels()
    if label not in labels:
        label = next(iter(labels), None)
    order = {i: k for k, i in enumerate(store.items)}
    files = []
    for tap in list(umap)[:3]:
        rec = umap[tap]
        lab = [labels[label][order[i]] for i in rec["ids"]] if label else None
        fig = plot_embedding(np.asarray(rec["xy"]), lab,
                             title=f"{rec.get('method', 'umap').upper()} of {tap} (mean-pooled), colour: {label}")
        files.append(_save(fig, out.with_name(f"{out.stem}_{tap.replace('.', '_')}.png")))
    return files


# --------------------------------------------------------------------------- the report
def _probe_findings(matrix: dict[str, Any]) -> list[dict[str, Any]]:
    """Per label: the best tap, its score, the chance level and its selectivity."""
    best: dict[str, dict] = {}
    for r in matrix.get("results", []):
        cur = best.get(r["label"])
        if cur is None or r["score_mean"] > cur["score_mean"]:
            best[r["label"]] = r
    return [{"label": k, "metric": r["metric"], "best tap": r["tap"], "score": r["score_mean"],
             "chance": r["chance"] if r["metric"] == "accuracy" else None, "selectivity": r.get("selectivity_mean")}
            for k, r in best.items()]


def write_report(run: str | Path) -> Path:
    """Write RUN/report.md and RUN/figures/*.png from whatever results RUN holds."""
    run = Path(run)
    figs = run / FIG_DIR
    figs.mkdir(parents=True, exist_ok=True)
    md: list[str] = ["# Florence-VL workbench demo report\n",
                     f"Run directory `{run}`, written {time.strftime('%Y-%m-%d %H:%M')}. "
                     f"Explore it interactively: `{app_command(run)}`.\n"]
    records = {p.stem: _json(p) for p in (run / ".steps").glob("*.json")}
    steps = dict(sorted(records.items(), key=lambda kv: str((kv[1] or {}).get("finished", ""))))  # run order
    if steps:
        md.append("## Pipeline\n")
        md.append(markdown_table([{"step": k, "seconds": (v or {}).get("seconds"), "finished": (v or {}).get("finished")}
                                 for k, v in steps.items()], digits=1))

    data = run / "data"
    dm = _json(data / "manifest.json")
    md.append("## Data\n")
    if dm:
        md.append(f"{dm.get('n')} synthetic scenes ({dm.get('image_size')} px, seed {dm.get('seed')}); splits "
                  + ", ".join(f"{k} {v}" for k, v in (dm.get("split_counts") or {}).items()) + ".\n")
        f = fig_samples(data, figs / "samples.png")
        if f:
            md.append(f"![samples]({f})\n")
    else:
        md.append("_No data set (run `fvl demo`)._\n")

    md.append("## Model and training\n")
    results = _json(run / "results.json") or (steps.get("train") or {}).get("info")
    if isinstance(results, dict) and "overall" in results:
        from workbench.data.scenes import QA_TYPES

        md.append(f"`{results.get('preset')}` preset at {results.get('image_size')} px, trained by the scaled-down "
                  f"recipe (Florence-2 pretraining, stage 1 captions, stage 2 instructions) on {results.get('n_images')} "
                  f"images in {results.get('minutes', 0):.1f} min ({results.get('threads')} threads). VQA exact match "
                  f"on the {results.get('eval_split')} split:\n")
        chance = results.get("chance") or {}
        n = results.get("n_questions") or {}
        md.append(markdown_table([{"type": t, "accuracy": results.get(t), "chance": chance.get(t), "questions": n.get(t)}
                                 for t in (*QA_TYPES, "overall") if results.get(t) is not None]))
        if results.get("florence2"):
            md.append("Florence-2 tasks: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                                        for k, v in results["florence2"].items()) + "\n")
    elif results:
        md.append("Training summary:\n\n```json\n" + json.dumps(results, indent=1, default=str)[:4000] + "\n```\n")
    else:
        md.append("_No training results (`fvl train recipe` or `fvl demo`)._\n")

    store = run / "store"
    sm = _json(store / "manifest.json")
    md.append("## Feature store\n")
    if sm:
        from workbench.store import FeatureStore

        s = FeatureStore(store)
        md.append(f"`{store}`: {len(s)} items ({len(s.failed)} failed), {len(s.taps)} taps, pooling "
                  f"`{sm.get('pool')}`, {sm.get('dtype')}; model `{sm.get('model_id')}`.\n")
        f = fig_feature_maps(store, data, figs / "feature_maps.png")
        if f:
            md.append(f"![PCA-as-RGB feature maps]({f})\n")

    md.append("## Linear probes\n")
    probe = _json(run / "probe" / "probe.json")
    if probe and probe.get("results"):
        st = probe.get("settings", {})
        md.append(f"{st.get('n_folds')}-fold grouped CV, C chosen by {st.get('select')}; selectivity = score minus "
                  "the control-task score (Hewitt & Liang). Best tap per label:\n")
        md.append(markdown_table(_probe_findings(probe)))
        md.append(f"![probe matrix]({fig_probe(probe, figs / 'probe_matrix.png')})\n")
    else:
        md.append("_No probe results (`fvl demo` or `fvl probe`)._\n")

    md.append("## Vision-language alignment\n")
    align = _json(run / "align" / "alignment.json")
    if align and align.get("results"):
        from probes.alignment import flatten, plot_alignment

        rows = []
        for enc, res in align["results"].items():
            for k, c in flatten(res).items():
                rows.append({"encoder": enc, "features": k, "held-out loss": c["eval_loss"], "top-1": c["eval_top1"],
                             "chance": c["chance"]})
        md.append("Held-out loss of a linear projection onto the LLM's caption features (lower = better aligned; "
                  "'-X' = all streams but X):\n")
        md.append(markdown_table(rows, digits=4))
        enc, res = next(iter(align["results"].items()))
        plot_alignment(flatten(res), figs / "alignment.png", title=f"alignment per stream ({enc})")
        md.append(f"![alignment]({FIG_DIR}/alignment.png)\n")
    else:
        md.append("_No alignment results (`fvl demo` or `fvl align`)._\n")

    md.append("## Attribution\n")
    attr = _json(run / "attribute" / "attribution.json")
    if attr and attr.get("items"):
        rows = [{"image": r["id"], "type": r.get("type"), "question": r["question"], "answer": r["answer"],
                 **{k: v for k, v in ((r.get("streams") or {}).get("shares") or {}).items()}} for r in attr["items"]]
        md.append("Share of |integrated gradients| carried by each fusion stream for the ground-truth answer:\n")
        md.append(markdown_table(rows, digits=2))
        f = fig_attribution(run, attr["items"], figs / "attribution.png")
        if f:
            md.append(f"![attribution]({f})\n")
    else:
        md.append("_No attribution results (`fvl demo` or `fvl attribute`)._\n")

    umap = _json(run / "project" / "umap.json")
    if umap and sm:
        files = fig_umap(store, umap, figs / "embedding.png")
        if files:
            md.append("## Embeddings\n")
            md.append(" ".join(f"![embedding]({f})" for f in files) + "\n")
    md.append("## Explore\n")
    md.append(f"```\n{app_command(run)}\n```\n")
    path = run / "report.md"
    atomic_write_text(path, "\n".join(md))
    return path
