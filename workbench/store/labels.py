"""Label columns: the per-item labels of the index as arrays an analysis can use directly."""
from __future__ import annotations

from typing import Any

import numpy as np


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


MISSING = _Missing()


def label_array(values: list[Any]) -> np.ndarray:
    """One label column as an array: typed when all values share a simple type, else objects.

    Missing numbers become NaN (float column); other missing values become None.
    """
    present = [v for v in values if v is not MISSING]
    kinds = {_label_kind(v) for v in present}
    if len(present) < len(values):
        if kinds and kinds <= {"int", "float"}:
            return np.array([np.nan if v is MISSING else v for v in values], dtype=np.float64)
        values = [None if v is MISSING else v for v in values]
    elif kinds == {"bool"}:
        return np.array(values, dtype=bool)
    elif kinds and kinds <= {"int", "float"}:
        return np.array(values, dtype=np.int64 if kinds == {"int"} else np.float64)
    elif kinds == {"str"}:
        return np.array(values, dtype=str)
    elif kinds == {"list"}:
        try:
            arr = np.array(values)
            if arr.dtype.kind in "biuf":
                return arr
        except ValueError:  # ragged
            pass
    arr = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        arr[i] = v
    return arr


def _label_kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "str"
    if isinstance(value, list):
        return "list"
    return "other"
