"""Seeded synthetic scenes: coloured shapes and rendered words with full ground truth.

Why synthetic: every attribute a probe, a VQA score or an attribution map needs (colour,
shape, count, position, the word and where it is) is known exactly, the difficulty is
controlled, and nothing is downloaded. Lessons from the prototype (offline-assets.md §5)
are built in: objects never overlap or touch (rejection sampling with a margin), and the
words come from a 64-word vocabulary with varied size, position and colour.

`generate_scene(seed)` is a pure function of its arguments: the same seed gives the same
pixels and the same truth on every run. `render=False` gives the truth without drawing,
which is what a resumed `fvl data synth` uses for images already on disk.

All answers are single lowercase words or digits, so a VQA answer is right or wrong by exact
match after `normalize_answer`.
"""
from __future__ import annotations

import functools
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from workbench.data.loc_tokens import region_string

GENERATOR_VERSION = "scenes-1"

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star")
# Hues far apart plus black (every pair > 100 apart in RGB; orange was dropped for being
# too close to red and yellow), all saturated enough to stand out on a light background.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "yellow": (230, 200, 0),
    "green": (40, 160, 60),
    "cyan": (0, 180, 200),
    "blue": (35, 75, 215),
    "purple": (150, 40, 170),
    "black": (25, 25, 25),
}
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)
TEXT_COLORS: tuple[str, ...] = ("red", "green", "blue", "purple", "black")  # yellow/cyan text is hard to read
SIZES: tuple[str, ...] = ("small", "large")
# Font size of a rendered word as a fraction of the image side (min, max).
TEXT_SIZE_RANGE: tuple[float, float] = (0.07, 0.11)
# Half-extent of an object as a fraction of the image side, per size class (min, max).
SIZE_RANGES: dict[str, tuple[float, float]] = {"small": (0.055, 0.07), "large": (0.1, 0.125)}
# Short concrete English words; none is a colour, shape, size or answer word.
WORDS: tuple[str, ...] = (
    "apple", "bag", "ball", "bear", "bed", "bell", "bike", "boat", "book", "box", "bus", "cake",
    "car", "cat", "cloud", "coat", "cow", "cup", "desk", "dog", "door", "duck", "egg", "fan",
    "farm", "fish", "flag", "frog", "game", "gate", "goat", "hat", "hill", "home", "horse", "jam",
    "key", "kite", "lamp", "leaf", "lion", "map", "milk", "moon", "nest", "owl", "pen", "pig",
    "rain", "ring", "road", "rock", "rose", "sea", "ship", "shoe", "sock", "tent", "toy", "train",
    "tree", "van", "wind", "wolf",
)
BACKGROUNDS: tuple[str, ...] = ("plain", "noise")
QUADRANTS: tuple[str, ...] = ("top_left", "top_right", "bottom_left", "bottom_right")
QA_TYPES: tuple[str, ...] = ("count", "color", "shape", "position", "reading", "existence")
MAX_OBJECTS = 4
MAX_WORDS = 2
# Every answer a question of each type can have. Position questions offer two options
# ("left or right?", "top or bottom?"), so guessing is right half of the time.
ANSWER_SETS: dict[str, tuple[str, ...]] = {
    "count": tuple(str(k) for k in range(1, MAX_OBJECTS + 1)),
    "color": COLOR_NAMES,
    "shape": SHAPES,
    "position": ("left", "right", "top", "bottom"),
    "reading": WORDS,
    "existence": ("yes", "no"),
}
# Accuracy of a uniform guess among the options a question of that type allows.
CHANCE: dict[str, float] = {
    "count": 1 / len(ANSWER_SETS["count"]),
    "color": 1 / len(COLOR_NAMES),
    "shape": 1 / len(SHAPES),
    "position": 1 / 2,
    "reading": 1 / len(WORDS),
    "existence": 1 / 2,
}
LABEL_NAMES: tuple[str, ...] = (
    "n_objects", "n_words", "has_text", "word", "main_color", "main_shape", "main_size",
    "main_x", "main_y", "main_quadrant", "background",
)
MIN_IMAGE_SIZE = 64
_NUMBER_WORDS = {"zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6"}
_COUNT_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    size: str
    bbox: tuple[int, int, int, int]  # tight pixel box x0, y0, x1, y1
    center: tuple[int, int]
    radius: int  # half-extent of the square the shape is drawn in

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"


