"""Task values and instance values of TIVE, streamed over stored features in O(N*d).

* Task value ``v(T)`` = mean of ``n_s`` over the finite examples ``s`` of ``T``.
* Instance value ``u(s)`` = mean over ``s'`` in ``T`` of ``cos(f_s, f_s')``, ``s`` itself included,
  computed as ``f̂_s · mean_{s' in T} f̂_s'`` in two passes over the features (the per-task sum of unit
  vectors, then one dot product per row); no N x N matrix is ever formed.

An example is *finite* when its norm is finite and its feature row holds no NaN/inf. Non-finite
examples are left out of every task statistic and get NaN values. A finite example whose feature is
zero has cosine 0 with everything (it counts in ``|T|`` and adds a zero vector).

Rows are always processed in fixed sub-blocks of :data:`SUB_BLOCK` rows aligned to the pool index,
so the values are bit-identical whatever ``block_rows`` and whatever the source (array or store)
holds the same numbers, for a given machine and thread count.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

__all__ = [
    "SUB_BLOCK",
    "ArrayFeatures",
    "FeatureSource",
    "TaskStats",
    "as_feature_source",
    "instance_values",
    "task_values",
]

# Fixed summation granularity (rows); small enough that a sub-block's float16 and float32 copies stay in
# a typical L3 cache at d=8192.
SUB_BLOCK = 256


@runtime_checkable
class FeatureSource(Protocol):
    """Anything that yields ``(first_row, rows)`` feature blocks in row order (e.g. a FeatureStore)."""

    @property
    def num_rows(self) -> int: ...

    @property
    def dim(self) -> int: ...

    def iter_blocks(
        self, block_rows: int = ..., start: int = ..., stop: int | None = ..., reuse_buffer: bool = ...
    ) -> Iterator[tuple[int, np.ndarray]]: ...


class ArrayFeatures:
    """A :class:`FeatureSource` over an in-memory (or memory-mapped) array or tensor [N, d]."""

    def __init__(self, array: Any) -> None:
        if hasattr(array, "detach"):
            array = array.detach().cpu().numpy()
        array = np.asarray(array)
        if array.ndim != 2:
            raise ValueError(f"features must be 2-D [N, d], got shape {array.shape}")
        self.array = array

    @property
    def num_rows(self) -> int:
        """Number of rows."""
        return self.array.shape[0]

    @property
    def dim(self) -> int:
        """Feature dimension."""
        return self.array.shape[1]

    def iter_blocks(
        self, block_rows: int = 8192, start: int = 0, stop: int | None = None, reuse_buffer: bool = False
    ) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(first_row, view)`` blocks over rows ``[start, stop)`` (views: no buffer to reuse)."""
        stop = self.num_rows if stop is None else min(stop, self.num_rows)
        for first in range(start, stop, block_rows):
            yield first, self.array[first : min(first + block_rows, stop)]


def as_feature_source(features: Any) -> FeatureSource:
    """Return ``features`` if it is a FeatureSource, else wrap an array/tensor in :class:`ArrayFeatures`."""
    if isinstance(features, FeatureSource) and not isinstance(features, np.ndarray):
        return features
    return ArrayFeatures(features)


@dataclass
class TaskStats:
    """Per-task counts and task values (index = task id)."""

    #: [K] examples per task.
    sizes: np.ndarray
    #: [K] finite examples per task.
    finite_counts: np.ndarray
    #: [K] mean gradient norm over the finite examples; NaN for a task without any.
    values: np.ndarray


def _check_task_ids(task_ids: Any, num_rows: int, num_tasks: int) -> np.ndarray:
    tid = np.asarray(task_ids).astype(np.int64).reshape(-1)
    if tid.shape[0] != num_rows:
        raise ValueError(f"task_ids has {tid.shape[0]} entries but there are {num_rows} examples")
    if tid.size and (tid.min() < 0 or tid.max() >= num_tasks):
        raise ValueError(f"task ids must lie in [0, {num_tasks}), got range [{tid.min()}, {tid.max()}]")
    return tid


def task_values(norms: Any, task_ids: Any, num_tasks: int, finite: Any = None) -> TaskStats:
    """Return sizes, finite counts and ``v(T)`` = mean finite gradient norm of each task."""
    n = np.asarray(norms, dtype=np.float64).reshape(-1)
    tid = _check_task_ids(task_ids, n.shape[0], num_tasks)
    ok = np.isfinite(n) if finite is None else (np.asarray(finite, dtype=bool) & np.isfinite(n))
    sizes = np.bincount(tid, minlength=num_tasks)
    counts = np.bincount(tid[ok], minlength=num_tasks)
    sums = np.bincount(tid[ok], weights=n[ok], minlength=num_tasks)
    with np.errstate(invalid="ignore", divide="ignore"):
        values = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    return TaskStats(sizes=sizes, finite_counts=counts, values=values)


