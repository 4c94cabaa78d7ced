"""An experiment's results files: <results>.json, <results>.md (protocol and reading kept across reruns), <results>.png."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from lightning_tive.experiment.stats import json_safe

RESULTS_HEADING = "## Results"
READING_MARK = "<!-- reading: kept across reruns -->"
CHANCE = {"color": 1 / 8, "shape": 1 / 5, "count": 1 / 5, "spatial": 1 / 2, "choice": 1 / 4}


def fmt(values: list[float]) -> str:
    """mean ± std over seeds."""
    v = np.asarray(values, dtype=np.float64)
    return f"{np.nanmean(v):.3f} ± {np.nanstd(v):.3f}" if len(v) else "–"


def write_results(out: Path, arms: dict, meta: dict) -> None:
    """<results>.json, <results>.md below its protocol (the reading after its marker kept) and <results>.png."""
    stem = meta["results"]
    payload = {"protocol": meta["protocol"], "seeds": meta["seeds"], "arms": arms, "wall_min": meta["wall_min"]}
    (out / f"{stem}.json").write_text(json.dumps(json_safe(payload), indent=1) + "\n")
    write_keeping_protocol_and_reading(out / f"{stem}.md", "\n".join(results_lines(arms, meta)) + "\n")
    plot_results(out / f"{stem}.png", arms)


def write_keeping_protocol_and_reading(path: Path, results: str, new_file_title: str = "") -> None:
    """Replace a results file's `## Results` section, keeping the protocol above it and the reading below its marker."""
    previous = path.read_text() if path.exists() else new_file_title
    protocol = previous.split(RESULTS_HEADING, 1)[0] if RESULTS_HEADING in previous else previous
    reading = previous.split(READING_MARK, 1)[1] if READING_MARK in previous else "\n## Reading\n\n(to be written)\n"
    path.write_text(protocol + results + "\n" + READING_MARK + reading)


def results_lines(arms: dict, meta: dict) -> list[str]:
    """The `## Results` section: relative scores and paired differences, per-task scores, costs, TIVE's budgets."""
    tasks = sorted({t for a in arms.values() for t in a["scores"]})
    lines = [
        RESULTS_HEADING, "",
        f"Produced by `python -m lightning_tive experiment {meta['command']}` in {meta['wall_min']:.1f} min on this "
        f"2-core CPU ({meta['threads']} torch thread(s)); seeds {meta['seeds']}; {meta['epochs']} epochs per arm; "
        f"{meta['held_out']} held-out examples per task. Mean ± std over seeds.", "",
        "### Relative score and the paired difference to random", "",
        "| arm | examples | optimizer steps | relative to full (%) | arm − random (points) | 95% interval |",
        "|---|---|---|---|---|---|",
    ]
    for name, a in arms.items():
        diff = a.get("minus_random")
        cells = ("", "")
        if diff:
            low, high = diff["ci95"]
            cells = (f"{diff['mean']:+.1f}", f"[{low:+.1f}, {high:+.1f}]" if math.isfinite(low) else "– (one seed)")
        rel = np.asarray(a["relative"])
        lines.append(f"| {name} | {a['train_examples']} | {a['steps']:.0f} | {rel.mean():.1f} ± {rel.std():.1f} | "
                     f"{cells[0]} | {cells[1]} |")
    lines += [
        "", "`*_equal_steps` arms train as many optimizer steps as `full`; their difference is to "
        "`random_equal_steps`. Relative: mean over tasks of score / full's score on the same seed.", "",
        "### Held-out score per task", "",
        "| arm | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks),
    ]
    for name, a in arms.items():
        lines.append(f"| {name} | " + " | ".join(fmt(a["scores"].get(t, [])) for t in tasks) + " |")
    lines += [
        "", "Chance levels: " + ", ".join(f"{t} {c:.2f}" for t, c in CHANCE.items()) + "; `caption`, `conversation` "
        "are token F1, the others exact-match accuracy.", "",
        "### Cost per arm (seconds, mean over seeds)", "",
        "| arm | warm-up | valuation | selection | training | total | total / full |", "|---|---|---|---|---|---|---|",
    ]
    full_total = sum(arms["full"]["seconds"].values()) if "full" in arms else float("nan")
    for name, a in arms.items():
        sec = a["seconds"]
        total = sum(sec.values())
        lines.append(f"| {name} | {sec['warmup_s']:.1f} | {sec['valuation_s']:.1f} | {sec['selection_s']:.2f} | "
                     f"{sec['training_s']:.1f} | {total:.1f} | {total / full_total:.2f} |")
    lines += ["", f"Stage 1 (once): {meta['stage1_s']:.0f} s. Arms that re-select from `tive`'s features show its "
              "warm-up and valuation (paid once per seed).", ""]
    if meta.get("budgets"):
        lines += ["### Task budgets chosen by TIVE (first seed)", "",
                  "| task | size | task value | budget | share of pool | share of budget |", "|---|---|---|---|---|---|"]
        pool = sum(r["size"] for r in meta["budgets"])
        budget = max(sum(r["budget"] for r in meta["budgets"]), 1)
        for r in meta["budgets"]:
            lines.append(f"| {r['task']} | {r['size']} | {r['task_value']:.3f} | {r['budget']} | {r['size'] / pool:.3f} | "
                         f"{r['budget'] / budget:.3f} |")
    return lines


def plot_results(path: Path, arms: dict) -> None:
    """Relative score per arm, and each arm's paired difference to random with its 95% interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(arms)
    fig, axes = plt.subplots(1, 2, figsize=(14, 4.8), constrained_layout=True)
    means = [np.mean(arms[n]["relative"]) for n in names]
    stds = [np.std(arms[n]["relative"]) for n in names]
    colors = ["gray" if n == "full" else "tab:orange" if n.endswith("_equal_steps") else "tab:blue" for n in names]
    axes[0].bar(names, means, yerr=stds, capsize=3, color=colors)
    axes[0].axhline(100, color="black", lw=0.8, ls="--")
    axes[0].set_ylabel("held-out score, % of full data")
    axes[0].set_title("relative score (blue: equal epochs, orange: equal steps)")
    axes[0].tick_params(axis="x", rotation=45)
    paired = [n for n in names if "minus_random" in arms[n]]
    mid = [arms[n]["minus_random"]["mean"] for n in paired]
    err = np.array([[m - arms[n]["minus_random"]["ci95"][0], arms[n]["minus_random"]["ci95"][1] - m] for n, m in zip(paired, mid, strict=True)]).T
    axes[1].errorbar(range(len(paired)), mid, yerr=np.nan_to_num(err), fmt="o", capsize=4)
    axes[1].axhline(0, color="black", lw=0.8)
    axes[1].set_xticks(range(len(paired)), paired, rotation=45)
    axes[1].set_ylabel("arm − random, relative points (95% interval)")
    axes[1].set_title("paired difference to random")
    fig.savefig(path, dpi=110)
    plt.close(fig)
