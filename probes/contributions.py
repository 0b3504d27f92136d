"""Exact Shapley values of fusion streams (or any small set of players) for a metric.

With k players (e.g. the fusion streams depth, caption, ocr, grounding) the metric is
evaluated once on each of the 2^k subsets (the coalitions: e.g. a model run with only those
streams kept and the others ablated) and player i gets

    phi_i = sum over S not containing i of |S|! (k - |S| - 1)! / k! * (v(S + i) - v(S)),

the average marginal gain of adding i over all orders. The values are exact and satisfy
efficiency: sum_i phi_i = v(all) - v(empty), which the result reports as a check.
"""
from __future__ import annotations

import itertools
import json
import math
from collections.abc import Mapping as MappingABC
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Mapping

MAX_PLAYERS = 16  # 65,536 evaluations; beyond that use sampling, not exact values


@dataclass(eq=False)
class ShapleyResult(MappingABC):
    """Per-player Shapley values plus bookkeeping. It is also a read-only mapping
    player -> value (``res["depth"]``, ``dict(res)``, ``res.values()``)."""
    players: list[str]
    shapley: dict[str, float]
    full: float                    # v(all players)
    empty: float                   # v(no player)
    total: float                   # sum of the values
    efficiency_gap: float          # total - (full - empty); ~0 up to rounding
    subsets: dict[str, float]      # "+"-joined members in player order ("" = empty set) -> metric
    evaluations: int

    def __getitem__(self, player: str) -> float:
        return self.shapley[player]

    def __iter__(self) -> Iterator[str]:
        return iter(self.players)

    def __len__(self) -> int:
        return len(self.players)

    def to_dict(self) -> dict:
        return {"players": list(self.players), "values": dict(self.shapley), "full": self.full,
                "empty": self.empty, "total": self.total, "efficiency_gap": self.efficiency_gap,
                "subsets": dict(self.subsets), "evaluations": self.evaluations}

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)


def _key(subset: Iterable[str], order: Mapping[str, int]) -> str:
    return "+".join(sorted(subset, key=order.__getitem__))


def _shapley(players: list[str], v: Callable[[frozenset], float]) -> ShapleyResult:
    k = len(players)
    if k == 0:
        raise ValueError("players: give at least one player (e.g. ['depth', 'caption', 'ocr', 'grounding'])")
    if len(set(players)) != k:
        raise ValueError(f"players: names must be distinct, got {players}")
    if k > MAX_PLAYERS:
        raise ValueError(f"players: {k} players need 2^{k} evaluations; exact Shapley values are limited to "
                         f"{MAX_PLAYERS} players (group players or sample permutations)")
    order = {p: i for i, p in enumerate(players)}
    cache: dict[frozenset, float] = {}
    for r in range(k + 1):
        for combo in itertools.combinations(players, r):
            s = frozenset(combo)
            val = float(v(s))
            if not math.isfinite(val):
                raise ValueError(f"metric of subset {sorted(s, key=order.__getitem__)} is {val}; "
                                 "the metric must return a finite number for every subset")
            cache[s] = val
    weights = [math.factorial(r) * math.factorial(k - r - 1) / math.factorial(k) for r in range(k)]
    values = {}
    for p in players:
        others = [q for q in players if q != p]
        phi = 0.0
        for r in range(k):
            for combo in itertools.combinations(others, r):
                s = frozenset(combo)
                phi += weights[r] * (cache[s | {p}] - cache[s])
        values[p] = phi
    full, empty = cache[frozenset(players)], cache[frozenset()]
    total = sum(values.values())
    return ShapleyResult(players=list(players), shapley=values, full=full, empty=empty, total=total,
                         efficiency_gap=total - (full - empty),
                         subsets={_key(s, order): val for s, val in cache.items()}, evaluations=len(cache))


def shapley_values(players: Iterable[str], metric: Callable[[frozenset], float]) -> ShapleyResult:
    """Exact Shapley values; ``metric(frozenset_of_players) -> float`` is called exactly once per
    subset (2^k calls, results cached), the empty set included."""
    return _shapley(list(players), metric)


def shapley_from_table(table: Mapping[frozenset | Iterable[str] | str, float],
                       players: Iterable[str] | None = None) -> ShapleyResult:
    """Exact Shapley values from precomputed metrics of every subset. Keys may be frozensets,
    iterables of names, or "+"-joined strings ("" for the empty set); ``players`` defaults to
    the union of all keys. Every subset must be present."""
    norm: dict[frozenset, float] = {}
    for key, val in table.items():
        if isinstance(key, str):
            s = frozenset(p for p in key.split("+") if p)
        else:
            s = frozenset(key)
        norm[s] = float(val)
    names = list(players) if players is not None else sorted(set().union(*norm.keys()))
    missing = []
    for r in range(len(names) + 1):
        for combo in itertools.combinations(names, r):
            if frozenset(combo) not in norm:
                missing.append("+".join(combo) or "(empty)")
    if missing:
        shown = ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else "")
        raise ValueError(f"table: {len(missing)} subset(s) missing: {shown}; give the metric of every subset "
                         f"of {names}, the empty set included")
    return _shapley(names, lambda s: norm[s])
