"""Objectives of the small encoders: CLIP-style contrastive training against a tiny text tower, and
supervised classification (a CvT-style recipe, tiny).

The encoders themselves are models (`model.encoders`); what they are trained with lives here, with
the word tokenizer and text tower that only the contrastive objective needs. The cycle-contrast
objective on videos is `model.training.cycle_contrast`.
"""
from __future__ import annotations

import math
import re
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from model.encoders import VisionEncoder, as_pixel_values


class WordTokenizer:
    """A whitespace/punctuation word tokenizer with a vocabulary built in-process from the captions.

    Why: CLIP-style training needs a text tower but the workbench has no downloadable tokenizer; the
    synthetic captions use a tiny closed vocabulary, so a word-level vocab is exact and fast.
    """

    PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"

    def __init__(self, vocab: dict[str, int]):
        for tok in (self.PAD, self.UNK, self.BOS, self.EOS):
            if tok not in vocab:
                raise ValueError(f"vocab lacks the special token {tok!r}; build it with WordTokenizer.fit(texts)")
        self.vocab = dict(vocab)
        self.pad_id, self.unk_id = vocab[self.PAD], vocab[self.UNK]
        self.bos_id, self.eos_id = vocab[self.BOS], vocab[self.EOS]

    @staticmethod
    def words(text: str) -> list[str]:
        return re.findall(r"[a-z0-9]+|[^\sa-z0-9]", text.lower())

    @classmethod
    def fit(cls, texts: Sequence[str]) -> "WordTokenizer":
        vocab = {cls.PAD: 0, cls.UNK: 1, cls.BOS: 2, cls.EOS: 3}
        for text in texts:
            for w in cls.words(text):
                vocab.setdefault(w, len(vocab))
        return cls(vocab)

    def __len__(self) -> int:
        return len(self.vocab)

    def __call__(self, texts: Sequence[str], max_length: int = 32) -> tuple[Tensor, Tensor]:
        """(input_ids, attention_mask), both (B, L); <bos> words <eos>, right-padded, truncated to max_length."""
        if isinstance(texts, str):
            raise TypeError("texts must be a list of strings, not one string")
        if max_length < 3:
            raise ValueError(f"max_length={max_length} must be >= 3 (bos, one word, eos)")
        rows = []
        for text in texts:
            ids = [self.vocab.get(w, self.unk_id) for w in self.words(text)][: max_length - 2]
            rows.append([self.bos_id, *ids, self.eos_id])
        length = max(len(r) for r in rows)
        ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        return ids, mask


class TextTower(nn.Module):
    """Caption encoder for CLIP-style training: a tiny transformers CLIPTextModel ("clip", pooled at
    <eos> like CLIP) or a masked bag of embeddings ("bag"); both end in a linear map to embed_dim."""

    def __init__(self, vocab_size: int, embed_dim: int = 32, kind: str = "clip", width: int = 32, layers: int = 2,
                 heads: int = 2, max_length: int = 32, pad_id: int = 0, eos_id: int = 3):
        super().__init__()
        self.kind = kind
        if kind == "clip":
            from transformers import CLIPTextConfig, CLIPTextModel

            cfg = CLIPTextConfig(vocab_size=vocab_size, hidden_size=width, intermediate_size=2 * width,
                                 num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=max_length,
                                 pad_token_id=pad_id, bos_token_id=2, eos_token_id=eos_id)
            self.model = CLIPTextModel(cfg)
        elif kind == "bag":
            self.embed = nn.Embedding(vocab_size, width, padding_idx=pad_id)
        else:
            raise ValueError(f"text tower kind={kind!r}; choose 'clip' or 'bag'")
        self.proj = nn.Linear(width, embed_dim)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        if self.kind == "clip":
            hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            eos = attention_mask.sum(1) - 1  # <eos> is the last real token (causal mask: it sees them all)
            pooled = hidden[torch.arange(len(hidden), device=hidden.device), eos]
        else:
            m = attention_mask.unsqueeze(-1).float()
            pooled = (self.embed(input_ids) * m).sum(1) / m.sum(1).clamp_min(1.0)
        return self.proj(pooled)


