"""Seeded synthetic stick figures with 9 joints, for the heatmap (localisation) probe.

Each figure faces the camera, so its LEFT limbs are on the IMAGE-RIGHT side: "left" is
defined geometrically (the member of a left/right pair with the larger x), never by colour.
That keeps the flip test valid: mirroring an image turns the figure's left limbs into
image-left limbs, which by the same definition are its right limbs, so swapping the
``flip_pairs`` channels of the mirrored prediction is exactly right.

Joints (x, y) are in pixel units of the image, with pixel centres at integer coordinates
(pixel i covers [i - 0.5, i + 0.5]); a horizontal flip maps x -> W - 1 - x.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

JOINT_NAMES = ("head", "neck", "left_hand", "right_hand", "pelvis", "left_knee", "right_knee",
               "left_foot", "right_foot")
FLIP_PAIRS = ((2, 3), (5, 6), (7, 8))
SKELETON = ((0, 1), (1, 2), (1, 3), (1, 4), (4, 5), (4, 6), (5, 7), (6, 8))


@dataclass
class StickFigures:
    """images (n, H, W, 3) uint8; joints (n, 9, 2) float32 pixel (x, y); visible (n, 9) bool."""
    images: np.ndarray
    joints: np.ndarray
    visible: np.ndarray
    joint_names: tuple[str, ...] = JOINT_NAMES
    flip_pairs: tuple[tuple[int, int], ...] = FLIP_PAIRS
    skeleton: tuple[tuple[int, int], ...] = SKELETON

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def size(self) -> tuple[int, int]:
        """(H, W)."""
        return self.images.shape[1], self.images.shape[2]

    def tensor(self):
        """Images as a float32 torch tensor (n, 3, H, W) in [0, 1]."""
        import torch

        return torch.from_numpy(self.images).permute(0, 3, 1, 2).float().div_(255.0)

    def pil(self, i: int):
        from PIL import Image

        return Image.fromarray(self.images[i])

    def flipped(self) -> "StickFigures":
        """The horizontally mirrored set, joints relabelled by the geometric left/right rule."""
        W = self.images.shape[2]
        joints = self.joints.copy()
        joints[..., 0] = W - 1 - joints[..., 0]
        visible = self.visible.copy()
        for a, b in self.flip_pairs:
            joints[:, [a, b]] = joints[:, [b, a]]
            visible[:, [a, b]] = visible[:, [b, a]]
        return StickFigures(self.images[:, :, ::-1].copy(), joints, visible)


def _pose(rng: np.random.Generator, H: int, W: int) -> np.ndarray:
    """One random pose (9, 2) facing the camera; left limbs point to image-right."""
    s = min(H, W)
    scale = rng.uniform(0.75, 1.0) * s
    pelvis = np.array([W / 2 + rng.uniform(-0.12, 0.12) * W, H / 2 + rng.uniform(0.0, 0.12) * H])
    lean = rng.uniform(-0.25, 0.25)
    up = np.array([np.sin(lean), -np.cos(lean)])
    neck = pelvis + up * 0.24 * scale
    head = neck + up * 0.12 * scale

    def limb(origin: np.ndarray, angle: float, length: float) -> np.ndarray:
        return origin + length * np.array([np.cos(angle), np.sin(angle)])

    # arms: angle measured from image +x (pointing right), y downwards
    left_hand = limb(neck, rng.uniform(-1.0, 1.1), 0.22 * scale)
    right_hand = limb(neck, np.pi - rng.uniform(-1.0, 1.1), 0.22 * scale)
    # legs: from pelvis downwards and outwards
    lk = limb(pelvis, np.pi / 2 - rng.uniform(0.15, 0.7), 0.17 * scale)
    rk = limb(pelvis, np.pi / 2 + rng.uniform(0.15, 0.7), 0.17 * scale)
    lf = limb(lk, np.pi / 2 - rng.uniform(-0.15, 0.5), 0.17 * scale)
    rf = limb(rk, np.pi / 2 + rng.uniform(-0.15, 0.5), 0.17 * scale)
    return np.stack([head, neck, left_hand, right_hand, pelvis, lk, rk, lf, rf])


def _geometric_left_right(joints: np.ndarray) -> np.ndarray:
    """Enforce the rule: in each pair the left joint has the larger x."""
    out = joints.copy()
    for a, b in FLIP_PAIRS:
        swap = out[a, 0] < out[b, 0]
        if swap:
            out[[a, b]] = out[[b, a]]
    return out


def make_stick_figures(n: int, size: int | tuple[int, int] = 64, seed: int = 0, noise: float = 0.04,
                       occlude_prob: float = 0.0, thickness: float = 1.6) -> StickFigures:
    """Render ``n`` stick figures of ``size`` (H = W = size, or (H, W)).

    Each image has a random grey-level background with pixel noise (std ``noise``), a figure
    in a random colour drawn with anti-aliased lines (4x supersampling), a filled head and
    small joint dots. With probability ``occlude_prob`` a background-coloured box hides part of
    the figure; joints under it are marked invisible (target weight 0 in the probe). Joints
    outside the image are invisible too. Same arguments -> identical arrays.
    """
    from PIL import Image, ImageDraw

    if n < 1:
        raise ValueError(f"n={n}: ask for at least one stick figure")
    H, W = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if min(H, W) < 16:
        raise ValueError(f"size={size}: stick figures need at least 16x16 pixels")
    rng = np.random.default_rng(seed)
    ss = 4  # supersampling factor
    images = np.empty((n, H, W, 3), dtype=np.uint8)
    joints = np.empty((n, len(JOINT_NAMES), 2), dtype=np.float32)
    visible = np.ones((n, len(JOINT_NAMES)), dtype=bool)
    for i in range(n):
        pose = _geometric_left_right(_pose(rng, H, W))
        bg = rng.uniform(0.1, 0.5)
        fg = np.clip(bg + rng.choice([-1, 1]) * rng.uniform(0.35, 0.5) + rng.normal(0, 0.05, 3), 0, 1)
        bg_rgb = tuple(int(255 * bg) for _ in range(3))
        fg_rgb = tuple(int(255 * c) for c in fg)
        canvas = Image.new("RGB", (W * ss, H * ss), bg_rgb)
        draw = ImageDraw.Draw(canvas)

        def P(pt: np.ndarray) -> tuple[float, float]:
            # pixel-centre coordinates -> supersampled canvas coordinates
            return ((pt[0] + 0.5) * ss, (pt[1] + 0.5) * ss)

        lw = max(1, int(round(thickness * ss)))
        for a, b in SKELETON:
            draw.line([P(pose[a]), P(pose[b])], fill=fg_rgb, width=lw)
        r_head = 0.07 * min(H, W) * ss
        hx, hy = P(pose[0])
        draw.ellipse([hx - r_head, hy - r_head, hx + r_head, hy + r_head], fill=fg_rgb)
        r_dot = 1.0 * lw
        for j in range(1, len(JOINT_NAMES)):
            x, y = P(pose[j])
            draw.ellipse([x - r_dot, y - r_dot, x + r_dot, y + r_dot], fill=fg_rgb)
        occluder = None
        if occlude_prob > 0 and rng.random() < occlude_prob:
            ow, oh = rng.uniform(0.2, 0.35) * W, rng.uniform(0.2, 0.35) * H
            ox, oy = rng.uniform(0, W - ow), rng.uniform(0, H - oh)
            occluder = (ox, oy, ox + ow, oy + oh)
            draw.rectangle([ox * ss, oy * ss, (ox + ow) * ss, (oy + oh) * ss], fill=bg_rgb)
        small = canvas.resize((W, H), Image.BOX)
        img = np.asarray(small, dtype=np.float32) / 255.0
        img = img + rng.normal(0.0, noise, img.shape)
        images[i] = np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)
        joints[i] = pose
        inside = (pose[:, 0] >= -0.5) & (pose[:, 0] <= W - 0.5) & (pose[:, 1] >= -0.5) & (pose[:, 1] <= H - 0.5)
        visible[i] = inside
        if occluder is not None:
            x0, y0, x1, y1 = occluder
            hidden = (pose[:, 0] + 0.5 >= x0) & (pose[:, 0] + 0.5 <= x1) & (pose[:, 1] + 0.5 >= y0) & (pose[:, 1] + 0.5 <= y1)
            visible[i] &= ~hidden
    return StickFigures(images, joints, visible)


PROGRESS_FILE = ".stick-figures-in-progress.json"


def _check_figures_dir(root, meta: dict) -> None:
    """Refuse an output directory that holds anything but stick figures made with the same
    arguments (a finished run, or an interrupted one to finish): overwriting another command's
    data set would corrupt it, and figures of other arguments would leave stale images behind."""
    import json
    from pathlib import Path

    root = Path(root)
    if root.exists() and not root.is_dir():
        raise ValueError(f"--out {root} is a file; give a directory path")
    if not root.is_dir() or not any(root.iterdir()):
        return
    for marker in (root / "manifest.json", root / PROGRESS_FILE):
        if not marker.is_file():
            continue
        try:
            old = json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ValueError(f"--out {root}: {marker.name} is unreadable ({exc}); choose another --out") from None
        if not isinstance(old, dict) or old.get("kind") != "stick_figures":
            break  # another command's data set
        diff = [f"{k}={old.get(k)!r} (now {v!r})" for k, v in meta.items() if old.get(k) != v]
        if diff:
            raise ValueError(f"--out {root} already holds stick figures made with other arguments: {', '.join(diff)}; "
                             "rerun with the same arguments, or choose another --out")
        return
    raise ValueError(f"--out {root} is not empty and does not hold stick figures (it may be another data set); "
                     "choose an empty or new directory")


def write_stick_figures(out: str, n: int, size: int = 64, seed: int = 0, test_fraction: float = 0.25,
                        flips: bool = True, noise: float = 0.04, occlude_prob: float = 0.0) -> dict:
    """Write a stick-figure dataset for capture + ``fvl heatmap``.

    Layout: ``OUT/images/sf000000.png`` (and ``sf000000_flip.png``, the mirrored image, when
    ``flips``), ``OUT/joints.json`` ({stem: {"joints", "visible", "split", "flip_of"}}, flipped
    entries carry the mirrored, relabelled joints) and ``OUT/manifest.json``. Capture features
    with ``fvl capture --data OUT/images --pool none``; store items are matched to joints by
    file stem. The last ``test_fraction`` of figures is the test split. A directory that holds
    anything else is refused (see `_check_figures_dir`); rerunning the same arguments rewrites the
    same files (the output is a pure function of the arguments), which also finishes a killed run."""
    import json
    import os
    from pathlib import Path

    from PIL import Image

    from workbench.data.files import atomic_write_json, atomic_write_text

    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction={test_fraction}: give a fraction between 0 and 1")
    root = Path(out)
    meta = {"kind": "stick_figures", "n": n, "size": size, "seed": seed, "test_fraction": test_fraction,
            "flips": flips, "noise": noise, "occlude_prob": occlude_prob, "joint_names": list(JOINT_NAMES),
            "flip_pairs": [list(p) for p in FLIP_PAIRS], "coordinates": "pixel centres at integers (x, y)"}
    _check_figures_dir(root, meta)
    (root / "images").mkdir(parents=True, exist_ok=True)
    atomic_write_json(root / PROGRESS_FILE, meta)
    (root / "manifest.json").unlink(missing_ok=True)  # only a finished run has a manifest
    sf = make_stick_figures(n, size, seed=seed, noise=noise, occlude_prob=occlude_prob)
    mirrored = sf.flipped()
    n_test = max(1, int(round(n * test_fraction)))
    table: dict[str, dict] = {}

    def put(stem: str, img: np.ndarray, joints: np.ndarray, vis: np.ndarray, split: str, flip_of: str | None):
        path = root / "images" / f"{stem}.png"
        tmp = path.with_name(f".{stem}.tmp.png")
        Image.fromarray(img).save(tmp)
        os.replace(tmp, path)
        table[stem] = {"joints": joints.round(4).tolist(), "visible": vis.astype(bool).tolist(), "split": split,
                       "flip_of": flip_of}

    for i in range(n):
        split = "test" if i >= n - n_test else "train"
        stem = f"sf{i:06d}"
        put(stem, sf.images[i], sf.joints[i], sf.visible[i], split, None)
        if flips:
            put(f"{stem}_flip", mirrored.images[i], mirrored.joints[i], mirrored.visible[i], split, stem)
    atomic_write_text(root / "joints.json", json.dumps(table))
    atomic_write_json(root / "manifest.json", meta)
    (root / PROGRESS_FILE).unlink(missing_ok=True)
    return meta
