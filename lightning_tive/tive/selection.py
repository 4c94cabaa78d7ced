"""TIVE budget allocation across tasks and sampling inside tasks.

* Budget ``B = round(ratio * |D|)`` with Python's ``round`` (halves go to the even integer).
* Task budgets ``b_T = B * v(T) / sum v`` over the eligible tasks, rounded by largest remainder so
  that they add up to ``B`` exactly (equal remainders: earlier task first). A task is eligible unless
  it is in ``exclude_tasks``, has no finite example, or has a zero / non-finite value; the others
  get 0 (with a warning when not excluded by name), and their share goes to the eligible tasks.
* Inside a task, with ``n`` finite examples: every one is taken ``b_T // n`` times, and
  ``b_T % n`` more distinct ones are drawn by Gumbel-top-k on the keys
  ``u(s)/temperature + g_s`` (``softmax``, i.e. sampling without replacement with probability
  proportional to ``exp(u/temperature)``), ``u(s)`` (``topk``) or ``g_s`` (``uniform``).
  ``g`` is one standard Gumbel draw per pool index, in pool-index order, from
  ``numpy.random.Generator(PCG64(seed))``; ties are broken by ``u`` then pool index. So the result
  depends only on the values and the seed, never on the processing order.
* Non-finite examples are never selected.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from .values import TaskStats, as_feature_source, instance_values, task_values

# Notices a user must see: logging, which PYTHONWARNINGS=ignore does not silence.
log = logging.getLogger("lightning_tive")

__all__ = [
    "SAMPLING_MODES",
    "SelectionResult",
    "TaskRow",
    "allocate_budgets",
    "gumbel_noise",
    "sample_within_tasks",
    "select",
    "select_from_values",
    "select_top_scores",
    "total_budget",
]

SAMPLING_MODES = ("softmax", "topk", "uniform")
BUDGET_MODES = ("value", "size", "value_size")


@dataclass
class TaskRow:
    """One row of ``tasks.csv``."""

    task: str
    size: int
    task_value: float
    proportion: float
    budget: int
    selected: int


@dataclass
class SelectionResult:
    """Everything a selection decided, indexed by pool position where per-example."""

    tasks: list[TaskRow]
    #: B = round(ratio * pool_size).
    budget: int
    #: [N] float64 instance values u(s); NaN for non-finite examples.
    instance_values: np.ndarray
    #: [N] int64 copies of each example in the selection.
    times_selected: np.ndarray
    #: [B] int64 selected pool indices, repeats included, in increasing order.
    selected_indices: np.ndarray
    #: [N] bool, examples whose gradient norm and feature were finite.
    finite: np.ndarray
    #: [N] float64 gradient norms as given.
    grad_norms: np.ndarray
    settings: dict = field(default_factory=dict)
    #: seconds spent per phase: values_s (both streaming passes + task values), budget_s, sampling_s.
    timings: dict = field(default_factory=dict)

    def task_table(self) -> list[dict]:
        """Return the task rows as dicts with the ``tasks.csv`` columns."""
        return [asdict(row) for row in self.tasks]


def total_budget(pool_size: int, ratio: float) -> int:
    """Return ``B = round(ratio * pool_size)`` after checking ``0 < ratio <= 1``."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not (0.0 < float(ratio) <= 1.0):
        raise ValueError(f"ratio must be in (0, 1], got {ratio!r}")
    return int(round(float(ratio) * int(pool_size)))