def _sub_blocks(source: FeatureSource, block_rows: int) -> Iterator[tuple[int, np.ndarray]]:
    block_rows = max(SUB_BLOCK, -(-block_rows // SUB_BLOCK) * SUB_BLOCK)
    for first, block in source.iter_blocks(block_rows, reuse_buffer=True):
        for s in range(0, block.shape[0], SUB_BLOCK):
            yield first + s, block[s : s + SUB_BLOCK]


class _Rows:
    """A reused float32 buffer holding one sub-block with its non-finite rows zeroed."""

    def __init__(self, dim: int) -> None:
        self.buffer = torch.empty(SUB_BLOCK, dim, dtype=torch.float32)

    def load(self, rows: np.ndarray, ok: torch.Tensor | None = None) -> torch.Tensor:
        f = self.buffer[: rows.shape[0]]
        with warnings.catch_warnings():
            # Read-only (memory-mapped) rows: torch warns, but they are only read.
            warnings.simplefilter("ignore", UserWarning)
            f.copy_(torch.from_numpy(rows))
        if ok is not None and not bool(ok.all()):
            f[~ok] = 0
        return f


@contextmanager
def _torch_threads(num_threads: int | None) -> Iterator[None]:
    before = torch.get_num_threads()
    if num_threads:
        torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def instance_values(
    features: Any,
    task_ids: Any,
    num_tasks: int,
    finite: Any = None,
    block_rows: int = 16384,
    num_threads: int | None = 1,
    all_reduce: Callable[[torch.Tensor], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(u, finite)``: instance values [N] (float64, NaN where not finite) and the finite mask used.

    ``features`` is a :class:`FeatureSource` or an array [N, d]; ``finite`` optionally marks examples
    already known to be non-finite (e.g. NaN norms). Two streaming passes; memory ~ one block + K*d.
    ``num_threads`` sets torch's intra-op threads for the passes (restored after; None keeps the
    current setting). The default, 1, is the fastest measured on a busy 2-core machine (the work per
    sub-block is too small for thread hand-offs to pay) and makes results independent of it.
    ``all_reduce`` (in-place sum across processes) turns this into the sharded computation: each
    process passes its own rows, and the per-task sums and counts of pass 1 are summed over all.
    """
    with _torch_threads(num_threads):
        return _instance_values(features, task_ids, num_tasks, finite, block_rows, all_reduce)


def _instance_values(
    features: Any,
    task_ids: Any,
    num_tasks: int,
    finite: Any,
    block_rows: int,
    all_reduce: Callable[[torch.Tensor], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    source = as_feature_source(features)
    n_rows, dim = source.num_rows, source.dim
    tid = _check_task_ids(task_ids, n_rows, num_tasks)
    known = np.ones(n_rows, dtype=bool) if finite is None else np.asarray(finite, dtype=bool).reshape(-1)
    if known.shape[0] != n_rows:
        raise ValueError(f"finite has {known.shape[0]} entries but there are {n_rows} examples")
    tid_t = torch.from_numpy(tid)
    known_t = torch.from_numpy(known)
    ok_all = torch.zeros(n_rows, dtype=torch.bool)
    inv_all = torch.zeros(n_rows, dtype=torch.float32)
    sums = torch.zeros(num_tasks, dim, dtype=torch.float64)
    part = torch.empty(num_tasks, dim, dtype=torch.float32)
    rows_buf = _Rows(dim)

    # Pass 1: per-task sums of unit vectors; the inverse norms are kept for pass 2.
    for first, rows in _sub_blocks(source, block_rows):
        sl = slice(first, first + rows.shape[0])
        f = rows_buf.load(rows)
        norm = torch.linalg.vector_norm(f, dim=1)
        ok = torch.isfinite(norm) & known_t[sl]
        if not bool(ok.all()):
            f[~ok] = 0
        inv = torch.where(ok & (norm > 0), 1.0 / norm, torch.zeros((), dtype=norm.dtype))
        f.mul_(inv[:, None])
        part.zero_()
        # index_add_ adds rows in index order on the CPU, so the sum does not depend on threads.
        part.index_add_(0, tid_t[sl], f)
        sums += part
        ok_all[sl] = ok
        inv_all[sl] = inv

    ok_np = ok_all.numpy()
    counts = torch.from_numpy(np.bincount(tid[ok_np], minlength=num_tasks)).double()
    if all_reduce is not None:
        all_reduce(sums)
        all_reduce(counts)
    means_t = (sums / counts.clamp_min(1)[:, None]).float().T.contiguous()  # [d, K]

    # Pass 2: u(s) = (f_s . mean_T) / ||f_s||.
    u = np.full(n_rows, np.nan, dtype=np.float64)
    for first, rows in _sub_blocks(source, block_rows):
        sl = slice(first, first + rows.shape[0])
        ok = ok_all[sl]
        f = rows_buf.load(rows, ok)
        dots = (f @ means_t).gather(1, tid_t[sl][:, None])[:, 0] * inv_all[sl]
        u[sl] = torch.where(ok, dots, torch.full((), float("nan"))).double().numpy()
    return u, ok_np