@dataclass(frozen=True)
class SceneWord:
    text: str
    color: str
    font_size: int
    xy: tuple[int, int]  # where the text was drawn (Pillow's default "la" anchor)
    bbox: tuple[int, int, int, int]  # ImageDraw.textbbox of the drawn text


@dataclass(frozen=True)
class QA:
    question: str
    answer: str
    type: str
    refs: tuple[str, ...] = ()  # "object:i" / "word:i" the question is about (attribution targets)


@dataclass
class Scene:
    seed: int
    image_size: int
    background: str
    background_color: tuple[int, int, int]
    objects: list[SceneObject]
    words: list[SceneWord]  # in reading order
    caption: str = ""
    detailed_caption: str = ""
    ocr: str = ""
    od: str = ""  # Florence-2 <OD> target: "circle<loc..>x4..."
    regions: str = ""  # Florence-2 <DENSE_REGION_CAPTION> target: "red circle<loc..>x4..."
    qa: list[QA] = field(default_factory=list)
    labels: dict[str, Any] = field(default_factory=dict)
    image: Image.Image | None = None

    def to_dict(self) -> dict[str, Any]:
        """Everything but the pixels, JSON-ready (tuples become lists)."""
        d = asdict(self)
        d.pop("image")
        d["generator"] = GENERATOR_VERSION
        return d


def normalize_answer(text: str) -> str:
    """Lowercase, strip punctuation/articles/quotes and map number words to digits.

    Used on both sides of an exact-match VQA comparison.
    """
    t = re.sub(r"[^a-z0-9 ]+", " ", str(text).lower())
    tokens = [_NUMBER_WORDS.get(w, w) for w in t.split() if w not in ("a", "an", "the")]
    return " ".join(tokens)


@functools.lru_cache(maxsize=256)
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def _boxes_apart(a: tuple[int, int, int, int], b: tuple[int, int, int, int], margin: int) -> bool:
    """True when boxes a and b have a gap of at least `margin` pixels on some axis."""
    return a[2] + margin <= b[0] or b[2] + margin <= a[0] or a[3] + margin <= b[1] or b[3] + margin <= a[1]