def allocate_budgets(
    total: int,
    values: Sequence[float],
    task_names: Sequence[str],
    exclude_tasks: Sequence[str] = (),
    finite_counts: Sequence[int] | None = None,
) -> np.ndarray:
    """Split ``total`` over tasks in proportion to ``values`` by largest remainder; return int64 [K]."""
    names = list(task_names)
    vals = np.asarray(values, dtype=np.float64).reshape(-1)
    if vals.shape[0] != len(names):
        raise ValueError(f"{vals.shape[0]} task values for {len(names)} task names")
    unknown = sorted(set(exclude_tasks) - set(names))
    if unknown:
        raise ValueError(f"exclude_tasks names unknown task(s) {unknown}; known tasks: {names}")
    counts = np.ones(len(names), dtype=np.int64) if finite_counts is None else np.asarray(finite_counts)
    excluded = (
        np.isin(np.asarray(names, dtype=object), list(exclude_tasks))
        if exclude_tasks
        else np.zeros(len(names), dtype=bool)
    )
    eligible = ~excluded & (counts > 0) & np.isfinite(vals) & (vals > 0)
    dropped = [names[i] for i in np.flatnonzero(~excluded & ~eligible)]
    if dropped:
        log.warning(f"task(s) {dropped} get no budget: no finite example, or a zero / non-finite task value")
    budgets = np.zeros(len(names), dtype=np.int64)
    if total == 0:
        return budgets
    if not eligible.any():
        raise ValueError("no task can receive budget: every task is excluded or has no positive finite value")
    share = np.where(eligible, vals, 0.0)
    quota = total * share / share.sum()
    base = np.floor(quota).astype(np.int64)
    left = int(total - base.sum())
    frac = np.where(eligible, quota - base, -np.inf)
    # Stable sort on -frac: equal remainders go to the earlier task.
    order = np.argsort(-frac, kind="stable")
    base[order[:left]] += 1
    return base


def gumbel_noise(pool_size: int, seed: int) -> np.ndarray:
    """Return one standard Gumbel draw per pool index, in pool order, from ``PCG64(seed)``."""
    return np.random.Generator(np.random.PCG64(int(seed))).gumbel(size=int(pool_size))


def _check_sampling(sampling: str, temperature: float) -> None:
    if sampling not in SAMPLING_MODES:
        raise ValueError(f"sampling={sampling!r} is not one of {', '.join(SAMPLING_MODES)}")
    if sampling == "softmax" and not (
        isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0
    ):
        raise ValueError(
            f"temperature must be a positive finite number for sampling='softmax', got {temperature!r}"
        )


def sample_within_tasks(
    values: np.ndarray,
    task_ids: np.ndarray,
    budgets: np.ndarray,
    finite: np.ndarray,
    sampling: str = "softmax",
    temperature: float = 1.0,
    seed: int = 0,
) -> np.ndarray:
    """Return ``times_selected`` [N] int64: each task ``T`` gets exactly ``budgets[T]`` picks of finite examples."""
    _check_sampling(sampling, temperature)
    u = np.asarray(values, dtype=np.float64)
    tid = np.asarray(task_ids, dtype=np.int64)
    ok = np.asarray(finite, dtype=bool)
    n = u.shape[0]
    times = np.zeros(n, dtype=np.int64)
    noise = gumbel_noise(n, seed) if sampling != "topk" else None
    pool_index = np.arange(n)
    members_by_task = np.split(
        np.lexsort((pool_index, tid)), np.cumsum(np.bincount(tid, minlength=len(budgets)))[:-1]
    )
    for task, members in enumerate(members_by_task):
        b = int(budgets[task])
        members = members[ok[members]]
        if b == 0:
            continue
        if members.size == 0:
            raise ValueError(f"task {task} has budget {b} but no finite example")
        reps, rest = divmod(b, members.size)
        times[members] += reps
        if rest == 0:
            continue
        mu = u[members]
        if sampling == "topk":
            keys = mu
        elif sampling == "uniform":
            keys = noise[members]
        else:
            keys = mu / temperature + noise[members]
        # lexsort: last key is primary -> keys desc, then u desc, then pool index asc.
        order = np.lexsort((members, -mu, -keys))
        times[members[order[:rest]]] += 1
    return times


def select(
    norms: Any,
    features: Any,
    task_ids: Any,
    task_names: Sequence[str],
    ratio: float = 0.15,
    exclude_tasks: Sequence[str] = (),
    sampling: str = "softmax",
    temperature: float = 1.0,
    seed: int = 0,
    block_rows: int = 16384,
    num_threads: int | None = 1,
) -> SelectionResult:
    """Run TIVE's values, budgets and sampling over a pool; ``features`` is an array [N, d] or a FeatureStore."""
    names = _check_names(task_names)
    source = as_feature_source(features)
    norm_arr = np.asarray(norms, dtype=np.float64).reshape(-1)
    if norm_arr.shape[0] != source.num_rows:
        raise ValueError(f"{norm_arr.shape[0]} gradient norms for {source.num_rows} feature rows")
    _check_request(names, ratio, exclude_tasks, sampling, temperature)
    clock = time.perf_counter()
    u, finite = instance_values(
        source, task_ids, len(names), np.isfinite(norm_arr), block_rows=block_rows, num_threads=num_threads
    )
    values_s = time.perf_counter() - clock
    result = select_from_values(
        norm_arr, u, finite, task_ids, names, ratio, exclude_tasks, sampling, temperature, seed
    )
    result.timings["values_s"] += values_s
    return result


