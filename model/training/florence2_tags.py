"""Dense region tags: the auxiliary loss of Florence-2 pretraining (see `model.training.florence2`).

A linear head on the image tokens predicts, for the grid cell holding each region's box centre, the
region's attribute and noun and its box, and on the global token every label word of the image.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F


def label_words(label: str) -> list[str]:
    """A region label as tags: its lowercase words ("red circle" -> red, circle; "word farm" -> word, farm)."""
    return [w for w in label.lower().split() if w]


@dataclass
class TagVocab:
    """Vocabularies of the dense region tags. Region labels are "<attribute> <noun>" ("red circle",
    "word farm"): each grid cell gets one softmax over attributes (first words) and one over nouns
    (last words), each with a background class, so colour and shape (or "word" and the word itself)
    are separate factors the cell must tell apart; the global token gets every word, multi-label.
    An object's cell also regresses the object's box (x0, y0, x1, y1 in [0, 1]): the dense form of
    the region task's `<loc_i>` tokens, which makes the features say where they are."""

    first: list[str]
    last: list[str]
    words: list[str]

    @property
    def size(self) -> int:
        """Outputs of the tag head: attributes + background, nouns + background, global words, box."""
        return len(self.first) + 1 + len(self.last) + 1 + len(self.words) + 4

    def to_dict(self) -> dict[str, list[str]]:
        return {"first": self.first, "last": self.last, "words": self.words}


def tag_vocabulary(samples: Sequence) -> TagVocab:
    """The tag vocabularies of samples that carry `.regions` (label, box) lists."""
    labels = [label_words(label) for s in samples for label, _ in s.regions]
    return TagVocab(first=sorted({w[0] for w in labels if len(w) > 1}), last=sorted({w[-1] for w in labels if w}),
                    words=sorted({x for w in labels for x in w}))


class DenseTargets(NamedTuple):
    cells: torch.Tensor      # (N, 2) long: attribute id, noun id per image token (background ids where no object)
    boxes: torch.Tensor      # (N, 4) float: the object's box in [0, 1] on its centre cell (0 elsewhere)
    multi_hot: torch.Tensor  # (W,) float: every label word of the image, for the global token


def dense_tags(regions, vocab: TagVocab, grid: int, global_token: bool = True) -> DenseTargets:
    """Targets of one image: for the image token of the grid cell holding each region's box centre, the
    region's (attribute, noun) ids and its box; background ids elsewhere; and a multi-hot of every
    label word for the global token (index 0, when the image tokens start with one)."""
    offset = 1 if global_token else 0
    first = {w: i for i, w in enumerate(vocab.first)}
    last = {w: i for i, w in enumerate(vocab.last)}
    words = {w: i for i, w in enumerate(vocab.words)}
    cells = torch.tensor([len(first), len(last)]).repeat(offset + grid * grid, 1)
    boxes = torch.zeros(offset + grid * grid, 4)
    multi_hot = torch.zeros(len(words))
    for label, (x0, y0, x1, y1) in regions:
        ws = label_words(label)
        if not ws:
            continue
        col = min(grid - 1, max(0, int((x0 + x1) / 2 / 1000 * grid)))
        row = min(grid - 1, max(0, int((y0 + y1) / 2 / 1000 * grid)))
        token = offset + row * grid + col
        if len(ws) > 1 and ws[0] in first:
            cells[token, 0] = first[ws[0]]
        if ws[-1] in last:
            cells[token, 1] = last[ws[-1]]
        boxes[token] = torch.tensor([x0, y0, x1, y1]) / 1000.0
        for w in ws:
            if w in words:
                multi_hot[words[w]] = 1.0
    return DenseTargets(cells, boxes, multi_hot)


def tag_loss(logits: torch.Tensor, cells: torch.Tensor, boxes: torch.Tensor, multi_hot: torch.Tensor,
             vocab: TagVocab, object_weight: float, global_token: bool, box_weight: float = 5.0) -> torch.Tensor:
    """Per-image tag loss (B,): cell cross-entropies of both factors (object cells weighted by
    `object_weight`, so the few object cells are not drowned by background), the L1 box error on
    object cells (weighted by `box_weight`, as DETR weighs its L1 box term), and, on the global
    token, the multi-label BCE per positive word."""
    nf, nl, nw = len(vocab.first) + 1, len(vocab.last) + 1, len(vocab.words)
    start = 1 if global_token else 0
    total = logits.new_zeros(logits.shape[0])
    for k, (lo, hi) in enumerate(((0, nf), (nf, nf + nl))):
        target = cells[:, start:, k]
        ce = F.cross_entropy(logits[:, start:, lo:hi].transpose(1, 2), target, reduction="none")  # (B, N)
        weight = torch.where(target == hi - lo - 1, 1.0, object_weight)
        total = total + (ce * weight).sum(1) / weight.sum(1)
    is_object = ((cells[:, start:, 0] < nf - 1) | (cells[:, start:, 1] < nl - 1)).float()  # (B, N)
    l1 = (logits[:, start:, nf + nl + nw:].sigmoid() - boxes[:, start:]).abs().sum(-1)  # (B, N)
    total = total + box_weight * (l1 * is_object).sum(1) / is_object.sum(1).clamp_min(1.0)
    if global_token and nw:
        bce = F.binary_cross_entropy_with_logits(logits[:, 0, nf + nl:nf + nl + nw], multi_hot,
                                                 reduction="none").sum(1)
        total = total + bce / multi_hot.sum(1).clamp_min(1.0)
    return total

