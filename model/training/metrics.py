"""Text and box metrics of evaluation, and the lenient region parser that pretraining also uses.

Apart from the evaluation loops so that Florence-2 pretraining (which reads region targets with
`parse_regions_lenient`) and evaluation (which runs a Florence-2 task module) do not import each other.
"""
from __future__ import annotations

import re
from collections import Counter
from typing import Sequence

from workbench.data.loc_tokens import parse_region_string
from workbench.data.scenes import normalize_answer

LOC_SPACES = re.compile(r"\s*(<loc_\d+>)\s*")


def token_f1(prediction: str, reference: str) -> float:
    """Bag-of-words F1 between two texts after answer normalisation."""
    p, r = normalize_answer(prediction).split(), normalize_answer(reference).split()
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
    text = LOC_SPACES.sub(r"\1", text).strip()
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
            if used[j] or normalize_answer(plabel) != normalize_answer(label):
                continue
            v = box_iou(box, pbox)
            if v > best:
                best, best_j = v, j
        if best_j >= 0 and best >= iou:
            used[best_j] = True
            hit += 1
    return hit, len(gt)