def select_from_values(
    norms: Any,
    instance_vals: Any,
    finite: Any,
    task_ids: Any,
    task_names: Sequence[str],
    ratio: float = 0.15,
    exclude_tasks: Sequence[str] = (),
    sampling: str = "softmax",
    temperature: float = 1.0,
    seed: int = 0,
    budget_by: str = "value",
    size_alpha: float = 0.5,
    task_scores: Any = None,
    report_values: bool = True,
) -> SelectionResult:
    """Budgets and sampling from already computed instance values (e.g. gathered from many processes).

    ``budget_by="value"`` splits B by task value v(T) (TIVE); ``"size"`` by the tasks' finite sizes
    (the proportional split of a random subset); ``"value_size"`` by ``v(T) * |T|**size_alpha``.
    ``task_scores`` are the per-example numbers whose task mean is v(T) (default: the norms).
    ``report_values=False`` marks the values as stand-ins (e.g. a random draw): reported as NaN.
    """
    if budget_by not in BUDGET_MODES:
        raise ValueError(f"budget_by must be one of {BUDGET_MODES}, got {budget_by!r}")
    if not (isinstance(size_alpha, (int, float)) and math.isfinite(size_alpha)):
        raise ValueError(f"size_alpha must be a finite number, got {size_alpha!r}")
    names = _check_names(task_names)
    norm_arr = np.asarray(norms, dtype=np.float64).reshape(-1)
    scores = norm_arr if task_scores is None else np.asarray(task_scores, dtype=np.float64).reshape(-1)
    if scores.shape != norm_arr.shape:
        raise ValueError(f"{scores.shape[0]} task scores for {norm_arr.shape[0]} norms")
    u = np.asarray(instance_vals, dtype=np.float64).reshape(-1)
    finite = np.asarray(finite, dtype=bool).reshape(-1) & np.isfinite(norm_arr) & np.isfinite(u) & np.isfinite(scores)
    n_rows = norm_arr.shape[0]
    if u.shape[0] != n_rows or finite.shape[0] != n_rows:
        raise ValueError(f"{n_rows} norms, {u.shape[0]} instance values and {finite.shape[0]} finite flags")
    _check_request(names, ratio, exclude_tasks, sampling, temperature)
    budget = total_budget(n_rows, ratio)
    clock = time.perf_counter()
    tid = np.asarray(task_ids).astype(np.int64).reshape(-1)
    stats: TaskStats = task_values(scores, tid, len(names), finite)
    timings = {"values_s": time.perf_counter() - clock}
    clock = time.perf_counter()
    counts = stats.finite_counts.astype(np.float64)
    shares = {"value": stats.values, "size": counts, "value_size": stats.values * counts**size_alpha}[budget_by]
    budgets = allocate_budgets(budget, shares, names, exclude_tasks, stats.finite_counts)
    timings["budget_s"] = time.perf_counter() - clock
    clock = time.perf_counter()
    times = sample_within_tasks(u, tid, budgets, finite, sampling, temperature, seed)
    timings["sampling_s"] = time.perf_counter() - clock
    if not report_values:
        nan = np.full(n_rows, np.nan)
        stats = replace(stats, values=np.full(len(names), np.nan))
        u, norm_arr = nan, nan
    return _result(names, stats, shares, exclude_tasks, budget, budgets, times, u, finite, norm_arr, tid, {
        "ratio": float(ratio),
        "exclude_tasks": list(exclude_tasks),
        "sampling": sampling,
        "temperature": float(temperature),
        "seed": int(seed),
        "budget_by": budget_by,
        **({"size_alpha": float(size_alpha)} if budget_by == "value_size" else {}),
    }, timings)


