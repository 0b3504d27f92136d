"""The layout of a run directory: where `fvl demo --out RUN` puts each output, and where the report and
the app look for them. One module, so the writer and the readers cannot drift apart.

    RUN/data/                       synthetic scenes (images and labels)
    RUN/model/                      the trained model (config.json, model.safetensors, tokenizers)
    RUN/florence2/ pretrain/ finetune/ results.json   the training recipe's own stages and results
    RUN/store/                      the feature store
    RUN/probe/probe.json            probes.linear.ProbeMatrix.to_dict()
    RUN/align/alignment.json        {"results": {encoder: alignment_by_stream(...)}, "summary": ...}
    RUN/attribute/attribution.json  {"items": [per-image pixel and stream attributions with maps]}
    RUN/project/umap.json           {tap: {"ids", "xy"}} precomputed 2-D embeddings
    RUN/compare/compare.json        encoder comparison tables
    RUN/report.md                   the report, with its figures under RUN/figures/
    RUN/.steps/<step>.json          the demo's completion records
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DATA = "data"
MODEL = "model"
STORE = "store"
FIGURES = "figures"
STEPS = ".steps"
RECIPE_RESULTS = "results.json"
REPORT = "report.md"

# result kind -> (path inside the run directory, the command that writes it on its own)
RESULTS: dict[str, tuple[str, str]] = {
    "probe": ("probe/probe.json", "fvl probe --store {store} --out {run}/probe"),
    "align": ("align/alignment.json", "fvl align --store {store} --data {run}/data --model {run}/model --out {run}/align"),
    "attribute": ("attribute/attribution.json",
                  "fvl attribute --model {run}/model --image IMAGE --question Q --answer A --out {run}/attribute"),
    "compare": ("compare/compare.json", "fvl compare --out {run}/compare"),
    "project": ("project/umap.json", "fvl demo --out {run}"),
    "report": (REPORT, "fvl demo --out {run}"),
}


@dataclass(frozen=True)
class RunDir:
    """Paths inside one run directory."""

    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    @property
    def data(self) -> Path:
        return self.root / DATA

    @property
    def model(self) -> Path:
        return self.root / MODEL

    @property
    def store(self) -> Path:
        return self.root / STORE

    @property
    def figures(self) -> Path:
        return self.root / FIGURES

    @property
    def report(self) -> Path:
        return self.root / REPORT

    @property
    def recipe_results(self) -> Path:
        return self.root / RECIPE_RESULTS

    def result(self, kind: str) -> Path:
        """Where a result of ``kind`` (probe, align, attribute, compare, project, report) lives."""
        return self.root / RESULTS[kind][0]

    def command_for(self, kind: str, store: str | Path | None = None) -> str:
        """The command that writes a missing result, for messages that tell the user what to run."""
        return RESULTS[kind][1].format(run=self.root, store=store or self.store)

    def step_record(self, step: str) -> Path:
        return self.root / STEPS / f"{step}.json"


def app_command(out: str | Path) -> str:
    """The one command that opens the app on a demo run (with --root when the run lies outside the current
    directory, the app's default data root)."""
    out = Path(out)
    cwd = Path.cwd().resolve()
    full = out.resolve()
    if full == cwd or cwd in full.parents:
        return f"fvl app --store {out / 'store'}"
    return f"fvl app --root {full} --store store"
