"""Evaluation: VQA exact match per question type, and Florence-2 task metrics.

VQA: greedy answers to the synthetic QA (count, color, shape, position, reading, existence),
compared by exact match after `normalize_answer` (lowercase, punctuation and articles stripped,
number words to digits). Reported per type and overall, beside each type's chance level (a uniform
guess among that type's possible answers, from the data package) and the margin over chance.

Florence-2: OCR exact match (`<OCR>`), caption token F1 (`<DETAILED_CAPTION>` by default, bag-of-words
F1 as in SQuAD),
region box recall at IoU 0.5 (`<DENSE_REGION_CAPTION>`: a ground-truth box counts when a predicted
box with the same label overlaps it with IoU >= 0.5, one-to-one).
"""
from __future__ import annotations

import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Sequence

import torch

_LOC_SPACES = re.compile(r"\s*(<loc_\d+>)\s*")


def _normalize(text: str) -> str:
    from workbench.data.scenes import normalize_answer

    return normalize_answer(text)


def chance_levels(data_dir: str | Path | None = None) -> dict[str, float]:
    """Chance accuracy per QA type: the data manifest's `qa_types[*].chance`, else the generator's table."""
    import json

    if data_dir is not None and (Path(data_dir) / "manifest.json").is_file():
        manifest = json.loads((Path(data_dir) / "manifest.json").read_text())
        stats = manifest.get("qa_types") or {}
        found = {k: float(v["chance"]) for k, v in stats.items() if isinstance(v, dict) and v.get("chance") is not None}
        if found:
            return found
    try:
        from workbench.data.scenes import CHANCE

        return dict(CHANCE)
    except ImportError:
        return {}


def _vlm_template(model, template: str | None) -> str:
    if template:
        return template
    return model.config.template if model.config.template != "plain" else "phi3"


@torch.inference_mode()
def answer_questions(model, processor, images: Sequence[str], questions: Sequence[str], *, template: str | None = None,
                     batch_size: int = 64, max_new_tokens: int = 8, bank=None, progress: bool = False) -> list[str]:
    """Greedy answers, one per (image, question). Image features come from `bank` (a `FeatureBank`
    of fused features) when given, computed once per image either way."""
    from tqdm.auto import tqdm

    from model.train import FeatureBank

    template = _vlm_template(model, template)
    model.eval()
    bank = bank or FeatureBank(model, processor, progress=progress)
    bank.add(images)
    prompts = [processor.encode_conversation([(q, None)], template=template)[0] for q in questions]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths share a batch
    answers: list[str] = [""] * len(prompts)
    device = next(model.parameters()).device
    proj_dtype = model.mm_projector.encoder_mlp[0].weight.dtype
    for start in tqdm(range(0, len(order), batch_size), desc="vqa", unit="batch", disable=not progress):
        idx = order[start:start + batch_size]
        batch = processor.collate([(prompts[i], [-100] * len(prompts[i])) for i in idx], padding_side="left")
        feats = model.mm_projector(bank.get([images[i] for i in idx]).to(device, proj_dtype))
        out = model.generate(batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                             image_features=feats, max_new_tokens=max_new_tokens, do_sample=False)
        for i, ids in zip(idx, out.tolist()):
            answers[i] = processor.decode(ids, template=template)
    return answers


