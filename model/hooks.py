"""Named hook points: identity modules placed where the model's named features live.

A forward hook on a `HookPoint` sees exactly the tensor the model uses next, and a hook that
returns a tensor replaces it (this is how `workbench.taps.ablate` / `patch` intervene).
They cost one Python call each when no hook is registered.
"""
from __future__ import annotations

from torch import nn


class HookPoint(nn.Identity):
    """An identity module whose only job is to be hooked (like TransformerLens' HookPoint)."""


def davit_block_taps(stages) -> dict[str, nn.Module]:
    """`vision.block{j}` (every DaViT block, numbered across stages) and `vision.stage{s}` (the last block of
    stage s) for a DaViT `blocks` list of stages. Hooks go on the blocks themselves: a hook on a stage's
    ModuleList would never fire."""
    taps: dict[str, nn.Module] = {}
    j = 0
    for s, blocks in enumerate(stages):
        for block in blocks:
            taps[f"vision.block{j}"] = block
            j += 1
        taps[f"vision.stage{s}"] = blocks[len(blocks) - 1]
    return taps
