"""Export: a fit checkpoint → a merged Hugging Face LLaVA and its processor (`python -m lightning_tive export`).

Reads the final model (`checkpoints/final.ckpt`, or any checkpoint `fit` wrote: a file, or a folder of
shards), loading only the trainable weights it holds into a module rebuilt from the checkpoint's
hyper-parameters: a file is memory-mapped and its optimizer state never read; a folder of shards is
read for its weights alone. LoRA is merged, and the weights are written as safetensors in bfloat16
unless `--dtype` says otherwise.
"""

from __future__ import annotations

import argparse
import inspect
import os
from pathlib import Path
from typing import Any

import torch

from lightning_tive.model.module import LlavaModule

EXPORT_DTYPES = ("bfloat16", "float16", "float32")


def merged_model(module: LlavaModule) -> Any:
    """A plain `LlavaForConditionalGeneration` with LoRA merged in (for export)."""
    if hasattr(module.model, "merge_and_unload"):
        return module.model.merge_and_unload()
    return module.model


def export_module(module: LlavaModule, output_dir: str | os.PathLike, dtype: str | None = "bfloat16") -> Path:
    """Write a merged HF model (safetensors, in `dtype`; None keeps the module's) and processor that `from_pretrained` loads."""
    output_dir = Path(output_dir)
    merged = merged_model(module)
    if dtype is not None:
        merged = merged.to(getattr(torch, dtype))
        merged.config.dtype = dtype
    merged.save_pretrained(output_dir)
    module.processor.save_pretrained(output_dir)
    return output_dir


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint file or folder of shards; a run folder stands for its `checkpoints/final.ckpt`."""
    from lightning_tive.checkpoints import FINAL_CHECKPOINT

    path = Path(path)
    final = path / "checkpoints" / FINAL_CHECKPOINT
    if path.is_dir() and not (path / "meta.pt").exists() and final.exists():
        return final
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path} (a run folder's final model is checkpoints/{FINAL_CHECKPOINT})")
    return path


def read_checkpoint_meta(path: Path) -> dict:
    """The checkpoint's hyper-parameters and trainable names, without reading any weight."""
    if path.is_dir():
        return torch.load(path / "meta.pt", map_location="cpu", weights_only=True)
    checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    return {k: v for k, v in checkpoint.items() if k not in ("state_dict", "optimizer_states")}


def load_trainable_weights(module: LlavaModule, path: Path) -> int:
    """Copy the checkpoint's weights into the module (mmap'd file, or a folder of shards); returns how many."""
    own = module.state_dict(keep_vars=True)
    if path.is_dir():
        import torch.distributed.checkpoint as dcp

        names = read_checkpoint_meta(path).get("lightning_tive_trainable") or sorted(own)
        unknown = sorted(n for n in names if n not in own)
        if unknown:
            raise ValueError(f"{path} holds weights this model lacks (e.g. {unknown[:3]}): built from another config?")
        state = {"state_dict": {name: own[name].detach() for name in names}}
        dcp.load(state, checkpoint_id=path, no_dist=True)  # reads into the module's own tensors
        return len(names)
    saved = torch.load(path, map_location="cpu", mmap=True, weights_only=True)["state_dict"]
    unknown = sorted(n for n in saved if n not in own)
    if unknown:
        raise ValueError(f"{path} holds weights this model lacks (e.g. {unknown[:3]}): built from another config?")
    with torch.no_grad():
        for name, value in saved.items():
            own[name].copy_(value.to(own[name].dtype))
    return len(saved)


def export_checkpoint(
    ckpt_path: str | os.PathLike, output_dir: str | os.PathLike, merge_from_full_precision: bool = True,
    dtype: str | None = "bfloat16",
) -> Path:
    """Rebuild the checkpoint's module, load its trainable weights, and write the merged model with its processor."""
    path = resolve_checkpoint(ckpt_path)
    hparams = dict(read_checkpoint_meta(path).get("hyper_parameters", {}))
    if merge_from_full_precision and hparams.get("finetune") == "qlora":
        # LoRA weights have the same names on a 4-bit and a full-precision base; merge into the latter.
        hparams["finetune"] = "lora"
    accepted = inspect.signature(LlavaModule.__init__).parameters  # LightningCLI adds keys of its own
    module = LlavaModule(**{k: v for k, v in hparams.items() if k in accepted})
    module.on_load_checkpoint(read_checkpoint_meta(path))  # refuses a checkpoint of another configuration
    load_trainable_weights(module, path)
    return export_module(module, output_dir, dtype)


def export_main(argv: list[str]) -> Path:
    """`export --ckpt_path CKPT --output_dir DIR [--dtype bfloat16]`: a merged HF model + processor from a checkpoint."""
    parser = argparse.ArgumentParser(prog="python -m lightning_tive export", description=export_main.__doc__)
    parser.add_argument(
        "--ckpt_path", required=True,
        help="a checkpoint written by `fit` (file or folder of shards), or a run folder (its checkpoints/final.ckpt)",
    )
    parser.add_argument("--output_dir", required=True, help="folder for the merged model and processor")
    parser.add_argument("--dtype", choices=[*EXPORT_DTYPES, "keep"], default="bfloat16",
                        help="dtype of the written weights (default bfloat16; `keep`: the checkpoint's)")
    parser.add_argument(
        "--merge_from_full_precision",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="for QLoRA, rebuild the base in full precision before merging (default: on)",
    )
    ns = parser.parse_args(argv)
    dtype = None if ns.dtype == "keep" else ns.dtype
    path = export_checkpoint(ns.ckpt_path, ns.output_dir, ns.merge_from_full_precision, dtype)
    print(f"exported merged model and processor to {path}")
    return path
