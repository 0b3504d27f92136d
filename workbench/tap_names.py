"""Tap names: the one place where a name such as ``prompt.ocr.layer3`` or ``fusion.input[ocr]`` is parsed
and formatted.

The vocabulary (README, `fvl taps`):

  vision.stage{s}  vision.block{j}  vision.layer{i}  vision.output       the vision tower
  depth                                                                  the depth stream V
  prompt.{name}  prompt.{name}.layer{i}                                  breadth streams per prompt
  fusion.input  fusion.input[{stream}]  fusion.output  projector.output  fusion and projector
  llm.layer{i}                                                           the LLM

This module imports nothing heavy, so the command line can refuse a misspelt tap before a model loads.
"""
from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass

FAMILIES = ("vision", "depth", "prompt", "fusion", "projector", "llm")
SPECIAL = ("all", "default")
_NAME = re.compile(
    r"^(?:vision\.(?:stage\d+|block\d+|layer\d+|output)"
    r"|depth"
    r"|prompt\.[A-Za-z0-9_\-]+(?:\.layer\d+)?"
    r"|fusion\.(?:input|output)"
    r"|projector\.output"
    r"|llm\.layer\d+)$"
)
_VIEW = re.compile(r"^(?P<base>[^\[\]]+)\[(?P<view>[^\[\]]+)\]$")


class TapNameError(ValueError):
    """A tap name or pattern outside the vocabulary."""


@dataclass(frozen=True)
class TapName:
    """A parsed tap name: ``base`` is the hooked feature, ``view`` an optional named slice of it
    (``fusion.input[ocr]`` is the OCR stream's channels of the fusion input)."""

    base: str
    view: str | None = None

    @classmethod
    def parse(cls, text: str) -> "TapName":
        m = _VIEW.match(text)
        base, view = (m.group("base"), m.group("view")) if m else (text, None)
        if not _NAME.match(base):
            raise TapNameError(f"{text!r} is not a tap name; taps look like {', '.join(EXAMPLES)}")
        if view is not None and base != "fusion.input":
            raise TapNameError(f"{text!r}: only fusion.input has views (fusion.input[depth], fusion.input[ocr], ...)")
        return cls(base, view)

    def __str__(self) -> str:
        return f"{self.base}[{self.view}]" if self.view else self.base

    @property
    def family(self) -> str:
        return self.base.split(".")[0]

    @property
    def prompt(self) -> str | None:
        """The prompt of a ``prompt.*`` tap."""
        return self.base.split(".")[1] if self.family == "prompt" else None

    @property
    def index(self) -> int | None:
        """The number in ``stage{s}``, ``block{j}``, ``layer{i}``."""
        m = re.search(r"(\d+)$", self.base)
        return int(m.group(1)) if m and self.base != "depth" else None


EXAMPLES = ("vision.stage2", "vision.layer11", "depth", "prompt.ocr", "prompt.caption.layer3",
            "fusion.input[ocr]", "fusion.output", "llm.layer0")


def split_spec(spec: str | list[str]) -> list[str]:
    """'a,b, c' or ['a', 'b'] -> ['a', 'b', 'c'] (empty parts dropped)."""
    parts = spec.split(",") if isinstance(spec, str) else list(spec)
    return [p.strip() for p in parts if p and p.strip()]


def check_pattern(pattern: str) -> None:
    """Refuse a pattern that can match no tap of any model: a misspelt family, or a name outside the
    grammar. Globs are checked by their family (``prompt.*``, ``vision.stage*``, ``*``)."""
    if pattern in SPECIAL or set(pattern) <= {"*", "?"}:
        return
    m = _VIEW.match(pattern)
    base = m.group("base") if m else pattern
    if any(c in base for c in "*?["):
        family = base.split(".")[0]
        if any(c in family for c in "*?[") or family in FAMILIES:
            return
        raise TapNameError(f"tap pattern {pattern!r}: {family!r} is not a tap family; families are "
                           f"{', '.join(FAMILIES)} (list a model's taps with `fvl taps`)")
    TapName.parse(pattern)


def check_spec(spec: str | list[str]) -> list[str]:
    """Check every pattern of a comma-separated spec; returns the patterns."""
    patterns = split_spec(spec)
    if not patterns:
        raise TapNameError("no taps given; pass names or globs such as 'depth,prompt.*' (or 'all', 'default')")
    for p in patterns:
        check_pattern(p)
    return patterns


def expand(patterns: list[str], available: list[str]) -> list[str]:
    """Glob patterns -> the matching names of ``available``, in its order; a pattern that matches nothing
    is an error. A view (``fusion.input[ocr]``) matches when its base is available and is kept as written;
    a globbed view (``fusion.input[*]``) stays a pattern for the store to expand."""
    names: list[str] = []
    for pattern in patterns:
        m = _VIEW.match(pattern)
        if m and m.group("base") in available:
            matched = [pattern]
        else:
            matched = [n for n in available if fnmatch.fnmatchcase(n, pattern)]
        if not matched:
            family = pattern.split(".")[0]
            close = [n for n in available if n.split(".")[0] == family][:8] or available[:8]
            raise TapNameError(f"tap {pattern!r} matches nothing here; known taps include {close}")
        names += [n for n in matched if n not in names]
    return names
