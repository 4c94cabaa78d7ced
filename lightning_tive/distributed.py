"""Every collective TIVE uses, in one place, on the device the process group wants.

NCCL accepts only CUDA tensors and gloo CPU ones: each helper moves its tensor to the strategy's
root device for the collective and back to where it came from. With one process they are no-ops.
"""

from __future__ import annotations

import hashlib
import itertools
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

# Calls of `wait_for_all` per name, in this process: every process makes the same calls in the same order.
_WAITS: defaultdict[str, itertools.count] = defaultdict(itertools.count)


def _default_store() -> Any:
    """The default process group's key-value store (the TCPStore of env:// rendezvous), or None."""
    from torch.distributed import distributed_c10d

    try:
        return distributed_c10d._get_default_store()
    except (RuntimeError, ValueError, AttributeError):
        return None


class Collectives:
    """Sums, maxima, gathers and broadcasts across the processes of a run (no-ops on one)."""

    def __init__(
        self, world_size: int, rank: int, device: torch.device | str, strategy: Any = None, group: Any = None
    ) -> None:
        self.world_size, self.rank = int(world_size), int(rank)
        self.device = torch.device(device)
        self.strategy = strategy  # for barrier() and broadcast_object(), when given
        self.group = group  # a sub-group (e.g. the data-parallel processes); None: every process

    @classmethod
    def of(cls, trainer: Any) -> Collectives:
        """The collectives of a Lightning trainer's processes."""
        return cls(trainer.world_size, trainer.global_rank, trainer.strategy.root_device, trainer.strategy)

    @property
    def distributed(self) -> bool:
        """More than one process."""
        return self.world_size > 1

    def _to_group(self, tensor: torch.Tensor) -> torch.Tensor:
        """The tensor on the device the process group works on (itself when already there)."""
        return tensor.to(self.device)

    @staticmethod
    def _back(moved: torch.Tensor, tensor: torch.Tensor) -> None:
        """Write a collective's result back into the caller's tensor, on the caller's device."""
        if moved is not tensor:
            tensor.copy_(moved)

    def _reduce(self, tensor: torch.Tensor, op: Any) -> torch.Tensor:
        if not self.distributed:
            return tensor
        moved = self._to_group(tensor)
        dist.all_reduce(moved, op=op, group=self.group)
        self._back(moved, tensor)
        return tensor

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """In-place sum over processes; returns the tensor."""
        return self._reduce(tensor, dist.ReduceOp.SUM)

    def max_(self, tensor: torch.Tensor) -> torch.Tensor:
        """In-place maximum over processes; returns the tensor."""
        return self._reduce(tensor, dist.ReduceOp.MAX)

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum over processes, as a new tensor."""
        return self.sum_(tensor.clone())

    def any(self, flag: bool) -> bool:
        """True when `flag` holds on any process."""
        return bool(self.max_(torch.tensor([1.0 if flag else 0.0])).item() > 0)

    def broadcast_(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Overwrite `tensor` with process `src`'s, in place."""
        if not self.distributed:
            return tensor
        moved = self._to_group(tensor.data)
        dist.broadcast(moved, src=src, group=self.group)
        self._back(moved, tensor.data)
        return tensor

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every process's `obj`, in rank order."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """Process `src`'s `obj` on every process."""
        if not self.distributed:
            return obj
        if self.strategy is not None:
            return self.strategy.broadcast(obj, src=src)
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def barrier(self, name: str) -> None:
        """Wait for every process."""
        if self.strategy is not None:
            self.strategy.barrier(name)
        elif self.distributed:
            dist.barrier()

    def wait_for_all(self, name: str, what: str = "arrive", poll_s: float = 0.5, report_every_s: float = 60.0) -> None:
        """Wait until every process reaches `name`, without holding a collective open meanwhile.

        A barrier is a collective: under NCCL, a process that waits in one longer than the process
        group's timeout (30 minutes by default) aborts the run. Here each process adds 1 to a counter in
        the process group's key-value store and polls it, so the wait may last as long as the slowest
        process needs; a barrier follows once all are there (it returns at once).
        """
        if not self.distributed:
            return
        store = _default_store() if self.group is None else None
        if store is not None:
            key = f"lightning_tive/wait/{name}/{next(_WAITS[name])}"
            arrived, start, reported = store.add(key, 1), time.monotonic(), time.monotonic()
            while arrived < self.world_size:
                time.sleep(poll_s)
                arrived = store.add(key, 0)
                if self.rank == 0 and time.monotonic() - reported >= report_every_s:
                    reported = time.monotonic()
                    print(
                        f"[tive] waiting {reported - start:.0f} s for {self.world_size - arrived} of {self.world_size} "
                        f"processes to {what}", flush=True,
                    )
        self.barrier(name)

    def on_first(self, fn: Callable[[], Any], what: str) -> Any:
        """`fn()` on process 0 (its result there, None elsewhere); if it raises, every process raises.

        Alone, process 0's exception would leave the others waiting in their next collective until the
        process group's timeout.
        """
        result, error = None, None
        if self.rank == 0:
            try:
                result = fn()
            except Exception as err:  # noqa: BLE001 (re-raised below, on every process)
                error = err
        failure = self.broadcast_object(None if error is None else f"{type(error).__name__}: {error}")
        if error is not None:
            raise error
        if failure is not None:
            raise RuntimeError(f"process 0 failed to {what}: {failure}")
        return result

    def same_everywhere(self, array: np.ndarray, what: str) -> str:
        """Refuse to go on unless every process holds the identical array; returns its digest."""
        digest = hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()
        digests = self.gather_objects(digest)
        if len(set(digests)) != 1:
            raise RuntimeError(f"processes disagree on {what}: {digests}")
        return digest

    def gather_by_index(self, pool_size: int, indices: np.ndarray, columns: dict[str, np.ndarray]) -> dict:
        """Pool-ordered per-example columns from every process's rows; each index exactly once."""
        out = {
            name: np.zeros(pool_size, dtype=bool) if column.dtype == bool else np.full(pool_size, np.nan)
            for name, column in columns.items()
        }
        seen = np.zeros(pool_size, dtype=np.int64)
        for idx, part in self.gather_objects((indices, columns)):
            for name, column in part.items():
                out[name][idx] = column
            np.add.at(seen, idx, 1)
        if not (seen == 1).all():
            raise RuntimeError(
                f"valuation covered {int((seen == 0).sum())} pool indices 0 times and {int((seen > 1).sum())} more than once"
            )
        return out
