"""Errors and the conversion report of `model.loading`.

Kept apart from the loaders so that any layer (commands, the app, tests) can catch a loading error
without importing torch or the model classes.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded or converted faithfully; the message names the keys/files and the fix."""


class UnsupportedModelError(CheckpointError):
    """A directory whose model family has no loader or adapter; the message lists the supported ones."""


def abbrev(keys: list[str], limit: int = 12) -> str:
    """The first `limit` names, then how many more: error messages stay one readable line."""
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


@dataclass
class ConversionReport:
    """What a conversion did, kept on the model (`model.conversion_report`) and written as conversion.json."""

    source: str
    layout: str
    loaded: int = 0
    dropped: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    added: list[str] = field(default_factory=list)
    rebuilt: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def summary(self) -> str:
        lines = [f"{self.source}: {self.layout} layout, {self.loaded} tensors loaded"]
        if self.dropped:
            lines.append(f"  dropped on purpose ({len(self.dropped)}): {abbrev(self.dropped)}")
        if self.rebuilt:
            lines.append(f"  rebuilt fixed tables absent from the checkpoint ({len(self.rebuilt)}): "
                         f"{abbrev(self.rebuilt)}")
        if self.missing:
            lines.append(f"  MISSING, left randomly initialised ({len(self.missing)}): {abbrev(self.missing)}")
        lines += [f"  added: {a}" for a in self.added]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)
