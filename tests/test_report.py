"""report.write_outputs: every file from a small selection, and report.png only where matplotlib imports."""

from __future__ import annotations

import csv
import json
import logging
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from lightning_tive import report
from lightning_tive.tive.selection import select_from_values

TASKS = ["color", "count", "text"]
TABLES = ("tasks.csv", "values.csv", "subset.json", "summary.json")


def small_selection() -> tuple[SimpleNamespace, object, dict]:
    """A datamodule stand-in with 12 records in 3 tasks, and a real selection of half of them."""
    rng = np.random.default_rng(0)
    task_ids = np.repeat(np.arange(len(TASKS)), 4)
    records = [{"id": f"r{i}", "task": TASKS[t], "conversations": []} for i, t in enumerate(task_ids)]
    datamodule = SimpleNamespace(
        pool_task_ids=task_ids, task_names=TASKS, pool_size=len(records), pool_record=lambda i: records[i],
    )
    result = select_from_values(
        norms=rng.uniform(0.5, 2.0, len(records)), instance_vals=rng.uniform(-1, 1, len(records)),
        finite=np.ones(len(records), dtype=bool), task_ids=task_ids, task_names=TASKS, ratio=0.5, seed=0,
    )
    summary = {"pool_size": len(records), "budget": int(result.budget), "timings_s": {"valuation_s": 1.0}}
    return datamodule, result, summary


def write(tmp_path, caplog) -> tuple[object, list[str]]:
    datamodule, result, summary = small_selection()
    with caplog.at_level(logging.INFO):
        report.write_outputs(tmp_path, datamodule, result, result.selected_indices, summary, loggers=[])
    return result, [r.getMessage() for r in caplog.records if r.name == report.log.name]


def check_tables(tmp_path, result) -> None:
    rows = list(csv.DictReader(open(tmp_path / "tasks.csv")))
    assert [r["task"] for r in rows] == TASKS and sum(int(r["budget"]) for r in rows) == result.budget
    assert len(list(csv.DictReader(open(tmp_path / "values.csv")))) == 12
    assert [r["id"] for r in json.loads((tmp_path / "subset.json").read_text())] == [
        f"r{i}" for i in result.selected_indices
    ]
    assert json.loads((tmp_path / "summary.json").read_text())["budget"] == result.budget


def test_without_matplotlib_every_other_file_is_written_and_one_line_says_why(tmp_path, monkeypatch, caplog):
    pytest.importorskip("matplotlib")  # the contrast below needs it installed, as pyproject requires
    (tmp_path / "report.png").write_bytes(b"a plot from an earlier selection")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    result, lines = write(tmp_path, caplog)  # returns: the W&B payload and the summary line still follow
    check_tables(tmp_path, result)
    assert not (tmp_path / "report.png").exists()  # the stale plot is gone, not left to mislead
    assert len(lines) == 1 and "report.png skipped" in lines[0] and "pip install matplotlib" in lines[0]


def test_with_matplotlib_report_png_is_written_too(tmp_path, caplog):
    pytest.importorskip("matplotlib")
    result, lines = write(tmp_path, caplog)
    check_tables(tmp_path, result)
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not lines
