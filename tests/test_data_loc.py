"""Florence-2 location tokens: quantisation bounds and round trips (hypothesis properties)."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from workbench.data.loc_tokens import (
    NUM_BINS,
    box_to_loc,
    dequantize,
    loc_to_box,
    parse_region_string,
    quantize,
    region_string,
)

sizes = st.integers(min_value=1, max_value=5000)


@st.composite
def image_and_box(draw):
    w, h = draw(sizes), draw(sizes)
    xs = sorted(draw(st.floats(0, w, allow_nan=False)) for _ in range(2))
    ys = sorted(draw(st.floats(0, h, allow_nan=False)) for _ in range(2))
    return w, h, (xs[0], ys[0], xs[1], ys[1])


labels = st.text(alphabet="abcdefghijklmnopqrstuvwxyz 0123456789", min_size=1, max_size=20).map(str.strip).filter(bool)


@settings(max_examples=300, deadline=None)
@given(size=sizes, frac=st.floats(0, 1, allow_nan=False))
def test_quantize_dequantize_within_one_bin(size, frac):
    coord = frac * size
    b = quantize(coord, size)
    assert 0 <= b < NUM_BINS
    assert abs(dequantize(b, size) - coord) <= size / NUM_BINS + 1e-9


@settings(max_examples=300, deadline=None)
@given(image_and_box())
def test_box_round_trip_within_one_bin(case):
    w, h, box = case
    tokens = box_to_loc(box, w, h)
    assert tokens.count("<loc_") == 4
    decoded = loc_to_box(tokens, w, h)
    for got, want, size in zip(decoded, box, (w, h, w, h)):
        assert abs(got - want) <= size / NUM_BINS + 1e-9
    # decoding then encoding again is a fixed point: the tokens are canonical
    assert box_to_loc(decoded, w, h) == tokens


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(labels, image_and_box()), min_size=1, max_size=5))
def test_region_string_round_trip(regions):
    w, h = regions[0][1][0], regions[0][1][1]
    pairs = [(label, tuple(min(c, s) for c, s in zip(box, (w, h, w, h)))) for label, (_, _, box) in regions]
    s = region_string(pairs, w, h)
    parsed = parse_region_string(s, w, h)
    assert [p[0] for p in parsed] == [p[0] for p in pairs]
    for (_, got), (_, want) in zip(parsed, pairs):
        assert all(abs(g - x) <= size / NUM_BINS + 1e-9 for g, x, size in zip(got, want, (w, h, w, h)))


def test_quantize_examples_and_clipping():
    assert quantize(0, 384) == 0
    assert quantize(384, 384) == 999  # the far edge clips into the last bin
    assert quantize(-5, 384) == 0
    assert quantize(191.99, 384) == 499 and quantize(192, 384) == 500
    assert dequantize(0, 1000) == 0.5
    assert box_to_loc((0, 0, 100, 50), 100, 100) == "<loc_0><loc_0><loc_999><loc_500>"


def test_parse_region_string_forms():
    s = "red circle<loc_12><loc_40><loc_88><loc_120>blue square<loc_1><loc_2><loc_3><loc_4>"
    out = parse_region_string(s)
    assert [lab for lab, _ in out] == ["red circle", "blue square"]
    assert out[0][1] == (12.5, 40.5, 88.5, 120.5)
    # Florence-2 <OD> writes several boxes after one label
    two = parse_region_string("car<loc_1><loc_2><loc_3><loc_4><loc_5><loc_6><loc_7><loc_8>")
    assert [lab for lab, _ in two] == ["car", "car"] and two[1][1][0] == 5.5
    assert parse_region_string("") == []


@pytest.mark.parametrize("bad", [
    "red<loc_1><loc_2><loc_3>",                 # not a multiple of four
    "<loc_1><loc_2><loc_3><loc_4>",             # no label
    "red<loc_1><loc_2><loc_3><loc_4>trailing",  # text after the last box
    "red<loc_1><loc_2><loc_3><loc_1000>",       # bin out of range
])
def test_parse_region_string_rejects_malformed(bad):
    with pytest.raises(ValueError):
        parse_region_string(bad)


def test_loc_to_box_needs_exactly_four_tokens():
    with pytest.raises(ValueError, match="four"):
        loc_to_box("<loc_1><loc_2><loc_3>", 10, 10)
    with pytest.raises(ValueError, match="label"):
        region_string([("a<b", (0, 0, 1, 1))], 10, 10)


def test_binning_equals_transformers_florence2_post_processor():
    """The scalar rule here is the library's: same bins and centres for boxes anywhere on the image."""
    import types

    import torch
    from transformers.models.florence2.processing_florence2 import Florence2PostProcessor

    post = Florence2PostProcessor(None, types.SimpleNamespace(all_special_tokens=[]))
    rng = np.random.default_rng(0)
    size = (640, 427)
    boxes = rng.uniform(-5, 700, size=(200, 4))
    ours = [[quantize(b[0], size[0]), quantize(b[1], size[1]), quantize(b[2], size[0]), quantize(b[3], size[1])]
            for b in boxes]
    theirs = post.quantize(torch.tensor(boxes, dtype=torch.float64), size).tolist()
    assert ours == theirs
    centres = post.dequantize(torch.tensor(ours, dtype=torch.float64), size).numpy()
    ours_centres = [[dequantize(q[0], size[0]), dequantize(q[1], size[1]), dequantize(q[2], size[0]),
                     dequantize(q[3], size[1])] for q in ours]
    # the library truncates a centre to whole pixels; the synthetic targets keep the sub-pixel centre
    np.testing.assert_array_equal(np.trunc(ours_centres), centres)
