"""The selection strategies behind `tive.strategy`: TIVE, its ablations, baselines and variants."""

from __future__ import annotations

from typing import Any

import numpy as np

from lightning_tive.tive.selection import SelectionResult, select_from_values, select_top_scores
from lightning_tive.tive_config import TIVEConfig

# Single-score baselines: the B highest scores over the pool (the column, or the response length).
TOP_SCORE = {"gradnorm": "norms", "perplexity": "loss", "length": None}
NEEDS_COLUMN = {"perplexity": "loss", "length_normalised": "tokens"}


def select_subset(config: TIVEConfig, datamodule: Any, values: dict[str, np.ndarray]) -> SelectionResult:
    """The configured strategy's selection from pool-ordered values (norms, u, loss, tokens, finite)."""
    names, task_ids = datamodule.task_names, np.asarray(datamodule.pool_task_ids)
    norms, u, finite = values["norms"], values["u"], values["finite"]
    common = {"ratio": config.ratio, "exclude_tasks": config.exclude_tasks}
    strategy = config.strategy
    if strategy in NEEDS_COLUMN:
        column = NEEDS_COLUMN[strategy]
        missing = finite & np.isfinite(norms) & ~np.isfinite(values[column])
        if missing.any():
            raise ValueError(
                f"tive.strategy={strategy} needs each example's {column} in the feature store, and "
                f"{int(missing.sum())} finite examples have none (features written by an older version?): "
                "recompute the features"
            )
    if strategy in TOP_SCORE:
        column = TOP_SCORE[strategy]
        scores = response_words(datamodule) if column is None else values[column]
        return select_top_scores(scores, norms, u, finite, task_ids, names, **common)
    if strategy == "random":
        # Budgets by task size and a uniform draw: no values needed, so none are reported.
        return select_from_values(
            np.ones(len(norms)), np.zeros(len(norms)), finite, task_ids, names, **common, sampling="uniform",
            seed=config.seed, budget_by="size", report_values=False,
        )
    return select_from_values(
        norms, u, finite, task_ids, names, **common,
        sampling="uniform" if strategy == "tive_uniform" else config.sampling,
        temperature=config.temperature, seed=config.seed,
        budget_by={"instance_only": "size", "size_aware": "value_size"}.get(strategy, "value"),
        size_alpha=config.size_alpha,
        # ||g_s|| averages T_s per-token gradients: times sqrt(T_s) undoes the shrinkage of averaging.
        task_scores=norms * np.sqrt(values["tokens"]) if strategy == "length_normalised" else None,
    )


def response_words(datamodule: Any) -> np.ndarray:
    """Words in each pool example's assistant turns (the `length` baseline's score)."""
    return np.array(
        [
            sum(len(t["value"].split()) for t in datamodule.pool_record(i)["conversations"] if t["from"] == "gpt")
            for i in range(datamodule.pool_size)
        ],
        dtype=np.float64,
    )
