"""scripts/bench_selection.py runs end to end on a small pool and cleans up after itself."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_selection.py"


def test_bench_prints_json_last_and_removes_its_files(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_selection", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(
        [
            "--n",
            "3000",
            "--dim",
            "32",
            "--tasks",
            "4",
            "--compare-quadratic",
            "600",
            "--workdir",
            str(tmp_path),
        ]
    )
    last = capsys.readouterr().out.strip().splitlines()[-1]
    summary = json.loads(last)
    assert {"wall_s", "peak_rss_mb", "n", "dim", "quadratic_ratio"} <= set(summary)
    assert (summary["n"], summary["dim"], summary["budget"], summary["selected"]) == (3000, 32, 450, 450)
    assert summary["max_abs_diff"] < 1e-5  # streamed and N x N values agree
    assert list(tmp_path.iterdir()) == []
