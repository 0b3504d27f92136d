"""Seeded synthetic videos of moving shapes, for cycle-contrast and SELSA experiments.

Why synthetic: the workbench trains offline on CPU with no data sets, yet the video objectives
need the structure real video has: one object identity per video (class = shape), nuisance that
is constant within a video and varies across videos (object colour, stripe texture, background),
and frames that differ by motion. Optional per-frame degradation (blur, occlusion, noise) with a
flag per frame gives the "hard key frame" setting that SELSA's sequence-level aggregation targets.

Everything is vectorised numpy and deterministic: video v depends only on (seed, v), never on how
many other videos were generated.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

SHAPES = ("circle", "square", "triangle", "cross", "diamond", "ring")
OBJECT_COLOURS = {
    "red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 90, 230), "yellow": (235, 220, 50),
    "magenta": (210, 50, 200), "cyan": (50, 210, 220), "orange": (240, 140, 30), "white": (235, 235, 235),
}
BACKGROUND_COLOURS = {
    "black": (15, 15, 15), "grey": (110, 110, 110), "navy": (20, 25, 90), "olive": (90, 90, 25),
    "maroon": (95, 20, 25), "teal": (20, 90, 90), "brown": (100, 60, 30),
}
DEGRADATIONS = ("blur", "occlusion", "noise")


@dataclass
class VideoSet:
    """A batch of synthetic videos.

    frames: uint8 (V, T, H, W, 3); labels: int64 (V,) shape class; degraded: bool (V, T), True where
    the frame was degraded; boxes: float32 (V, T, 4) object box (x1, y1, x2, y2) in pixels before
    degradation; video_ids: int64 (V,) global index of each video (stable under `subset`);
    attributes: one dict per video with its nuisance (colour, background, stripes, ...).
    """

    frames: np.ndarray
    labels: np.ndarray
    degraded: np.ndarray
    boxes: np.ndarray
    video_ids: np.ndarray
    class_names: list[str]
    attributes: list[dict] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.frames.shape[0])

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[1])

    def captions(self) -> list[str]:
        """One caption per video, naming the class and the nuisance (for CLIP-style training)."""
        out = []
        for label, attr in zip(self.labels, self.attributes):
            stripes = "striped " if attr["stripes"] else ""
            out.append(f"a {stripes}{attr['colour']} {self.class_names[int(label)]} on a {attr['background']} background")
        return out

    def subset(self, index) -> "VideoSet":
        """Videos selected by an index array or slice; video_ids keep their global values."""
        index = np.arange(len(self))[index]
        return VideoSet(
            frames=self.frames[index], labels=self.labels[index], degraded=self.degraded[index],
            boxes=self.boxes[index], video_ids=self.video_ids[index], class_names=list(self.class_names),
            attributes=[self.attributes[i] for i in index],
        )

    def split(self, test_fraction: float = 0.25, seed: int = 0) -> tuple["VideoSet", "VideoSet"]:
        """Class-stratified split by video (never by frame, so no video leaks across the split)."""
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"test_fraction={test_fraction} must lie in (0, 1)")
        rng = np.random.default_rng(seed)
        test = []
        for c in np.unique(self.labels):
            idx = np.flatnonzero(self.labels == c)
            n = max(1, int(round(len(idx) * test_fraction)))
            if n >= len(idx):
                raise ValueError(f"class {c} has {len(idx)} video(s): too few to split; generate more videos per class")
            test.extend(rng.choice(idx, size=n, replace=False).tolist())
        test_mask = np.zeros(len(self), bool)
        test_mask[test] = True
        return self.subset(np.flatnonzero(~test_mask)), self.subset(np.flatnonzero(test_mask))


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray, r: float) -> np.ndarray:
    """Inside-test of a shape of radius r in object coordinates (u, v), any leading dims."""
    if shape == "circle":
        return u * u + v * v <= r * r
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.8 * r
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= r
    if shape == "ring":
        d2 = u * u + v * v
        return (d2 <= r * r) & (d2 >= (0.55 * r) ** 2)
    if shape == "cross":
        w = r / 3.0
        return ((np.abs(u) <= w) & (np.abs(v) <= r)) | ((np.abs(v) <= w) & (np.abs(u) <= r))
    if shape == "triangle":
        # equilateral triangle pointing up, circumradius r: three half-planes
        s3 = np.sqrt(3.0)
        return (v <= r / 2.0) & (s3 * u - v <= r) & (-s3 * u - v <= r)
    raise ValueError(f"unknown shape {shape!r}; choose from {SHAPES}")


def _render_video(rng: np.random.Generator, shape: str, frames: int, size: int) -> tuple[np.ndarray, np.ndarray, dict]:
    r = rng.uniform(0.17, 0.25) * size
    centre = rng.uniform(r, size - r, size=2)
    speed = rng.uniform(0.6, 1.6) * size / 32.0
    angle = rng.uniform(0, 2 * np.pi)
    vel = speed * np.array([np.cos(angle), np.sin(angle)])
    rot0, spin = rng.uniform(0, 2 * np.pi), rng.uniform(-0.15, 0.15)
    # bouncing trajectory, reflected at the walls so the object stays inside
    lo, hi = r, size - r
    cs = np.empty((frames, 2))
    c = centre.copy()
    for t in range(frames):
        cs[t] = c
        c = c + vel
        for k in range(2):
            if c[k] < lo or c[k] > hi:
                vel[k] = -vel[k]
                c[k] = np.clip(c[k], lo, hi)
    obj_name = rng.choice(list(OBJECT_COLOURS))
    bg_name = rng.choice(list(BACKGROUND_COLOURS))
    obj = np.clip(np.array(OBJECT_COLOURS[obj_name]) + rng.normal(0, 12, 3), 0, 255)
    bg = np.clip(np.array(BACKGROUND_COLOURS[bg_name]) + rng.normal(0, 10, 3), 0, 255)
    stripes = bool(rng.random() < 0.5)
    stripe_angle, stripe_period = rng.uniform(0, np.pi), rng.uniform(3.0, 6.0) * size / 64.0
    grad_dir = rng.normal(size=2)
    grad_dir /= np.linalg.norm(grad_dir) + 1e-9
    grad_amp = rng.uniform(0.0, 40.0)

    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    background = bg[None, None, :] + grad_amp * (((xx - size / 2) * grad_dir[0] + (yy - size / 2) * grad_dir[1]) / size)[..., None]
    dx = xx[None] - cs[:, 0, None, None]  # (T, H, W)
    dy = yy[None] - cs[:, 1, None, None]
    th = (rot0 + spin * np.arange(frames))[:, None, None]
    u = np.cos(th) * dx + np.sin(th) * dy
    v = -np.sin(th) * dx + np.cos(th) * dy
    mask = _shape_mask(shape, u, v, r)  # (T, H, W)
    colour = np.broadcast_to(obj, (frames, size, size, 3)).astype(np.float32)
    if stripes:  # texture fixed to the object, so it moves and turns with it
        phase = (np.cos(stripe_angle) * u + np.sin(stripe_angle) * v) / stripe_period
        colour = colour * (0.55 + 0.45 * (np.sin(2 * np.pi * phase) > 0))[..., None]
    video = np.where(mask[..., None], colour, background[None])
    boxes = np.stack([cs[:, 0] - r, cs[:, 1] - r, cs[:, 0] + r, cs[:, 1] + r], 1).clip(0, size)
    attr = dict(shape=shape, colour=str(obj_name), background=str(bg_name), stripes=stripes, radius=float(r),
                speed=float(speed))
    return video.astype(np.float32), boxes.astype(np.float32), attr


def degrade_frame(frame: np.ndarray, box: np.ndarray, rng: np.random.Generator, kinds=DEGRADATIONS,
                  severity: float = 1.0) -> np.ndarray:
    """Apply the listed degradations to one float frame (H, W, 3); returns a new float frame.

    occlusion: a block over 45-70% of the object's box (at severity 1), placed on the object and filled
    with the background colour (median of the frame border) so the object looks cut, not covered by a
    new square-looking object that would mimic the "square" class;
    blur: Gaussian, sigma about 2 px at 64 px; noise: Gaussian, sigma about 35 grey levels.
    """
    unknown = set(kinds) - set(DEGRADATIONS)
    if unknown:
        raise ValueError(f"unknown degradation(s) {sorted(unknown)}; choose from {DEGRADATIONS}")
    size = frame.shape[0]
    out = frame.copy()
    if "occlusion" in kinds:
        x1, y1, x2, y2 = box
        bw, bh = (x2 - x1), (y2 - y1)
        frac = np.clip(rng.uniform(0.45, 0.7) * severity, 0.05, 1.0)
        ow, oh = max(2.0, bw * np.sqrt(frac) * 1.2), max(2.0, bh * np.sqrt(frac) * 1.2)
        ox = rng.uniform(x1 + 0.1 * bw - ow / 2, x2 - 0.1 * bw - ow / 2)
        oy = rng.uniform(y1 + 0.1 * bh - oh / 2, y2 - 0.1 * bh - oh / 2)
        xa, xb = int(np.clip(ox, 0, size)), int(np.clip(ox + ow, 0, size))
        ya, yb = int(np.clip(oy, 0, size)), int(np.clip(oy + oh, 0, size))
        border = np.concatenate([out[0], out[-1], out[:, 0], out[:, -1]], 0)
        out[ya:yb, xa:xb] = np.median(border, axis=0)
    if "blur" in kinds:
        from scipy.ndimage import gaussian_filter  # scipy comes with scikit-learn; only blur needs it

        sigma = severity * rng.uniform(1.5, 2.5) * size / 64.0
        out = gaussian_filter(out, sigma=(sigma, sigma, 0), mode="nearest")
    if "noise" in kinds:
        out = out + rng.normal(0, 35.0 * severity, out.shape)
    return out


def make_videos(num_classes: int = 4, videos_per_class: int = 8, frames: int = 8, size: int = 64, *,
                degrade_fraction: float = 0.0, degradations=DEGRADATIONS, severity: float = 1.0,
                seed: int = 0) -> VideoSet:
    """Generate `num_classes * videos_per_class` videos of `frames` frames at `size` x `size` px.

    Videos are ordered class-major (video i has class i // videos_per_class). Each frame is degraded
    independently with probability `degrade_fraction` by all of `degradations` (flag in `.degraded`).
    """
    if not 2 <= num_classes <= len(SHAPES):
        raise ValueError(f"num_classes={num_classes}: must be between 2 and {len(SHAPES)} (shapes: {SHAPES})")
    if videos_per_class < 1 or frames < 1:
        raise ValueError(f"videos_per_class={videos_per_class} and frames={frames} must both be >= 1")
    if size < 16:
        raise ValueError(f"size={size} is too small to draw shapes; use 16 px or more")
    if not 0.0 <= degrade_fraction <= 1.0:
        raise ValueError(f"degrade_fraction={degrade_fraction} must lie in [0, 1]")
    degradations = tuple(degradations)
    unknown = set(degradations) - set(DEGRADATIONS)
    if unknown:
        raise ValueError(f"unknown degradation(s) {sorted(unknown)}; choose from {DEGRADATIONS}")
    n = num_classes * videos_per_class
    seqs = np.random.SeedSequence(seed).spawn(n)
    out = np.empty((n, frames, size, size, 3), np.uint8)
    boxes = np.empty((n, frames, 4), np.float32)
    degraded = np.zeros((n, frames), bool)
    labels = np.repeat(np.arange(num_classes), videos_per_class).astype(np.int64)
    attributes = []
    for i in range(n):
        rng = np.random.default_rng(seqs[i])
        video, boxes[i], attr = _render_video(rng, SHAPES[labels[i]], frames, size)
        # a separate stream for degradation, so changing degrade_fraction leaves the clean content alone
        drng = np.random.default_rng(seqs[i].spawn(1)[0])
        if degrade_fraction > 0 and degradations:
            flags = drng.random(frames) < degrade_fraction
            for t in np.flatnonzero(flags):
                video[t] = degrade_frame(video[t], boxes[i, t], drng, degradations, severity)
            degraded[i] = flags
        out[i] = np.clip(np.rint(video), 0, 255).astype(np.uint8)
        attributes.append(attr)
    return VideoSet(frames=out, labels=labels, degraded=degraded, boxes=boxes, video_ids=np.arange(n, dtype=np.int64),
                    class_names=list(SHAPES[:num_classes]), attributes=attributes)
