"""How close are `kronecker` selections to dense `rademacher` ones, on the demo, from one reference model?

For every seed, with `configs/demo.yaml`'s `tive:` settings (tiny model, default demo mixture unless
`--demo-sizes`), three `fit`s run through the CLI with `tive.stop_after_selection: true`:

1. `kronecker`: warm-up of the reference adapter, valuation, selection, as a demo run does. It leaves
   `tive/reference_adapter.pt`.
2. `rademacher`: the same config with `tive.projector: rademacher`, in a fresh folder that holds a copy
   of that `reference_adapter.pt`. The callback's resume path loads it (no second warm-up), so its
   features come from the very same reference model (checked: the runs' `reference_adapter_sha256`
   must agree).
3. `rademacher'` (the noise floor; off with `--no-floor`): the same as 2 with `tive.seed` raised by
   1000. The adapter is loaded again, so only the projection draw changes. It answers: does kronecker
   differ from rademacher more than two rademacher draws differ from each other?

Every arm's features are read back with `open_features` and `instance_values` (as the callback does)
and selected with `select_subset` at the config's settings and at top-k (temperature → 0), always
with the base seed's sampling noise. The config-setting selection of arms 1 and 2 is checked against
the one the fit wrote in `values.csv`.

Reported per seed and as mean ± std: per-task Spearman correlation of instance values, task-value and
norm agreement (both exact, so they should be bit-equal), task-budget equality, and multiset subset
overlap |A ∩ B| / B. Two references put the overlaps in context: the overlap with a selection drawn
with another sampling seed, and the expected overlap of two independent uniform draws with the same
task budgets. The last line printed is one JSON object.

    PYTHONPATH=. python scripts/compare_projectors.py            # 3 seeds, default demo pool
    PYTHONPATH=. python scripts/compare_projectors.py --quick    # 3 seeds, 12 examples per task: ~1 min
    PYTHONPATH=. python scripts/compare_projectors.py --demo-sizes '{"color": 300, "text": 100}'
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import time
import warnings
from pathlib import Path

import numpy as np

from lightning_tive.data.demo import DEMO_TASKS
from lightning_tive.experiment.runs import QUIET_TRAINER, ROOT, overlay
from lightning_tive.experiment.stats import json_safe, mean_std, overlap, spearman, uniform_overlap

STAGE1 = ROOT / "runs" / "demo_stage1" / "checkpoints" / "stage1.ckpt"
QUICK_SIZES = {t: 12 for t in DEMO_TASKS}
FLOOR_SEED_OFFSET = 1000
OTHER_SAMPLING_SEED_OFFSET = 1


def fit_arm(folder: Path, seed: int, projector: str, tive_seed: int, args: argparse.Namespace, dtype: str = "float16"):
    """One `fit` that stops after selection; returns the CLI (trainer, model, datamodule)."""
    import lightning as L

    from lightning_tive.cli import run_cli

    demo = json.dumps({"train_sizes": args.sizes} if args.sizes else {})
    text = f"""
seed_everything: {seed}
trainer:
{QUIET_TRAINER}
  default_root_dir: {folder}
model:
  init_from: {args.init_from or "null"}
data:
  demo: {demo}
  output_dir: {folder}
tive:
  projector: {projector}
  seed: {tive_seed}
  stop_after_selection: true
  feature_dtype: {dtype}
  output_dir: {folder / "tive"}
"""
    L.seed_everything(seed, verbose=False)
    cli = run_cli(["--config", str(ROOT / "configs" / "demo.yaml"), "--config", overlay(folder, text)], run=False)
    cli.trainer.fit(cli.model, cli.datamodule)
    return cli


def arm_values(folder: Path, datamodule) -> dict:
    """Pool-ordered norms, instance values, losses, tokens and finite flags of an arm's feature store."""
    from lightning_tive.feature_folder import open_features
    from lightning_tive.tive.values import instance_values

    source, indices, settings = open_features(folder / "tive" / "features", datamodule)
    task_ids = np.asarray(datamodule.pool_task_ids)
    if not np.array_equal(indices, np.arange(datamodule.pool_size)):
        raise RuntimeError("expected a single-process store (row i = pool index i)")
    norms = source.read_norms()
    u, finite = instance_values(source, task_ids, len(datamodule.task_names), np.isfinite(norms))
    return {"norms": norms, "u": u, "loss": source.read_column("loss"), "tokens": source.read_column("tokens"),
            "finite": finite, "projection": settings["projection"]["kind"]}


