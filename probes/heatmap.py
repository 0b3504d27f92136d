"""The Simple Baselines heatmap head (Xiao, Wu & Wei, ECCV 2018) as a localisation probe.

A small deconvolution head is trained on FROZEN spatial features of any tap (n, C, H, W) to
predict one heatmap per joint; how well a fixed-capacity head localises joints (PCK) says how
much precise spatial information the features keep. Pieces, as in the paper:

* ``DeconvHead``: n_deconv x [ConvTranspose2d(k4, s2, p1, no bias) -> BN -> ReLU], then a 1x1
  conv to K heatmaps; deconv/conv weights ~ N(0, 0.001), BN (1, 0).
* Targets: an unnormalised Gaussian per joint (peak 1, sigma 2 heatmap pixels) at the joint's
  rounded heatmap position, cut at 3 sigma; target weight 0 for invisible or off-map joints.
* ``JointsMSELoss``: (1/K) sum_k 0.5 * MSE(w_k * pred_k, w_k * target_k).
* Decoding: argmax, then a quarter-pixel shift towards the higher neighbour (x and y).
* Flip test: heatmaps of the mirrored image are flipped back, left/right channels swapped,
  shifted one pixel right (the paper's alignment fix; ``shift=False`` disables it), averaged.
* PCK@alpha: fraction of visible joints within alpha x reference of the truth (reference =
  image size, or a per-figure torso length).

Coordinates: image pixel centres are integers (pixel i covers [i - 0.5, i + 0.5]); a heatmap of
stride s maps x -> (x + 0.5) / s - 0.5 and back, so cell centres line up at any stride.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import nn


class DeconvHead(nn.Module):
    """n_deconv x [ConvTranspose2d(k4, s2, p1, bias=False) -> BatchNorm2d -> ReLU] -> Conv2d 1x1.

    Each deconvolution doubles the resolution; ``n_deconv=0`` is a plain 1x1 linear readout."""

    def __init__(self, c_in: int, num_joints: int, n_deconv: int = 3, channels: int | Sequence[int] = 256,
                 kernel: int = 4):
        super().__init__()
        if n_deconv < 0:
            raise ValueError(f"n_deconv={n_deconv}: use 0, 2 or 3 (any count >= 0 works)")
        if kernel not in (2, 3, 4):
            raise ValueError(f"kernel={kernel}: use 4 (the paper), 3 or 2")
        chans = [channels] * n_deconv if isinstance(channels, int) else list(channels)
        if len(chans) != n_deconv:
            raise ValueError(f"channels={channels}: give one int or one value per deconv layer ({n_deconv})")
        padding, output_padding = {4: (1, 0), 3: (1, 1), 2: (0, 0)}[kernel]
        layers: list[nn.Module] = []
        c = c_in
        for out in chans:
            layers += [nn.ConvTranspose2d(c, out, kernel, stride=2, padding=padding, output_padding=output_padding,
                                          bias=False),
                       nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
            c = out
        self.deconv = nn.Sequential(*layers)
        self.final = nn.Conv2d(c, num_joints, kernel_size=1)
        self.n_deconv = n_deconv
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.ConvTranspose2d, nn.Conv2d)):
                nn.init.normal_(m.weight, std=0.001)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.final(self.deconv(x))


# --------------------------------------------------------------------------- coordinates and targets
def to_heatmap_coords(xy: np.ndarray | torch.Tensor, stride: float | Sequence[float]):
    """Image pixel coordinates -> heatmap coordinates for a heatmap of ``stride`` (sx, sy)."""
    s = np.broadcast_to(np.asarray(stride, dtype=np.float64), (2,))
    return (xy + 0.5) / s - 0.5 if isinstance(xy, np.ndarray) else (xy + 0.5) / torch.as_tensor(s, dtype=xy.dtype) - 0.5


def to_image_coords(uv: np.ndarray | torch.Tensor, stride: float | Sequence[float]):
    """Heatmap coordinates -> image pixel coordinates (inverse of ``to_heatmap_coords``)."""
    s = np.broadcast_to(np.asarray(stride, dtype=np.float64), (2,))
    return (uv + 0.5) * s - 0.5 if isinstance(uv, np.ndarray) else (uv + 0.5) * torch.as_tensor(s, dtype=uv.dtype) - 0.5


def gaussian_targets(joints_hm: np.ndarray, visible: np.ndarray | None, size: tuple[int, int],
                     sigma: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    """Targets (n, K, h, w) float32 and weights (n, K) for joints in HEATMAP coordinates (n, K, 2).

    As in Simple Baselines: the Gaussian (peak 1) sits at the rounded joint position
    ``int(u + 0.5)`` and is cut at 3 sigma; joints that are invisible or whose 3-sigma window
    lies entirely off the map get an all-zero target and weight 0."""
    joints_hm = np.asarray(joints_hm, dtype=np.float64)
    n, K, _ = joints_hm.shape
    h, w = size
    vis = np.ones((n, K), dtype=bool) if visible is None else np.asarray(visible, dtype=bool)
    targets = np.zeros((n, K, h, w), dtype=np.float32)
    weights = vis.astype(np.float32)
    r = int(np.ceil(3 * sigma))
    ax = np.arange(-r, r + 1)
    g = np.exp(-(ax[None, :] ** 2 + ax[:, None] ** 2) / (2 * sigma ** 2)).astype(np.float32)
    for i in range(n):
        for k in range(K):
            if not vis[i, k]:
                continue
            mx, my = int(joints_hm[i, k, 0] + 0.5), int(joints_hm[i, k, 1] + 0.5)
            x0, y0, x1, y1 = mx - r, my - r, mx + r + 1, my + r + 1
            if x0 >= w or y0 >= h or x1 <= 0 or y1 <= 0:
                weights[i, k] = 0.0
                continue
            gx0, gy0 = max(0, -x0), max(0, -y0)
            gx1, gy1 = min(x1, w) - x0, min(y1, h) - y0
            targets[i, k, max(0, y0):min(y1, h), max(0, x0):min(x1, w)] = g[gy0:gy1, gx0:gx1]
    return targets, weights


class JointsMSELoss(nn.Module):
    """L = (1/K) sum_k 0.5 * mean((w_k * pred_k - w_k * target_k)^2) over batch and pixels."""

    def __init__(self, use_target_weight: bool = True):
        super().__init__()
        self.use_target_weight = use_target_weight

    def forward(self, pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        if pred.shape != target.shape:
            raise ValueError(f"heatmaps {tuple(pred.shape)} and targets {tuple(target.shape)} differ in shape")
        n, K = pred.shape[:2]
        p = pred.reshape(n, K, -1)
        t = target.reshape(n, K, -1)
        if self.use_target_weight and weight is not None:
            w = weight.reshape(n, K, 1)
            p, t = p * w, t * w
        return 0.5 * ((p - t) ** 2).mean(dim=(0, 2)).mean()


# --------------------------------------------------------------------------- decoding and flip test
def decode_heatmaps(heatmaps: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Argmax per heatmap plus a 0.25-pixel shift towards the higher neighbour in x and y
    (not on the border). Returns heatmap coordinates (n, K, 2) and peak values (n, K)."""
    hm = torch.as_tensor(heatmaps).detach().float().cpu()
    n, K, h, w = hm.shape
    flat = hm.reshape(n, K, -1)
    maxval, idx = flat.max(-1)
    px = (idx % w).long()
    py = (idx // w).long()
    coords = torch.stack([px, py], -1).float()
    inner_x = (px > 0) & (px < w - 1)
    inner_y = (py > 0) & (py < h - 1)
    pxl, pxr = (px - 1).clamp(0, w - 1), (px + 1).clamp(0, w - 1)
    pyu, pyd = (py - 1).clamp(0, h - 1), (py + 1).clamp(0, h - 1)

    def at(yy: torch.Tensor, xx: torch.Tensor) -> torch.Tensor:
        return flat.gather(-1, (yy * w + xx).unsqueeze(-1)).squeeze(-1)

    dx = torch.sign(at(py, pxr) - at(py, pxl)) * inner_x
    dy = torch.sign(at(pyd, px) - at(pyu, px)) * inner_y
    coords[..., 0] += 0.25 * dx
    coords[..., 1] += 0.25 * dy
    return coords.numpy(), maxval.numpy()


def flip_back(heatmaps: torch.Tensor, flip_pairs: Sequence[tuple[int, int]]) -> torch.Tensor:
    """Heatmaps predicted for a mirrored image -> the original orientation: mirror along W and
    swap each left/right channel pair."""
    out = heatmaps.flip(-1).clone()
    for a, b in flip_pairs:
        out[:, [a, b]] = out[:, [b, a]]
    return out


def flip_test(heatmaps: torch.Tensor, heatmaps_of_flipped: torch.Tensor, flip_pairs: Sequence[tuple[int, int]],
              shift: bool = True) -> torch.Tensor:
    """Average of the heatmaps and the flipped-back heatmaps of the mirrored input; ``shift``
    moves the flipped-back maps one pixel right first (``H_f[..., 1:] = H_f[..., :-1]``)."""
    back = flip_back(heatmaps_of_flipped, flip_pairs)
    if shift:
        back[..., 1:] = back[..., :-1].clone()
    return 0.5 * (heatmaps + back)


def pck(pred: np.ndarray, gt: np.ndarray, visible: np.ndarray | None, alpha: float,
        ref: float | np.ndarray) -> tuple[float, np.ndarray]:
    """PCK@alpha: fraction of visible joints with ||pred - gt|| <= alpha * ref, where ref is a
    scalar (e.g. image size) or per-item (n,) (e.g. torso length). Returns (overall, per-joint)."""
    pred = np.asarray(pred, dtype=np.float64)
    gt = np.asarray(gt, dtype=np.float64)
    vis = np.ones(gt.shape[:2], dtype=bool) if visible is None else np.asarray(visible, dtype=bool)
    ref = np.broadcast_to(np.asarray(ref, dtype=np.float64).reshape(-1, 1), gt.shape[:2]) if np.ndim(ref) else ref
    hit = (np.linalg.norm(pred - gt, axis=-1) <= alpha * ref) & vis
    per_joint = hit.sum(0) / np.maximum(vis.sum(0), 1)
    return float(hit.sum() / max(vis.sum(), 1)), per_joint


# --------------------------------------------------------------------------- the probe
def _predict(head: nn.Module, feats: torch.Tensor, batch_size: int, device: str) -> torch.Tensor:
    head.eval()
    outs = []
    with torch.no_grad():
        for i in range(0, feats.shape[0], batch_size):
            outs.append(head(feats[i:i + batch_size].to(device).float()).cpu())
    return torch.cat(outs)


def train_heatmap_probe(train_feats, train_joints, test_feats, test_joints, *, image_size: int | tuple[int, int],
                        train_visible=None, test_visible=None, flip_feats=None,
                        flip_pairs: Sequence[tuple[int, int]] = ((2, 3), (5, 6), (7, 8)),
                        n_deconv: int = 2, channels: int | Sequence[int] = 64, sigma: float = 2.0,
                        epochs: int = 10, batch_size: int = 32, lr: float = 1e-3, weight_decay: float = 0.0,
                        alpha: float = 0.05, torso: tuple[int, int] | None = (1, 4), torso_alpha: float = 0.2,
                        shift: bool = True, seed: int = 0, device: str = "cpu", threads: int | None = None,
                        progress: bool = True) -> dict:
    """Train a DeconvHead on frozen features and report localisation quality.

    train_feats/test_feats: (n, C, H, W) features of any tap (numpy or torch); joints (n, K, 2)
    in IMAGE pixel coordinates of images of ``image_size`` (int or (H, W)); visibility (n, K)
    optional; ``flip_feats``: features of the horizontally mirrored TEST images, for the flip
    test. The heatmaps have the feature size x 2^n_deconv; Adam, step LR decay x0.1 at 2/3 and
    9/10 of ``epochs`` (the paper's schedule, scaled).

    Returns a dict: ``pck`` (PCK@alpha of image size), ``pck_torso`` (PCK@torso_alpha of the
    torso length between joints ``torso``), ``pck_flip`` / ``pck_flip_torso`` (flip test, with
    the one-pixel shift if ``shift``) and ``pck_flip_noshift``, ``untrained`` (the same metrics
    for the freshly initialised head), ``mean_px_error``, ``per_joint``, ``curve`` (per epoch:
    loss and test PCK) and the settings. ``threads``: torch CPU threads while training
    (restored after; None leaves the current setting).
    """
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(max(1, int(threads)))
    try:
        return _train(train_feats, train_joints, test_feats, test_joints, image_size=image_size,
                      train_visible=train_visible, test_visible=test_visible, flip_feats=flip_feats,
                      flip_pairs=flip_pairs, n_deconv=n_deconv, channels=channels, sigma=sigma, epochs=epochs,
                      batch_size=batch_size, lr=lr, weight_decay=weight_decay, alpha=alpha, torso=torso,
                      torso_alpha=torso_alpha, shift=shift, seed=seed, device=device, progress=progress)
    finally:
        torch.set_num_threads(old_threads)


def _train(train_feats, train_joints, test_feats, test_joints, *, image_size, train_visible, test_visible, flip_feats,
           flip_pairs, n_deconv, channels, sigma, epochs, batch_size, lr, weight_decay, alpha, torso, torso_alpha,
           shift, seed, device, progress) -> dict:
    from tqdm.auto import tqdm

    Xtr = torch.as_tensor(np.asarray(train_feats) if not torch.is_tensor(train_feats) else train_feats).float()
    Xte = torch.as_tensor(np.asarray(test_feats) if not torch.is_tensor(test_feats) else test_feats).float()
    if Xtr.ndim != 4 or Xte.ndim != 4:
        raise ValueError(f"features must be spatial maps (n, C, H, W); got train {tuple(Xtr.shape)}, "
                         f"test {tuple(Xte.shape)} (token maps (n, N, D) need reshaping to (n, D, h, w))")
    if Xtr.shape[1:] != Xte.shape[1:]:
        raise ValueError(f"train features {tuple(Xtr.shape)} and test features {tuple(Xte.shape)} differ per item")
    jtr = np.asarray(train_joints, dtype=np.float64)
    jte = np.asarray(test_joints, dtype=np.float64)
    if jtr.shape[0] != Xtr.shape[0] or jte.shape[0] != Xte.shape[0]:
        raise ValueError(f"joints ({jtr.shape[0]} train, {jte.shape[0]} test) must match feature rows "
                         f"({Xtr.shape[0]} train, {Xte.shape[0]} test)")
    K = jtr.shape[1]
    H_img, W_img = (image_size, image_size) if isinstance(image_size, int) else tuple(int(v) for v in image_size)
    h, w = Xtr.shape[2] * 2 ** n_deconv, Xtr.shape[3] * 2 ** n_deconv
    stride = (W_img / w, H_img / h)
    vtr = np.ones(jtr.shape[:2], bool) if train_visible is None else np.asarray(train_visible, bool)
    vte = np.ones(jte.shape[:2], bool) if test_visible is None else np.asarray(test_visible, bool)
    targets, weights = gaussian_targets(to_heatmap_coords(jtr, stride), vtr, (h, w), sigma)
    T = torch.from_numpy(targets)
    Wt = torch.from_numpy(weights)

    torch.manual_seed(seed)
    head = DeconvHead(Xtr.shape[1], K, n_deconv=n_deconv, channels=channels).to(device)
    loss_fn = JointsMSELoss()
    opt = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=weight_decay)
    milestones = sorted({max(1, int(round(epochs * 2 / 3))), max(1, int(round(epochs * 0.9)))})
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.1)

    ref_img = float(max(H_img, W_img))
    ref_torso = None
    if torso is not None:
        ref_torso = np.linalg.norm(jte[:, torso[0]] - jte[:, torso[1]], axis=-1)

    def evaluate(hm: torch.Tensor) -> dict:
        uv, _ = decode_heatmaps(hm)
        xy = to_image_coords(uv, stride)
        out = {"pck": pck(xy, jte, vte, alpha, ref_img)[0]}
        if ref_torso is not None:
            out["pck_torso"] = pck(xy, jte, vte, torso_alpha, ref_torso)[0]
        err = np.linalg.norm(xy - jte, axis=-1)
        out["mean_px_error"] = float(err[vte].mean()) if vte.any() else float("nan")
        return out

    untrained = evaluate(_predict(head, Xte, batch_size, device))
    gen = torch.Generator().manual_seed(seed)
    curve = []
    n = Xtr.shape[0]
    bar = tqdm(range(epochs), desc="heatmap probe", leave=False, disable=not progress)
    for epoch in bar:
        head.train()
        perm = torch.randperm(n, generator=gen)
        total, seen = 0.0, 0
        for i in range(0, n, batch_size):
            idx = perm[i:i + batch_size]
            if idx.numel() < 2:  # BatchNorm needs two samples
                continue
            pred = head(Xtr[idx].to(device))
            loss = loss_fn(pred, T[idx].to(device), Wt[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * idx.numel()
            seen += idx.numel()
        sched.step()
        metrics = evaluate(_predict(head, Xte, batch_size, device))
        curve.append({"epoch": epoch + 1, "loss": total / max(seen, 1), **metrics})
        bar.set_postfix(loss=f"{total / max(seen, 1):.2e}", pck=f"{metrics['pck']:.3f}")

    hm = _predict(head, Xte, batch_size, device)
    uv, _ = decode_heatmaps(hm)
    xy = to_image_coords(uv, stride)
    final = evaluate(hm)
    result = {**final, "per_joint": pck(xy, jte, vte, alpha, ref_img)[1].tolist(), "untrained": untrained,
              "curve": curve, "alpha": alpha, "torso_alpha": torso_alpha if torso is not None else None,
              "heatmap_size": (h, w), "stride": stride, "n_deconv": n_deconv, "sigma": sigma, "epochs": epochs,
              "n_train": int(n), "n_test": int(Xte.shape[0])}
    if flip_feats is not None:
        Xf = torch.as_tensor(np.asarray(flip_feats) if not torch.is_tensor(flip_feats) else flip_feats).float()
        if Xf.shape != Xte.shape:
            raise ValueError(f"flip_feats {tuple(Xf.shape)} must have the test features' shape {tuple(Xte.shape)}")
        hf = _predict(head, Xf, batch_size, device)
        with_shift = evaluate(flip_test(hm, hf, flip_pairs, shift=shift))
        no_shift = evaluate(flip_test(hm, hf, flip_pairs, shift=False))
        result["pck_flip"] = with_shift["pck"]
        if "pck_torso" in with_shift:
            result["pck_flip_torso"] = with_shift["pck_torso"]
        result["pck_flip_noshift"] = no_shift["pck"]
        result["flip_shift"] = shift
    return result
