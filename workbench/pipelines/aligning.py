"""Align: the paper's vision-language alignment loss over one or more stores, as one library call.

`align_stores` takes stores captured from different encoders over the same data, pairs each stored item
with its caption, computes the text side once (the last hidden layer of a text model, mean-pooled over
the caption tokens, as the paper does with Llama-3-8B-Instruct) and trains the projection of every
stream of every store on the same pairs, the same held-out split and the same batches (one seed), so the
held-out losses compare. `fvl align`, the demo, the report and the notebooks call it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from workbench.pipelines.probing import ProbeSetupError, load_vectors

MIN_PAIRS = 8


def parse_store_spec(spec: str) -> tuple[str, str]:
    """'NAME=DIR' -> (NAME, DIR); a bare DIR (or a path that itself contains '=') is named after its folder."""
    if "=" in spec and not Path(spec).exists():
        name, path = spec.split("=", 1)
        return name, path
    return Path(spec).name or spec, spec


def read_captions(data: str, kind: str = "detailed", image_folder: str | None = None) -> dict[str, str]:
    """item id -> caption: synthetic dirs (scenes.jsonl); LLaVA files (first answer per image), COCO
    caption files and image folders with a caption column in metadata.jsonl (first caption)."""
    from workbench.data.dataset import load_scenes, open_dataset

    dataset = open_dataset(data, image_folder=image_folder)
    if dataset.kind == "synthetic":
        key = "detailed_caption" if kind == "detailed" else "caption"
        return {r["id"]: r[key] for r in load_scenes(data)}
    captions = dataset.captions()
    if not captions:
        raise ValueError(f"{data} has no captions; pass a `fvl data synth` directory, a LLaVA or COCO captions "
                         "file, or an image folder whose metadata.jsonl has a \"caption\" or \"text\" column")
    return captions


def stream_taps(store, taps: str | Sequence[str] | None) -> dict[str, str]:
    """display name -> tap/view to load: the given taps; by default the fusion streams (the
    fusion.input[*] views, else depth + prompt.*), else every vision output a foreign encoder stores."""
    if taps:
        names = [t.strip() for t in (taps.split(",") if isinstance(taps, str) else taps) if t.strip()]
        missing = [t for t in names if t not in store.taps and t not in store.view_names]
        if missing:
            raise ProbeSetupError(f"--taps: {store.path} has no taps {missing}; it has {store.taps + store.view_names}")
        return {t: t for t in names}
    if "fusion.input" in store.views:
        return {v: f"fusion.input[{v}]" for v in store.views["fusion.input"]}
    if "depth" in store.taps:
        order = (store.manifest.get("model") or {}).get("streams") or []
        prompts = [n for n in order if f"prompt.{n}" in store.taps] or \
                  [t.split(".", 1)[1] for t in store.taps if t.count(".") == 1 and t.startswith("prompt.")]
        return {"depth": "depth", **{n: f"prompt.{n}" for n in prompts}}
    if "vision.output" in store.taps:
        return {"vision.output": "vision.output"}
    layers = sorted((t for t in store.taps if t.startswith("vision.layer")), key=lambda t: int(t[12:] or 0))
    if layers:  # a ViT-style encoder captured layer by layer: its last layer, as the paper's Fig. 4 does
        return {layers[-1]: layers[-1]}
    raise ProbeSetupError(f"{store.path} holds none of fusion.input, depth, prompt.*, vision.output, vision.layer*; "
                          f"pass --taps with the taps to compare (it has {store.taps})")


def text_model_features(texts: Sequence[str], text_model: str, *, device: str = "cpu", dtype=None,
                        trust_remote_code: bool = False, progress: bool = False) -> np.ndarray:
    """The paper's text side with any transformers text model (directory or hub id): last hidden layer,
    mean-pooled over the caption tokens (a causal LM's leading BOS left out)."""
    from probes.alignment import load_text_model, text_features

    tokenizer, model, kind = load_text_model(text_model, device=device, dtype=dtype,
                                             trust_remote_code=trust_remote_code)
    return text_features(texts, model, tokenizer=tokenizer, kind=kind, progress=progress)


def common_items(stores: Mapping[str, Any], captions: Mapping[str, str]) -> list[str]:
    """Items stored in every store and captioned in the data, sorted (the same pairs for every store)."""
    items = sorted(set.intersection(*(set(s.items) for s in stores.values())) & set(captions))
    if len(items) < MIN_PAIRS:
        raise ProbeSetupError(f"only {len(items)} items are in every store and have a caption in the data; the loss "
                              f"needs at least {MIN_PAIRS} (capture the stores from this data set, with more items)")
    return items


def align_stores(stores: Mapping[str, Any], captions: Mapping[str, str],
                 text: Callable[[list[str]], tuple[np.ndarray, str]], *, taps: str | Sequence[str] | None = None,
                 leave_one_out: bool = True, control: bool = False, progress: bool = False,
                 **curve_kwargs) -> dict:
    """The alignment report over ``stores`` (name -> FeatureStore): per store, each stream alone, all
    streams fused, leave-one-stream-out (when several) and a shuffled-pairs control (when asked).
    ``text(texts) -> (features, description)`` gives the text side once for all stores. The report's
    ``held_out_loss`` gives one number per store (all its streams fused), ``summary`` every curve's."""
    from probes.alignment import alignment_by_stream, summary

    if not stores:
        raise ProbeSetupError("--store: give at least one feature store")
    items = common_items(stores, captions)
    text_feats, source = text([captions[i] for i in items])
    results, summaries = {}, {}
    for name, store in stores.items():
        chosen = stream_taps(store, taps)
        feats = {k: load_vectors(store, t, "mean", items) for k, t in chosen.items()}
        bad = [k for k, v in feats.items() if not np.isfinite(v).all()]
        if bad:
            raise ProbeSetupError(f"--store {name}: taps {bad} hold NaN/inf (float16 overflow?); recapture as float32")
        try:
            res = alignment_by_stream(feats, text_feats, leave_one_out=leave_one_out, control=control,
                                      single=len(feats) > 1, progress=progress, **curve_kwargs)
        except ValueError as exc:
            raise ProbeSetupError(f"--store {name}: {exc}") from exc
        res["taps"] = chosen
        results[name] = res
        summaries[name] = summary(res)
    first = next(iter(results.values()))["all"]
    return {"text": source, "n_items": len(items), "n_train": first["n_train"], "n_eval": first["n_eval"],
            "batch_size": first["batch_size"], "chance": first["chance"],
            "held_out_loss": {name: round(float(r["all"]["eval_loss"]), 6) for name, r in results.items()},
            "settings": dict(curve_kwargs), "summary": summaries, "results": results}


def write_alignment_outputs(report: dict, out: str | Path) -> list[Path]:
    """alignment.json (the whole report) and alignment.png (every curve) in ``out``."""
    from probes.alignment import flatten, plot_alignment
    from workbench.data.files import atomic_write_json

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    several = len(report["results"]) > 1
    curves = {(f"{name}:{label}" if several else label): curve for name, res in report["results"].items()
              for label, curve in flatten(res).items()}
    files = [out / "alignment.json", out / "alignment.png"]
    atomic_write_json(files[0], report)
    plot_alignment(curves, files[1], title=f"alignment loss vs {report['text']} text ({report['n_items']} pairs, "
                                           f"batch {report['batch_size']})")
    return files


def align_with_own_llm(store_path: str | Path, data_dir: str | Path, model, processor, *, steps: int = 300,
                       seed: int = 0, progress: bool = True) -> dict:
    """The demo's alignment run: `align_stores` over one store of this project's model, with the model's own
    LLM as the text side (last hidden layer, mean-pooled over the detailed captions). The report is filed
    under the encoder name "florence2", as `fvl align` files its stores."""
    from probes.alignment import text_features
    from workbench.data.dataset import open_dataset
    from workbench.store import FeatureStore

    store = FeatureStore(store_path)
    store.check_against(dataset=open_dataset(data_dir))

    def own_llm(texts: list[str]) -> tuple[np.ndarray, str]:
        return text_features(texts, "llm", model=model, processor=processor, progress=progress), "llm:model"

    report = align_stores({"florence2": store}, read_captions(str(data_dir)), own_llm, control=True,
                          progress=progress, steps=steps, seed=seed)
    report["caption"] = "detailed"
    return report
