"""Florence-2 location tokens: boxes as `<loc_i>` strings with 1000 bins per axis.

Florence-2 writes every coordinate as one of 1000 special tokens so that detection,
grounding and region captioning become plain text generation. A coordinate `c` on an
axis of length `size` goes to bin `floor(c / size * 1000)` clipped to 0..999; a bin
decodes to its centre `(i + 0.5) * size / 1000`. The decoded coordinate is therefore
within one bin width (`size / 1000`) of the original for every `c` in `[0, size]`.

A region string is a sequence of `label<loc_x0><loc_y0><loc_x1><loc_y1>` groups, e.g.
`red circle<loc_12><loc_40><loc_88><loc_120>blue square<loc_...>...`; a label followed by
several groups of four tokens names several boxes (Florence-2 writes `<OD>` that way).

The binning is the rule of transformers' `Florence2PostProcessor.quantize` / `dequantize`, written here for
scalars because this module sits under every other layer and must not import torch or transformers (the
synthetic generator runs in plain worker processes); `tests/test_data_loc.py` checks that both give the
same bins and the same centres (the library truncates a centre to whole pixels, this module keeps it exact).
"""
from __future__ import annotations

import math
import re
from typing import Iterable, Sequence

NUM_BINS = 1000

_LOC_RE = re.compile(r"<loc_(\d+)>")
# One label (anything up to the next '<') followed by one or more <loc_i> tokens.
_GROUP_RE = re.compile(r"([^<]*)((?:<loc_\d+>)+)")

Box = tuple[float, float, float, float]


def quantize(coord: float, size: float) -> int:
    """Bin index of `coord` on an axis of length `size` (floor, clipped to 0..999)."""
    if size <= 0:
        raise ValueError(f"axis size must be positive, got {size!r}")
    return min(NUM_BINS - 1, max(0, math.floor(coord / size * NUM_BINS)))


def dequantize(index: int, size: float) -> float:
    """Centre of bin `index` in pixels on an axis of length `size`."""
    if not 0 <= index < NUM_BINS:
        raise ValueError(f"location bin must be in 0..{NUM_BINS - 1}, got {index}")
    return (index + 0.5) * size / NUM_BINS


def box_to_loc(box_xyxy: Sequence[float], width: float, height: float) -> str:
    """`(x0, y0, x1, y1)` in pixels -> `"<loc_a><loc_b><loc_c><loc_d>"`."""
    if len(box_xyxy) != 4:
        raise ValueError(f"a box needs 4 numbers (x0, y0, x1, y1), got {box_xyxy!r}")
    x0, y0, x1, y1 = box_xyxy
    bins = (quantize(x0, width), quantize(y0, height), quantize(x1, width), quantize(y1, height))
    return "".join(f"<loc_{b}>" for b in bins)


def loc_to_box(tokens: str, width: float, height: float) -> Box:
    """`"<loc_a><loc_b><loc_c><loc_d>"` -> box in pixels (bin centres)."""
    bins = [int(m) for m in _LOC_RE.findall(tokens)]
    if len(bins) != 4 or _LOC_RE.sub("", tokens).strip():
        raise ValueError(f"expected exactly four <loc_i> tokens, got {tokens!r}")
    return _bins_to_box(bins, width, height)


def _bins_to_box(bins: Sequence[int], width: float, height: float) -> Box:
    a, b, c, d = bins
    return (dequantize(a, width), dequantize(b, height), dequantize(c, width), dequantize(d, height))


def region_string(regions: Iterable[tuple[str, Sequence[float]]], width: float, height: float) -> str:
    """[(label, box_xyxy), ...] -> `label<loc..>x4label<loc..>x4...` (the `<OD>` / dense-region format)."""
    parts = []
    for label, box in regions:
        if "<" in label or ">" in label:
            raise ValueError(f"a region label cannot contain '<' or '>': {label!r}")
        parts.append(label + box_to_loc(box, width, height))
    return "".join(parts)


def parse_region_string(s: str, width: float = NUM_BINS, height: float = NUM_BINS) -> list[tuple[str, Box]]:
    """`label<loc..>x4...` -> [(label, box), ...] with boxes in pixels of a `width` x `height` image.

    With the default size 1000 the boxes are in bin units (centres). A label followed by
    4k tokens yields k boxes with that label; a group with no label inherits the previous
    one. Raises ValueError when a token group is not a multiple of four, or text follows the
    last group, so that malformed model output is never silently truncated.
    """
    out: list[tuple[str, Box]] = []
    pos = 0
    label = ""
    for m in _GROUP_RE.finditer(s):
        if m.start() != pos:
            raise ValueError(f"unexpected text at position {pos} of region string {s!r}")
        pos = m.end()
        text = m.group(1).strip()
        if text:
            label = text
        elif not out:
            raise ValueError(f"region string starts with location tokens but no label: {s!r}")
        bins = [int(x) for x in _LOC_RE.findall(m.group(2))]
        if len(bins) % 4:
            raise ValueError(f"label {label!r} has {len(bins)} location tokens, not a multiple of 4, in {s!r}")
        for k in range(0, len(bins), 4):
            out.append((label, _bins_to_box(bins[k:k + 4], width, height)))
    if s[pos:].strip():
        raise ValueError(f"text {s[pos:]!r} after the last box in region string {s!r}")
    return out
