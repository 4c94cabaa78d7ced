"""TIVE run outputs: tasks.csv, values.csv, subset.json, summary.json, report.png and W&B logging."""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from lightning.pytorch.utilities import rank_zero_info

from lightning_tive.files import atomic_write

log = logging.getLogger(__name__)

TASKS_COLUMNS = ("task", "size", "task_value", "proportion", "budget", "selected")
VALUES_COLUMNS = ("index", "id", "task", "grad_norm", "instance_value", "times_selected")


def write_tasks_csv(path: Path, rows: Sequence[dict]) -> None:
    """One row per task: size, value, proportion of the budget, budget and selected count."""

    def write(f: Any) -> None:
        writer = csv.DictWriter(f, fieldnames=TASKS_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row[k] for k in TASKS_COLUMNS})

    atomic_write(path, write)


def write_values_csv(
    path: Path,
    ids: Sequence[Any],
    tasks: Sequence[str],
    grad_norms: np.ndarray,
    instance_values: np.ndarray,
    times_selected: np.ndarray,
) -> None:
    """One row per pool index; a non-finite gradient shows as `nan` in grad_norm and instance_value."""

    def write(f: Any) -> None:
        writer = csv.writer(f)
        writer.writerow(VALUES_COLUMNS)
        for i in range(len(ids)):
            writer.writerow(
                [i, ids[i], tasks[i], _num(grad_norms[i]), _num(instance_values[i]), int(times_selected[i])]
            )

    atomic_write(path, write)


def _num(value: float) -> str:
    return "nan" if not math.isfinite(float(value)) else repr(float(value))


