"""Stream contributions: exact Shapley values of the four fusion streams for a VQA metric.

Question: how much of Florence-VL's answer quality comes from the depth stream, the caption
stream, the OCR stream and the grounding stream, and does that differ by question type (the OCR
stream should matter for reading questions, grounding for position questions)? A stream's
Shapley value is its average marginal gain over all orders of adding streams, which credits
redundant and complementary streams fairly; with K = 4 streams the 2^K = 16 subsets are
evaluated exactly (`probes.contributions.shapley_values`).

A stream that is "absent" is replaced as `workbench.taps.ablate` does: zeros (mode "zero") or a
mean (mode "mean": `mean_features[stream]`, by default the per-token mean of the stream over the
evaluation images). Efficiency: the vision tower and BART encoder run once per image
(`model.image_streams`); each subset only re-runs fusion, projector and LLM on the cached streams:
``model.mm_projector(model.fusion(streams))`` -> ``model(..., image_features=...)``. The cache holds
K x N x D floats per image (tiny: 17 KB; Florence-VL-large: 9 MB), so keep `limit` to what fits.

Metrics per question (averaged per question type, plus "all"):
  loglik   - teacher-forced mean log-probability of the answer tokens (smooth; works for any model);
  accuracy - greedy generation, exact match after `normalize_answer` (the VQA score);
  a callable ``fn(model, processor, rows, image_features) -> per-row scores`` (e.g. a probe).
"""
from __future__ import annotations

import itertools
import os
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

METRICS = ("loglik", "accuracy")
MODES = ("zero", "mean")


def all_subsets(players: Sequence[str]) -> list[frozenset[str]]:
    """Every subset of `players`, smallest first (2^K of them)."""
    return [frozenset(c) for r in range(len(players) + 1) for c in itertools.combinations(players, r)]


def cache_streams(model, processor, images: Sequence[Any], batch_size: int = 8,
                  progress: bool = False) -> dict[str, torch.Tensor]:
    """{stream: (n_images, N, D)} computed once (vision tower + one batched BART pass per batch)."""
    from tqdm.auto import tqdm

    chunks: dict[str, list[torch.Tensor]] = {n: [] for n in model.stream_names}
    with torch.inference_mode():
        for start in tqdm(range(0, len(images), batch_size), desc="streams", disable=not progress):
            px = processor.images(list(images[start:start + batch_size]))
            p = next(model.parameters())
            streams = model.image_streams(px.to(device=p.device, dtype=p.dtype))
            for n in model.stream_names:
                chunks[n].append(streams[n].detach())
    return {n: torch.cat(v) for n, v in chunks.items()}