def evaluate_vqa(model, processor, data_dir: str | Path, split: str = "test", *, template: str | None = None,
                 batch_size: int = 64, max_new_tokens: int = 8, limit: int | None = None, bank=None,
                 progress: bool = False, return_predictions: bool = False) -> dict[str, Any]:
    """Exact-match VQA accuracy per type and overall on a synthetic dataset split.

    Returns {"accuracy": {type: acc, ..., "overall": acc}, "n": {...}, "chance": {...},
    "margin_over_chance": {...}, "split": split} (+ "predictions" when asked)."""
    from workbench.data.dataset import load_qa

    rows = load_qa(data_dir, split=split)
    if not rows:
        raise ValueError(f"{data_dir} has no QA rows for split {split!r}; choose a split it has (train/val/test)")
    if limit:
        rows = rows[:limit]
    preds = answer_questions(model, processor, [r["image"] for r in rows], [r["question"] for r in rows],
                             template=template, batch_size=batch_size, max_new_tokens=max_new_tokens, bank=bank,
                             progress=progress)
    right: dict[str, int] = defaultdict(int)
    total: dict[str, int] = defaultdict(int)
    for r, p in zip(rows, preds):
        ok = _normalize(p) == _normalize(r["answer"])
        right[r["type"]] += ok
        total[r["type"]] += 1
    chance = chance_levels(data_dir)
    types = [t for t in ("count", "color", "shape", "position", "reading", "existence") if t in total]
    types += sorted(t for t in total if t not in types)
    acc = {t: right[t] / total[t] for t in types}
    acc["overall"] = sum(right.values()) / sum(total.values())
    result: dict[str, Any] = {
        "split": split,
        "accuracy": {k: round(v, 4) for k, v in acc.items()},
        "n": {**{t: total[t] for t in types}, "overall": sum(total.values())},
        "chance": {t: round(chance[t], 4) for t in types if t in chance},
        "margin_over_chance": {t: round(acc[t] - chance[t], 4) for t in types if t in chance},
    }
    if return_predictions:
        result["predictions"] = [{"id": r["id"], "type": r["type"], "question": r["question"], "answer": r["answer"],
                                  "prediction": p} for r, p in zip(rows, preds)]
    return result


