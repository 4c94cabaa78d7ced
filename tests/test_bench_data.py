"""scripts/bench_data.py runs end to end on a small synthetic pool, and its numbers mean what they say."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_data_smoke(tmp_path):
    done = subprocess.run(
        [sys.executable, "scripts/bench_data.py", "--records", "1500", "--quick", "--before", "none",
         "--world", "2", "--batch", "4", "--work", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    first, warm = result["setup_first"], result["setup_warm"]
    assert first["pool"] == warm["pool"] and first["digest"] == warm["digest"]  # the warm set-up maps the same pool
    assert warm["setup_s"] < first["setup_s"]
    pad = result["padding_synthetic"]
    assert pad["training_grouped"] > pad["training_shuffled"] and pad["valuation_sorted_shards"] > pad["valuation_pool_order"]