def selections(config, datamodule, values: dict, seed: int) -> dict:
    """The config-setting and top-k selections, and the config setting with another sampling seed."""
    from lightning_tive.strategies import select_subset

    return {
        "config": select_subset(dataclasses.replace(config, seed=seed), datamodule, values),
        "topk": select_subset(dataclasses.replace(config, seed=seed, sampling="topk"), datamodule, values),
        "other_seed": select_subset(dataclasses.replace(config, seed=seed + OTHER_SAMPLING_SEED_OFFSET), datamodule,
                                    values),
    }


def compare(names: list[str], task_ids: np.ndarray, va: dict, vb: dict, sa: dict, sb: dict) -> dict:
    """Agreement of two arms' values and selections."""
    ok = va["finite"] & vb["finite"]
    per_task = {name: spearman(va["u"][ok & (task_ids == t)], vb["u"][ok & (task_ids == t)]) for t, name in enumerate(names)}
    tv_a = np.array([r.task_value for r in sa["config"].tasks])
    tv_b = np.array([r.task_value for r in sb["config"].tasks])
    with np.errstate(invalid="ignore", divide="ignore"):
        rel = np.nanmax(np.abs(tv_a - tv_b) / np.abs(tv_a)) if len(tv_a) else 0.0
    return {
        "spearman_per_task": per_task,
        "spearman_mean": float(np.nanmean(list(per_task.values()))),
        "spearman_min": float(np.nanmin(list(per_task.values()))),
        "spearman_pooled": spearman(va["u"][ok], vb["u"][ok]),
        "norms_equal": bool(np.array_equal(va["norms"], vb["norms"], equal_nan=True)),
        "task_values_equal": bool(np.array_equal(tv_a, tv_b, equal_nan=True)),
        "task_value_max_rel_diff": float(rel),
        "budgets_equal": [r.budget for r in sa["config"].tasks] == [r.budget for r in sb["config"].tasks],
        "overlap_config": overlap(sa["config"], sb["config"]),
        "overlap_topk": overlap(sa["topk"], sb["topk"]),
    }


def check_fit_selection(folder: Path, result) -> None:
    """The offline selection at the config's settings must be the one the fit wrote."""
    import csv

    with open(folder / "tive" / "values.csv") as f:
        written = np.array([int(row["times_selected"]) for row in csv.DictReader(f)])
    if not np.array_equal(written, result.times_selected):
        raise RuntimeError(f"{folder}: the re-computed selection differs from the fit's values.csv")


def adapter_sha(folder: Path) -> str:
    return json.loads((folder / "tive" / "ranks" / "rank-00000.json").read_text())["reference_adapter_sha256"]


# arm -> (tive.projector, offset of tive.seed, tive.feature_dtype)
ARMS = {
    "kronecker": ("kronecker", 0, "float16"),
    "rademacher": ("rademacher", 0, "float16"),
    "rademacher_floor": ("rademacher", FLOOR_SEED_OFFSET, "float16"),
    "exact": ("identity", 0, "float32"),
}
# pair name -> (arm a, arm b)
PAIRS = {
    "kronecker_vs_rademacher": ("kronecker", "rademacher"),
    "floor": ("rademacher", "rademacher_floor"),
    "kronecker_vs_exact": ("kronecker", "exact"),
    "rademacher_vs_exact": ("rademacher", "exact"),
}
SUMMARY_KEYS = ("spearman_mean", "spearman_min", "spearman_pooled", "overlap_config", "overlap_topk")
CHECKS = ("norms_equal", "task_values_equal", "budgets_equal")


