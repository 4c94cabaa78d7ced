"""A proxy reference model (`tive.reference_model`): a smaller LlavaModule that values the pool for the main one.

The proxy is built eagerly on every process, on the trainer's root device, and is never wrapped by
DDP or FSDP: the reference phases run on it unsharded (gradients averaged across processes in the
warm-up, the pool dealt to processes for valuation), then it is dropped. It must tokenise the pool
exactly as the main model does, since the DataModule tokenises with the main model's processor.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import inspect
import json
from typing import Any

import torch

#: LlavaModule arguments a proxy does not take: it is trained only by the warm-up's own AdamW.
NOT_FOR_PROXY = ("optimizer", "lr_scheduler")
#: Text tokenised by both tokenizers as a last check (system prompt, digits, unicode, the image token).
PROBE_TEXT = (
    "A chat between a curious user and an artificial intelligence assistant. USER: <image>\n"
    "What colour is the 3rd shape, 12.5% or 1000? Ünïcödé ✓ ASSISTANT: Red.</s>"
)


def reference_model_keys() -> dict[str, Any]:
    """The keys `tive.reference_model` accepts (LlavaModule's arguments) and their nested dataclasses."""
    from lightning_tive.model.module import LlavaModule
    from lightning_tive.model.settings import LoraSettings, TinyLlavaConfig, VisionTowerConfig

    nested = {"tiny": TinyLlavaConfig, "vision_config": VisionTowerConfig, "lora": LoraSettings}
    names = [n for n in inspect.signature(LlavaModule.__init__).parameters if n != "self" and n not in NOT_FOR_PROXY]
    return {name: nested.get(name) for name in names}


def check_reference_model(settings: Any) -> None:
    """Refuse a `tive.reference_model` that is not a mapping of LlavaModule arguments, naming the bad key."""
    if not isinstance(settings, dict):
        raise ValueError(f"tive.reference_model must be a mapping of model arguments (as `model:`), not {settings!r}")
    keys = reference_model_keys()
    for key, value in settings.items():
        if key not in keys:
            raise ValueError(
                f"tive.reference_model.{key} is not a model argument; it takes {sorted(keys)} (as the `model:` section, "
                "without optimizer/lr_scheduler: the proxy is trained by the warm-up only)"
            )
        kind = keys[key]
        if kind is not None and isinstance(value, dict):
            allowed = {f.name for f in dataclasses.fields(kind)}
            unknown = sorted(set(value) - allowed)
            if unknown:
                raise ValueError(f"tive.reference_model.{key}.{unknown[0]} is not a setting of {kind.__name__}; "
                                 f"it takes {sorted(allowed)}")


def build_reference_model(settings: dict, device: Any, precision_plugin: Any = None) -> Any:
    """The proxy LlavaModule, built for real on this process (never a meta skeleton), on `device`."""
    from lightning_tive.model.module import LlavaModule

    check_reference_model(settings)
    proxy = LlavaModule(**settings)
    if proxy.on_meta:  # processes other than 0 build a skeleton for the main model's broadcast; not here
        proxy.build_model()
    if precision_plugin is not None:  # the main model's dtype conversion (e.g. bf16-true), as the strategy does it
        proxy = precision_plugin.convert_module(proxy)
    return proxy.to(device)


def release_device_memory(device: Any) -> None:
    """Return freed memory (a dropped proxy's) to the device once its last reference is gone."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def tokenisation(processor: Any) -> dict[str, Any]:
    """What decides the pool's token ids and pixels: vocabulary, special tokens, template, image tokens and size."""
    from lightning_tive.data.images import image_token_count

    tokenizer = processor.tokenizer
    vocab = sorted(tokenizer.get_vocab().items())
    image = processor.image_processor.to_dict()
    for key in ("image_processor_type", "processor_class", "_processor_class"):
        image.pop(key, None)
    return {
        "vocabulary": hashlib.sha256(json.dumps(vocab).encode()).hexdigest()[:16] + f" ({len(vocab)} tokens)",
        "special tokens": {
            name: getattr(tokenizer, f"{name}_token_id", None) for name in ("bos", "eos", "pad", "unk")
        } | {"image": tokenizer.convert_tokens_to_ids(processor.image_token)},
        "chat template": hashlib.sha256(str(tokenizer.chat_template).encode()).hexdigest()[:16],
        "probe token ids": hashlib.sha256(str(tokenizer(PROBE_TEXT)["input_ids"]).encode()).hexdigest()[:16],
        "image tokens": image_token_count(processor),
        "image processor": hashlib.sha256(json.dumps(image, sort_keys=True, default=str).encode()).hexdigest()[:16],
    }


def describe_model(module: Any) -> str:
    """A model named by its build source: `tiny={...}, tokenizer=demo`, `pretrained=...`, or its LM and tower."""
    from lightning_tive.model.init_from import BUILD_KEYS

    hparams = dict(getattr(module, "hparams", {}))
    shown = {k: hparams[k] for k in BUILD_KEYS if hparams.get(k) not in (None, 0)}
    return ", ".join(f"{k}={v}" for k, v in shown.items()) or type(module).__name__


def check_same_tokenisation(main: Any, proxy: Any) -> None:
    """Refuse a proxy whose processor would give the pool other token ids or pixels than the main model's."""
    ours, theirs = tokenisation(main.processor), tokenisation(proxy.processor)
    differ = [f"{key}: {ours[key]} (main) vs {theirs[key]} (proxy)" for key in ours if ours[key] != theirs[key]]
    if differ:
        raise ValueError(
            f"tive.reference_model tokenises the pool differently from the main model; the main model "
            f"({describe_model(main)}) and the proxy ({describe_model(proxy)}) differ in " + "; ".join(differ)
            + ". A proxy needs the main model's tokenizer and image token count (a different tokenizer is not supported)"
        )
