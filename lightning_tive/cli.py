"""The LightningCLI for lightning_tive: `fit`, `validate`, `test`, plus `export` and `fetch-smollm2`."""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from lightning.pytorch.cli import LightningCLI

from lightning_tive.callback import TIVESelectionCallback
from lightning_tive.data.datamodule import LlavaDataModule
from lightning_tive.model import LlavaModule


class TiveCLI(LightningCLI):
    """LightningCLI over LlavaModule and LlavaDataModule; the module owns its optimizers."""

    def add_arguments_to_parser(self, parser) -> None:
        """The top-level `tive:` section: TIVESelectionCallback's arguments, always present."""
        parser.add_lightning_class_args(TIVESelectionCallback, "tive")


def run_cli(args: list[str] | None = None) -> TiveCLI:
    """Run `fit` / `validate` / `test` from the command line or a list of arguments."""
    return TiveCLI(
        LlavaModule,
        LlavaDataModule,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


def export_main(argv: list[str]) -> Path:
    """`export --ckpt_path CKPT --output_dir DIR`: a merged HF model + processor from a checkpoint."""
    parser = argparse.ArgumentParser(prog="python -m lightning_tive export", description=export_main.__doc__)
    parser.add_argument("--ckpt_path", required=True, help="a Lightning checkpoint written by `fit`")
    parser.add_argument("--output_dir", required=True, help="folder for the merged model and processor")
    parser.add_argument(
        "--merge_from_full_precision",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="for QLoRA, rebuild the base in full precision before merging (default: on)",
    )
    ns = parser.parse_args(argv)
    path = export_checkpoint(ns.ckpt_path, ns.output_dir, ns.merge_from_full_precision)
    print(f"exported merged model and processor to {path}")
    return path


def export_checkpoint(ckpt_path: str, output_dir: str, merge_from_full_precision: bool = True) -> Path:
    """Load a fit checkpoint into its module and write the merged model with its processor."""
    overrides = {}
    if merge_from_full_precision:
        import torch

        # mmap: read the hyper-parameters without pulling every weight into memory a second time.
        hparams = torch.load(ckpt_path, map_location="cpu", mmap=True, weights_only=True).get("hyper_parameters", {})
        if hparams.get("finetune") == "qlora":
            # LoRA weights have the same names on a 4-bit and a full-precision base; merge into the latter.
            overrides["finetune"] = "lora"
    with warnings.catch_warnings():
        # Checkpoints hold trainable weights only; the frozen rest is rebuilt from its source by design.
        warnings.filterwarnings("ignore", message="Found keys that are in the model state dict but not in the checkpoint")
        module = LlavaModule.load_from_checkpoint(ckpt_path, map_location="cpu", **overrides)
    return module.export(output_dir)


def main(argv: list[str] | None = None) -> None:
    """Entry point for `python -m lightning_tive`."""
    words = sys.argv[1:] if argv is None else argv
    if words and words[0] == "export":
        export_main(words[1:])
        return
    if words and words[0] == "fetch-smollm2":
        from lightning_tive.weights import fetch_main

        fetch_main(words[1:])
        return
    run_cli(argv)  # None: LightningCLI reads sys.argv itself
