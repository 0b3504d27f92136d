"""Cycle-contrast mechanism: own-video masking, gradient path, disjoint support/negatives, FIFO bank, training."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model.training.cycle_contrast import MemoryBank, cycle_loss, intra_video_infonce, train_cycle_contrast
from model.encoders import build_encoder
from workbench.data.videos import make_videos


def _bank(k=24, d=8, videos=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    bank = F.normalize(torch.randn(k, d, generator=g), dim=-1)
    ids = torch.arange(k) % videos
    return bank, ids


def test_own_video_entries_do_not_change_the_loss():
    bank, ids = _bank()
    torch.manual_seed(1)
    c, k_pos = torch.randn(4, 8), torch.randn(4, 8)
    qv = torch.tensor([0, 0, 0, 0])  # all queries from video 0
    support = torch.arange(0, 24, 2)
    out = cycle_loss(c, k_pos, bank, ids, qv, support_index=support)
    changed = bank.clone()
    changed[ids == 0] = F.normalize(torch.randn(int((ids == 0).sum()), 8), dim=-1)
    out2 = cycle_loss(c, k_pos, changed, ids, qv, support_index=support)
    assert torch.allclose(out.loss, out2.loss)
    own = ids[out.support_index] == 0
    assert own.any() and (out.alpha[:, own] == 0).all()
    assert torch.allclose(out.alpha.sum(1), torch.ones(4))
    # while other videos' entries do matter
    changed[ids == 1] = -changed[ids == 1]
    assert not torch.allclose(out.loss, cycle_loss(c, k_pos, changed, ids, qv, support_index=support).loss)


def test_gradient_reaches_only_the_query():
    bank, ids = _bank()
    bank.requires_grad_(True)
    c = torch.randn(5, 8, requires_grad=True)
    k_pos = torch.randn(5, 8, requires_grad=True)
    out = cycle_loss(c, k_pos, bank, ids, torch.tensor([0, 1, 2, 3, 4]), generator=torch.Generator().manual_seed(0))
    out.loss.backward()
    assert c.grad is not None and c.grad.abs().sum() > 0
    assert bank.grad is None and k_pos.grad is None


def test_support_and_negatives_are_disjoint_and_cover_the_bank():
    bank, ids = _bank(k=30)
    for seed in range(5):
        out = cycle_loss(torch.randn(3, 8), torch.randn(3, 8), bank, ids, torch.tensor([0, 1, 2]), support_size=7,
                         generator=torch.Generator().manual_seed(seed))
        s, n = set(out.support_index.tolist()), set(out.negative_index.tolist())
        assert len(s) == 7 and not s & n and s | n == set(range(30))
    out = cycle_loss(torch.randn(3, 8), torch.randn(3, 8), bank, ids, torch.tensor([0, 1, 2]),
                     support_index=torch.tensor([3, 1, 3]))
    assert out.support_index.tolist() == [1, 3] and set(out.negative_index.tolist()) == set(range(30)) - {1, 3}


def test_query_without_other_video_support_is_skipped_not_nan():
    bank, ids = _bank(k=8, videos=2)
    c = torch.randn(2, 8, requires_grad=True)
    out = cycle_loss(c, torch.randn(2, 8), bank, ids, torch.tensor([0, 1]), support_index=torch.tensor([0, 2, 4]))
    assert out.valid.tolist() == [False, True]  # support rows are all video 0
    assert torch.isfinite(out.loss) and out.per_query[0] == 0
    out.loss.backward()
    assert torch.isfinite(c.grad).all()


def test_cycle_loss_lowers_on_a_planted_problem():
    """Video 9's positive sits next to bank entries of video 3 (its cross-video match): learning c
    to put the soft-NN mass on them lowers the loss."""
    g = torch.Generator().manual_seed(0)
    d = 16
    target = F.normalize(torch.randn(d, generator=g), dim=0)
    others = F.normalize(torch.randn(20, d, generator=g), dim=-1)
    match = F.normalize(target + 0.1 * torch.randn(4, d, generator=g), dim=-1)
    bank = torch.cat([others, match])
    ids = torch.cat([torch.arange(20) % 3, torch.full((4,), 3)])  # only the matches belong to video 3
    support = torch.cat([torch.arange(0, 20, 2), torch.arange(20, 24)])  # the matches are all in the support
    c = torch.randn(1, d, generator=g, requires_grad=True)
    opt = torch.optim.SGD([c], lr=0.5)
    matched = ids[support] == 3
    with torch.no_grad():
        start = cycle_loss(c, target[None], bank, ids, torch.tensor([9]), support_index=support).alpha[0, matched].sum()
    losses = []
    for _ in range(30):
        out = cycle_loss(c, target[None], bank, ids, torch.tensor([9]), support_index=support)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(float(out.loss.detach()))
    assert losses[-1] < 0.5 * losses[0]
    assert float(out.alpha[0, matched].sum().detach()) > float(start) + 0.05  # the soft-NN mass moved onto the matches


def test_intra_infonce_formula_and_own_video_mask():
    q, k = torch.randn(3, 8), torch.randn(3, 8)
    neg, neg_ids = torch.randn(5, 8), torch.tensor([0, 1, 1, 2, 2])
    loss = intra_video_infonce(q, k, neg, tau=0.5)
    qn, kn, nn_ = F.normalize(q, dim=-1), F.normalize(k, dim=-1), F.normalize(neg, dim=-1)
    pos, negs = (qn * kn).sum(-1) / 0.5, qn @ nn_.t() / 0.5
    expected = (-pos + torch.logsumexp(torch.cat([pos[:, None], negs], 1), 1)).mean()
    assert torch.allclose(loss, expected, atol=1e-6)
    qv = torch.tensor([0, 1, 2])
    a = intra_video_infonce(q, k, neg, 0.5, qv, neg_ids)
    neg2 = neg.clone()
    neg2[0] = torch.randn(8)  # only video 0's entry; query 0 masks it, queries 1, 2 see it
    b = intra_video_infonce(q[:1], k[:1], neg2, 0.5, qv[:1], neg_ids)
    assert torch.allclose(intra_video_infonce(q[:1], k[:1], neg, 0.5, qv[:1], neg_ids), b)
    assert not torch.allclose(a, intra_video_infonce(q, k, neg2, 0.5, qv, neg_ids))


def test_memory_bank_is_fifo_with_video_ids():
    bank = MemoryBank(5, 4)
    x = torch.randn(3, 4, requires_grad=True)
    bank.enqueue(x, torch.tensor([1, 2, 3]))
    assert len(bank) == 3 and bank.video_ids().tolist() == [1, 2, 3]
    assert not bank.embeddings().requires_grad
    assert torch.allclose(bank.embeddings().norm(dim=-1), torch.ones(3))
    bank.enqueue(torch.randn(4, 4), torch.tensor([4, 5, 6, 7]))
    assert len(bank) == 5 and sorted(bank.video_ids().tolist()) == [3, 4, 5, 6, 7]  # 1, 2 were the oldest
    bank.enqueue(torch.randn(7, 4), torch.arange(10, 17))
    assert sorted(bank.video_ids().tolist()) == [12, 13, 14, 15, 16]
    with pytest.raises(ValueError, match="expected embeddings"):
        bank.enqueue(torch.randn(2, 3), torch.tensor([0, 1]))


def test_training_lowers_the_loss_and_keeps_a_momentum_copy():
    videos = make_videos(4, 4, 4, 32, seed=0)
    enc = build_encoder("cycle", {"backbone": "clip", "backbone_config": {"image_size": 32, "patch_size": 8}})
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    run = train_cycle_contrast(enc, videos, steps=40, lam=1.0, batch_size=8, queue_size=8, cycle_queue_size=16,
                               progress=False)
    hist = run["history"]
    assert np.mean(hist["loss"][-6:]) < np.mean(hist["loss"][2:8])
    assert all(np.isfinite(hist["loss"])) and max(hist["cycle"]) > 0 and hist["cycle_valid"][-1] == 1.0
    assert set(run["cycle_bank"].video_ids().tolist()) <= set(videos.video_ids.tolist())
    assert run["heads"] is enc.objective_heads
    changed = [k for k, v in enc.state_dict().items() if not torch.equal(v, before[k])]
    assert changed
    key = run["key_encoder"].state_dict()
    assert any(not torch.equal(key[k], enc.state_dict()[k]) for k in changed)  # EMA lags the query
    assert not any(p.requires_grad for p in run["key_encoder"].parameters())


def test_training_rejects_single_frame_videos():
    enc = build_encoder("clip", {"image_size": 32, "patch_size": 8})
    with pytest.raises(ValueError, match=">= 2 frames"):
        train_cycle_contrast(enc, np.zeros((4, 1, 32, 32, 3), np.uint8), steps=1, progress=False)
