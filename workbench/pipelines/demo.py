"""`fvl demo`: the whole workbench end to end, as a small pipeline of resumable steps.

    data -> train -> capture -> probe -> align -> attribute -> project -> report

Each step has a name, an output path under OUT and a function. A step is skipped when its output
exists and its completion record (OUT/.steps/<name>.json, written only after the step succeeded)
names the same settings; an interrupted step leaves no record and is rerun, and the steps that
write big outputs (synthetic data, training, capture) resume their own partial work. Later steps
are rerun when an earlier one was redone. Layout of OUT (the app reads the same layout, see
`workbench.app_views.context`):

    data/  model/  store/  probe/probe.json  align/alignment.json  attribute/attribution.json
    project/umap.json  report.md  figures/*.png
    florence2/ pretrain/ finetune/ results.json   (the training recipe's own stages and results)

`--quick` uses the tiny preset and a few dozen images (a couple of minutes on 2 cores; tests use it).
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from workbench.data.files import atomic_write_text
from workbench.pipelines.aligning import align_with_own_llm
from workbench.pipelines.attributing import attribute_items
from workbench.pipelines.probing import probe_store
from workbench.pipelines.rundir import RunDir
from workbench.pipelines.similarity import embed_store
from workbench.store import FeatureStore

# Labels the demo probes (the synthetic scenes' labels; `word` has 60+ classes and little data per class).
PROBE_LABELS = ("n_objects", "has_text", "main_color", "main_shape", "main_size", "main_quadrant", "background",
                "main_x", "main_y")


@dataclass(frozen=True)
class DemoSettings:
    """Everything that decides the demo's outputs; each step records the settings it used."""
    preset: str = "small"
    n_images: int | None = None  # synthetic scenes for training and analysis (None: the recipe's default)
    n_capture: int = 600  # items captured into the store (the first ids: all splits)
    seed: int = 0
    pool: str = "grid6"
    probe_folds: int = 5
    # C chosen by the mean CV score ("cv": half the fits of nested "inner" selection, slightly optimistic) so
    # that all taps x labels fit the 30-minute budget; `fvl probe` does the unbiased nested selection.
    probe_select: str = "cv"
    probe_Cs: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
    probe_taps: tuple[str, ...] = ()  # () = every stored tap
    probe_labels: tuple[str, ...] = PROBE_LABELS
    align_steps: int = 300
    n_attribute: int = 4
    attribute_steps: int = 32
    embed_method: str = "umap"
    embed_taps: tuple[str, ...] = ("depth", "prompt.caption", "prompt.ocr", "prompt.grounding", "fusion.output")
    # RecipeConfig overrides for model.training.recipe.run_recipe. 192 px: the small preset's 384 px makes Florence-2
    # pretraining alone ~45 min on 2 cores; at 192 px the whole recipe takes ~17 min.
    recipe: tuple[tuple[str, Any], ...] = (("image_size", 192),)

    @classmethod
    def quick(cls) -> "DemoSettings":
        """Tiny preset, 48 images, one epoch per stage: the whole pipeline in a few minutes (tests use it)."""
        epoch = {"epochs": 1.0, "batch_size": 16, "lr": 1e-3}
        return cls(preset="tiny", n_images=48, n_capture=48, pool="grid4", probe_folds=3, probe_select="cv",
                   probe_Cs=(1e-2, 1e-1, 1.0, 10.0), probe_labels=("main_color", "has_text", "main_x"),
                   probe_taps=("vision.stage3", "depth", "prompt.caption", "prompt.ocr", "prompt.grounding",
                               "fusion.output"), align_steps=40,
                   n_attribute=2, attribute_steps=4, embed_method="pca", embed_taps=("depth", "fusion.output"),
                   recipe=(("florence2", epoch), ("pretrain", epoch), ("finetune", {**epoch, "independent_turns": True}),
                           ("florence2_eval_images", 4), ("save_every", 0)))

    def recipe_config(self):
        """The RecipeConfig `run_recipe` will use (its defaults plus this demo's overrides)."""
        from model.training.recipe import RecipeConfig

        rc = RecipeConfig()
        for key, value in self.recipe:
            if not hasattr(rc, key):
                raise ValueError(f"unknown recipe setting {key!r}; known: {', '.join(asdict(rc))}")
            setattr(rc, key, value)
        if self.n_images is not None:
            rc.n_images = self.n_images
        return rc

    def image_count(self) -> int:
        return int(self.recipe_config().n_images)

    def data_args(self) -> dict[str, Any]:
        """The synth_scenes arguments the recipe uses for its data (so the data step and the recipe agree)."""
        from model.presets import PRESETS

        rc = self.recipe_config()
        return {"n": int(rc.n_images), "seed": int(rc.data_seed),
                "image_size": int(rc.image_size or PRESETS[self.preset]["image_size"])}

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["embed_taps"] = list(self.embed_taps)
        for k in ("probe_Cs", "probe_taps", "probe_labels"):
            d[k] = list(getattr(self, k))
        d["recipe"] = dict(self.recipe)
        d["n_images"] = self.image_count()
        d["data"] = self.data_args()
        return d


