"""Named hook points: identity modules placed where the model's named features live.

A forward hook on a `HookPoint` sees exactly the tensor the model uses next, and a hook that
returns a tensor replaces it (this is how `workbench.taps.ablate` / `patch` intervene).
They cost one Python call each when no hook is registered.
"""
from __future__ import annotations

from torch import nn


class HookPoint(nn.Identity):
    """An identity module whose only job is to be hooked (like TransformerLens' HookPoint)."""
