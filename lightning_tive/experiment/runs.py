"""One experiment run, built through the CLI: stage 1 once, then each arm from its checkpoint, scored held out.

Every run is `TiveCLI(..., run=False)` over a config plus a YAML overlay written into the run's
folder, so an arm is exactly what `python -m lightning_tive fit` with those files would train.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import yaml

#: The repository holding the package: the presets' configs/ and the results' docs/.
ROOT = Path(__file__).resolve().parents[2]
NEVER = 100_000  # check_val_every_n_epoch: no validation inside fit; one pass after it

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
            max_steps: int | None = None, tive_overrides: dict | None = None) -> dict:
    """Train one arm from the stage-1 start and score it on the held-out split.

    `tive_overrides` (a cost setting's `tive:` fields) make the arm a `tive` run valued otherwise.
    """
    import lightning as L

    from lightning_tive.callback import TIVESelectionCallback
    from lightning_tive.cli import run_cli

    steps = f"max_steps: {max_steps}\n  max_epochs: -1" if max_steps else f"max_epochs: {args.epochs}"
    strategy = "tive" if arm == "full" or tive_overrides else arm
    extra = "".join(f"\n  {key}: {json.dumps(value)}" for key, value in (tive_overrides or {}).items())
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
  features_from: {features_from or "null"}{extra}
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