def _shape_points(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Polygon vertices of a shape drawn in the square of half-side r around (cx, cy)."""
    if shape == "square":
        s = r * 0.9
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + 0.8 * r), (cx - r, cy + 0.8 * r)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + 0.75 * r, cy), (cx, cy + r), (cx - 0.75 * r, cy)]
    if shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else 0.45 * r
            ang = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + rad * math.cos(ang), cy + rad * math.sin(ang)))
        return pts
    raise ValueError(f"unknown shape {shape!r}; choose one of {SHAPES}")


def _shape_bbox(shape: str, cx: int, cy: int, r: int) -> tuple[int, int, int, int]:
    if shape == "circle":
        return (cx - r, cy - r, cx + r, cy + r)
    pts = _shape_points(shape, cx, cy, r)
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    return (math.floor(min(xs)), math.floor(min(ys)), math.ceil(max(xs)), math.ceil(max(ys)))


def _grid_position(cx: float, cy: float, size: int) -> str:
    """'top left', 'top', 'center', ... from thirds of the image."""
    col = ("left", "", "right")[min(2, int(3 * cx / size))]
    row = ("top", "", "bottom")[min(2, int(3 * cy / size))]
    return " ".join(p for p in (row, col) if p) or "center"


def _position_phrase(where: str) -> str:
    if where == "center":
        return "in the center"
    if where in ("top", "bottom"):
        return f"at the {where}"
    if where in ("left", "right"):
        return f"on the {where}"
    return f"in the {where}"


def _quadrant(cx: float, cy: float, size: int) -> str:
    return f"{'top' if cy < size / 2 else 'bottom'}_{'left' if cx < size / 2 else 'right'}"


def _a(word: str) -> str:
    """Indefinite article for `word` ("an orange ...", "a red ...")."""
    return "an" if word[:1] in "aeiou" else "a"


def _join(items: list[str]) -> str:
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def check_text_size(text_size) -> tuple[float, float]:
    """(min, max) font size as a fraction of the image side; ValueError naming the fix otherwise."""
    try:
        lo, hi = (float(v) for v in text_size)
    except (TypeError, ValueError):
        raise ValueError(f"text_size {text_size!r}: give two fractions of the image side, e.g. (0.07, 0.11)") from None
    if not 0.02 <= lo <= hi <= 0.25:
        raise ValueError(f"text_size {text_size!r}: need 0.02 <= min <= max <= 0.25 (fractions of the image side; "
                         f"default {TEXT_SIZE_RANGE})")
    return lo, hi


def check_words(words) -> tuple[str, ...]:
    """The reading vocabulary as a tuple of distinct lower-case words; ValueError naming the fix otherwise.

    Why a vocabulary can be chosen: with the default 64 words a few hundred training scenes show each word a
    handful of times, too few for a small VLM to learn to read; a benchmark that must show reading uses a few
    words that differ in length and outline (words that share most letters, such as cat / car / hat, stay
    unread by a tiny tower at 128 px: docs/compare.md)."""
    if isinstance(words, str) or not isinstance(words, (list, tuple)):
        raise ValueError(f"words {words!r}: give a list of words, e.g. ['cat', 'dog', 'car']")
    out = tuple(words)
    bad = [w for w in out if not (isinstance(w, str) and w.isascii() and w.isalpha() and w.islower())]
    if bad:
        raise ValueError(f"words: {bad!r} are not lower-case ASCII words; use letters a-z only")
    if len(set(out)) != len(out) or len(out) < MAX_WORDS:
        raise ValueError(f"words: need at least {MAX_WORDS} distinct words (a scene shows up to {MAX_WORDS} "
                         f"different ones), got {list(out)}")
    return out


def reading_chance(words: tuple[str, ...] = WORDS) -> float:
    """Accuracy of a uniform guess at a reading question over the vocabulary `words`."""
    return 1 / len(words)


def _reading_order(words: list[SceneWord]) -> list[SceneWord]:
    """Top-to-bottom lines, left-to-right within a line (a line = vertical overlap > half height)."""
    rest = sorted(words, key=lambda w: (w.bbox[1], w.bbox[0]))
    lines: list[list[SceneWord]] = []
    for w in rest:
        if lines:
            ref = lines[-1][0]
            overlap = min(ref.bbox[3], w.bbox[3]) - max(ref.bbox[1], w.bbox[1])
            if overlap > 0.5 * min(ref.bbox[3] - ref.bbox[1], w.bbox[3] - w.bbox[1]):
                lines[-1].append(w)
                continue
        lines.append([w])
    return [w for line in lines for w in sorted(line, key=lambda w: w.bbox[0])]


def _place_objects(rng: np.random.Generator, size: int, n: int, margin: int) -> list[SceneObject]:
    objects: list[SceneObject] = []
    taken: set[tuple[str, str]] = set()
    for _ in range(n):
        while True:  # colour-shape pairs are unique, so "the red circle" always names one object
            shape = SHAPES[int(rng.integers(len(SHAPES)))]
            color = COLOR_NAMES[int(rng.integers(len(COLOR_NAMES)))]
            if (color, shape) not in taken:
                break
        size_name = SIZES[int(rng.integers(len(SIZES)))]
        lo, hi = SIZE_RANGES[size_name]
        r = max(3, round(size * float(rng.uniform(lo, hi))))
        for _try in range(100):
            cx = int(rng.integers(r + margin, size - r - margin + 1))
            cy = int(rng.integers(r + margin, size - r - margin + 1))
            square = (cx - r, cy - r, cx + r, cy + r)
            if all(_boxes_apart(square, (o.center[0] - o.radius, o.center[1] - o.radius,
                                         o.center[0] + o.radius, o.center[1] + o.radius), margin)
                   for o in objects):
                objects.append(SceneObject(shape, color, size_name, _shape_bbox(shape, cx, cy, r), (cx, cy), r))
                taken.add((color, shape))
                break
    return objects


def _place_words(rng: np.random.Generator, size: int, n: int, margin: int,
                 objects: list[SceneObject], text_size: tuple[float, float] = TEXT_SIZE_RANGE,
                 vocabulary: tuple[str, ...] = WORDS) -> list[SceneWord]:
    words: list[SceneWord] = []
    blocked = [(o.center[0] - o.radius, o.center[1] - o.radius, o.center[0] + o.radius, o.center[1] + o.radius)
               for o in objects]
    used_text: set[str] = set()
    used_color: set[str] = set()
    for _ in range(n):
        text = vocabulary[int(rng.integers(len(vocabulary)))]
        while text in used_text:
            text = vocabulary[int(rng.integers(len(vocabulary)))]
        color = TEXT_COLORS[int(rng.integers(len(TEXT_COLORS)))]
        while color in used_color:  # distinct colours let "the word in blue" name one word
            color = TEXT_COLORS[int(rng.integers(len(TEXT_COLORS)))]
        font_size = max(10, round(size * float(rng.uniform(*text_size))))
        for _try in range(60):
            l, t, r, b = _font(font_size).getbbox(text)
            x_lo, x_hi = margin - l, size - margin - r
            y_lo, y_hi = margin - t, size - margin - b
            if x_hi < x_lo or y_hi < y_lo:
                font_size = max(10, font_size - 2)
                continue
            x = int(rng.integers(x_lo, x_hi + 1))
            y = int(rng.integers(y_lo, y_hi + 1))
            box = (x + l, y + t, x + r, y + b)
            if all(_boxes_apart(box, other, margin) for other in blocked):
                words.append(SceneWord(text, color, font_size, (x, y), box))
                blocked.append(box)
                used_text.add(text)
                used_color.add(color)
                break
            if _try % 20 == 19:
                font_size = max(10, font_size - 2)  # a crowded scene gets a smaller word, not none
    return _reading_order(words)


def _captions(objects: list[SceneObject], words: list[SceneWord], background: str, size: int) -> tuple[str, str]:
    ordered = sorted(range(len(objects)), key=lambda i: (objects[i].center[1], objects[i].center[0]))
    phrases = [f"{_a(objects[i].color)} {objects[i].color} {objects[i].shape}" for i in ordered]
    short = _join(phrases)
    if len(words) == 1:
        short += f' with the word "{words[0].text}"'
    elif words:
        short += " with the words " + _join([f'"{w.text}"' for w in words])
    short = short[0].upper() + short[1:] + "."
    n = len(objects)
    counts: dict[str, int] = {}
    for o in objects:
        counts[o.shape] = counts.get(o.shape, 0) + 1
    kinds = _join([f"{_COUNT_WORDS[c]} {s}{'s' if c > 1 else ''}" for s, c in sorted(counts.items(), key=lambda kv: SHAPES.index(kv[0]))])
    sentences = [f"There {'is' if n == 1 else 'are'} {_COUNT_WORDS[n]} shape{'s' if n > 1 else ''} "
                 f"on a {background if background == 'plain' else 'noisy'} light background: {kinds}."]
    for i in ordered:
        o = objects[i]
        where = _position_phrase(_grid_position(o.center[0], o.center[1], size))
        sentences.append(f"A {o.size} {o.color} {o.shape} is {where}.")
    if not words:
        sentences.append("There is no text.")
    for w in words:
        cx, cy = (w.bbox[0] + w.bbox[2]) / 2, (w.bbox[1] + w.bbox[3]) / 2
        sentences.append(f'The word "{w.text}" is written in {w.color} {_position_phrase(_grid_position(cx, cy, size))}.')
    return short, " ".join(sentences)


def _pick(rng: np.random.Generator, items: list):
    return items[int(rng.integers(len(items)))]


def _questions(rng: np.random.Generator, objects: list[SceneObject], words: list[SceneWord], size: int) -> list[QA]:
    qa: list[QA] = []
    n = len(objects)
    all_refs = tuple(f"object:{i}" for i in range(n))
    qa.append(QA("How many shapes are there?", str(n), "count", all_refs))
    # A second count question about one attribute, so counting is not only "count everything".
    if rng.integers(2):
        shape = _pick(rng, [o.shape for o in objects])
        refs = tuple(f"object:{i}" for i, o in enumerate(objects) if o.shape == shape)
        qa.append(QA(f"How many {shape}s are there?", str(len(refs)), "count", refs))
    else:
        color = _pick(rng, [o.color for o in objects])
        refs = tuple(f"object:{i}" for i, o in enumerate(objects) if o.color == color)
        qa.append(QA(f"How many {color} shapes are there?", str(len(refs)), "count", refs))

    def unique(key) -> list[int]:
        return [i for i, o in enumerate(objects) if sum(key(p) == key(o) for p in objects) == 1]

    # colour: refer to an object by its shape (or size and shape) when that names exactly one
    cands = unique(lambda o: o.shape)
    if cands:
        i = _pick(rng, cands)
        qa.append(QA(f"What color is the {objects[i].shape}?", objects[i].color, "color", (f"object:{i}",)))
    elif cands := unique(lambda o: (o.size, o.shape)):
        i = _pick(rng, cands)
        qa.append(QA(f"What color is the {objects[i].size} {objects[i].shape}?", objects[i].color, "color", (f"object:{i}",)))
    # shape: refer by colour (or size and colour)
    cands = unique(lambda o: o.color)
    if cands:
        i = _pick(rng, cands)
        qa.append(QA(f"What shape is the {objects[i].color} object?", objects[i].shape, "shape", (f"object:{i}",)))
    elif cands := unique(lambda o: (o.size, o.color)):
        i = _pick(rng, cands)
        qa.append(QA(f"What shape is the {objects[i].size} {objects[i].color} object?", objects[i].shape, "shape", (f"object:{i}",)))
    # position: only when the object is clearly off the middle line of the asked axis
    options = []
    for i, o in enumerate(objects):
        if abs(o.center[0] / size - 0.5) >= 0.1:
            options.append((i, "x"))
        if abs(o.center[1] / size - 0.5) >= 0.1:
            options.append((i, "y"))
    if options:
        i, axis = _pick(rng, options)
        o = objects[i]
        if axis == "x":
            q, a = f"Is the {o.name} on the left or the right?", "left" if o.center[0] < size / 2 else "right"
        else:
            q, a = f"Is the {o.name} at the top or the bottom?", "top" if o.center[1] < size / 2 else "bottom"
        qa.append(QA(q, a, "position", (f"object:{i}",)))
    # reading
    if len(words) == 1:
        qa.append(QA("What word is written in the image?", words[0].text, "reading", ("word:0",)))
    elif words:
        j = int(rng.integers(len(words)))
        qa.append(QA(f"What word is written in {words[j].color}?", words[j].text, "reading", (f"word:{j}",)))
    # existence (POPE-style): one present and one absent colour-shape pair per scene, so the
    # answers are exactly half "yes"; half of the negatives share the colour or the shape of
    # a present object (adversarial), the rest are random absent pairs.
    i = int(rng.integers(n))
    pos = QA(f"Is there {_a(objects[i].color)} {objects[i].name} in the image?", "yes", "existence", (f"object:{i}",))
    present = {(o.color, o.shape) for o in objects}
    absent = [(c, s) for c in COLOR_NAMES for s in SHAPES if (c, s) not in present]
    if rng.integers(2):
        near = [(c, s) for (c, s) in absent if any(c == o.color or s == o.shape for o in objects)]
        absent = near or absent
    c, s = _pick(rng, absent)
    neg = QA(f"Is there {_a(c)} {c} {s} in the image?", "no", "existence", ())
    qa.extend([pos, neg] if rng.integers(2) else [neg, pos])
    return qa


def _labels(objects: list[SceneObject], words: list[SceneWord], background: str, size: int) -> dict[str, Any]:
    main = max(range(len(objects)), key=lambda i: (objects[i].radius, -i))
    o = objects[main]
    return {
        "n_objects": len(objects),
        "n_words": len(words),
        "has_text": int(bool(words)),
        "word": words[0].text if words else "none",
        "main_color": o.color,
        "main_shape": o.shape,
        "main_size": o.size,
        "main_x": round(o.center[0] / size, 4),
        "main_y": round(o.center[1] / size, 4),
        "main_quadrant": _quadrant(o.center[0], o.center[1], size),
        "background": background,
    }


def _render(size: int, background: str, bg_color: tuple[int, int, int], objects: list[SceneObject],
            words: list[SceneWord], rng: np.random.Generator) -> Image.Image:
    if background == "noise":
        base = np.asarray(bg_color, dtype=np.int16)
        noise = rng.integers(-14, 15, size=(size, size, 1), dtype=np.int16)
        img = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB")
    else:
        img = Image.new("RGB", (size, size), bg_color)
    draw = ImageDraw.Draw(img)
    for o in objects:
        fill = COLORS[o.color]
        if o.shape == "circle":
            cx, cy, r = o.center[0], o.center[1], o.radius
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        else:
            draw.polygon(_shape_points(o.shape, o.center[0], o.center[1], o.radius), fill=fill)
    for w in words:
        draw.text(w.xy, w.text, font=_font(w.font_size), fill=COLORS[w.color])
    return img


def generate_scene(seed: int, image_size: int = 384, *, n_objects: int | None = None,
                   n_words: int | None = None, render: bool = True,
                   text_size: tuple[float, float] = TEXT_SIZE_RANGE, words: tuple[str, ...] | None = None) -> Scene:
    """A deterministic scene: 1-4 shapes and 0-2 words on a light background, with its truth.

    `n_objects` / `n_words` fix the counts (otherwise uniform in 1..4 and 0..2); objects or
    words that cannot be placed without touching are dropped and the truth says so.
    `text_size` is the (min, max) font size as a fraction of the image side: at low resolution
    larger words keep the letters as many pixels tall as they would be in a larger image.
    `words` is the reading vocabulary (default `WORDS`): the objects and the number of words
    drawn for a seed do not depend on it; the words' texts and places do.
    """
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size {image_size} is too small for legible words; use at least {MIN_IMAGE_SIZE}")
    if n_objects is not None and not 1 <= n_objects <= MAX_OBJECTS:
        raise ValueError(f"n_objects must be in 1..{MAX_OBJECTS}, got {n_objects}")
    if n_words is not None and not 0 <= n_words <= MAX_WORDS:
        raise ValueError(f"n_words must be in 0..{MAX_WORDS}, got {n_words}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    text_size = check_text_size(text_size)
    vocabulary = WORDS if words is None else check_words(words)
    rng = np.random.default_rng(seed)
    size = int(image_size)
    margin = max(3, round(0.03 * size))
    background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    bg_color = tuple(int(v) for v in rng.integers(228, 256, size=3))
    n_obj = int(rng.integers(1, MAX_OBJECTS + 1)) if n_objects is None else n_objects
    n_wrd = int(rng.integers(0, MAX_WORDS + 1)) if n_words is None else n_words
    objects = _place_objects(rng, size, n_obj, margin)
    words = _place_words(rng, size, n_wrd, margin, objects, text_size, vocabulary)
    caption, detailed = _captions(objects, words, background, size)
    qa = _questions(rng, objects, words, size)
    labels = _labels(objects, words, background, size)
    ordered = sorted(objects, key=lambda o: (o.bbox[1], o.bbox[0]))
    od = region_string([(o.shape, o.bbox) for o in ordered], size, size)
    regions = region_string([(o.name, o.bbox) for o in ordered] + [(f"word {w.text}", w.bbox) for w in words], size, size)
    scene = Scene(seed=int(seed), image_size=size, background=background, background_color=bg_color,  # type: ignore[arg-type]
                  objects=objects, words=words, caption=caption, detailed_caption=detailed,
                  ocr=" ".join(w.text for w in words), od=od, regions=regions, qa=qa, labels=labels)
    if render:
        # The noise comes from a child generator so the truth is the same with or without pixels.
        scene.image = _render(size, background, bg_color, objects, words, np.random.default_rng([seed, 1]))
    return scene
