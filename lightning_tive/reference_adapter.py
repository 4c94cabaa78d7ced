"""The reference adapter's weights around TIVE's phases: added and removed with the main model checked bit
for bit, the layers features are taken over, and its saved copy (digests, loading on every process).

Tensor and module code with no Lightning in it: `lightning_tive.phases` drives it.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from lightning_tive.distributed import Collectives
from lightning_tive.sharding import copy_full_, full, local
from lightning_tive.tive_config import TIVEConfig


@contextlib.contextmanager
def reference_model(module: Any, config: TIVEConfig, comm: Collectives) -> Iterator[tuple[list, list]]:
    """The module with the reference adapter added; afterwards the main model is back, bit for bit.

    Yields the adapter's (name, Linear) layers and the extra parameters the warm-up may train (the
    projector), whose values and flags are restored on the way out. Sharded parameters are compared
    shard by shard on their own process; `comm` makes the verdict the same on every process.
    """
    extra = list(module.projector_parameters())
    was_training = module.training
    saved = [(p, p.detach().clone(), p.requires_grad) for p in extra]
    with unchanged_weights(module, comm, "the warm-up"):
        adapter = module.add_reference_adapter(config.reference_lora, config.seed)
        try:
            yield adapter, extra
        finally:
            module.remove_reference_adapter()
            with torch.no_grad():
                for param, value, flag in saved:
                    param.copy_(value)
                    param.requires_grad_(flag)
            module.train(was_training)


@contextlib.contextmanager
def unchanged_weights(module: Any, comm: Collectives, what: str) -> Iterator[None]:
    """Refuse (on every process) a block that changed the main model's trainable or projector weights, bit for bit."""
    extra = list(module.projector_parameters())
    before = trainable_digests(module, extra)
    yield
    after = trainable_digests(module, extra)
    changed = sorted(before[k][0] for k in before if before[k][1] != after.get(k, (None, None))[1])[:5]
    if comm.any(bool(changed)):
        raise RuntimeError(f"{what} changed the main model's trainable weights (e.g. {changed or 'on another process'})")


def feature_layers(adapter: list, modules: list[str], last_layers: int | None) -> list:
    """The adapter's (name, Linear) layers the features are taken over: `modules`, in the last `last_layers`
    decoder layers (all when None; the layer count is read from the adapter's names, `...layers.N...`)."""
    chosen = [(name, layer) for name, layer in adapter if lora_module_of(name) in modules]
    if last_layers is None:
        return chosen
    depth = {name: decoder_layer_of(name) for name, _ in adapter}
    unknown = [name for name, d in depth.items() if d is None]
    if unknown:
        raise ValueError(f"tive.gradient_layers needs decoder-layer numbers in the adapter's names (`.layers.N.`); {unknown[0]} has none")
    count = max(depth.values()) + 1
    if last_layers > count:
        raise ValueError(f"tive.gradient_layers={last_layers} is more than the language model's {count} decoder layers")
    return [(name, layer) for name, layer in chosen if depth[name] >= count - last_layers]


def decoder_layer_of(layer_name: str) -> int | None:
    """`...language_model.layers.3.self_attn.q_proj.lora_A.x` -> 3 (None without a `.layers.N.` part)."""
    found = re.findall(r"(?:^|\.)layers\.(\d+)\.", layer_name)
    return int(found[-1]) if found else None


@contextlib.contextmanager
def only_differentiating(adapter: list, layers: list, enabled: bool = True) -> Iterator[None]:
    """The adapter's weights outside `layers` frozen for the block (flags restored afterwards)."""
    keep = {id(layer.weight) for _, layer in layers}
    frozen = [layer.weight for _, layer in adapter if id(layer.weight) not in keep and layer.weight.requires_grad]
    frozen = frozen if enabled else []
    for weight in frozen:
        weight.requires_grad_(False)
    try:
        yield
    finally:
        for weight in frozen:
            weight.requires_grad_(True)


def lora_module_of(layer_name: str) -> str:
    """`...self_attn.q_proj.lora_A.tive_reference` -> `q_proj`."""
    parts = layer_name.split(".")
    return parts[next(i for i, p in enumerate(parts) if p.startswith("lora_")) - 1]


def tensor_digest(tensor: torch.Tensor) -> str:
    """A digest of a tensor's exact bits (of this process's shard, for a sharded parameter)."""
    data = local(tensor.detach())
    if data.element_size() > 1:
        data = data.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[data.element_size()])
    else:
        data = data.view(torch.uint8)
    return hashlib.blake2b(data.cpu().contiguous().numpy().tobytes(), digest_size=16).hexdigest()


def trainable_digests(module: torch.nn.Module, extra: list | None = None) -> dict[int, tuple[str, str]]:
    """(name, bit-level digest) of every trainable parameter, and of `extra` ones (e.g. a frozen projector).

    Keyed by the parameter's identity: its name changes while peft wraps a fully fine-tuned model
    for the reference adapter, the parameter does not.
    """
    ids = {id(p) for p in extra or []}
    return {
        id(p): (name, tensor_digest(p)) for name, p in module.named_parameters() if p.requires_grad or id(p) in ids
    }


def adapter_params(layers: list, extra_params: list) -> dict[str, torch.Tensor]:
    """The reference model's own weights by name: adapter layers by name, extra parameters by position."""
    params = {name: layer.weight for name, layer in layers}
    params.update({f"projector.{k}": p for k, p in enumerate(extra_params)})
    return params


def adapter_state(layers: list, extra_params: list) -> dict[str, torch.Tensor]:
    """The reference model's weights (`adapter_params`) as whole CPU tensors.

    Sharded ones are all-gathered, so every process must call it.
    """
    return {name: full(p.detach()).cpu() for name, p in adapter_params(layers, extra_params).items()}


def adapter_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 over the reference model's weights, in name order."""
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(tensor_digest(state[name]).encode())
    return digest.hexdigest()


def saved_digest(path: Path) -> str | None:
    """The digest of a saved reference model (None when there is none)."""
    return adapter_digest(torch.load(path, map_location="cpu", weights_only=True)) if path.exists() else None


def load_adapter(layers: list, extra_params: list, path: Path, comm: Collectives) -> None:
    """Load a saved reference model: process 0 reads the file, every process takes its copy (or its shards)."""
    saved = torch.load(path, map_location="cpu", weights_only=True) if comm.rank == 0 else {}
    params = adapter_params(layers, extra_params)
    # Decided together: a process raising alone would leave the others waiting in a broadcast.
    if not comm.broadcast_object(set(saved) == set(params) if comm.rank == 0 else None):
        raise ValueError(f"{path} was written for a different reference adapter; delete it to warm up again")
    for name in sorted(params):
        param = params[name]
        value = saved[name].to(param.dtype) if comm.rank == 0 else torch.empty(param.shape, dtype=param.dtype)
        comm.broadcast_(value)
        copy_full_(param, value)
