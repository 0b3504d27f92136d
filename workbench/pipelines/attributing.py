"""Attribute: which pixels and which fusion streams an answer (or a probe's decision) rests on.

`attribute_image` is the one library call behind `fvl attribute`, the app's attribution view and the
notebooks: it builds the target (an answer's score, or a probe fitted on a store by the probe matrix's
solver), runs captum on the pixels and on the fusion streams, and returns one result dict with the
completeness checks; `write_attribution_outputs` writes attribution.json and attribution.png.
Errors are `probes.attribution.AttributionError` (a ValueError) naming the option and the fix.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

DELTA_WARNING = 0.05


@dataclass
class ProbeTarget:
    """A probe to attribute on ``tap``: ``fitted`` (a saved `probes.estimator.LinearProbe`, reused as it is),
    or else one fitted on ``store``'s ``tap`` for ``label``; ``klass`` None = the class it predicts."""
    store: Any
    tap: str
    label: str
    klass: str | None = None
    fitted: Any = None
    pool: str | None = None


def probe_score(model, px, target: ProbeTarget):
    """A `probes.attribution.ProbeScore` for the probe matrix's logistic probe (`probes.estimator.LinearProbe`)
    fitted on the store, for ``target.klass`` (default: the class the probe predicts for this image)."""
    import torch

    from probes.attribution import AttributionError, ProbeScore, probe_from_store

    probe = target.fitted if target.fitted is not None else probe_from_store(target.store, target.tap, target.label)
    classes = [str(c) for c in probe.classes_]
    pool = target.pool or target.store.manifest.get("pool", "mean")
    binary = len(classes) == 2
    p = next(model.parameters())
    px = px.to(device=p.device, dtype=p.dtype)  # the model's device and dtype (CUDA, bf16) for the first logits
    score = ProbeScore(model, target.tap, probe, class_index=None if binary else 0, pool=pool)
    try:
        with torch.no_grad():
            logits = score.logits(px)[0].reshape(-1)
    except RuntimeError as exc:  # e.g. a store of another model: the widths differ
        where = f"--store {target.store.path}" if target.store is not None else "--probe-file"
        raise AttributionError(f"{where}: the probe's {target.tap} features do not fit this model's ({exc}); "
                               "attribute with the model that captured the store") from exc
    if target.klass is None:
        pick = int(logits[0] > 0) if binary else int(logits.argmax())
    elif target.klass in classes:
        pick = classes.index(target.klass)
    else:
        raise AttributionError(f"--probe-class {target.klass!r} is not a class of {target.label}: {classes}")
    if binary and pick == 0:  # one logit for classes[1]: attribute its negation for classes[0]
        score = ProbeScore(model, target.tap, lambda x: -probe.torch_logits(x), class_index=None, pool=pool)
    elif not binary:
        score.class_index = pick
    score.description = {"label": target.label, "class": classes[pick], "classes": classes}
    return score


def attribute_image(model, processor, image, *, question: str | None = None, answer: str | None = None,
                    probe: ProbeTarget | None = None, method: str = "ig", steps: int = 32, stream_steps: int = 64,
                    score: str = "logit", baseline: str = "black", stream_baseline: str = "zero",
                    template: str | None = None, batch_size: int = 8, window: int | None = None,
                    stride: int | None = None, streams: bool = True, top: int = 10) -> dict:
    """Pixels (integrated gradients or occlusion) and, for an answer, the stream shares, for one PIL image.
    Returns {"pixels": dict, "streams": dict | None, "warnings": [...], "_objects": (pixels, streams)} where
    the objects are what `write_attribution_outputs` draws."""
    from probes.attribution import AnswerScore, pixel_attribution, stream_attribution

    px = processor.images([image])
    target = probe_score(model, px, probe) if probe is not None else \
        AnswerScore(model, processor, question, answer, score=score, template=template)
    pixels = pixel_attribution(model, px, target, method=method, steps=steps, baseline=baseline,
                               internal_batch_size=batch_size, window=window, stride=stride,
                               orig_size=tuple(image.size))
    by_stream = None
    if streams and probe is None and model.config.encoder_type == "florence2" and model.config.fusion != "average":
        by_stream = stream_attribution(model, px, target, steps=stream_steps, baseline=stream_baseline,
                                       pixel_baseline=baseline, internal_batch_size=batch_size)
    warnings = []
    for name, res, option in (("pixels", pixels, "--steps"), ("streams", by_stream, "--stream-steps")):
        rel = res.relative_delta if res is not None else None
        if rel is not None and rel > DELTA_WARNING:
            warnings.append(f"{name}: completeness delta is {rel:.1%} of F(x)-F(baseline); raise {option} "
                            "(or use --float64)")
    return {"dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
            "pixels": pixels.to_dict(top_k=top), "streams": by_stream.to_dict() if by_stream else None,
            "warnings": warnings, "_objects": (pixels, by_stream)}


