"""The check that a multi-process selection is the one-process selection, shared by the DDP and FSDP tests."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import numpy as np


def values(tmp: Path) -> dict[int, dict]:
    """values.csv rows by pool index."""
    return {int(r["index"]): r for r in csv.DictReader(open(tmp / "tive" / "values.csv"))}


def assert_same_selection(one: Path, many: Path, atol: float = 1e-4, min_overlap: float = 0.99) -> float:
    """Equal task budgets, instance values within `atol`, subsets overlapping at least `min_overlap`."""
    budgets = [{r["task"]: int(r["budget"]) for r in csv.DictReader(open(run / "tive" / "tasks.csv"))} for run in (one, many)]
    assert budgets[0] == budgets[1]
    v1, v2 = values(one), values(many)
    assert v1.keys() == v2.keys()
    u1 = np.array([float(v1[i]["instance_value"]) for i in sorted(v1)])
    u2 = np.array([float(v2[i]["instance_value"]) for i in sorted(v2)])
    np.testing.assert_allclose(u1, u2, atol=atol)
    s1, s2 = (Counter(r["id"] for r in json.loads((run / "tive" / "subset.json").read_text())) for run in (one, many))
    overlap = sum((s1 & s2).values()) / sum(s1.values())
    assert overlap >= min_overlap, overlap
    return overlap