def run_seed(seed: int, args: argparse.Namespace) -> dict:
    """The arms of one seed, and their comparisons."""
    base = Path(args.work) / f"seed{seed}"
    if base.exists():
        shutil.rmtree(base)
    arms = [a for a in ARMS if (a != "rademacher_floor" or args.floor) and (a != "exact" or args.exact)]
    folders = {arm: base / arm for arm in arms}
    seconds, clis = {}, {}
    for arm in arms:
        projector, offset, dtype = ARMS[arm]
        folder = folders[arm]
        if arm != "kronecker":  # the resume path loads the kronecker run's reference model
            (folder / "tive").mkdir(parents=True)
            shutil.copy2(folders["kronecker"] / "tive" / "reference_adapter.pt", folder / "tive" / "reference_adapter.pt")
        clock = time.perf_counter()
        clis[arm] = fit_arm(folder, seed, projector, seed + offset, args, dtype)
        seconds[arm] = time.perf_counter() - clock
    shas = {arm: adapter_sha(folder) for arm, folder in folders.items()}
    if len(set(shas.values())) != 1:
        raise RuntimeError(f"seed {seed}: the arms used different reference models: {shas}")
    datamodule = clis["kronecker"].datamodule
    config = next(c for c in clis["kronecker"].trainer.callbacks if type(c).__name__ == "TIVESelectionCallback").config
    names, task_ids = list(datamodule.task_names), np.asarray(datamodule.pool_task_ids)
    values = {arm: arm_values(folder, datamodule) for arm, folder in folders.items()}
    for arm in arms:
        if values[arm]["projection"] != ARMS[arm][0]:
            raise RuntimeError(f"{arm}: the store holds {values[arm]['projection']} features")
    sel = {arm: selections(config, datamodule, v, seed) for arm, v in values.items()}
    for arm in arms:
        if ARMS[arm][1] == 0:  # the fit sampled with this seed: its values.csv must match
            check_fit_selection(folders[arm], sel[arm]["config"])
    pairs = {name: compare(names, task_ids, values[a], values[b], sel[a], sel[b])
             for name, (a, b) in PAIRS.items() if a in arms and b in arms}
    out = {
        "seed": seed,
        **pairs.pop("kronecker_vs_rademacher"),
        **pairs,
        "pool_size": int(datamodule.pool_size),
        "reference_adapter_sha256": shas["kronecker"][:16],
        "budget": int(sel["kronecker"]["config"].budget),
        "budgets": {r.task: r.budget for r in sel["kronecker"]["config"].tasks},
        "reference": {
            "overlap_other_sampling_seed": overlap(sel["kronecker"]["config"], sel["kronecker"]["other_seed"]),
            "overlap_uniform_expected": uniform_overlap(sel["kronecker"]["config"], task_ids),
        },
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
    }
    if not args.keep:
        shutil.rmtree(base)
    return out


def summarise_pair(entries: list[dict]) -> dict:
    """Mean ± std over seeds (std with ddof 0) of one pair's figures; the exact checks must hold on every seed."""
    out = {k: mean_std([e[k] for e in entries]) for k in SUMMARY_KEYS}
    names = list(entries[0]["spearman_per_task"])
    out["spearman_per_task"] = {t: mean_std([e["spearman_per_task"][t] for e in entries]) for t in names}
    out.update({k: all(e[k] for e in entries) for k in CHECKS})
    return out


def summarise(per_seed: list[dict]) -> dict:
    """kronecker vs rademacher at the top level; the other pairs and the references under their names."""
    out = summarise_pair(per_seed)
    for name in PAIRS:
        if name in per_seed[0]:
            out[name] = summarise_pair([s[name] for s in per_seed])
    for k in ("overlap_other_sampling_seed", "overlap_uniform_expected"):
        out[k] = mean_std([s["reference"][k] for s in per_seed])
    return out


def fmt(entry: dict) -> str:
    return f"{entry['mean']:.3f} ± {entry['std']:.3f}"


COLUMN_TITLES = {"floor": "rad vs rad'", "kronecker_vs_exact": "kron vs exact", "rademacher_vs_exact": "rad vs exact"}


