"""SELSA aggregation: the properties that make it a set operation over the reference frames."""
from __future__ import annotations

import math

import pytest
import torch

from model.selsa import SELSA
from model.training.selsa import selsa_experiment

VARIANTS = [dict(heads=1, value_proj=False), dict(heads=2, value_proj=False), dict(heads=4, value_proj=True)]


def _module(seed=0, dim=16, init_std=0.3, **kw) -> SELSA:
    torch.manual_seed(seed)
    # a larger init than the paper's 0.01 so the affinity is far from uniform and the tests can fail
    return SELSA(dim, init_std=init_std, **kw)


@pytest.mark.parametrize("kw", VARIANTS)
def test_invariant_to_reference_order(kw):
    m = _module(**kw)
    key, ref = torch.randn(5, 16), torch.randn(9, 16)
    perm = torch.randperm(9)
    out, aff = m(key, ref)
    out_p, aff_p = m(key, ref[perm])
    assert torch.allclose(out, out_p, atol=1e-6)
    assert torch.allclose(aff[:, perm], aff_p, atol=1e-6)


@pytest.mark.parametrize("kw", VARIANTS)
def test_affinity_rows_sum_to_one_and_are_not_uniform(kw):
    m = _module(**kw)
    _, aff = m(torch.randn(6, 16), torch.randn(7, 16))
    assert aff.shape == (6, 7)
    assert torch.allclose(aff.sum(-1), torch.ones(6), atol=1e-6)
    assert (aff >= 0).all()
    assert aff.std() > 1e-3


@pytest.mark.parametrize("kw", VARIANTS)
def test_identity_when_wz_is_zero(kw):
    m = _module(**kw)
    key, ref = torch.randn(4, 16), torch.randn(5, 16)
    out, _ = m(key, ref)
    assert not torch.allclose(out, key)
    with torch.no_grad():
        m.z.weight.zero_()
        m.z.bias.zero_()
    out, _ = m(key, ref)
    assert torch.equal(out, key)


@pytest.mark.parametrize("kw", VARIANTS)
def test_duplicating_the_reference_set_changes_nothing(kw):
    m = _module(**kw)
    key, ref = torch.randn(3, 16), torch.randn(6, 16)
    out, aff = m(key, ref)
    out2, aff2 = m(key, torch.cat([ref, ref]))
    assert torch.allclose(out, out2, atol=1e-6)
    assert torch.allclose(aff2[:, :6] + aff2[:, 6:], aff, atol=1e-6)


def test_matches_the_paper_formula_single_head():
    m = _module(heads=1)
    key, ref = torch.randn(3, 16), torch.randn(4, 16)
    q, k = m.q(key), m.k(ref)
    w = torch.softmax(q @ k.t() / math.sqrt(16), -1)
    expected = key + m.z(w @ ref)
    out, aff = m(key, ref)
    assert torch.allclose(out, expected, atol=1e-6)
    assert torch.allclose(aff, w, atol=1e-6)


def test_batched_with_mask_equals_unbatched():
    m = _module(heads=2)
    key = torch.randn(2, 3, 16)
    ref = torch.randn(2, 5, 16)
    mask = torch.tensor([[True, True, True, True, True], [True, False, True, False, False]])
    out, aff = m(key, ref, mask)
    out0, _ = m(key[0], ref[0])
    out1, aff1 = m(key[1], ref[1][mask[1]])
    assert torch.allclose(out[0], out0, atol=1e-6)
    assert torch.allclose(out[1], out1, atol=1e-6)
    assert torch.allclose(aff[1][:, mask[1]], aff1, atol=1e-6)
    assert (aff[1][:, ~mask[1]] == 0).all()


def test_paper_init_and_gradients():
    m = SELSA(32)
    assert 0.005 < m.q.weight.std() < 0.02 and (m.z.bias == 0).all()
    out, _ = m(torch.randn(4, 32), torch.randn(6, 32))
    out.pow(2).sum().backward()
    for layer in (m.q, m.k, m.z):
        assert layer.weight.grad.abs().sum() > 0


def test_bad_shapes_are_named():
    m = SELSA(8, heads=2)
    with pytest.raises(ValueError, match="width must be 8"):
        m(torch.randn(2, 4), torch.randn(3, 4))
    with pytest.raises(ValueError, match="x_ref is empty"):
        m(torch.randn(2, 8), torch.randn(0, 8))
    with pytest.raises(ValueError, match="multiple of heads"):
        SELSA(10, heads=3)


def test_experiment_runs_end_to_end_at_toy_size():
    res = selsa_experiment(train_videos_per_class=3, test_videos_per_class=2, frames=4, size=24, steps=3,
                           batch_videos=4, width=8, progress=False)
    for model in ("single_frame", "selsa", "selsa_self_only"):
        for split in ("degraded", "clean", "all"):
            acc = res[model][split]
            assert math.isnan(acc) or 0.0 <= acc <= 1.0
    assert 0.0 <= res["affinity_on_clean_refs"]["uniform_share"] <= 1.0
    assert len(res["history"]["selsa"]) == 3
    assert res["setup"]["test_videos"] == 8
