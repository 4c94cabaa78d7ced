"""The task-balanced warm-up set: an equal count from every task, seeded."""

from __future__ import annotations

import numpy as np

from lightning_tive.tive.projection import derive_seed


def balanced_quotas(task_sizes: np.ndarray, total: int, seed: int) -> np.ndarray:
    """Per-task counts summing to min(total, pool): equal shares, small tasks give all they have.

    What a small task cannot give is spread evenly over the others; the last few leftover units go to
    tasks in a seeded order, so no task is favoured by its position.
    """
    sizes = np.asarray(task_sizes, dtype=np.int64)
    quotas = np.zeros_like(sizes)
    remaining = int(min(total, sizes.sum()))
    open_tasks = [t for t in range(len(sizes)) if sizes[t] > 0]
    while remaining > 0 and open_tasks:
        share = remaining // len(open_tasks)
        small = [t for t in open_tasks if sizes[t] - quotas[t] <= share]
        if small:
            for t in small:
                remaining -= int(sizes[t] - quotas[t])
                quotas[t] = sizes[t]
            open_tasks = [t for t in open_tasks if t not in small]
            continue
        for t in open_tasks:
            quotas[t] += share
        remaining -= share * len(open_tasks)
        order = np.random.default_rng(derive_seed(seed, "warmup-leftover")).permutation(len(open_tasks))
        for k in order[:remaining]:
            quotas[open_tasks[k]] += 1
        remaining = 0
    return quotas


def balanced_warmup_indices(task_ids: np.ndarray, num_tasks: int, total: int, seed: int) -> np.ndarray:
    """Sorted pool indices of the warm-up set: `balanced_quotas` per task, drawn without replacement."""
    task_ids = np.asarray(task_ids, dtype=np.int64)
    sizes = np.bincount(task_ids, minlength=num_tasks)
    quotas = balanced_quotas(sizes, total, seed)
    chosen = []
    for task in range(num_tasks):
        if quotas[task] == 0:
            continue
        members = np.nonzero(task_ids == task)[0]
        rng = np.random.default_rng(derive_seed(seed, "warmup", task))
        chosen.append(rng.choice(members, size=int(quotas[task]), replace=False))
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)
