"""Cross-video cycle-consistency contrastive learning (Wu & Wang, ICCV 2021, arXiv 2105.06463), small form.

Why: frame-level contrastive learning on video treats every other video as a negative, even videos
of the same class. The cycle objective lets a query frame find *other* videos whose frames cycle
back to its own video - a soft nearest neighbour over a memory bank that excludes the query's own
video - and contrasts that neighbour against a frame of the query's video, which turns cross-video
neighbours into positives.

    L = L_intra + lambda * L_cycle
    L_intra: InfoNCE, q = f_q(frame crop), k+ = f_k(other frame of the same video) (momentum
             encoder, no gradient), negatives from a FIFO queue.
    L_cycle: c = g_q(frame crop); S = random support subset of the cycle bank U with the query's
             own video excluded; alpha = softmax(c . u_j / tau_nn) over S; c_hat = normalize(sum
             alpha_j u_j); InfoNCE of c_hat against k+ = g_k(other frame of the same video) with
             negatives U \\ S. The gradient reaches the query only through alpha.

Re-implemented from the paper's description (the official code is CC BY-NC; none of it is used).
Deviation, on purpose: entries of the query's own video are also removed from the negatives (they
are frames of the positive's video, i.e. false negatives), so the loss does not depend on own-video
bank entries at all. Small-scale defaults (bank 256, support half the bank) replace the paper's
81920 / 16384.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from model.encoders import IMAGE_MEAN, IMAGE_STD, VisionEncoder, build_encoder, mlp_head
from workbench.data.videos import make_videos


class MemoryBank(nn.Module):
    """FIFO memory of L2-normalised embeddings with the video id of each entry.

    Stored as buffers (detached, no gradient ever), so the bank moves with .to() and is saved with
    the module. `embeddings()` / `video_ids()` return only the filled entries.
    """

    def __init__(self, size: int, dim: int):
        super().__init__()
        if size < 1 or dim < 1:
            raise ValueError(f"MemoryBank: size={size} and dim={dim} must be >= 1")
        self.size, self.dim = int(size), int(dim)
        self.register_buffer("_emb", torch.zeros(size, dim))
        self.register_buffer("_vid", torch.full((size,), -1, dtype=torch.long))
        self.register_buffer("_ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("_count", torch.zeros((), dtype=torch.long))

    def __len__(self) -> int:
        return int(self._count)

    @torch.no_grad()
    def enqueue(self, embeddings: Tensor, video_ids: Tensor) -> None:
        """Append rows (oldest entries are overwritten once full); embeddings are normalised and detached."""
        embeddings = F.normalize(embeddings.detach().to(self._emb), dim=-1)
        video_ids = torch.as_tensor(video_ids, dtype=torch.long, device=self._vid.device).reshape(-1)
        if embeddings.ndim != 2 or embeddings.shape[1] != self.dim or len(embeddings) != len(video_ids):
            raise ValueError(f"MemoryBank.enqueue: expected embeddings (n, {self.dim}) and n video ids, got "
                             f"{tuple(embeddings.shape)} and {len(video_ids)}")
        if len(embeddings) > self.size:
            embeddings, video_ids = embeddings[-self.size:], video_ids[-self.size:]
        n = len(embeddings)
        idx = (int(self._ptr) + torch.arange(n, device=self._emb.device)) % self.size
        self._emb[idx] = embeddings
        self._vid[idx] = video_ids
        self._ptr.fill_((int(self._ptr) + n) % self.size)
        self._count.fill_(min(self.size, int(self._count) + n))

    def embeddings(self) -> Tensor:
        return self._emb[: len(self)] if len(self) < self.size else self._emb

    def video_ids(self) -> Tensor:
        return self._vid[: len(self)] if len(self) < self.size else self._vid


def intra_video_infonce(q: Tensor, k_pos: Tensor, negatives: Tensor, tau: float = 0.07,
                        query_video_ids: Tensor | None = None, negative_video_ids: Tensor | None = None) -> Tensor:
    """MoCo-style InfoNCE: -log exp(q.k+/tau) / (exp(q.k+/tau) + sum_n exp(q.n/tau)), averaged.

    q (B, d) has the gradient; k_pos (B, d) and negatives (K, d) are detached (momentum features).
    With video ids, negatives from the query's own video are masked (they are false negatives).
    """
    q = F.normalize(q, dim=-1)
    k_pos = F.normalize(k_pos.detach(), dim=-1)
    pos = (q * k_pos).sum(-1, keepdim=True) / tau
    if negatives is None or len(negatives) == 0:
        neg = q.new_zeros(len(q), 0)
    else:
        neg = q @ F.normalize(negatives.detach(), dim=-1).t() / tau
        if query_video_ids is not None and negative_video_ids is not None:
            own = query_video_ids.reshape(-1, 1) == negative_video_ids.reshape(1, -1)
            neg = neg.masked_fill(own, float("-inf"))
    logits = torch.cat([pos, neg], 1)
    return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))


@dataclass
class CycleOutput:
    """loss: mean over valid queries; per_query: (B,) (0 where invalid); alpha: (B, |S|) soft-NN weights
    (0 on own-video entries); support_index / negative_index: bank rows of S and U \\ S (disjoint);
    valid: (B,) queries that had at least one other-video support entry."""

    loss: Tensor
    per_query: Tensor
    alpha: Tensor
    support_index: Tensor
    negative_index: Tensor
    valid: Tensor


def cycle_loss(c: Tensor, k_pos: Tensor, bank: Tensor, bank_video_ids: Tensor, query_video_ids: Tensor,
               tau: float = 0.07, tau_nn: float = 0.07, support_size: int | None = None,
               support_index: Tensor | None = None, generator: torch.Generator | None = None) -> CycleOutput:
    """The cross-video cycle loss (see the module docstring).

    c (B, d): query cycle embeddings (gradient); k_pos (B, d): same-video momentum embeddings (detached
    here); bank (K, d) / bank_video_ids (K,): the cycle memory U (detached here). The support S is
    `support_index` if given, else a random subset of `support_size` rows (default K // 2); the
    negatives are all other rows. Own-video rows are masked in both. Queries with no other-video
    support contribute 0 and are flagged invalid.
    """
    if c.ndim != 2 or k_pos.shape != c.shape:
        raise ValueError(f"cycle_loss: c and k_pos must both be (B, d), got {tuple(c.shape)} and {tuple(k_pos.shape)}")
    if bank.ndim != 2 or bank.shape[1] != c.shape[1] or len(bank) != len(bank_video_ids):
        raise ValueError(f"cycle_loss: bank must be (K, {c.shape[1]}) with K video ids, got {tuple(bank.shape)} and "
                         f"{len(bank_video_ids)} ids")
    k = len(bank)
    if k < 2 and support_index is None:
        raise ValueError(f"cycle_loss: the bank holds {k} entries; it needs at least 2 (support and negatives)")
    c = F.normalize(c, dim=-1)
    k_pos = F.normalize(k_pos.detach(), dim=-1)
    bank = F.normalize(bank.detach(), dim=-1)
    bank_video_ids = bank_video_ids.to(bank.device)
    query_video_ids = query_video_ids.reshape(-1).to(bank.device)
    if support_index is None:
        size = k // 2 if support_size is None else int(support_size)
        if not 1 <= size < k:
            raise ValueError(f"cycle_loss: support_size={size} must lie in [1, {k - 1}] for a bank of {k}")
        perm = torch.randperm(k, generator=generator, device="cpu").to(bank.device)
        support_index, negative_index = perm[:size].sort().values, perm[size:].sort().values
    else:
        support_index = torch.as_tensor(support_index, dtype=torch.long, device=bank.device).unique()
        keep = torch.ones(k, dtype=torch.bool, device=bank.device)
        keep[support_index] = False
        negative_index = keep.nonzero().reshape(-1)
    u_s, u_n = bank[support_index], bank[negative_index]
    own_s = query_video_ids[:, None] == bank_video_ids[support_index][None, :]
    own_n = query_video_ids[:, None] == bank_video_ids[negative_index][None, :]
    valid = (~own_s).any(1)

    nn_logits = (c @ u_s.t() / tau_nn).masked_fill(own_s, float("-inf"))
    nn_logits = torch.where(valid[:, None], nn_logits, torch.zeros_like(nn_logits))  # no NaN rows
    alpha = nn_logits.softmax(-1).masked_fill(own_s, 0.0)
    c_hat = F.normalize(alpha @ u_s, dim=-1)
    pos = (c_hat * k_pos).sum(-1, keepdim=True) / tau
    neg = (c_hat @ u_n.t() / tau).masked_fill(own_n, float("-inf"))
    logits = torch.cat([pos, neg], 1)
    per_query = F.cross_entropy(logits, torch.zeros(len(c), dtype=torch.long, device=c.device), reduction="none")
    per_query = torch.where(valid, per_query, torch.zeros_like(per_query))
    loss = per_query.sum() / valid.sum().clamp_min(1)
    return CycleOutput(loss=loss, per_query=per_query, alpha=alpha, support_index=support_index,
                       negative_index=negative_index, valid=valid)


# ----------------------------------------------------------------------------- training

def _frames_to_pixels(frames: Tensor) -> Tensor:
    """uint8 (B, H, W, 3) -> ImageNet-normalised float (B, 3, H, W)."""
    x = frames.permute(0, 3, 1, 2).float() / 255.0
    return (x - torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGE_STD).view(1, 3, 1, 1)


def augment_frames(frames: Tensor, gen: torch.Generator, out_size: int, scale: tuple[float, float] = (0.4, 1.0),
                   grey_prob: float = 0.2, jitter: float = 0.3) -> Tensor:
    """MoCo-style augmentation, batched: random resized square crop (area fraction in `scale`),
    horizontal flip, brightness/contrast jitter and random greyscale. uint8 (B, H, W, 3) -> (B, 3, S, S)."""
    x = _frames_to_pixels(frames)
    b = len(x)
    side = torch.sqrt(torch.empty(b).uniform_(*scale, generator=gen))
    tx = (torch.rand(b, generator=gen) * 2 - 1) * (1 - side)
    ty = (torch.rand(b, generator=gen) * 2 - 1) * (1 - side)
    flip = torch.where(torch.rand(b, generator=gen) < 0.5, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = side * flip, tx
    theta[:, 1, 1], theta[:, 1, 2] = side, ty
    grid = F.affine_grid(theta, (b, 3, out_size, out_size), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    brightness = (torch.rand(b, 1, 1, 1, generator=gen) * 2 - 1) * jitter
    contrast = 1 + (torch.rand(b, 1, 1, 1, generator=gen) * 2 - 1) * jitter
    mean = x.mean((1, 2, 3), keepdim=True)
    x = (x - mean) * contrast + mean + brightness
    grey = torch.rand(b, generator=gen) < grey_prob
    x = torch.where(grey[:, None, None, None], x.mean(1, keepdim=True).expand_as(x), x)
    return x


def _as_video_array(videos) -> tuple[Tensor, Tensor]:
    frames = getattr(videos, "frames", videos)
    ids = getattr(videos, "video_ids", None)
    frames = torch.as_tensor(np.asarray(frames))
    if frames.dtype != torch.uint8 or frames.ndim != 5 or frames.shape[-1] != 3:
        raise ValueError(f"videos must be a VideoSet or a uint8 array (V, T, H, W, 3), got {tuple(frames.shape)} "
                         f"{frames.dtype}; make them with workbench.data.videos.make_videos")
    if frames.shape[1] < 2:
        raise ValueError(f"videos have {frames.shape[1]} frame(s); cycle-contrast needs >= 2 frames per video")
    ids = torch.arange(len(frames)) if ids is None else torch.as_tensor(np.asarray(ids), dtype=torch.long)
    return frames, ids


@torch.no_grad()
def _momentum_update(query: nn.Module, key: nn.Module, m: float) -> None:
    for pq, pk in zip(query.parameters(), key.parameters()):
        pk.mul_(m).add_(pq.detach(), alpha=1 - m)
    for bq, bk in zip(query.buffers(), key.buffers()):
        bk.copy_(bq)


def train_cycle_contrast(encoder: VisionEncoder, videos, steps: int = 100, lam: float = 0.1, *, batch_size: int = 16,
                         queue_size: int = 256, cycle_queue_size: int = 256, support_size: int | None = None,
                         tau: float = 0.07, tau_nn: float = 0.07, momentum: float = 0.99, lr: float = 1e-3,
                         image_size: int | None = None, pooling: str = "mean", head_dim: int = 32, seed: int = 0,
                         progress: bool = True) -> dict:
    """Train `encoder` with L_intra + lam * L_cycle on videos (a VideoSet or uint8 (V, T, H, W, 3)).

    Each step samples `batch_size` distinct videos and two distinct frames of each: an augmented crop
    of the first is the query, of the second the key (momentum encoder). The heads are the encoder's
    `objective_heads` (the "cycle" kind has them) or new ones. Returns {"history": {"loss", "intra",
    "cycle", "cycle_valid"}, "heads", "key_encoder", "key_heads", "queue", "cycle_bank"}.
    lam = 0 gives the intra-video MoCo baseline. One function on purpose: the step is the paper's
    algorithm in order (sample, augment, two losses, momentum update, enqueue), easier to check whole.
    """
    frames, video_ids = _as_video_array(videos)
    num_videos, num_frames = frames.shape[:2]
    if batch_size < 2 or batch_size > num_videos:
        raise ValueError(f"batch_size={batch_size} must lie in [2, number of videos={num_videos}]")
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum={momentum} must lie in [0, 1)")
    out_size = int(image_size or frames.shape[2])
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        heads = getattr(encoder, "objective_heads", None)
        if heads is None:
            heads = nn.ModuleDict(dict(intra=mlp_head(encoder.hidden_size, head_dim),
                                       cycle=mlp_head(encoder.hidden_size, head_dim)))
        head_dim = heads["intra"][-1].out_features
        key_encoder, key_heads = copy.deepcopy(encoder), copy.deepcopy(heads)
    for p in (*key_encoder.parameters(), *key_heads.parameters()):
        p.requires_grad_(False)
    queue, bank = MemoryBank(queue_size, head_dim), MemoryBank(cycle_queue_size, head_dim)
    own = {id(p) for p in encoder.parameters()}
    params = [*encoder.parameters(), *(p for p in heads.parameters() if id(p) not in own)]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    history: dict[str, list[float]] = {"loss": [], "intra": [], "cycle": [], "cycle_valid": []}
    encoder.train(), heads.train(), key_encoder.train(), key_heads.train()
    for _ in tqdm(range(steps), desc=f"cycle-contrast lam={lam}", disable=not progress):
        vids = torch.randperm(num_videos, generator=gen)[:batch_size]
        t1 = torch.randint(0, num_frames, (batch_size,), generator=gen)
        t2 = (t1 + torch.randint(1, num_frames, (batch_size,), generator=gen)) % num_frames  # another frame
        xq = augment_frames(frames[vids, t1], gen, out_size)
        xk = augment_frames(frames[vids, t2], gen, out_size)
        qv = video_ids[vids]
        feat = encoder.pooled(xq, pooling)
        q, c = heads["intra"](feat), heads["cycle"](feat)
        with torch.no_grad():
            kfeat = key_encoder.pooled(xk, pooling)
            k, kc = F.normalize(key_heads["intra"](kfeat), dim=-1), F.normalize(key_heads["cycle"](kfeat), dim=-1)
        intra = intra_video_infonce(q, k, queue.embeddings(), tau, qv, queue.video_ids())
        cyc, valid = q.new_zeros(()), 0.0
        if lam > 0 and len(bank) >= 2:
            out = cycle_loss(c, kc, bank.embeddings(), bank.video_ids(), qv, tau, tau_nn,
                             support_size=None if support_size is None else min(support_size, len(bank) - 1),
                             generator=gen)
            cyc, valid = out.loss, float(out.valid.float().mean())
        loss = intra + lam * cyc
        opt.zero_grad()
        loss.backward()
        opt.step()
        _momentum_update(encoder, key_encoder, momentum)
        _momentum_update(heads, key_heads, momentum)
        queue.enqueue(k, qv)
        bank.enqueue(kc, qv)
        history["loss"].append(float(loss.detach()))
        history["intra"].append(float(intra.detach()))
        history["cycle"].append(float(cyc.detach()))
        history["cycle_valid"].append(valid)
    encoder.eval()
    return {"history": history, "heads": heads, "key_encoder": key_encoder, "key_heads": key_heads,
            "queue": queue, "cycle_bank": bank}


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def embed_frames(encoder: VisionEncoder, videos, pooling: str = "mean", batch_size: int = 64) -> np.ndarray:
    """Pooled depth embeddings of every frame: (V * T, D), video-major."""
    frames, _ = _as_video_array(videos)
    flat = frames.flatten(0, 1)
    encoder.eval()
    out = [encoder.pooled(_frames_to_pixels(flat[i:i + batch_size]), pooling) for i in range(0, len(flat), batch_size)]
    return torch.cat(out).numpy()


def knn_accuracy(encoder: VisionEncoder, train_videos, test_videos, k: int = 10, pooling: str = "mean") -> float:
    """kNN@k (cosine) frame classification of held-out videos' classes against training videos' frames:
    the paper's kind of transfer measure, cheap enough to compare lambda settings."""
    from sklearn.neighbors import KNeighborsClassifier

    t = train_videos.frames.shape[1]
    clf = KNeighborsClassifier(n_neighbors=k, metric="cosine")
    clf.fit(embed_frames(encoder, train_videos, pooling), np.repeat(train_videos.labels, t))
    t_test = test_videos.frames.shape[1]
    return float(clf.score(embed_frames(encoder, test_videos, pooling), np.repeat(test_videos.labels, t_test)))


def cycle_experiment(lams=(0.0, 0.1, 1.0), steps: int = 200, num_classes: int = 4, videos_per_class: int = 24,
                     frames: int = 6, size: int = 64, backbone: str = "davit", seed: int = 0,
                     progress: bool = True) -> dict:
    """kNN@10 class accuracy on held-out videos for a random-init encoder and for cycle-contrast training
    at each lambda (same init, same batches). An experiment to run and report - the seed study found
    no gain at toy scale, so nothing here asserts one."""

    data = make_videos(num_classes, videos_per_class, frames, size, seed=seed)
    train, test = data.split(0.25, seed=seed)
    results = {"random_init": knn_accuracy(build_encoder("cycle", {"backbone": backbone, "seed": seed}), train, test)}
    for lam in lams:
        enc = build_encoder("cycle", {"backbone": backbone, "seed": seed})
        run = train_cycle_contrast(enc, train, steps, lam, seed=seed, progress=progress)
        results[f"lam={lam}"] = knn_accuracy(enc, train, test)
        results[f"lam={lam}_final_loss"] = float(np.mean(run["history"]["loss"][-10:]))
    return results
