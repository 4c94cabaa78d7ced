"""Starting from an earlier run (`init_from`): its checkpoint's trained weights over a freshly built LLaVA.

Checkpoints keep trainable weights only, and the rest is rebuilt from the build source, so the
checkpoint must come from the same source; each setting that differs is named.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from lightning_tive.model.settings import TinyLlavaConfig, VisionTowerConfig

#: The hyper-parameters that decide the built (pre-fine-tuning) weights.
BUILD_SOURCE_KEYS = (
    "pretrained", "language_model", "gguf_file", "vision_tower", "vision_config", "projector_path", "tiny", "tokenizer",
    "init_seed",
)
#: What names a build: its source, and the cut (`language_model_layers`), which init_from does not compare
#: because a cut model loads the same checkpoint's weights as the whole one.
BUILD_KEYS = (*BUILD_SOURCE_KEYS, "language_model_layers")


def _with_defaults(key: str, value: Any) -> Any:
    """A build setting with its dataclass defaults filled in, so a field added later compares equal."""
    kinds = {"tiny": TinyLlavaConfig, "vision_config": VisionTowerConfig}
    if key in kinds and isinstance(value, dict):
        return asdict(kinds[key](**value))
    return value


def load_init_weights(model: torch.nn.Module, ckpt_path: str | os.PathLike, source: dict, _seen: tuple = ()) -> None:
    """Load a `fit` checkpoint's weights into a freshly built LLaVA (its own `init_from` chain first).

    Checkpoints keep trainable weights only; the rest is rebuilt from the build source, so the
    checkpoint must come from the same source (same pretrained parts, tiny config, seed).
    """
    path = Path(ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(f"model.init_from={path} does not exist (run the stage that writes it first)")
    if path.resolve() in _seen:
        raise ValueError(f"model.init_from chain loops back to {path}")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    hparams = checkpoint.get("hyper_parameters", {})
    for key in BUILD_SOURCE_KEYS:
        if _with_defaults(key, hparams.get(key)) != _with_defaults(key, source.get(key)):
            raise ValueError(
                f"model.init_from={path} was trained from another build source: {key}={hparams.get(key)!r} there, "
                f"{source.get(key)!r} here. Build this model from the same source as that run."
            )
    if hparams.get("init_from"):
        load_init_weights(model, hparams["init_from"], source, (*_seen, path.resolve()))
    state = {}
    for key, value in checkpoint["state_dict"].items():
        name = key.removeprefix("model.").removeprefix("base_model.model.")
        if ".lora_" in name:
            raise ValueError(
                f"model.init_from={path} holds LoRA weights ({name}); export that run "
                "(`python -m lightning_tive export`) and start from the merged folder with model.pretrained"
            )
        state[name] = value
    own = model.state_dict()
    unknown = sorted(k for k in state if k not in own)
    if unknown:
        raise ValueError(f"model.init_from={path} has weights this model lacks (e.g. {unknown[:3]})")
    wrong = sorted(k for k in state if own[k].shape != state[k].shape)
    if wrong:
        raise ValueError(f"model.init_from={path}: shapes differ for {wrong[:3]}")
    with torch.no_grad():
        for name, value in state.items():
            own[name].copy_(value.to(own[name].dtype))
