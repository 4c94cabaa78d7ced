"""Two processes: the second builds only a skeleton, and both end up with exactly the one-process model's weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from build_check import make_module, weights_digests, write_tied_lm
from parity import ROOT

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    "strategy,finetune,tied", [("ddp", "lora", False), ("fsdp", "full", False), ("fsdp", "lora", False), ("ddp", "full", True)]
)
def test_process_zero_reads_the_weights_and_the_others_receive_them(tmp_path, strategy, finetune, tied):
    """A tied LM (lm_head is the embeddings, as SmolLM2's) stays tied on the process that built a skeleton."""
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    tied_lm = [str(write_tied_lm(tmp_path / "lm"))] if tied else []
    done = subprocess.run([sys.executable, "tests/e2e/build_check.py", str(tmp_path), strategy, finetune, *tied_lm],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert [r["built_skeleton"] for r in ranks] == [False, True]
    assert all(r["sharded"] == (strategy == "fsdp") for r in ranks)
    assert all(r["tied"] == tied for r in ranks)
    torch.manual_seed(0)
    expected = weights_digests(make_module(finetune, tied_lm[0] if tied else None).model)
    for record in ranks:
        assert record["digests"].keys() == expected.keys()
        assert [n for n in expected if record["digests"][n] != expected[n]] == []
