"""Statistics for comparing runs and selections: relative scores, paired t-intervals, rank correlation, overlap."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

# Two-sided 95% Student t quantiles by degrees of freedom (no scipy needed).
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def task_scores(metrics: dict) -> dict[str, float]:
    """Each task's headline score: accuracy, else token F1."""
    out = {}
    for key, value in metrics.items():
        parts = key.split("/")
        if len(parts) == 3 and parts[2] in ("accuracy", "token_f1"):
            out[parts[1]] = value
    return out


def relative(scores: dict, full: dict) -> float:
    """Mean over tasks of score / full-data score (tasks the full-data model scores 0 on are left out)."""
    ratios = [scores[t] / full[t] for t in full if full[t] > 0 and t in scores]
    return 100.0 * float(np.mean(ratios)) if ratios else float("nan")


def interval(diffs: list[float]) -> tuple[float, float, float]:
    """Mean and 95% t-interval of paired differences."""
    d = np.asarray(diffs, dtype=np.float64)
    mean = float(d.mean())
    if len(d) < 2:
        return mean, float("nan"), float("nan")
    half = T95.get(len(d) - 1, 1.96) * float(d.std(ddof=1)) / math.sqrt(len(d))
    return mean, mean - half, mean + half


def summarise_arms(runs: list[dict]) -> dict:
    """results.json's `arms`: per arm, relative and task scores per seed, mean seconds; paired differences."""
    full = {r["seed"]: task_scores(r["metrics"]) for r in runs if r["arm"] == "full"}
    arms: dict = {}
    for name in dict.fromkeys(r["name"] for r in runs):
        mine = sorted((r for r in runs if r["name"] == name), key=lambda r: r["seed"])
        tasks = sorted({t for r in mine for t in task_scores(r["metrics"])})
        arms[name] = {
            "seeds": [r["seed"] for r in mine],
            "relative": [relative(task_scores(r["metrics"]), full[r["seed"]]) for r in mine],
            "scores": {t: [task_scores(r["metrics"]).get(t, float("nan")) for r in mine] for t in tasks},
            "seconds": {k: float(np.mean([r["seconds"][k] for r in mine])) for k in mine[0]["seconds"]},
            "train_examples": mine[0]["train_examples"],
            "steps": float(np.mean([r["steps"] for r in mine])),
        }
    for name, entry in arms.items():
        base = "random_equal_steps" if name.endswith("_equal_steps") else "random"
        if name in (base, "full") or base not in arms:
            continue
        theirs = dict(zip(arms[base]["seeds"], arms[base]["relative"], strict=True))
        diffs = [v - theirs[s] for s, v in zip(entry["seeds"], entry["relative"], strict=True) if s in theirs]
        mean, low, high = interval(diffs)
        entry["minus_random"] = {"per_seed": diffs, "mean": mean, "ci95": [low, high], "against": base}
    return arms


def ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties given their average rank."""
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x), dtype=np.float64)
    r[order] = np.arange(1, len(x) + 1)
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=r)
    return (sums / counts)[inverse]


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation (NaN when either side is constant or there are < 2 values)."""
    if len(a) < 2:
        return float("nan")
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = math.sqrt(float((ra * ra).sum() * (rb * rb).sum()))
    return float((ra * rb).sum() / den) if den > 0 else float("nan")


def overlap(a: Any, b: Any) -> float:
    """Multiset overlap of two selections of the same budget: sum_i min(times_a, times_b) / B."""
    return float(np.minimum(a.times_selected, b.times_selected).sum() / max(a.budget, 1))


def uniform_overlap(result: Any, task_ids: np.ndarray) -> float:
    """Expected overlap of two independent uniform draws with `result`'s task budgets (repeats included)."""
    sizes = np.bincount(task_ids[result.finite], minlength=len(result.tasks))
    total = 0.0
    for row, n in zip(result.tasks, sizes, strict=True):
        if row.budget and n:
            reps, rest = divmod(row.budget, int(n))
            total += reps * n + rest * rest / n
    return total / max(result.budget, 1)


def mean_std(values: list[float]) -> dict:
    """{"mean", "std"} over seeds (std with ddof 0, NaNs left out), rounded to 4 places."""
    v = np.asarray(values, dtype=np.float64)
    return {"mean": round(float(np.nanmean(v)), 4), "std": round(float(np.nanstd(v)), 4)}


def json_safe(value: Any, digits: int | None = None) -> Any:
    """NaN and infinities -> null (floats rounded to `digits` if given), so a printed line is strict JSON."""
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        return value if digits is None else round(value, digits)
    if isinstance(value, dict):
        return {k: json_safe(v, digits) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v, digits) for v in value]
    return value
