"""DBFusion (depth-breadth fusion) and the projectors into the LLM.

Channel concatenation is the paper's choice: [V | V_caption | V_ocr | V_grounding] -> (B, N, (K+1)D).
Token concatenation (B, (K+1)N, D) and element-wise averaging (B, N, D) are the Table 1 ablations.
Projector parameter names follow the official Florence-VL checkpoints (`encoder_mlp.0`,
`encoder_mlp.{k}.1`, where `encoder_mlp.{k}.0` is a weightless GELU) so weights load without renames.
"""
from __future__ import annotations

import torch
from torch import nn

from model.hooks import HookPoint
from model.tokens import stream_slices


class DBFusion(nn.Module):
    def __init__(self, mode: str, stream_names: list[str]):
        super().__init__()
        if mode not in ("channel", "token", "average"):
            raise ValueError(f"fusion mode {mode!r} is not channel, token or average")
        self.mode = mode
        self.stream_names = list(stream_names)
        self.hook_input = HookPoint()  # tap `fusion.input`

    def forward(self, streams: dict[str, torch.Tensor]) -> torch.Tensor:
        missing = [n for n in self.stream_names if n not in streams]
        if missing:
            raise ValueError(f"fusion expects streams {self.stream_names}, missing {missing}")
        xs = [streams[n] for n in self.stream_names]
        if self.mode == "channel":
            fused = torch.cat(xs, dim=-1)
        elif self.mode == "token":
            fused = torch.cat(xs, dim=1)
        else:
            fused = torch.stack(xs, dim=0).mean(dim=0)
        return self.hook_input(fused)

    def stream_slices(self, width: int) -> dict[str, tuple[int, int]]:
        """Where each stream lies in `fusion.input` (channel slices; token slices for token concat)."""
        return stream_slices(self.stream_names, width)


class Projector(nn.Module):
    """`linear`, `mlp2x_gelu` or `mlp3x_gelu` (LLaVA naming), parameters under `encoder_mlp`."""

    def __init__(self, kind: str, in_dim: int, out_dim: int):
        super().__init__()
        depth = {"linear": 1, "mlp2x_gelu": 2, "mlp3x_gelu": 3}.get(kind)
        if depth is None:
            raise ValueError(f"projector {kind!r} is not linear, mlp2x_gelu or mlp3x_gelu")
        layers: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
        for _ in range(depth - 1):
            layers.append(nn.Sequential(nn.GELU(), nn.Linear(out_dim, out_dim)))
        self.encoder_mlp = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder_mlp(x)
