"""The benchmark scripts run end to end on small settings (bench_selection also cleans up after itself)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

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


def test_projection_bench_prints_json_last_with_both_projectors(capsys):
    path = SCRIPT.parent / "bench_projection.py"
    spec = importlib.util.spec_from_file_location("bench_projection", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--quick", "--proj-dim", "512", "--tokens", "8", "--batch-sizes", "2", "--threads", "1"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["full_dim_32_layers"] == 134_217_728 and summary["full_dim_measured"] == 8_388_608
    assert summary["rademacher_random_entries_per_batch_32_layers"] == 134_217_728 * 512
    figures = summary["batch"]["2"]
    for kind in ("kronecker", "rademacher"):
        per_example = figures[f"{kind}_s_per_example"]
        assert per_example["32_layers"] == pytest.approx(16 * per_example["2_layers"])
        assert per_example["2_layers"] > 0
    assert figures["ratio_rademacher_over_kronecker"] == pytest.approx(
        figures["rademacher_s_per_example"]["2_layers"] / figures["kronecker_s_per_example"]["2_layers"]
    )


def test_valuation_bench_cost_mode_times_every_setting_against_full(capsys, monkeypatch):
    path = SCRIPT.parent / "bench_valuation.py"
    spec = importlib.util.spec_from_file_location("bench_valuation", path)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_valuation", bench)  # its dataclasses look their module up
    spec.loader.exec_module(bench)
    bench.main(["--cost", "--rounds", "1", "--batch-size", "4", "--batches", "2"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["cost"]
    for name, batch_set in summary["batch_sets"].items():
        assert batch_set["cut"] >= batch_set["half_of_longest"] and 0 < batch_set["tokens_kept"] <= 1
        arms = summary["demo"]["arms"][name]
        assert set(arms) == {"full", "gradient_layers=1", "gradient_layers=1,unfrozen",
                             f"valuation_max_length={batch_set['cut']}", "both", "train"}
        assert arms["full"]["vs_full"] == 1.0 and all(a["s_per_round"] > 0 for a in arms.values())
    assert summary["demo"]["info"]["feature_dims"] == {"all": 32768, "last1": 16384}
