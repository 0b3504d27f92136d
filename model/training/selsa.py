"""The SELSA experiment: does sequence-level aggregation help classify degraded video frames?

Trains a small frame network with and without a `model.selsa.SELSA` layer on synthetic videos with
degraded frames (`workbench.data.videos`) and compares their accuracy on the degraded frames.
"""
from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from model.selsa import SELSA
from workbench.data.videos import make_videos


class _FrameNet(nn.Module):
    """Tiny CNN frame encoder: 4 conv-BN-ReLU blocks (3 strided) and a global max pool. (Average pooling
    and no normalisation learned the shape classes several times more slowly at this size.)"""

    def __init__(self, width: int = 32):
        super().__init__()
        layers: list[nn.Module] = []
        for c_in, c_out, stride in ((3, 16, 1), (16, 32, 2), (32, width, 2), (width, width, 2)):
            layers += [nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
        self.net = nn.Sequential(*layers, nn.AdaptiveMaxPool2d(1), nn.Flatten())

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class _Classifier(nn.Module):
    def __init__(self, width: int, num_classes: int, selsa: bool, heads: int = 1):
        super().__init__()
        self.encoder = _FrameNet(width)
        self.selsa = SELSA(width, heads) if selsa else None
        self.head = nn.Linear(width, num_classes)

    def forward(self, frames: Tensor, ref_mask: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """frames (B, F, 3, H, W): every frame is a key; with SELSA the references are all F frames of
        its row (its own video), limited by ref_mask (B, F)."""
        b, f = frames.shape[:2]
        x = self.encoder(frames.flatten(0, 1)).view(b, f, -1)
        affinity = None
        if self.selsa is not None:
            x, affinity = self.selsa(x, x, ref_mask)
            x = F.relu(x)
        return self.head(x), affinity


def _pixels(frames: np.ndarray) -> Tensor:
    """uint8 (..., H, W, 3) -> float (..., 3, H, W) in [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).float().div_(127.5).sub_(1.0)
    return x.movedim(-1, -3)


def _augment(x: Tensor, gen: torch.Generator) -> Tensor:
    """Per-frame random flip, 90-degree rotation and RGB channel permutation of (..., 3, H, W) frames.

    Why: the class (shape) is invariant to all three, while a video's colours are nuisance that a tiny
    CNN otherwise memorises (it fits even the degraded training frames by recognising the video)."""
    shape = x.shape
    x = x.reshape(-1, *shape[-3:])
    n = len(x)
    flip = torch.rand(n, generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    k = torch.randint(0, 4, (n,), generator=gen)
    x = torch.stack([torch.rot90(img, int(r), (-2, -1)) for img, r in zip(x, k)]) if x.shape[-1] == x.shape[-2] else x
    perm = torch.argsort(torch.rand(n, 3, generator=gen), dim=1)
    x = torch.gather(x, 1, perm[:, :, None, None].expand_as(x))
    return x.reshape(shape)


def selsa_experiment(num_classes: int = 4, train_videos_per_class: int = 150, test_videos_per_class: int = 16,
                     frames: int = 8, size: int = 32, degrade_fraction: float = 0.5, train_refs: int = 2,
                     steps: int = 400, batch_videos: int = 16, width: int = 32, lr: float = 3e-3, seed: int = 0,
                     num_threads: int | None = None, progress: bool = True) -> dict:
    """Train a tiny frame encoder + classifier with and without SELSA, on synthetic moving-shape videos
    whose frames are degraded (blur + occlusion + noise) with probability `degrade_fraction`.

    Training (frames randomly flipped, rotated by 90 degrees, channel-permuted): each step samples
    `batch_videos` videos and 1 + `train_refs` random frames from each; the single-frame model
    classifies each frame alone, the SELSA model aggregates each frame with the other sampled frames of
    its video (the paper trains with 2 references). Both see the same frames, labels
    (class = shape) and initial encoder weights. Test (held-out videos, fresh seed): the SELSA model uses
    all frames of the video as references ("selsa"), or only the key frame itself ("selsa_self_only",
    i.e. the same weights without aggregation). Accuracies are reported separately on degraded and clean
    key frames, plus the affinity mass that degraded keys put on clean references.
    `num_threads` sets torch's intra-op threads for the run and restores them after (1 is fastest on a
    busy 2-core machine).
    """
    previous_threads = torch.get_num_threads()
    if num_threads:
        torch.set_num_threads(int(num_threads))
    try:
        return _selsa_experiment(num_classes, train_videos_per_class, test_videos_per_class, frames, size,
                                 degrade_fraction, train_refs, steps, batch_videos, width, lr, seed, progress)
    finally:
        torch.set_num_threads(previous_threads)


def _selsa_experiment(num_classes, train_videos_per_class, test_videos_per_class, frames, size, degrade_fraction,
                      train_refs, steps, batch_videos, width, lr, seed, progress) -> dict:
    """The experiment in order (data, both models trained on the same batches, evaluation); kept whole
    so the two arms visibly get the same treatment."""
    if frames < 1 + train_refs:
        raise ValueError(f"frames={frames} must be >= 1 + train_refs={1 + train_refs}")
    t0 = time.perf_counter()
    train = make_videos(num_classes, train_videos_per_class, frames, size, degrade_fraction=degrade_fraction, seed=seed)
    test = make_videos(num_classes, test_videos_per_class, frames, size, degrade_fraction=degrade_fraction,
                       seed=seed + 10_000)
    x_train, y_train = _pixels(train.frames), torch.from_numpy(train.labels)
    x_test, y_test = _pixels(test.frames), torch.from_numpy(test.labels)
    t_data = time.perf_counter() - t0

    models, histories, train_time = {}, {}, {}
    for name, use_selsa in (("single_frame", False), ("selsa", True)):
        t1 = time.perf_counter()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = _Classifier(width, num_classes, use_selsa)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
        gen = torch.Generator().manual_seed(seed + 1)  # same batches for both models
        losses = []
        model.train()
        for _ in tqdm(range(steps), desc=f"selsa-exp {name}", disable=not progress):
            vids = torch.randperm(len(x_train), generator=gen)[:batch_videos]
            order = torch.argsort(torch.rand(len(vids), frames, generator=gen), dim=1)[:, : 1 + train_refs]
            batch = _augment(x_train[vids[:, None], order], gen)  # (B, 1+R, 3, H, W)
            logits, _ = model(batch)
            labels = y_train[vids][:, None].expand(-1, order.shape[1])
            loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        model.eval()
        models[name], histories[name] = model, losses
        train_time[name] = time.perf_counter() - t1

    degraded = torch.from_numpy(test.degraded)  # (V, T)
    labels = y_test[:, None].expand(-1, frames)

    def accuracies(pred: Tensor) -> dict:
        hit = pred == labels
        return {"degraded": float(hit[degraded].float().mean()) if degraded.any() else float("nan"),
                "clean": float(hit[~degraded].float().mean()) if (~degraded).any() else float("nan"),
                "all": float(hit.float().mean())}

    results = {}
    with torch.no_grad():
        logits, _ = models["single_frame"](x_test)
        results["single_frame"] = accuracies(logits.argmax(-1))
        logits, affinity = models["selsa"](x_test)
        results["selsa"] = accuracies(logits.argmax(-1))
        # affinity mass that degraded key frames put on clean reference frames, vs the clean share
        clean_ref = (~degraded).float()[:, None, :]  # (V, 1, T)
        mass = (affinity * clean_ref).sum(-1)  # (V, T)
        rows = degraded & (~degraded).any(1, keepdim=True)
        results["affinity_on_clean_refs"] = {
            "degraded_keys": float(mass[rows].mean()) if rows.any() else float("nan"),
            "uniform_share": float(clean_ref.mean(-1).expand_as(mass)[rows].mean()) if rows.any() else float("nan")}
        # same weights, no aggregation: each key frame's only reference is itself
        feats = models["selsa"].encoder(x_test.flatten(0, 1)).view(len(x_test), frames, -1)
        out = torch.stack([models["selsa"].selsa(feats[:, t:t + 1], feats[:, t:t + 1])[0][:, 0] for t in range(frames)], 1)
        results["selsa_self_only"] = accuracies(models["selsa"].head(F.relu(out)).argmax(-1))
    results["train_loss_last10"] = {k: float(np.mean(v[-10:])) for k, v in histories.items()}
    results["setup"] = dict(num_classes=num_classes, train_videos=len(train), test_videos=len(test), frames=frames,
                            size=size, degrade_fraction=degrade_fraction,
                            degraded_test_frames=int(degraded.sum()), train_refs=train_refs, test_refs=frames,
                            steps=steps, batch_videos=batch_videos, width=width, seed=seed)
    results["timing_s"] = {"data": round(t_data, 2), **{k: round(v, 2) for k, v in train_time.items()},
                           "total": round(time.perf_counter() - t0, 2)}
    results["history"] = histories
    return results