def write_json(path: Path, payload: Any) -> None:
    """Pretty JSON, written atomically."""
    atomic_write(path, lambda f: json.dump(payload, f, indent=2, sort_keys=False, default=_jsonable))


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def plot_report(
    path: Path,
    task_rows: Sequence[dict],
    task_of_example: np.ndarray,
    instance_values: np.ndarray,
    grad_norms: np.ndarray,
) -> bool:
    """report.png: instance values and gradient norms per task, and budgets against pool shares.

    Returns False, writing nothing, where matplotlib is not installed: the plot is the one output
    the run can do without, so a GPU image without it still gets every other file.
    """
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as error:
        log.warning(f"[tive] report.png skipped: matplotlib cannot be imported ({error}); `pip install matplotlib` "
                    "to get it. tasks.csv, values.csv, subset.json and summary.json are written as usual.")
        return False

    names = [row["task"] for row in task_rows]
    fig, axes = plt.subplots(1, 3, figsize=(17, 0.45 * len(names) + 3.2), constrained_layout=True)
    for ax, values, title in (
        (axes[0], instance_values, "instance value u(s): mean cosine to its task"),
        (axes[1], grad_norms, "gradient norm ‖g_s‖ (task value = its mean)"),
    ):
        data = [values[(task_of_example == t) & np.isfinite(values)] for t in range(len(names))]
        positions = [k for k, d in enumerate(data) if len(d)]
        if positions:
            ax.boxplot([data[k] for k in positions], positions=positions, vert=False, widths=0.6, showfliers=False)
            for k in positions:
                jitter = np.random.default_rng(k).uniform(-0.2, 0.2, size=len(data[k]))
                ax.scatter(data[k], k + jitter, s=3, alpha=0.25, color="tab:blue")
        ax.set_yticks(range(len(names)), names)
        ax.set_title(title, fontsize=10)
        ax.invert_yaxis()
    sizes = np.array([row["size"] for row in task_rows], dtype=float)
    budgets = np.array([row["budget"] for row in task_rows], dtype=float)
    y = np.arange(len(names))
    ax = axes[2]
    ax.barh(y - 0.2, sizes / max(sizes.sum(), 1), height=0.4, label="share of the pool")
    ax.barh(y + 0.2, budgets / max(budgets.sum(), 1), height=0.4, label="share of the budget")
    for k, row in enumerate(task_rows):
        ax.text(budgets[k] / max(budgets.sum(), 1), k + 0.2, f" {row['budget']}/{row['size']}", va="center", fontsize=8)
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    ax.set_title("task budgets (selected/size) vs pool share", fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    fig.suptitle(f"TIVE selection: {int(budgets.sum())} of {int(sizes.sum())} examples")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def log_to_wandb(
    loggers: Sequence[Any],
    task_rows: Sequence[dict],
    task_of_example: np.ndarray,
    instance_values: np.ndarray,
    grad_norms: np.ndarray,
    scalars: dict[str, float],
    report_png: Path | None,
) -> bool:
    """Histograms per task, the task table, scalars and the report image to every WandbLogger."""
    from lightning.pytorch.loggers import WandbLogger

    targets = [lg for lg in loggers if isinstance(lg, WandbLogger)]
    if not targets:
        return False
    import wandb

    payload: dict[str, Any] = dict(scalars)
    for t, row in enumerate(task_rows):
        members = task_of_example == t
        values = instance_values[members & np.isfinite(instance_values)]
        norms = grad_norms[members & np.isfinite(grad_norms)]
        if len(values):
            payload[f"tive/instance_value/{row['task']}"] = wandb.Histogram(values.tolist(), num_bins=64)
        if len(norms):
            payload[f"tive/grad_norm/{row['task']}"] = wandb.Histogram(norms.tolist(), num_bins=64)
    payload["tive/tasks"] = wandb.Table(
        columns=list(TASKS_COLUMNS), data=[[row[k] for k in TASKS_COLUMNS] for row in task_rows]
    )
    if report_png is not None and report_png.exists():
        payload["tive/report"] = wandb.Image(str(report_png))
    for logger in targets:
        logger.experiment.log(payload)
    return True


def summary(config: Any, datamodule: Any, result: Any, timings: dict, feature_settings: dict | None) -> dict:
    """summary.json: sizes, the budget, the settings and seconds per phase.

    With `features_from`, `feature_settings` are the stored features' own (what produced them);
    otherwise the features came from this run's settings.
    """
    finite = np.asarray(result.finite)
    return {
        "pool_size": int(datamodule.pool_size),
        "budget": int(result.budget),
        "selected": int(len(result.selected_indices)),
        "distinct_selected": int((np.asarray(result.times_selected) > 0).sum()),
        "ratio": config.ratio,
        "seed": config.seed,
        "non_finite_examples": int((~finite).sum()),
        "tasks": result.task_table(),
        "settings": config.as_dict(),
        "features": {"from": config.features_from, "settings": feature_settings}
        if config.features_from is not None
        else {"from": None, "settings": config.feature_settings()},
        "timings_s": {**timings, **{f"selection_{k}": v for k, v in result.timings.items()}},
    }


def write_outputs(out: Path, datamodule: Any, result: Any, selected: np.ndarray, summary: dict, loggers: Sequence[Any]) -> None:
    """tasks.csv, values.csv, subset.json, summary.json, report.png (with matplotlib), and the W&B payload."""
    task_ids = np.asarray(datamodule.pool_task_ids)
    names = datamodule.task_names
    records = [datamodule.pool_record(i) for i in range(datamodule.pool_size)]
    norms, values = np.asarray(result.grad_norms), np.asarray(result.instance_values)
    write_tasks_csv(out / "tasks.csv", result.task_table())
    write_values_csv(
        out / "values.csv", [r.get("id") for r in records], [names[t] for t in task_ids], norms, values,
        np.asarray(result.times_selected),
    )
    write_json(out / "subset.json", [records[i] for i in selected])
    write_json(out / "summary.json", summary)
    png = out / "report.png"
    if not plot_report(png, result.task_table(), task_ids, values, norms):
        png.unlink(missing_ok=True)  # a plot left by an earlier run would not show this selection
        png = None
    scalars = {
        "tive/pool_size": summary["pool_size"],
        "tive/budget": summary["budget"],
        **{f"tive/{k}": v for k, v in summary["timings_s"].items()},
    }
    log_to_wandb(loggers, result.task_table(), task_ids, values, norms, scalars, png)
    rank_zero_info(f"[tive] selected {len(selected)} of {datamodule.pool_size}; files in {out}")


def write_rank_record(out: Path, rank: int, world_size: int, selection_sha256: str, adapter_sha256: str | None,
                      valued_now: int) -> None:
    """ranks/rank-NNNNN.json: what this process selected and from which reference model."""
    (out / "ranks").mkdir(parents=True, exist_ok=True)
    write_json(out / "ranks" / f"rank-{rank:05d}.json", {
        "rank": rank, "world_size": world_size, "selection_sha256": selection_sha256,
        "reference_adapter_sha256": adapter_sha256, "valued_this_run": valued_now,
    })
