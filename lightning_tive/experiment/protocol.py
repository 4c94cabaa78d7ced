"""The experiment protocol: presets, the arms for every seed, the equal-compute arms, then the results files.

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
- `cost` and `cost_smollm2`: the cost/quality table (lightning_tive/experiment/cost.py): `full`, `random`,
  `tive`, `length_normalised` and one `tive` arm per cheaper valuation setting (a proxy cut from the main
  model, the last layers' features, a shorter valuation length, combined); 5 and 3 seeds;
  docs/cost.* and docs/cost_smollm2.* (per-arm details in docs/<stem>_arms.*).

    python -m lightning_tive experiment                   # the demo protocol: 5 seeds (86 min on 2 shared cores)
    python -m lightning_tive experiment --quick           # a tiny pool, 1 seed, 1 epoch: minutes; writes to --work
    python -m lightning_tive experiment --demo-sizes '{"color": 600, "text": 200}' --seeds 0 1 2
    python -m lightning_tive experiment --preset smollm2  # the SmolLM2 protocol (34 min on 2 quiet cores)
    python -m lightning_tive experiment --preset cost     # the demo's cost/quality table
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lightning_tive.data.demo import DEMO_TASKS
from lightning_tive.experiment.cost import cost_rows, tive_overrides, write_cost
from lightning_tive.experiment.results import write_results
from lightning_tive.experiment.runs import ROOT, run_arm, run_stage1, stage1_settings, stage2_mixture
from lightning_tive.experiment.stats import json_safe, summarise_arms

ARMS = (
    "full", "random", "tive", "tive_uniform", "instance_only", "gradnorm", "length", "perplexity", "size_aware",
    "length_normalised",
)
# Arms that re-select from the seed's `tive` features instead of warming up and valuing again.
REUSES_FEATURES = ("tive_uniform", "instance_only", "gradnorm", "perplexity", "size_aware", "length_normalised")
EQUAL_STEPS = ("random", "tive", "size_aware")
# Pairs against random printed in the last line.
HEADLINE_PAIRS = ("tive", "size_aware", "length_normalised", "tive_equal_steps", "size_aware_equal_steps")


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
    #: Cost presets: arm name -> `tive:` fields of a cheaper valuation (`reference_layers: N` is a proxy,
    #: the main model cut to N LM layers); each runs as `tive` and goes into the cost/quality table.
    settings: dict = field(default_factory=dict, hash=False)


# The demo model has 2 decoder layers; 87 tokens keep every demo answer (docs/tive.md, "Cheaper valuation").
DEMO_COST = {
    "tive_proxy": {"reference_layers": 1},
    "tive_last_layer": {"gradient_layers": 1},
    "tive_short": {"valuation_max_length": 87},
    "tive_cheap": {"reference_layers": 1, "valuation_max_length": 87},
}
# SmolLM2-135M has 30 decoder layers; 83 tokens, the shortest cut that keeps every answer of the mixture,
# keep 98% of its tokens (its answers are short: the prompt dominates).
SMOLLM2_COST = {
    "tive_proxy": {"reference_layers": 8},
    "tive_last_layers": {"gradient_layers": 4},
    "tive_short": {"valuation_max_length": 83},
    "tive_cheap": {"reference_layers": 8, "gradient_layers": 4, "valuation_max_length": 83},
}
COST_ARMS = ("full", "random", "tive", "length_normalised")

PRESETS = {
    "demo": Preset("configs/demo_stage1.yaml", "configs/demo.yaml", "results"),
    # 4 seeds x (full, random, tive) at one epoch (LLaVA's stage 2), on the config's 435-example mixture
    # with 20 held-out examples per task: 33.9 min measured on 2 quiet cores (docs/results_smollm2.md).
    "smollm2": Preset(
        "configs/smollm2_stage1.yaml", "configs/smollm2.yaml", "results_smollm2", arms=("full", "random", "tive"),
        seeds=(0, 1, 2, 3), equal_steps_seeds=0, epochs=1, threads=2, quick_per_task=3, quick_val_size=2,
        quick_align=16, smollm2=True,
    ),
    # The cost/quality table (docs/cost.md): every cheaper valuation setting next to full valuation.
    "cost": Preset("configs/demo_stage1.yaml", "configs/demo.yaml", "cost", arms=(*COST_ARMS, *DEMO_COST),
                   equal_steps_seeds=0, settings=DEMO_COST),
    "cost_smollm2": Preset(
        "configs/smollm2_stage1.yaml", "configs/smollm2.yaml", "cost_smollm2", arms=(*COST_ARMS, *SMOLLM2_COST),
        seeds=(0, 1, 2), equal_steps_seeds=0, epochs=1, threads=2, quick_per_task=3, quick_val_size=2, quick_align=16,
        smollm2=True, settings=SMOLLM2_COST,
    ),
}
SETTING_ARMS = tuple(dict.fromkeys(name for p in PRESETS.values() for name in p.settings))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line, with the preset's defaults filled in (`args.preset` becomes the Preset)."""
    parser = argparse.ArgumentParser(prog="python -m lightning_tive experiment", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="demo", choices=sorted(PRESETS), help="which experiment (see above)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default: the preset's")
    parser.add_argument("--equal-steps-seeds", type=int, default=None, help="how many of the seeds run the equal-compute arms")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per arm (default: the preset's)")
    parser.add_argument("--demo-sizes", default=None, help="JSON task -> training size (another mixture)")
    parser.add_argument("--arms", nargs="+", default=None, choices=ARMS + SETTING_ARMS,
                        help="default: the preset's")
    parser.add_argument("--quick", action="store_true", help="a tiny pool, 1 seed, 1 epoch (checks the script)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: the preset's; 1 is safe on a shared machine)")
    parser.add_argument("--work", default=None, help="scratch folder for the runs (default: runs/experiment[_<preset>])")
    parser.add_argument("--out", default=None, help="where the results go (default: docs/, or --work with --quick)")
    parser.add_argument("--rewrite", action="store_true",
                        help="write the results files again from --work's runs.json (a finished experiment), run nothing")
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
    return args


def run_arms(work: Path, ckpt: Path, args: argparse.Namespace) -> list[dict]:
    """Every arm for every seed (`tive` before the arms that re-select from its features), then the equal-compute arms."""
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
            if arm in SETTING_ARMS and arm not in args.preset.settings:
                raise SystemExit(f"arm {arm} is a cost setting of another preset; this one has {sorted(args.preset.settings)}")
            setting = tive_overrides(args.preset.settings[arm], args, ckpt) if arm in args.preset.settings else None
            result = run_arm(arm, seed, base / arm, ckpt, args, features_from=reuse, tive_overrides=setting)
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
    return runs


def main(argv: list[str] | None = None) -> dict:
    """Stage 1, every arm for every seed, the equal-compute arms, then the results files."""
    args = parse_args(argv)
    record = None
    if args.rewrite:  # the results files again from a finished experiment's runs, nothing rerun
        saved = Path(args.work) / "runs.json"
        if not saved.is_file():
            raise SystemExit(f"--rewrite reads {saved}, written when an experiment finishes; there is none")
        record = json.loads(saved.read_text())
        out, work = args.out, args.work
        args = parse_args(shlex.split(record["command"]))  # the settings the runs were made with
        args.out, args.work = out or args.out, work
    preset = args.preset
    import torch

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("WANDB_MODE", "disabled")
    work = Path(args.work)
    if record is not None:
        runs, stage1_s, wall, command = record["runs"], record["stage1_s"], record["wall_min"], record["command"]
    else:
        started = time.perf_counter()
        ckpt, stage1_s = run_stage1(work, args)
        runs = run_arms(work, ckpt, args)
        wall = (time.perf_counter() - started) / 60
        command = " ".join(argv if argv is not None else sys.argv[1:])
        (work / "runs.json").write_text(json.dumps({"runs": runs, "stage1_s": stage1_s, "wall_min": wall, "command": command}))
    arms = summarise_arms(runs)
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
            "command": command}
    # A cost preset's own files hold the table; the usual per-arm results go next to them as <results>_arms.
    write_results(out, arms, meta | {"results": f"{preset.results}_arms"} if preset.settings else meta)
    if preset.settings:
        rows = cost_rows(runs, work, preset.settings, args.epochs)
        write_cost(out, preset.results, rows, preset.settings, meta)
    final = {name: round(float(np.mean(a["relative"])), 2) for name, a in arms.items()}
    final.update({f"{name} - random": [round(a["minus_random"]["mean"], 2), [round(x, 2) for x in a["minus_random"]["ci95"]]]
                  for name, a in arms.items() if "minus_random" in a and name in HEADLINE_PAIRS})
    final["wall_min"] = round(wall, 1)
    print(json.dumps(json_safe(final)))
    return final