@dataclass
class Step:
    """One pipeline step: `run(ctx)` writes `output` (relative to OUT) and returns a JSON summary."""
    name: str
    output: str
    run: Callable[["DemoContext"], dict]
    description: str = ""
    keys: tuple[str, ...] = ()  # the settings this step's output depends on (besides earlier steps)
    clean: tuple[str, ...] = ()  # paths (relative to OUT) removed before a rerun with other settings


@dataclass
class DemoContext:
    out: Path
    settings: DemoSettings
    progress: bool = True
    log: Callable[[str], None] = print
    _model: Any = None

    def path(self, rel: str) -> Path:
        return self.out / rel

    def model(self):
        """(model, processor) of the trained model, loaded once."""
        if self._model is None:
            from model.loading import load_model

            self._model = load_model(self.model_dir())
        return self._model

    def model_dir(self) -> Path:
        return self.path("model")


# --------------------------------------------------------------------------- analyses (also used by the app)
def probe_scene_labels(store_path: str | Path, labels: Sequence[str] = PROBE_LABELS, *, n_folds: int = 5,
                       taps: Sequence[str] | None = None, select: str = "inner", Cs: Sequence[float] | None = None,
                       progress: bool = True) -> dict[str, Any]:
    """`probe_store` over the scene labels this store has (the demo's label set); `ProbeMatrix.to_dict()`."""
    store = FeatureStore(store_path)
    present = [n for n in labels if n in store.labels()]
    if not present:
        raise ValueError(f"{store_path} has none of the labels {list(labels)}; its labels: {sorted(store.labels())}")
    run = probe_store(store, taps=list(taps) if taps else None, labels=present, folds=n_folds, cs=Cs,
                      select=select, progress=progress)
    return run.to_dict()


# --------------------------------------------------------------------------- steps
def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(data, indent=1, default=float))


def _step_data(ctx: DemoContext) -> dict:
    """The recipe's data set, made first so that every later step (and the app) finds it at OUT/data:
    the same arguments as `run_recipe` uses, so the recipe sees it complete and reuses it."""
    from workbench.data.synth import synth_scenes

    res = synth_scenes(ctx.path("data"), **ctx.settings.data_args(), progress=ctx.progress, log=None)
    return {"n": res.n, "splits": res.split_counts, "status": res.status}