def select_top_scores(
    scores: Any,
    norms: Any,
    instance_vals: Any,
    finite: Any,
    task_ids: Any,
    task_names: Sequence[str],
    ratio: float = 0.15,
    exclude_tasks: Sequence[str] = (),
) -> SelectionResult:
    """The B examples with the highest scores over the whole pool (ties: lower pool index first).

    For single-score baselines: longest responses, largest gradient norms (GraNd-like), and so on.
    """
    names = _check_names(task_names)
    score = np.asarray(scores, dtype=np.float64).reshape(-1)
    norm_arr = np.asarray(norms, dtype=np.float64).reshape(-1)
    u = np.asarray(instance_vals, dtype=np.float64).reshape(-1)
    tid = np.asarray(task_ids).astype(np.int64).reshape(-1)
    ok = np.asarray(finite, dtype=bool).reshape(-1) & np.isfinite(score)
    _check_request(names, ratio, exclude_tasks, "topk", 1.0)
    if exclude_tasks:
        ok &= ~np.isin(tid, [names.index(t) for t in exclude_tasks])
    budget = total_budget(len(score), ratio)
    clock = time.perf_counter()
    order = np.lexsort((np.arange(len(score)), -np.where(ok, score, -np.inf)))
    times = np.zeros(len(score), dtype=np.int64)
    times[order[: min(budget, int(ok.sum()))]] = 1
    stats = task_values(norm_arr, tid, len(names), ok)
    budgets = np.bincount(tid, weights=times, minlength=len(names)).astype(np.int64)
    timings = {"values_s": 0.0, "budget_s": 0.0, "sampling_s": time.perf_counter() - clock}
    shares = budgets.astype(np.float64)
    return _result(names, stats, shares, exclude_tasks, budget, budgets, times, u, ok, norm_arr, tid, {
        "ratio": float(ratio), "exclude_tasks": list(exclude_tasks), "sampling": "top_score",
    }, timings)


def _result(
    names: list[str],
    stats: TaskStats,
    shares: np.ndarray,
    exclude_tasks: Sequence[str],
    budget: int,
    budgets: np.ndarray,
    times: np.ndarray,
    u: np.ndarray,
    finite: np.ndarray,
    norm_arr: np.ndarray,
    tid: np.ndarray,
    settings: dict,
    timings: dict,
) -> SelectionResult:
    excluded = set(exclude_tasks)
    usable = np.array(
        [
            names[i] not in excluded and np.isfinite(v) and v > 0 and c > 0
            for i, (v, c) in enumerate(zip(shares, stats.finite_counts, strict=True))
        ],
        dtype=bool,
    )
    total_value = float(np.sum(np.where(usable, shares, 0.0)))
    selected_per_task = np.bincount(tid, weights=times, minlength=len(names)).astype(np.int64)
    rows = [
        TaskRow(
            task=names[i],
            size=int(stats.sizes[i]),
            task_value=float(stats.values[i]),
            proportion=float(shares[i] / total_value) if usable[i] and total_value > 0 else 0.0,
            budget=int(budgets[i]),
            selected=int(selected_per_task[i]),
        )
        for i in range(len(names))
    ]
    return SelectionResult(
        tasks=rows,
        budget=budget,
        instance_values=np.where(finite, u, np.nan),
        times_selected=times,
        selected_indices=np.repeat(np.arange(len(times), dtype=np.int64), times),
        finite=finite,
        grad_norms=norm_arr,
        settings=settings,
        timings=timings,
    )


def _check_names(task_names: Sequence[str]) -> list[str]:
    names = [str(t) for t in task_names]
    if len(set(names)) != len(names):
        raise ValueError(f"task_names has duplicates: {names}")
    return names


def _check_request(
    names: list[str], ratio: float, exclude_tasks: Sequence[str], sampling: str, temperature: float
) -> None:
    total_budget(1, ratio)  # validates the ratio
    _check_sampling(sampling, temperature)
    unknown = sorted(set(exclude_tasks) - set(names))
    if unknown:
        raise ValueError(f"exclude_tasks names unknown task(s) {unknown}; known tasks: {names}")