def clip_loss(image_emb: Tensor, text_emb: Tensor, logit_scale: Tensor) -> Tensor:
    """Symmetric InfoNCE over a batch of matched pairs (row i of each is a pair)."""
    image_emb = F.normalize(image_emb, dim=-1)
    text_emb = F.normalize(text_emb, dim=-1)
    logits = logit_scale.exp() * image_emb @ text_emb.t()
    target = torch.arange(len(logits), device=logits.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


# ----------------------------------------------------------------------------- training functions

def _check_pairs(name: str, pixels: Tensor, other_len: int, other_name: str) -> None:
    if len(pixels) != other_len:
        raise ValueError(f"{name}: {len(pixels)} images but {other_len} {other_name}; give one per image")
    if len(pixels) < 2:
        raise ValueError(f"{name}: need at least 2 images, got {len(pixels)}")


def train_clip_style(encoder: VisionEncoder, images, captions: Sequence[str], steps: int = 50, *,
                     text_tower: str | nn.Module = "clip", tokenizer: Callable | None = None, embed_dim: int = 32,
                     batch_size: int = 16, lr: float = 1e-3, pooling: str = "global", max_length: int = 32,
                     init_temperature: float = 0.07, seed: int = 0, progress: bool = True) -> dict:
    """CLIP-style contrastive training of `encoder` against a small text tower on image-caption pairs.

    Loss: symmetric InfoNCE with a learnable temperature (logit scale initialised to 1/0.07 and
    clamped at 100, as CLIP). The image embedding is a linear map of the pooled depth stream.
    `tokenizer(texts, max_length) -> (ids, mask)`; by default a WordTokenizer fitted on the captions.
    Returns {"history": {"loss", "temperature", "retrieval_acc"} per step, "text_tower", "tokenizer",
    "image_proj", "logit_scale"}; retrieval_acc = in-batch image->text top-1.
    """
    pixels = as_pixel_values(images)
    captions = list(captions)
    _check_pairs("train_clip_style", pixels, len(captions), "captions")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = tokenizer or WordTokenizer.fit(captions)
        if isinstance(text_tower, str):
            text_tower = TextTower(len(tokenizer), embed_dim, kind=text_tower, max_length=max_length,
                                   pad_id=getattr(tokenizer, "pad_id", 0), eos_id=getattr(tokenizer, "eos_id", 3))
        image_proj = nn.Linear(encoder.hidden_size, embed_dim)
        logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))
    ids, mask = tokenizer(captions, max_length=max_length)
    params = [*encoder.parameters(), *text_tower.parameters(), *image_proj.parameters(), logit_scale]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    history: dict[str, list[float]] = {"loss": [], "temperature": [], "retrieval_acc": []}
    encoder.train(), text_tower.train()
    bs = min(batch_size, len(pixels))
    for _ in tqdm(range(steps), desc="clip-style", disable=not progress):
        idx = torch.randperm(len(pixels), generator=gen)[:bs]
        img = image_proj(encoder.pooled(pixels[idx], pooling))
        txt = text_tower(ids[idx], mask[idx])
        loss = clip_loss(img, txt, logit_scale)
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            logit_scale.clamp_(0.0, math.log(100.0))
            sims = F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).t()
            # a hit when the retrieved caption's text equals the true one (duplicates count as correct)
            pred = sims.argmax(1)
            hits = [captions[int(idx[int(p)])] == captions[int(idx[i])] for i, p in enumerate(pred)]
        history["loss"].append(float(loss.detach()))
        history["temperature"].append(float(1.0 / logit_scale.detach().exp()))
        history["retrieval_acc"].append(float(np.mean(hits)))
    encoder.eval(), text_tower.eval()
    return {"history": history, "text_tower": text_tower, "tokenizer": tokenizer, "image_proj": image_proj,
            "logit_scale": logit_scale}


def train_supervised(encoder: VisionEncoder, images, labels, steps: int = 50, *, batch_size: int = 32,
                     lr: float = 1e-3, pooling: str = "mean", num_classes: int | None = None, seed: int = 0,
                     progress: bool = True) -> dict:
    """Supervised training: a linear head on pooled depth tokens, cross-entropy (CvT-style recipe, tiny).

    Returns {"history": {"loss", "accuracy"} per step (batch accuracy), "head"}.
    """
    pixels = as_pixel_values(images)
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    _check_pairs("train_supervised", pixels, len(labels), "labels")
    if labels.min() < 0:
        raise ValueError("train_supervised: labels must be class indices >= 0")
    num_classes = int(num_classes or int(labels.max()) + 1)
    if labels.max() >= num_classes:
        raise ValueError(f"train_supervised: label {int(labels.max())} >= num_classes={num_classes}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = nn.Linear(encoder.hidden_size, num_classes)
    opt = torch.optim.AdamW([*encoder.parameters(), *head.parameters()], lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    history: dict[str, list[float]] = {"loss": [], "accuracy": []}
    encoder.train()
    bs = min(batch_size, len(pixels))
    for _ in tqdm(range(steps), desc="supervised", disable=not progress):
        idx = torch.randperm(len(pixels), generator=gen)[:bs]
        logits = head(encoder.pooled(pixels[idx], pooling))
        loss = F.cross_entropy(logits, labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        history["loss"].append(float(loss.detach()))
        history["accuracy"].append(float((logits.argmax(1) == labels[idx]).float().mean()))
    encoder.eval()
    return {"history": history, "head": head}


@torch.no_grad()
def evaluate_supervised(encoder: VisionEncoder, head: nn.Module, images, labels, pooling: str = "mean",
                        batch_size: int = 64) -> float:
    """Accuracy of encoder + head (from train_supervised) on held-out images."""
    pixels = as_pixel_values(images)
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    encoder.eval()
    preds = [head(encoder.pooled(pixels[i:i + batch_size], pooling)).argmax(1) for i in range(0, len(pixels), batch_size)]
    return float((torch.cat(preds) == labels).float().mean())
