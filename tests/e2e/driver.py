"""`python tests/e2e/driver.py fit ...`: `fit` with test instruments switched on by environment variables.

- `LIGHTNING_TIVE_TEST_STRAGGLER_S`: process 1 starts its valuation that many seconds late, with the
  process group's timeout cut to 3 s first (as if NCCL's 30 minutes had passed);
- `LIGHTNING_TIVE_TEST_SEEN`: a folder where each process appends `{"step", "pool_index"}` per training
  batch to `seen-rank-R.jsonl`;
- `LIGHTNING_TIVE_TEST_KILL_AT`: every process stops dead (exit code 3) when that global step starts;
- `LIGHTNING_TIVE_TEST_HIDE_CHECKPOINT`: that process does not see the checkpoint it resumes from (a node
  whose disk lacks it).

Lightning's launcher starts the other processes with this same command, so each one patches itself.
"""

from __future__ import annotations

import json
import os
import time
from datetime import timedelta
from pathlib import Path

import lightning as L
import torch.distributed as dist
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from torch.distributed import distributed_c10d

from lightning_tive import __main__ as entry
from lightning_tive import cli, phases, sharding

LATE_S = float(os.environ.get("LIGHTNING_TIVE_TEST_STRAGGLER_S", "0"))
SEEN = os.environ.get("LIGHTNING_TIVE_TEST_SEEN")
KILL_AT = int(os.environ.get("LIGHTNING_TIVE_TEST_KILL_AT", "-1"))
HIDE_FROM = os.environ.get("LIGHTNING_TIVE_TEST_HIDE_CHECKPOINT")


class Instruments(L.Callback):
    """Records each training batch's pool indices; dies at KILL_AT."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == KILL_AT:
            os._exit(3)  # a kill: no hooks, no checkpoint
        if SEEN:
            sampler = type(trainer.train_dataloader.sampler).__name__  # not wrapped by Lightning
            line = json.dumps({"step": trainer.global_step, "pool_index": batch["pool_index"].tolist(), "sampler": sampler})
            with open(Path(SEEN) / f"seen-rank-{trainer.global_rank}.jsonl", "a") as f:
                f.write(line + "\n")


_value = phases.ReferencePhases.value
_instantiate_trainer = cli.TiveCLI.instantiate_trainer


def late_value(self, *args, **kwargs):
    """The real valuation, entered late by process 1, under a short collective timeout (restored after it)."""
    if dist.is_initialized():
        distributed_c10d._set_pg_timeout(timedelta(seconds=3))
    if self.comm.rank == 1:
        time.sleep(LATE_S)
    try:
        return _value(self, *args, **kwargs)
    finally:  # later phases are not under test: a busy machine must not time them out
        if dist.is_initialized():
            distributed_c10d._set_pg_timeout(default_pg_timeout)


def instrumented_trainer(self, **kwargs):
    """The CLI's trainer, with the instruments added."""
    trainer = _instantiate_trainer(self, **kwargs)
    trainer.callbacks.append(Instruments())
    return trainer


if LATE_S:
    phases.ReferencePhases.value = late_value
if HIDE_FROM is not None:
    _visible = sharding.checkpoint_visible
    sharding.checkpoint_visible = lambda path: _visible(path) and os.environ.get("LOCAL_RANK", "0") != HIDE_FROM
cli.TiveCLI.instantiate_trainer = instrumented_trainer

if __name__ == "__main__":
    entry.main()
