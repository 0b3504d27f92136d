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

import json
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import torch

from model.training.florence2 import Florence2Task, task_prompt_ids
from model.training.metrics import LOC_SPACES, region_recall, token_f1
from model.training.vlm import FeatureBank, qa_template
from workbench.data.dataset import load_florence2_tasks, load_qa
from workbench.data.scenes import CHANCE, QA_TYPES, normalize_answer


def chance_levels(data_dir: str | Path | None = None) -> dict[str, float]:
    """Chance accuracy per QA type: the data manifest's `qa_types[*].chance`, else the generator's table."""
    if data_dir is not None and (Path(data_dir) / "manifest.json").is_file():
        manifest = json.loads((Path(data_dir) / "manifest.json").read_text())
        stats = manifest.get("qa_types") or {}
        found = {k: float(v["chance"]) for k, v in stats.items() if isinstance(v, dict) and v.get("chance") is not None}
        if found:
            return found
    return dict(CHANCE)


@torch.inference_mode()
def answer_questions(model, processor, images: Sequence[str], questions: Sequence[str], *, template: str | None = None,
                     batch_size: int = 64, max_new_tokens: int = 8, bank=None, progress: bool = False) -> list[str]:
    """Greedy answers, one per (image, question). Image features come from `bank` (a `FeatureBank`
    of fused features) when given, computed once per image either way."""
    from tqdm.auto import tqdm

    template = qa_template(model, template)
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
        ok = normalize_answer(p) == normalize_answer(r["answer"])
        right[r["type"]] += ok
        total[r["type"]] += 1
    chance = chance_levels(data_dir)
    types = [t for t in QA_TYPES if t in total]
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


@torch.inference_mode()
def florence2_generate(florence2, tokenizer, pixel_values: torch.Tensor, task: str, max_new_tokens: int = 64) -> list[str]:
    """Greedy Florence-2 output for one task over a batch of images (DaViT once per image)."""
    dev = pixel_values.device
    prompt = torch.tensor([task_prompt_ids(tokenizer, task)] * pixel_values.shape[0], device=dev)
    embeds, mask = Florence2Task(florence2).encoder_inputs(pixel_values, torch.arange(pixel_values.shape[0], device=dev), prompt,
                                                           torch.ones_like(prompt))
    encoder_outputs = florence2.model.language_model.encoder(inputs_embeds=embeds, attention_mask=mask)
    out = florence2.generate(encoder_outputs=encoder_outputs, attention_mask=mask, max_new_tokens=max_new_tokens,
                             do_sample=False, num_beams=1)
    texts = tokenizer.batch_decode(out, skip_special_tokens=True)
    return [LOC_SPACES.sub(r"\1", t).strip() for t in texts]


MAX_NEW_TOKENS = {"<CAPTION>": 48, "<DETAILED_CAPTION>": 128, "<OCR>": 16, "<DENSE_REGION_CAPTION>": 96}


@torch.inference_mode()
def evaluate_florence2(florence2, processor, data_dir: str | Path, split: str = "test", *, limit: int | None = 100,
                       caption_task: str = "<DETAILED_CAPTION>", batch_size: int = 32, progress: bool = False,
                       return_predictions: bool = False) -> dict[str, Any]:
    """OCR exact match, caption token F1 (on `caption_task`: the caption task the model was trained on)
    and region recall at IoU 0.5 of a native Florence-2."""
    from tqdm.auto import tqdm

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
        param = next(florence2.parameters())
        px = processor.images(chunk).to(device=param.device, dtype=param.dtype)
        for task, length in lengths.items():
            preds[task] += florence2_generate(florence2, tok, px, task, length)
    ocr = [normalize_answer(p) == normalize_answer(by_image[i]["<OCR>"]) for i, p in zip(images, preds["<OCR>"])]
    # images without text count as hits when the model writes nothing: report the images with text alone too
    with_text = [hit for i, hit in zip(images, ocr) if normalize_answer(by_image[i]["<OCR>"])]
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
