"""`python tests/e2e/straggler.py fit ...`: `fit` where process 1 starts its valuation `LIGHTNING_TIVE_TEST_STRAGGLER_S`
seconds late, with the process group's timeout cut to 3 s first (as if NCCL's 30 minutes had passed).

Lightning's launcher starts the other processes with this same command, so each one patches itself.
"""

from __future__ import annotations

import os
import time
from datetime import timedelta

import torch.distributed as dist
from torch.distributed import distributed_c10d

from lightning_tive import phases
from lightning_tive.cli import main

LATE_S = float(os.environ["LIGHTNING_TIVE_TEST_STRAGGLER_S"])
_value = phases.ReferencePhases.value


def late_value(self, *args, **kwargs):
    """The real valuation, entered late by process 1, under a short collective timeout."""
    if dist.is_initialized():
        distributed_c10d._set_pg_timeout(timedelta(seconds=3))
    if self.comm.rank == 1:
        time.sleep(LATE_S)
    return _value(self, *args, **kwargs)


phases.ReferencePhases.value = late_value

if __name__ == "__main__":
    main()