def write_attribution_outputs(result: dict, out: str | Path, has_global: bool = True) -> list[Path]:
    """attribution.json (the result, without the drawing objects) and attribution.png in ``out``."""
    from probes.attribution import plot_attribution
    from workbench.data.files import atomic_write_json

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "attribution.json", out / "attribution.png"]
    atomic_write_json(files[0], {k: v for k, v in result.items() if not k.startswith("_")})
    pixels, streams = result["_objects"]
    plot_attribution(pixels, streams, files[1], has_global=has_global)
    return files


def vlm_template(model) -> str:
    """The template a finetuned model answers questions in (the plain pretraining template ignores them)."""
    from model.training.vlm import qa_template

    return qa_template(model)


def _downsample(heat: np.ndarray, side: int = 64) -> np.ndarray:
    """Block-mean a (H, W) map to at most side x side (keeps results files small)."""
    h, w = heat.shape
    fy, fx = max(1, h // side), max(1, w // side)
    h2, w2 = h // fy * fy, w // fx * fx
    return heat[:h2, :w2].reshape(h2 // fy, fy, w2 // fx, fx).mean((1, 3))


def attribution_record(model, processor, image, question: str, answer: str, *, steps: int = 16,
                       item_id: str = "", image_ref: str = "") -> dict:
    """`attribute_image` of `answer` to `question` in the model's question-answering template, as a
    JSON-ready record with the (downsampled) pixel map and the per-stream maps, for attribution.json."""
    from workbench.data.images import load_image

    img = load_image(image)
    result = attribute_image(model, processor, img, question=question, answer=answer, steps=steps,
                             stream_steps=steps, template=vlm_template(model), batch_size=4,
                             streams=model.config.fusion in ("channel", "token"))
    pixels, by_stream = result["_objects"]
    rec = {"id": item_id, "image": image_ref, "question": question, "answer": answer,
           "pixels": {**pixels.to_dict(), "heat": _downsample(pixels.heat).round(6).tolist()}}
    if by_stream is not None:
        rec["streams"] = by_stream.to_dict(maps=True)
    return rec


def attribute_items(model, processor, data_dir: str | Path, n: int, *, steps: int = 16, split: str = "test",
                    rel_to: Path | None = None, progress: bool = True) -> dict:
    """Attribute the ground-truth answer of one question per image for `n` images of `split`, cycling over
    question types (reading, color, position, ...) so the streams have different jobs to do."""
    import os

    from tqdm.auto import tqdm

    from workbench.data.dataset import load_qa

    rows = load_qa(data_dir, split=split) or load_qa(data_dir)
    by_image: dict[str, list[dict]] = {}
    for r in rows:
        by_image.setdefault(r["image_id"], []).append(r)
    order = ("reading", "color", "position", "shape", "count", "existence")
    chosen = []
    for k, (img_id, qs) in enumerate(sorted(by_image.items())):
        if len(chosen) >= n:
            break
        want = order[k % len(order)]
        chosen.append(next((q for q in qs if q["type"] == want), qs[0]))
    items = []
    for q in tqdm(chosen, desc="attribute", unit="img", disable=not progress):
        ref = os.path.relpath(q["image"], rel_to) if rel_to is not None else q["image"]
        items.append({**attribution_record(model, processor, q["image"], q["question"], q["answer"], steps=steps,
                                           item_id=q["image_id"], image_ref=ref), "type": q["type"]})
    return {"settings": {"method": "integrated gradients", "steps": steps, "split": split,
                         "template": vlm_template(model)}, "items": items}