def print_tables(per_seed: list[dict], summary: dict) -> None:
    """Per seed, then mean ± std with the other pairs side by side."""
    print("\nkronecker vs rademacher, same reference model")
    print("seed | Spearman u (mean over tasks / worst task / pooled) | overlap config | overlap top-k | "
          "norms = | task values = | budgets =")
    for s in per_seed:
        print(f"{s['seed']:>4} | {s['spearman_mean']:.3f} / {s['spearman_min']:.3f} / {s['spearman_pooled']:.3f}"
              f" | {s['overlap_config']:.3f} | {s['overlap_topk']:.3f} | {s['norms_equal']} | {s['task_values_equal']}"
              f" | {s['budgets_equal']}")
    others = [name for name in COLUMN_TITLES if name in summary]
    titles = ["kron vs rad", *(COLUMN_TITLES[n] for n in others)]
    print("\nmean ± std over seeds")
    print(f"  {'':<34} " + " | ".join(f"{t:<13}" for t in titles))
    rows = [("Spearman u, mean over tasks", "spearman_mean"), ("Spearman u, worst task", "spearman_min"),
            ("Spearman u, pooled", "spearman_pooled"), ("overlap at the config's settings", "overlap_config"),
            ("overlap at top-k", "overlap_topk")]
    for label, key in rows:
        cells = [summary[key], *(summary[n][key] for n in others)]
        print(f"  {label:<34} " + " | ".join(fmt(c) for c in cells))
    print(f"  {'reference: another sampling seed':<34} {fmt(summary['overlap_other_sampling_seed'])}")
    print(f"  {'reference: uniform draws (expected)':<34} {fmt(summary['overlap_uniform_expected'])}")
    print("\nSpearman u per task, mean ± std over seeds: " + " | ".join(titles))
    for task, entry in summary["spearman_per_task"].items():
        cells = [entry, *(summary[n]["spearman_per_task"][task] for n in others)]
        print(f"  {task:<14} " + " | ".join(fmt(c) for c in cells))
    print("\nnorms equal: " + str(summary["norms_equal"]) + "; task values equal: " + str(summary["task_values_equal"])
          + "; budgets equal: " + str(summary["budgets_equal"]) + " (kronecker vs rademacher, every seed)")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--demo-sizes", default=None, help="JSON task -> pool size (default: the demo mixture)")
    parser.add_argument("--init-from", default=None,
                        help=f"stage-1 checkpoint, or 'null' (default: {STAGE1.relative_to(ROOT)} if present, else null)")
    parser.add_argument("--no-floor", dest="floor", action="store_false", help="skip the rademacher' arm")
    parser.add_argument("--no-exact", dest="exact", action="store_false", help="skip the exact (identity) arm")
    parser.add_argument("--keep", action="store_true", help="keep each seed's run folders (features included)")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_SIZES['color']} examples per task (~1 min)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work", default=str(ROOT / "runs" / "compare_projectors"))
    args = parser.parse_args(argv)
    args.sizes = json.loads(args.demo_sizes) if args.demo_sizes else (QUICK_SIZES if args.quick else None)
    if args.init_from is None:
        args.init_from = str(STAGE1) if STAGE1.is_file() else None
    elif args.init_from.lower() in ("null", "none", ""):
        args.init_from = None
    import torch

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("WANDB_MODE", "disabled")
    started = time.perf_counter()
    print(f"init_from: {args.init_from or 'null (random tiny model)'}; pool sizes: {args.sizes or 'demo default'}",
          flush=True)
    per_seed = []
    for seed in args.seeds:
        per_seed.append(run_seed(seed, args))
        s = per_seed[-1]
        line = {k: s[k] for k in ("seed", "spearman_mean", "overlap_config", "overlap_topk", "task_values_equal",
                                  "budgets_equal", "seconds")}
        print(json.dumps(json_safe(line, digits=6)), flush=True)
    summary = summarise(per_seed)
    print_tables(per_seed, summary)
    final = {
        "seeds": args.seeds,
        "quick": args.quick,
        "init_from": args.init_from,
        "demo_sizes": args.sizes,
        "pool_size": per_seed[0]["pool_size"],
        "budget": per_seed[0]["budget"],
        "summary": summary,
        "per_seed": per_seed,
        "threads": args.threads,
        "wall_s": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(json_safe(final, digits=6)))
    return final


if __name__ == "__main__":
    main()