# ---------------------------------------------------------------------------------------------
# Florence-2 tasks
# ---------------------------------------------------------------------------------------------
def token_f1(prediction: str, reference: str) -> float:
    """Bag-of-words F1 between two texts after answer normalisation."""
    p, r = _normalize(prediction).split(), _normalize(reference).split()
    if not p and not r:
        return 1.0
    common = sum((Counter(p) & Counter(r)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def parse_regions_lenient(text: str) -> list[tuple[str, tuple[float, float, float, float]]]:
    """Regions from generated text; malformed output gives the groups that parse (never raises)."""
    from workbench.data.loc_tokens import parse_region_string

    text = _LOC_SPACES.sub(r"\1", text).strip()
    try:
        return parse_region_string(text)
    except ValueError:
        out = []
        for m in re.finditer(r"([^<]+)((?:<loc_\d+>){4})", text):
            try:
                out += parse_region_string(m.group(1).strip() + m.group(2))
            except ValueError:
                continue
        return out


def region_recall(predicted: str, reference: str, iou: float = 0.5) -> tuple[int, int]:
    """(matched ground-truth boxes, ground-truth boxes) with same-label IoU >= `iou`, greedy one-to-one."""
    gt = parse_regions_lenient(reference)
    pred = parse_regions_lenient(predicted)
    used = [False] * len(pred)
    hit = 0
    for label, box in gt:
        best, best_j = 0.0, -1
        for j, (plabel, pbox) in enumerate(pred):
            if used[j] or _normalize(plabel) != _normalize(label):
                continue
            v = box_iou(box, pbox)
            if v > best:
                best, best_j = v, j
        if best_j >= 0 and best >= iou:
            used[best_j] = True
            hit += 1
    return hit, len(gt)


@torch.inference_mode()
def florence2_generate(florence2, tokenizer, pixel_values: torch.Tensor, task: str, max_new_tokens: int = 64) -> list[str]:
    """Greedy Florence-2 output for one task over a batch of images (DaViT once per image)."""
    from model.florence2_pretrain import Florence2Task, task_prompt_ids

    dev = pixel_values.device
    prompt = torch.tensor([task_prompt_ids(tokenizer, task)] * pixel_values.shape[0], device=dev)
    embeds, mask = Florence2Task(florence2).encoder_inputs(pixel_values, torch.arange(pixel_values.shape[0], device=dev), prompt,
                                                           torch.ones_like(prompt))
    encoder_outputs = florence2.model.language_model.encoder(inputs_embeds=embeds, attention_mask=mask)
    out = florence2.generate(encoder_outputs=encoder_outputs, attention_mask=mask, max_new_tokens=max_new_tokens,
                             do_sample=False, num_beams=1)
    texts = tokenizer.batch_decode(out, skip_special_tokens=True)
    return [_LOC_SPACES.sub(r"\1", t).strip() for t in texts]


MAX_NEW_TOKENS = {"<CAPTION>": 48, "<DETAILED_CAPTION>": 128, "<OCR>": 16, "<DENSE_REGION_CAPTION>": 96}


@torch.inference_mode()
def evaluate_florence2(florence2, processor, data_dir: str | Path, split: str = "test", *, limit: int | None = 100,
                       caption_task: str = "<DETAILED_CAPTION>", batch_size: int = 32, progress: bool = False,
                       return_predictions: bool = False) -> dict[str, Any]:
    """OCR exact match, caption token F1 (on `caption_task`: the caption task the model was trained on)
    and region recall at IoU 0.5 of a native Florence-2."""
    from tqdm.auto import tqdm

    from workbench.data.dataset import load_florence2_tasks

    if caption_task not in ("<CAPTION>", "<DETAILED_CAPTION>", "<MORE_DETAILED_CAPTION>"):
        raise ValueError(f"caption_task {caption_task!r} is not a caption task (<CAPTION>, <DETAILED_CAPTION>)")
    lengths = {caption_task: MAX_NEW_TOKENS.get(caption_task, 128), "<OCR>": MAX_NEW_TOKENS["<OCR>"],
               "<DENSE_REGION_CAPTION>": MAX_NEW_TOKENS["<DENSE_REGION_CAPTION>"]}
    rows = load_florence2_tasks(data_dir, split=split, tasks=list(lengths))
    by_image: dict[str, dict[str, str]] = {}
    for r in rows:
        by_image.setdefault(r["image"], {})[r["task"]] = r["target"]
    images = sorted(by_image)[:limit] if limit else sorted(by_image)
    if not images:
        raise ValueError(f"{data_dir} has no Florence-2 task rows for split {split!r}")
    florence2.eval()
    tok = processor.florence2_tokenizer
    preds: dict[str, list[str]] = {t: [] for t in lengths}
    for start in tqdm(range(0, len(images), batch_size), desc="florence2 eval", unit="batch", disable=not progress):
        chunk = images[start:start + batch_size]
        px = processor.images(chunk).to(next(florence2.parameters()).device)
        for task, length in lengths.items():
            preds[task] += florence2_generate(florence2, tok, px, task, length)
    ocr = [_normalize(p) == _normalize(by_image[i]["<OCR>"]) for i, p in zip(images, preds["<OCR>"])]
    # images without text count as hits when the model writes nothing: report the images with text alone too
    with_text = [hit for i, hit in zip(images, ocr) if _normalize(by_image[i]["<OCR>"])]
    f1 = [token_f1(p, by_image[i][caption_task]) for i, p in zip(images, preds[caption_task])]
    hits = [region_recall(p, by_image[i]["<DENSE_REGION_CAPTION>"]) for i, p in zip(images, preds["<DENSE_REGION_CAPTION>"])]
    result: dict[str, Any] = {
        "split": split, "n_images": len(images), "caption_task": caption_task,
        "ocr_exact_match": round(sum(ocr) / len(ocr), 4),
        "ocr_exact_match_with_text": round(sum(with_text) / len(with_text), 4) if with_text else None,
        "ocr_images_with_text": len(with_text),
        "caption_token_f1": round(sum(f1) / len(f1), 4),
        "region_recall_iou50": round(sum(h for h, _ in hits) / max(1, sum(n for _, n in hits)), 4),
    }
    if return_predictions:
        result["predictions"] = [{"image": i, **{t: preds[t][k] for t in lengths}} for k, i in enumerate(images)]
    return result
