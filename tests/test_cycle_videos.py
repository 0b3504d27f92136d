"""Synthetic moving-shape videos: deterministic, class = shape, per-video nuisance, flagged degradation."""
from __future__ import annotations

import numpy as np
import pytest

from workbench.data.videos import SHAPES, make_videos


def test_shapes_dtypes_and_labels():
    vs = make_videos(5, 3, 4, 32, seed=1)
    assert vs.frames.shape == (15, 4, 32, 32, 3) and vs.frames.dtype == np.uint8
    assert vs.labels.tolist() == [c for c in range(5) for _ in range(3)]
    assert vs.class_names == list(SHAPES[:5])
    assert vs.degraded.shape == (15, 4) and not vs.degraded.any()
    assert vs.boxes.shape == (15, 4, 4)
    caps = vs.captions()
    assert all(vs.class_names[label] in cap for label, cap in zip(vs.labels, caps))


def test_deterministic_and_independent_of_the_number_of_videos():
    a = make_videos(4, 3, 4, 32, seed=7)
    b = make_videos(4, 3, 4, 32, seed=7)
    assert np.array_equal(a.frames, b.frames)
    assert not np.array_equal(a.frames, make_videos(4, 3, 4, 32, seed=8).frames)
    more = make_videos(4, 6, 4, 32, seed=7)
    assert np.array_equal(a.frames[0], more.frames[0])  # video 0 depends only on (seed, 0)


def test_objects_move_and_nuisance_varies_across_videos():
    vs = make_videos(4, 6, 6, 32, seed=2)
    moved = np.abs(vs.boxes[:, 1:, :2] - vs.boxes[:, :-1, :2]).sum(-1) > 0
    assert moved.mean() > 0.9
    keys = {(a["colour"], a["background"], a["stripes"]) for a in vs.attributes}
    assert len(keys) > 12
    assert not np.array_equal(vs.frames[:, 0], vs.frames[:, -1])


def test_degradation_is_flagged_and_leaves_clean_frames_alone():
    clean = make_videos(4, 4, 8, 32, seed=3)
    deg = make_videos(4, 4, 8, 32, degrade_fraction=0.5, seed=3)
    assert 0.3 < deg.degraded.mean() < 0.7
    assert np.array_equal(deg.frames[~deg.degraded], clean.frames[~deg.degraded])
    diff = np.abs(deg.frames[deg.degraded].astype(int) - clean.frames[deg.degraded].astype(int)).mean()
    assert diff > 10
    only_noise = make_videos(4, 4, 8, 32, degrade_fraction=1.0, degradations=("noise",), seed=3)
    assert only_noise.degraded.all()


def test_split_is_by_video_and_stratified():
    vs = make_videos(4, 8, 2, 32, seed=0)
    train, test = vs.split(0.25, seed=0)
    assert len(train) == 24 and len(test) == 8
    assert not set(train.video_ids) & set(test.video_ids)
    assert np.bincount(test.labels).tolist() == [2, 2, 2, 2]


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="num_classes"):
        make_videos(num_classes=9)
    with pytest.raises(ValueError, match="unknown degradation"):
        make_videos(degrade_fraction=0.5, degradations=("rain",))
    with pytest.raises(ValueError, match="degrade_fraction"):
        make_videos(degrade_fraction=1.5)
