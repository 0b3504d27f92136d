"""SELSA: sequence-level semantic aggregation (Wu et al., ICCV 2019, arXiv 1907.06390), small form.

Why: a frame (or region) feature that is degraded - blurred, occluded, noisy - can borrow evidence
from semantically similar features elsewhere in the *whole* sequence rather than a temporal window.
SELSA does this with one attention step whose row-normalised affinity the paper reads as a
spectral-clustering transition matrix:

    q = W_q x_key,  k = W_k x_ref,  w = softmax(q k^T / sqrt(d)),  x_hat = w x_ref,
    out = x_key + W_z x_hat                       (residual; W_z = 0 gives the identity)

Values are the raw reference features, as in the paper (mmtracking's variant adds a value projection:
`value_proj=True`). The affinity is returned for interpretability. `selsa_experiment` measures the
effect on synthetic videos with degraded frames (`model.training.selsa.selsa_experiment`).
"""
from __future__ import annotations

import math
from torch import Tensor, nn


class SELSA(nn.Module):
    """forward(x_key (N, d) or (B, N, d), x_ref (M, d) or (B, M, d), ref_mask (B, M) optional)
    -> (out like x_key, affinity (N, M) or (B, N, M), averaged over heads; rows sum to 1).

    With heads > 1, q/k and the values are split channel-wise into heads (values without projection
    are the reference features' channel groups). Weights of W_q, W_k, W_z (and W_v) ~ N(0, init_std),
    biases 0, as the paper initialises them.
    """

    def __init__(self, dim: int, heads: int = 1, value_proj: bool = False, init_std: float = 0.01):
        super().__init__()
        if dim < 1 or heads < 1 or dim % heads:
            raise ValueError(f"SELSA: dim={dim} must be a positive multiple of heads={heads}")
        self.dim, self.heads = dim, heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim) if value_proj else None
        self.z = nn.Linear(dim, dim)
        for layer in (self.q, self.k, self.v, self.z):
            if layer is not None:
                nn.init.normal_(layer.weight, 0.0, init_std)
                nn.init.zeros_(layer.bias)

    def _split(self, x: Tensor) -> Tensor:  # (B, L, d) -> (B, h, L, d/h)
        b, n, _ = x.shape
        return x.view(b, n, self.heads, self.dim // self.heads).transpose(1, 2)

    def forward(self, x_key: Tensor, x_ref: Tensor, ref_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        unbatched = x_key.ndim == 2
        if unbatched:
            if x_ref.ndim != 2:
                raise ValueError(f"SELSA: x_key is (N, d) so x_ref must be (M, d), got {tuple(x_ref.shape)}")
            x_key, x_ref = x_key[None], x_ref[None]
            ref_mask = None if ref_mask is None else ref_mask[None]
        if x_key.ndim != 3 or x_ref.ndim != 3 or x_key.shape[0] != x_ref.shape[0]:
            raise ValueError(f"SELSA: expected x_key (N, d) / (B, N, d) and x_ref (M, d) / (B, M, d) with the same B, "
                             f"got {tuple(x_key.shape)} and {tuple(x_ref.shape)}")
        if x_key.shape[-1] != self.dim or x_ref.shape[-1] != self.dim:
            raise ValueError(f"SELSA(dim={self.dim}): feature width must be {self.dim}, got {x_key.shape[-1]} and "
                             f"{x_ref.shape[-1]}")
        if x_ref.shape[1] == 0:
            raise ValueError("SELSA: x_ref is empty; give at least one reference feature (the key itself is fine)")
        q, k = self._split(self.q(x_key)), self._split(self.k(x_ref))
        values = self._split(self.v(x_ref) if self.v is not None else x_ref)
        logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, h, N, M)
        if ref_mask is not None:
            if ref_mask.shape != x_ref.shape[:2]:
                raise ValueError(f"SELSA: ref_mask must be (B, M) = {tuple(x_ref.shape[:2])}, got {tuple(ref_mask.shape)}")
            if not bool(ref_mask.any(-1).all()):
                raise ValueError("SELSA: every row of ref_mask needs at least one valid reference")
            logits = logits.masked_fill(~ref_mask.bool()[:, None, None, :], float("-inf"))
        w = logits.softmax(-1)
        x_hat = (w @ values).transpose(1, 2).reshape(x_key.shape)
        out = x_key + self.z(x_hat)
        affinity = w.mean(1)
        if unbatched:
            return out[0], affinity[0]
        return out, affinity


# ----------------------------------------------------------------------------- experiment