def _step_train(ctx: DemoContext) -> dict:
    """`model.training.recipe.run_recipe` into OUT (it resumes its own stages), then the final model copied to OUT/model."""
    import shutil

    from model.training.recipe import run_recipe

    s = ctx.settings
    rc = dict(s.recipe)
    rc.setdefault("progress", ctx.progress)
    rc["n_images"] = s.image_count()
    rc.setdefault("seed", s.seed + 42)
    result = run_recipe(s.preset, ctx.out, log=ctx.log if ctx.progress else None, **rc)
    final = ctx.path("finetune/model")
    if not (final / "config.json").is_file():
        raise RuntimeError(f"the training recipe finished without a model in {final}")
    dest = ctx.path("model")
    tmp = ctx.path(".model.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(final, tmp)
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    return result


def _step_capture(ctx: DemoContext) -> dict:
    from workbench.capturing import capture_dataset
    from workbench.data.dataset import open_dataset

    model, processor = ctx.model()
    report = capture_dataset(model, processor, open_dataset(ctx.path("data")), "default", ctx.settings.pool,
                             str(ctx.path("store")), model_id=str(ctx.model_dir().resolve()),
                             limit=ctx.settings.n_capture, progress=ctx.progress)
    if report.failed:
        raise RuntimeError(f"{report.failed} items failed at capture: {list(report.errors.items())[:3]}")
    return report.to_dict()


def _step_probe(ctx: DemoContext) -> dict:
    s = ctx.settings
    d = probe_scene_labels(ctx.path("store"), s.probe_labels, n_folds=s.probe_folds, taps=s.probe_taps or None,
                           select=s.probe_select, Cs=s.probe_Cs, progress=ctx.progress)
    _write_json(ctx.path("probe/probe.json"), d)
    return {"probes": len(d["results"])}


def _step_align(ctx: DemoContext) -> dict:
    model, processor = ctx.model()
    d = align_with_own_llm(ctx.path("store"), ctx.path("data"), model, processor, steps=ctx.settings.align_steps,
                           seed=ctx.settings.seed, progress=ctx.progress)
    _write_json(ctx.path("align/alignment.json"), d)
    return d["summary"]["florence2"]


def _step_attribute(ctx: DemoContext) -> dict:
    model, processor = ctx.model()
    d = attribute_items(model, processor, ctx.path("data"), ctx.settings.n_attribute,
                        steps=ctx.settings.attribute_steps, rel_to=ctx.out, progress=ctx.progress)
    _write_json(ctx.path("attribute/attribution.json"), d)
    return {"items": len(d["items"])}


def _step_project(ctx: DemoContext) -> dict:
    d = embed_store(ctx.path("store"), ctx.settings.embed_taps, method=ctx.settings.embed_method,
                    seed=ctx.settings.seed)
    _write_json(ctx.path("project/umap.json"), d)
    return {"taps": list(d)}


def _step_report(ctx: DemoContext) -> dict:
    from workbench.pipelines.report import write_report

    path = write_report(ctx.out)
    return {"report": str(path)}


STEPS: tuple[Step, ...] = (
    Step("data", "data", _step_data, "generate the synthetic scenes", ("preset", "data"), ("data",)),
    Step("train", "model", _step_train, "train the model (Florence-2 pretraining, stage 1, stage 2, eval)",
         ("preset", "seed", "recipe"), ("florence2", "pretrain", "finetune", "results.json", "model")),
    Step("capture", "store", _step_capture, "capture features into the store", ("pool", "n_capture"), ("store",)),
    Step("probe", "probe/probe.json", _step_probe, "linear probes per tap and label",
         ("probe_folds", "probe_select", "probe_Cs", "probe_taps", "probe_labels")),
    Step("align", "align/alignment.json", _step_align, "vision-language alignment per stream", ("align_steps", "seed")),
    Step("attribute", "attribute/attribution.json", _step_attribute, "pixel and stream attributions",
         ("n_attribute", "attribute_steps")),
    Step("project", "project/umap.json", _step_project, "2-D embeddings for the app", ("embed_method", "embed_taps", "seed")),
    Step("report", "report.md", _step_report, "write the report with its figures", ()),
)


def step_record(ctx: DemoContext, step: Step) -> Path:
    return RunDir(ctx.out).step_record(step.name)


def is_complete(ctx: DemoContext, step: Step, upstream: dict[str, Any]) -> bool:
    """The step's output exists and its record names the same settings and the same upstream runs."""
    rec = step_record(ctx, step)
    if not rec.is_file() or not ctx.path(step.output).exists():
        return False
    try:
        data = json.loads(rec.read_text())
    except (OSError, ValueError):
        return False
    return data.get("key") == _step_key(ctx, step, upstream)


def _step_key(ctx: DemoContext, step: Step, upstream: dict[str, Any]) -> dict[str, Any]:
    s = ctx.settings.to_dict()
    return {"settings": {k: s[k] for k in step.keys}, "upstream": upstream}


def run_demo(out: str | Path, settings: DemoSettings | None = None, *, only: Sequence[str] | None = None,
             force: Sequence[str] = (), progress: bool = True, log: Callable[[str], None] = print,
             steps: Sequence[Step] = STEPS) -> dict[str, Any]:
    """Run the pipeline into `out`; returns {"out", "steps": {name: {"status", "seconds", ...}}, "seconds"}.

    Steps whose output is complete are skipped ("done"); `force` names steps to redo; `only` stops
    after the last named step (earlier steps still run if they are not done). Once a step runs, every
    later step runs too (its inputs changed)."""
    from tqdm.auto import tqdm

    settings = settings or DemoSettings()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ctx = DemoContext(out, settings, progress, log)
    names = [s.name for s in steps]
    for n in list(force) + list(only or []):
        if n not in names:
            raise ValueError(f"unknown demo step {n!r}; steps are: {', '.join(names)}")
    last = max(names.index(n) for n in only) if only else len(steps) - 1
    summary: dict[str, Any] = {"out": str(out), "settings": settings.to_dict(), "steps": {}}
    upstream: dict[str, Any] = {}
    redone = False
    start = time.perf_counter()
    bar = tqdm(list(steps)[: last + 1], desc="demo", unit="step", disable=not progress)
    for step in bar:
        bar.set_postfix_str(step.name)
        if not redone and step.name not in force and is_complete(ctx, step, upstream):
            rec = json.loads(step_record(ctx, step).read_text())
            summary["steps"][step.name] = {"status": "done", "seconds": 0.0}
            upstream[step.name] = rec.get("finished")
            log(f"[{step.name}] already complete: {ctx.path(step.output)}")
            continue
        if step_record(ctx, step).is_file() or step.name in force:
            # done before with other settings or inputs (or --redo): start over; without a record it resumes
            import shutil

            for rel in step.clean:
                p = ctx.path(rel)
                shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
            step_record(ctx, step).unlink(missing_ok=True)
        log(f"[{step.name}] {step.description} -> {ctx.path(step.output)}")
        t0 = time.perf_counter()
        info = step.run(ctx)
        secs = round(time.perf_counter() - t0, 2)
        finished = time.strftime("%Y-%m-%dT%H:%M:%S")
        _write_json(step_record(ctx, step), {"key": _step_key(ctx, step, upstream), "finished": finished,
                                              "seconds": secs, "info": info})
        upstream[step.name] = finished
        redone = True  # later steps depend on this one's new output
        summary["steps"][step.name] = {"status": "ran", "seconds": secs, **{"info": info}}
    bar.close()
    summary["seconds"] = round(time.perf_counter() - start, 2)
    return summary
