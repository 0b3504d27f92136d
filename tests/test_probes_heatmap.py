"""The Simple-Baselines heatmap probe and the stick-figure generator."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from probes.heatmap import (DeconvHead, JointsMSELoss, decode_heatmaps, flip_back, flip_test, gaussian_targets, pck,
                            to_heatmap_coords, to_image_coords, train_heatmap_probe)
from workbench.data.stick_figures import FLIP_PAIRS, make_stick_figures


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny convolutions: on a busy machine a second torch thread only adds contention."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def continuous_gaussian(h, w, x0, y0, sigma=2.0):
    yy, xx = np.mgrid[0:h, 0:w]
    return np.exp(-((xx - x0) ** 2 + (yy - y0) ** 2) / (2 * sigma ** 2))


def test_stick_figures_are_seeded_and_left_is_image_right():
    a = make_stick_figures(12, 48, seed=5, occlude_prob=0.5)
    b = make_stick_figures(12, 48, seed=5, occlude_prob=0.5)
    assert a.images.shape == (12, 48, 48, 3) and a.images.dtype == np.uint8
    assert np.array_equal(a.images, b.images) and np.array_equal(a.joints, b.joints)
    assert not np.array_equal(a.images, make_stick_figures(12, 48, seed=6).images)
    assert a.joints.shape == (12, 9, 2) and a.visible.shape == (12, 9)
    for left, right in FLIP_PAIRS:
        assert np.all(a.joints[:, left, 0] >= a.joints[:, right, 0])
    f = a.flipped()
    assert np.array_equal(f.images, a.images[:, :, ::-1])
    for left, right in FLIP_PAIRS:       # the rule still holds after mirroring and relabelling
        assert np.all(f.joints[:, left, 0] >= f.joints[:, right, 0])
    assert np.allclose(f.flipped().joints, a.joints) and a.tensor().shape == (12, 3, 48, 48)


def test_decoding_recovers_planted_peak_within_a_quarter_pixel():
    rng = np.random.default_rng(0)
    pts = rng.uniform(2, 29, size=(50, 2))
    hm = np.stack([continuous_gaussian(32, 32, x, y) for x, y in pts])[None]
    uv, peak = decode_heatmaps(torch.from_numpy(hm).float())
    assert uv.shape == (1, 50, 2) and np.all(peak > 0.9)
    assert np.abs(uv[0] - pts).max() <= 0.25 + 1e-6
    # the quarter shift is what gets it there: plain argmax is off by up to 0.5
    exact = np.stack([continuous_gaussian(32, 32, 10.4, 7.0)])[None]
    assert decode_heatmaps(torch.from_numpy(exact).float())[0][0, 0].tolist() == [10.25, 7.0]


def test_targets_weights_coordinates_and_loss():
    joints = np.array([[[5.2, 6.7], [-20.0, 3.0], [10.0, 10.0]]])
    t, w = gaussian_targets(joints, np.array([[True, True, False]]), (16, 16), sigma=2)
    assert t.shape == (1, 3, 16, 16) and t[0, 0, 7, 5] == pytest.approx(1.0) and t[0, 0].max() == 1.0
    assert w.tolist() == [[1.0, 0.0, 0.0]] and t[0, 1:].max() == 0   # off-map and invisible joints
    xy = np.array([[3.0, 7.0]])
    assert np.allclose(to_image_coords(to_heatmap_coords(xy, 4), 4), xy)
    assert np.allclose(to_heatmap_coords(np.array([[1.5, 1.5]]), 4), 0.0)   # centre of the first 4x4 cell
    pred = torch.zeros(1, 3, 16, 16)
    loss = JointsMSELoss()(pred, torch.from_numpy(t), torch.from_numpy(w))
    expected = 0.5 * (t[0, 0] ** 2).mean() / 3
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)


def test_flip_test_bookkeeping_on_a_symmetric_planted_case():
    W = H = 24
    joints = np.array([[[12, 3], [12, 6], [17, 8], [5, 9], [12, 13], [15, 16], [9, 17], [16, 21], [7, 20]]], float)
    flipped = joints.copy()
    flipped[..., 0] = W - 1 - flipped[..., 0]
    for a, b in FLIP_PAIRS:
        flipped[:, [a, b]] = flipped[:, [b, a]]
    hm = torch.from_numpy(gaussian_targets(joints, None, (H, W))[0])
    hm_f = torch.from_numpy(gaussian_targets(flipped, None, (H, W))[0])   # "prediction" on the mirrored image
    assert torch.allclose(flip_back(hm_f, FLIP_PAIRS), hm)
    merged = flip_test(hm, hm_f, FLIP_PAIRS, shift=False)
    assert torch.allclose(merged, hm)
    assert np.allclose(decode_heatmaps(merged)[0], joints)
    shifted = flip_test(hm, hm_f, FLIP_PAIRS, shift=True)
    moved = hm.clone()
    moved[..., 1:] = hm[..., :-1]
    assert torch.allclose(shifted, 0.5 * (hm + moved))
    # a stick-figure batch and its mirror give consistent targets too
    sf = make_stick_figures(4, 32, seed=1)
    t0 = torch.from_numpy(gaussian_targets(np.round(sf.joints), None, (32, 32))[0])
    t1 = torch.from_numpy(gaussian_targets(np.round(sf.flipped().joints), None, (32, 32))[0])
    assert torch.allclose(flip_back(t1, FLIP_PAIRS), t0)


def test_deconv_head_shapes_init_and_pck():
    x = torch.randn(2, 8, 4, 5)
    for n_deconv, scale in ((0, 1), (2, 4), (3, 8)):
        head = DeconvHead(8, 9, n_deconv=n_deconv, channels=16)
        assert head(x).shape == (2, 9, 4 * scale, 5 * scale)
    head = DeconvHead(8, 9, n_deconv=3, channels=64)
    w = head.deconv[0].weight
    assert head.deconv[0].bias is None and abs(float(w.detach().std()) - 0.001) < 0.0002
    assert torch.all(head.deconv[1].weight == 1) and torch.all(head.final.bias == 0)
    gt = np.zeros((2, 2, 2))
    pred = np.array([[[1.0, 0.0], [0.0, 3.0]], [[0.0, 0.5], [0.0, 0.0]]])
    overall, per_joint = pck(pred, gt, np.array([[True, True], [True, False]]), alpha=0.1, ref=20.0)
    assert overall == pytest.approx(2 / 3) and per_joint.tolist() == [1.0, 0.0]
    assert pck(pred, gt, None, 0.5, np.array([2.0, 10.0]))[0] == pytest.approx(3 / 4)


def _features(sf):
    """Downsampled image plus coordinate channels: local appearance and where it is."""
    x = F.avg_pool2d(sf.tensor(), 4)
    n, _, h, w = x.shape
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    return torch.cat([x, xx.expand(n, 1, h, w), yy.expand(n, 1, h, w)], 1)


def test_heatmap_probe_learns_to_localise():
    train = make_stick_figures(200, 32, seed=0)
    test = make_stick_figures(60, 32, seed=1)
    r = train_heatmap_probe(_features(train), train.joints, _features(test), test.joints, image_size=32,
                            train_visible=train.visible, test_visible=test.visible, flip_feats=_features(test.flipped()),
                            n_deconv=2, channels=16, epochs=6, batch_size=16, lr=3e-3, progress=False)
    assert r["heatmap_size"] == (32, 32) and len(r["curve"]) == 6 and len(r["per_joint"]) == 9
    assert r["pck"] > r["untrained"]["pck"] + 0.1
    assert r["pck"] > 4 * r["untrained"]["pck"]
    assert r["mean_px_error"] < 0.5 * r["untrained"]["mean_px_error"]
    assert r["curve"][-1]["loss"] < r["curve"][0]["loss"]
    assert 0 <= r["pck_flip"] <= 1 and 0 <= r["pck_flip_noshift"] <= 1 and "pck_flip_torso" in r
    with pytest.raises(ValueError, match="spatial"):
        train_heatmap_probe(np.zeros((4, 5, 6)), train.joints[:4], np.zeros((4, 5, 6)), test.joints[:4], image_size=32)