def replace_absent(streams: Mapping[str, torch.Tensor], present: frozenset[str] | set[str], mode: str = "zero",
                   mean_features: Mapping[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """The streams with every stream not in `present` replaced (same rule as `workbench.taps.ablate`)."""
    if mode not in MODES:
        raise ValueError(f"ablation mode {mode!r} is not one of {MODES}")
    out = {}
    for name, x in streams.items():
        if name in present:
            out[name] = x
        elif mode == "zero":
            out[name] = torch.zeros_like(x)
        else:
            if mean_features is not None and name in mean_features:
                m = torch.as_tensor(mean_features[name]).to(x)
            else:
                m = x.mean(dim=0, keepdim=True)
            out[name] = m.expand_as(x).clone()
    return out


def project_streams(model, streams: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Fusion + projector on (possibly replaced) streams -> image tokens in the LLM space (B, N, H)."""
    fused = model.fusion(dict(streams))
    return model.mm_projector(fused.to(model.mm_projector.encoder_mlp[0].weight.dtype))


def answer_loglik(model, processor, rows: Sequence[Mapping[str, Any]], image_features: torch.Tensor,
                  template: str | None = None) -> np.ndarray:
    """Mean log-probability per answer token of each row's answer (teacher forcing)."""
    batch = processor(None, [r["question"] for r in rows], [r["answer"] for r in rows], template=template,
                      padding_side="right")
    dev = image_features.device
    ids, mask, labels = batch["input_ids"].to(dev), batch["attention_mask"].to(dev), batch["labels"].to(dev)
    logits = model(input_ids=ids, attention_mask=mask, image_features=image_features).logits.float()
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    tgt = labels[:, 1:]
    valid = tgt != -100
    tok = logp.gather(-1, tgt.clamp_min(0).unsqueeze(-1)).squeeze(-1) * valid
    return (tok.sum(1) / valid.sum(1).clamp_min(1)).cpu().numpy()


def answer_accuracy(model, processor, rows: Sequence[Mapping[str, Any]], image_features: torch.Tensor,
                    max_new_tokens: int = 8, template: str | None = None) -> np.ndarray:
    """1.0 where the greedy answer equals the reference after `normalize_answer`, else 0.0."""
    from workbench.data.scenes import normalize_answer

    batch = processor(None, [r["question"] for r in rows], template=template)  # generation prompts, left-padded
    dev = image_features.device
    out = model.generate(input_ids=batch["input_ids"].to(dev), attention_mask=batch["attention_mask"].to(dev),
                         image_features=image_features, max_new_tokens=max_new_tokens, do_sample=False)
    preds = [processor.decode(o, template=template) for o in out]
    return np.array([float(normalize_answer(p) == normalize_answer(r["answer"])) for p, r in zip(preds, rows)])


def subset_metrics(model, processor, rows: Sequence[Mapping[str, Any]], *, metric: str | Callable = "loglik",
                   mode: str = "zero", mean_features: Mapping[str, Any] | None = None, batch_size: int = 8,
                   max_new_tokens: int = 8, template: str | None = None,
                   streams: Mapping[str, torch.Tensor] | None = None,
                   progress: bool = False) -> dict[frozenset[str], np.ndarray]:
    """Per-row metric for every subset of present streams: {subset: (n_rows,) scores}.

    `rows` are QA rows with "question", "answer" and "image" (a path or PIL image; rows sharing an
    image share its cached streams). Pass `streams` (from `cache_streams` over the unique images,
    in first-seen order) to reuse a cache. `template` overrides the processor's conversation
    template (the `plain` pretraining template drops the question, so VQA wants phi3/llama3).
    """
    from tqdm.auto import tqdm

    if not rows:
        raise ValueError("no questions to evaluate (empty split or --types filter?)")
    if isinstance(metric, str) and metric not in METRICS:
        raise ValueError(f"metric {metric!r} is not one of {METRICS} (or a callable)")
    keys: dict[Any, int] = {}
    images, image_of_row = [], []
    for r in rows:  # one entry per distinct image (paths by value, PIL images by identity)
        key = str(r["image"]) if isinstance(r["image"], (str, os.PathLike)) else id(r["image"])
        if key not in keys:
            keys[key] = len(images)
            images.append(r["image"])
        image_of_row.append(keys[key])
    if streams is None:
        streams = cache_streams(model, processor, images, batch_size=batch_size, progress=progress)
    if mode == "mean" and mean_features is None:
        mean_features = {n: s.mean(dim=0) for n, s in streams.items()}  # per-token mean over the eval images
    players = list(model.stream_names)
    index = torch.tensor(image_of_row)
    out: dict[frozenset[str], np.ndarray] = {}
    jobs = all_subsets(players)
    bar = tqdm(total=len(jobs) * ((len(rows) + batch_size - 1) // batch_size), desc="subsets", disable=not progress)
    with torch.inference_mode():
        for subset in jobs:
            scores = []
            for start in range(0, len(rows), batch_size):
                chunk = rows[start:start + batch_size]
                idx = index[start:start + batch_size]
                present = replace_absent({n: s[idx] for n, s in streams.items()}, subset, mode, mean_features)
                feats = project_streams(model, present)
                if callable(metric):
                    scores.append(np.asarray(metric(model, processor, chunk, feats), dtype=np.float64))
                elif metric == "loglik":
                    scores.append(answer_loglik(model, processor, chunk, feats, template))
                else:
                    scores.append(answer_accuracy(model, processor, chunk, feats, max_new_tokens, template))
                bar.update(1)
            out[subset] = np.concatenate(scores).astype(np.float64)
    bar.close()
    return out


def stream_shapley(model, processor, rows: Sequence[Mapping[str, Any]], *, metric: str | Callable = "loglik",
                   mode: str = "zero", mean_features: Mapping[str, Any] | None = None, group_by: str = "type",
                   batch_size: int = 8, max_new_tokens: int = 8, template: str | None = None,
                   progress: bool = False) -> dict[str, Any]:
    """Exact Shapley values of each fusion stream for `metric`, per question type and over all rows.

    Returns {"players", "metric", "mode", "n_rows", "groups": {group: {"n", "full", "empty",
    "shapley": {stream: value}, "efficiency_gap"}}, "subsets": [{"streams": [...], group: value, ...}]}.
    `efficiency_gap` = sum of Shapley values - (full - empty), zero up to rounding by construction.
    """
    from probes.contributions import shapley_values

    per_row = subset_metrics(model, processor, rows, metric=metric, mode=mode, mean_features=mean_features,
                             batch_size=batch_size, max_new_tokens=max_new_tokens, template=template,
                             progress=progress)
    players = list(model.stream_names)
    labels = np.array([str(r.get(group_by, "all")) for r in rows])
    groups = {g: labels == g for g in sorted(set(labels.tolist()))}
    groups["all"] = np.ones(len(rows), dtype=bool)
    table = {s: {g: float(v[m].mean()) for g, m in groups.items()} for s, v in per_row.items()}
    result_groups = {}
    for g, m in groups.items():
        res = shapley_values(players, lambda s, g=g: table[frozenset(s)][g])
        result_groups[g] = {"n": int(m.sum()), "full": res.full, "empty": res.empty, "shapley": dict(res.shapley),
                            "efficiency_gap": res.efficiency_gap}
    subsets = [{"streams": [p for p in players if p in s], **table[s]} for s in all_subsets(players)]
    return {"players": players, "metric": metric if isinstance(metric, str) else getattr(metric, "__name__", "custom"),
            "mode": mode, "template": template or processor.template, "n_rows": len(rows), "group_by": group_by,
            "groups": result_groups, "subsets": subsets}


def plot_shapley(result: Mapping[str, Any], path: Any = None, title: str | None = None):
    """Grouped bars: one group per question type, one bar per stream (Shapley value); returns a
    Figure (Agg canvas, no pyplot) and saves it when `path` is given. (Kept here: probes.plots'
    `plot_shapley` draws one set of players, this one compares question types side by side.)"""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from probes.plots import save

    players = result["players"]
    groups = [g for g in result["groups"] if g != "all"] + (["all"] if "all" in result["groups"] else [])
    x = np.arange(len(groups))
    width = 0.8 / max(1, len(players))
    fig = Figure(figsize=(max(5.0, 1.1 * len(groups) + 2), 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for i, p in enumerate(players):
        vals = [result["groups"][g]["shapley"][p] for g in groups]
        ax.bar(x + (i - (len(players) - 1) / 2) * width, vals, width, label=p)
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_xticks(x, [f"{g}\n(n={result['groups'][g]['n']})" for g in groups], fontsize=8)
    ax.set_ylabel(f"Shapley value ({result['metric']})")
    ax.set_title(title or f"stream contributions, absent streams = {result['mode']}", fontsize=10)
    ax.legend(fontsize=8, ncol=min(4, len(players)))
    if path is not None:
        save(fig, path, dpi=120)
    return fig
