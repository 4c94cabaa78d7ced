"""The cost/quality table: each cheaper valuation setting's cost, its agreement with full valuation, its score.

A cost preset runs `full`, `random`, `tive` (full valuation) and one `tive` arm per cheaper setting,
each with its own warm-up and valuation, on every seed. Per setting and seed this module reads the
arm's values.csv and tasks.csv next to the same seed's `tive` ones and reports:
- cost: valuation (and warm-up + valuation) seconds / one full-pool training epoch of the same seed's
  `full` arm, and the select-then-train total / `full`'s training, same epochs, same machine;
- agreement with full valuation: Spearman of instance values within each task (mean over tasks), the
  L1 distance of the task budgets (sum |b - b_full| / B: 0 same, 2 disjoint), the overlap of each task's
  top-budget examples by value, and the multiset overlap of the drawn subsets (sum min(times,
  times_full) / B);
- the held-out relative score, paired with `random` and with `tive` on the same seed.
Two reference rows frame the agreement: `random` (chance) and `tive` against the next seed's `tive`
(what another warm-up seed alone changes).
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
import yaml

from lightning_tive.experiment.results import RESULTS_HEADING, write_keeping_protocol_and_reading
from lightning_tive.experiment.stats import interval, json_safe, relative, spearman, task_scores

#: `reference_layers: N` in a setting: the main model's own config, cut to its first N LM layers, as proxy.
PROXY_KEY = "reference_layers"


def shallow_reference(args: argparse.Namespace, ckpt: Path, layers: int) -> dict:
    """`tive.reference_model` for a proxy that is the main model cut to its first `layers` LM layers."""
    from lightning_tive.experiment.runs import ROOT
    from lightning_tive.proxy import NOT_FOR_PROXY

    model = dict(yaml.safe_load((ROOT / args.preset.config).read_text())["model"])
    for key in NOT_FOR_PROXY:
        model.pop(key, None)
    return {**model, **args.model_overrides, "init_from": str(ckpt), "language_model_layers": layers}


def tive_overrides(setting: dict, args: argparse.Namespace, ckpt: Path) -> dict:
    """A cost setting as `tive:` fields (its `reference_layers` becomes a `reference_model`)."""
    fields = {k: v for k, v in setting.items() if k != PROXY_KEY}
    if PROXY_KEY in setting:
        fields["reference_model"] = shallow_reference(args, ckpt, int(setting[PROXY_KEY]))
    return fields


def read_selection(folder: Path) -> dict:
    """A TIVE output folder's per-example values and selection counts, and per-task budgets."""
    with open(folder / "values.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    with open(folder / "tasks.csv", newline="") as f:
        tasks = {r["task"]: int(r["budget"]) for r in csv.DictReader(f)}
    return {
        "ids": [r["id"] for r in rows],
        "task": np.array([r["task"] for r in rows]),
        "value": np.array([float(r["instance_value"]) if r["instance_value"] else np.nan for r in rows]),
        "times": np.array([int(r["times_selected"]) for r in rows]),
        "budgets": tasks,
    }


def top_overlap(mine: dict, full: dict) -> float:
    """Share of full valuation's top-budget examples per task that `mine`'s values also rank in its top budget.

    Unlike the drawn subsets, this compares the values alone: two arms on one seed share their selection
    draw, so at a high temperature their subsets coincide whatever their values (random's row shows it).
    A selection without values (`random`) gets the expectation for random values, `top_overlap_chance`.
    """
    if not np.isfinite(mine["value"]).any():
        return top_overlap_chance(full)
    shared = total = 0
    for task, budget in full["budgets"].items():
        rows = np.flatnonzero(full["task"] == task)
        k = min(budget, len(rows))
        if k == 0:
            continue
        tops = []
        for values in (mine["value"][rows], full["value"][rows]):
            ordered = np.argsort(-np.where(np.isfinite(values), values, -np.inf), kind="stable")
            tops.append(set(rows[ordered[:k]].tolist()))
        shared += len(tops[0] & tops[1])
        total += k
    return shared / max(total, 1)


def top_overlap_chance(full: dict) -> float:
    """Expected `top_overlap` of values drawn at random: per task k / n, weighted by k."""
    sizes = {t: int((full["task"] == t).sum()) for t in full["budgets"]}
    picks = {t: min(b, sizes[t]) for t, b in full["budgets"].items()}
    return sum(k * k / sizes[t] for t, k in picks.items() if k) / max(sum(picks.values()), 1)


def agreement(mine: dict, full: dict) -> dict:
    """Against `full`: Spearman of instance values within tasks (mean), task-budget L1 / B, the drawn
    subsets' overlap, and the overlap of the top-budget examples by value."""
    if mine["ids"] != full["ids"]:
        raise ValueError("the two selections are over different pools (their values.csv ids differ)")
    rhos = []
    for task in sorted(set(full["task"].tolist())):
        rows = (full["task"] == task) & np.isfinite(mine["value"]) & np.isfinite(full["value"])
        if rows.sum() >= 2:
            rhos.append(spearman(mine["value"][rows], full["value"][rows]))
    budget = max(sum(full["budgets"].values()), 1)
    l1 = sum(abs(mine["budgets"].get(t, 0) - b) for t, b in full["budgets"].items()) / budget
    rho = float(np.nanmean(rhos)) if rhos and np.isfinite(rhos).any() else float("nan")
    return {"spearman": rho, "budget_l1": float(l1),
            "overlap": float(np.minimum(mine["times"], full["times"]).sum() / max(full["times"].sum(), 1)),
            "top_overlap": top_overlap(mine, full)}


def paired(relative_of: dict, name: str, against: str, seeds: list[int]) -> dict:
    """Per-seed differences of relative score (`name` - `against`) with their mean and 95% interval."""
    diffs = [relative_of[(name, s)] - relative_of[(against, s)] for s in seeds if (against, s) in relative_of]
    mean, low, high = interval(diffs) if diffs else (float("nan"),) * 3
    return {"per_seed": diffs, "mean": mean, "ci95": [low, high]}


def cost_rows(runs: list[dict], work: Path, settings: dict[str, dict], epochs: int) -> list[dict]:
    """One row per arm (`random`, `tive`, each setting, `length_normalised` when run): cost, agreement, score."""
    by = {(r["name"], r["seed"]): r for r in runs}
    seeds = sorted({r["seed"] for r in runs if r["name"] == "tive"})
    full_scores = {s: task_scores(by[("full", s)]["metrics"]) for s in seeds}
    relative_of = {(r["name"], r["seed"]): relative(task_scores(r["metrics"]), full_scores[r["seed"]])
                   for r in runs if r["seed"] in full_scores}
    selections: dict[tuple[str, int], dict] = {}

    def selection(name: str, seed: int) -> dict:
        if (name, seed) not in selections:
            selections[(name, seed)] = read_selection(work / f"seed{seed}" / name / "tive")
        return selections[(name, seed)]

    names = [n for n in ("random", "tive", *settings, "length_normalised") if (n, seeds[0]) in by]
    rows = []
    for name in names:
        per_seed = []
        for seed in seeds:
            full_s = by[("full", seed)]["seconds"]["training_s"]
            sec = by[(name, seed)]["seconds"]
            if name == "tive":  # the noise floor: the next seed's full valuation, same pool
                nxt = seeds[(seeds.index(seed) + 1) % len(seeds)]
                same_pool = nxt != seed and selection("tive", nxt)["ids"] == selection(name, seed)["ids"]
                agree = agreement(selection(name, seed), selection("tive", nxt)) if same_pool else {}
            else:
                agree = agreement(selection(name, seed), selection("tive", seed))
            per_seed.append({
                "seed": seed, "valuation_per_epoch": sec["valuation_s"] / (full_s / epochs),
                "reference_per_epoch": (sec["warmup_s"] + sec["valuation_s"]) / (full_s / epochs),
                "total_per_full": sum(sec.values()) / full_s, **agree,
            })
        row = {"arm": name, "per_seed": per_seed}
        for key in ("valuation_per_epoch", "reference_per_epoch", "total_per_full", "spearman", "budget_l1", "overlap",
                    "top_overlap"):
            values = [p.get(key, np.nan) for p in per_seed]
            row[key] = [float(np.nanmean(values)), float(np.nanstd(values))] if np.isfinite(values).any() else None
        row["relative"] = [relative_of[(name, s)] for s in seeds]
        row["minus_random"] = paired(relative_of, name, "random", seeds) if name != "random" else None
        row["minus_tive"] = paired(relative_of, name, "tive", seeds) if name not in ("random", "tive") else None
        rows.append(row)
    return rows


def _cell(pair: list[float] | None, digits: int = 2) -> str:
    return "–" if pair is None else f"{pair[0]:.{digits}f} ± {pair[1]:.{digits}f}"


def _diff(entry: dict | None) -> str:
    if not entry or not np.isfinite(entry["mean"]):
        return "–"
    low, high = entry["ci95"]
    return f"{entry['mean']:+.1f} [{low:+.1f}, {high:+.1f}]" if np.isfinite(low) else f"{entry['mean']:+.1f}"


def table_lines(rows: list[dict], settings: dict[str, dict]) -> list[str]:
    """The one table: cost, agreement with full valuation, held-out score and its paired differences."""
    lines = [
        "| arm | setting | valuation / full-pool epoch | warm-up + valuation / epoch | select-then-train / full | "
        "Spearman within tasks | budget L1 / B | top-budget overlap | drawn-subset overlap | relative to full (%) | "
        "− random | − tive |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        setting = json.dumps(settings.get(row["arm"], {}), separators=(", ", ": ")) if row["arm"] in settings else ""
        if row["arm"] == "tive":
            setting = "full valuation (agreement: with the next seed's)"
        rel = np.asarray(row["relative"], dtype=np.float64)
        lines.append(
            f"| {row['arm']} | {setting} | {_cell(row['valuation_per_epoch'])} | {_cell(row['reference_per_epoch'])} | "
            f"{_cell(row['total_per_full'])} | {_cell(row['spearman'])} | {_cell(row['budget_l1'])} | "
            f"{_cell(row['top_overlap'])} | {_cell(row['overlap'])} | {rel.mean():.1f} ± {rel.std():.1f} | {_diff(row['minus_random'])} | "
            f"{_diff(row['minus_tive'])} |"
        )
    return lines


def write_cost(out: Path, stem: str, rows: list[dict], settings: dict[str, dict], meta: dict) -> None:
    """<stem>.json, <stem>.md (protocol above `## Results` and the reading kept) and <stem>.png."""
    (out / f"{stem}.json").write_text(json.dumps(json_safe({"meta": meta, "settings": settings, "rows": rows}), indent=1) + "\n")
    lines = [
        RESULTS_HEADING, "",
        f"Produced by `python -m lightning_tive experiment {meta['command']}` in {meta['wall_min']:.1f} min on this "
        f"2-core CPU ({meta['threads']} torch thread(s)); seeds {meta['seeds']}; {meta['epochs']} epoch(s) per arm. "
        "Mean ± std over seeds; differences are paired by seed, in relative points, with their 95% t-interval.", "",
        *table_lines(rows, settings), "",
        "Cost columns divide by the same seed's `full` arm (one full-pool epoch = its training seconds / epochs). "
        "Agreement is with the same seed's `tive` arm (full valuation); `tive`'s own row is against the next "
        "seed's `tive` (another warm-up seed and draw). Top-budget overlap: per task, the share of full "
        "valuation's top-budget examples by value that the arm's values also rank in the top budget (`random`'s "
        "row: its expectation for random values). Drawn-subset overlap: the selected multisets' overlap; arms on "
        "one seed share the selection's random stream, so at a high temperature it is high whatever the values "
        "(`random`'s row shows how high).", "",
    ]
    write_keeping_protocol_and_reading(out / f"{stem}.md", "\n".join(lines), new_file_title=f"# {stem}\n\n")
    plot_cost(out / f"{stem}.png", rows)


def plot_cost(path: Path, rows: list[dict]) -> None:
    """Overlap with full valuation, and held-out score, against valuation cost."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), constrained_layout=True)
    for row in rows:
        x = row["valuation_per_epoch"][0] if row["valuation_per_epoch"] else 0.0
        if row["top_overlap"]:
            axes[0].errorbar(x, row["top_overlap"][0], yerr=row["top_overlap"][1], fmt="o", capsize=3)
            label = "tive (vs another seed's)" if row["arm"] == "tive" else row["arm"]
            axes[0].annotate(label, (x, row["top_overlap"][0]), textcoords="offset points", xytext=(4, 4), fontsize=8)
        rel = np.asarray(row["relative"], dtype=np.float64)
        axes[1].errorbar(x, rel.mean(), yerr=rel.std(), fmt="o", capsize=3)
        axes[1].annotate(row["arm"], (x, rel.mean()), textcoords="offset points", xytext=(4, 4), fontsize=8)
    axes[0].axhline(0.8, color="gray", lw=0.8, ls="--")
    axes[0].set_xlabel("valuation / one full-pool training epoch")
    axes[0].set_ylabel("top-budget overlap with full valuation")
    axes[1].set_xlabel("valuation / one full-pool training epoch")
    axes[1].set_ylabel("held-out score, % of full data")
    fig.savefig(path, dpi=110)
    plt.close(fig)
