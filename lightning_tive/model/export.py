"""Export: a fit checkpoint → a merged Hugging Face LLaVA and its processor (`python -m lightning_tive export`)."""

from __future__ import annotations

import argparse
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from lightning_tive.model.module import LlavaModule


def merged_model(module: LlavaModule) -> Any:
    """A plain `LlavaForConditionalGeneration` with LoRA merged in (for export)."""
    if hasattr(module.model, "merge_and_unload"):
        return module.model.merge_and_unload()
    return module.model


def export_module(module: LlavaModule, output_dir: str | os.PathLike) -> Path:
    """Write a merged HF model and processor that `from_pretrained` loads."""
    output_dir = Path(output_dir)
    merged = merged_model(module)
    merged.save_pretrained(output_dir)
    module.processor.save_pretrained(output_dir)
    return output_dir


def export_checkpoint(ckpt_path: str, output_dir: str, merge_from_full_precision: bool = True) -> Path:
    """Load a fit checkpoint into its module and write the merged model with its processor."""
    overrides = {}
    if merge_from_full_precision:
        # mmap: read the hyper-parameters without pulling every weight into memory a second time.
        hparams = torch.load(ckpt_path, map_location="cpu", mmap=True, weights_only=True).get("hyper_parameters", {})
        if hparams.get("finetune") == "qlora":
            # LoRA weights have the same names on a 4-bit and a full-precision base; merge into the latter.
            overrides["finetune"] = "lora"
    with warnings.catch_warnings():
        # Checkpoints hold trainable weights only; the frozen rest is rebuilt from its source by design.
        warnings.filterwarnings("ignore", message="Found keys that are in the model state dict but not in the checkpoint")
        module = LlavaModule.load_from_checkpoint(ckpt_path, map_location="cpu", **overrides)
    return export_module(module, output_dir)


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
