"""One model's weights read once per run: process 0 builds LLaVA for real, the others a skeleton it fills.

Built in every process, LLaVA-1.5-7B in fp32 is ~28 GB of host memory each: ~230 GB on a node of
8 GPUs. Here process 0 alone reads the weights (on the CPU) and every other process builds the same
modules on the meta device; after FSDP2 has sharded the skeletons (or, under DDP, as they are), the
others allocate their tensors on their device and process 0 broadcasts every tensor, one at a time,
each process keeping its shard. Host memory per node is then about one model, and no process holds
more than one whole tensor at a time besides its shards.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch

from lightning_tive.distributed import Collectives
from lightning_tive.sharding import copy_full_, is_dtensor


def materialize_from_first(module: Any, comm: Collectives, device: torch.device) -> None:
    """Give every process `module`'s weights from process 0's real build, sharding them first under FSDP2.

    Process 0 sends its tensor list (names, shapes, dtypes); the others give their skeleton those
    dtypes; `module.shard_model()` shards (a no-op without FSDP2); the others allocate their tensors on
    `device`; then every tensor is broadcast in process 0's order.
    """
    first = comm.rank == 0
    spec = comm.broadcast_object(tensor_spec(module.model) if first else None)
    if not first:
        align_skeleton(module.model, spec)
    source = named_tensors(module.model) if first else None  # whole tensors, kept while sharding
    module.shard_model()
    if not first:
        module.model.to_empty(device=device)
        if module.llava.config.get_text_config().tie_word_embeddings:
            module.llava.tie_weights()  # to_empty gave the tied alias a tensor of its own
    elif not module.sharded:
        module.model.to(device)
    broadcast_weights(module.model, spec, source, comm, device)


def later_process() -> bool:
    """Whether the launcher says this process is not the run's first (torchrun, SLURM, Lightning's own launcher).

    Such a process builds only the model's structure; a process with no rank in its environment (a
    single process, or the one that launches the others) builds for real.
    """
    for key in ("RANK", "LOCAL_RANK", "SLURM_PROCID"):
        value = os.environ.get(key)
        if value is not None:
            return int(value) != 0
    return False


@contextlib.contextmanager
def plain_build_context() -> Iterator[None]:
    """Build on the CPU in float32 by default, whatever context the caller runs in.

    Lightning calls `configure_model` under the root device and the precision's default dtype; random
    weights (a tiny model, a fresh tower, a projector) must be drawn as a CPU build draws them, so a
    rebuild anywhere (resume, export) gives the same frozen weights.
    """
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        with torch.device("cpu"):
            yield
    finally:
        torch.set_default_dtype(dtype)


def named_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer (persistent or not) by name; a tied weight once."""
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


def tensor_spec(model: torch.nn.Module) -> list[tuple[str, list[int], str]]:
    """(name, shape, dtype) of every tensor, in name order (of the whole tensors, before any sharding)."""
    return [(name, list(t.shape), str(t.dtype).removeprefix("torch.")) for name, t in sorted(named_tensors(model).items())]


def align_skeleton(model: torch.nn.Module, spec: list[tuple[str, list[int], str]]) -> None:
    """Give a meta skeleton process 0's dtypes; refuse a structure that differs from process 0's."""
    own = {name: (list(t.shape), str(t.dtype).removeprefix("torch.")) for name, t in named_tensors(model).items()}
    theirs = {name: (shape, dtype) for name, shape, dtype in spec}
    if own.keys() != theirs.keys() or any(own[n][0] != theirs[n][0] for n in own):
        missing, extra = sorted(theirs.keys() - own.keys())[:3], sorted(own.keys() - theirs.keys())[:3]
        shapes = sorted(n for n in own.keys() & theirs.keys() if own[n][0] != theirs[n][0])[:3]
        raise RuntimeError(
            f"this process's model skeleton differs from process 0's model: missing {missing}, extra {extra}, "
            f"other shapes {shapes}; every process must build from the same configuration"
        )
    with torch.no_grad():
        for prefix, module in model.named_modules(remove_duplicate=False):
            for kind in ("_parameters", "_buffers"):
                slots = getattr(module, kind)
                for key, tensor in list(slots.items()):
                    wanted = theirs.get(f"{prefix}.{key}" if prefix else key)
                    if tensor is None or wanted is None or str(tensor.dtype).removeprefix("torch.") == wanted[1]:
                        continue  # (an alias of a tied weight is listed under its first name only)
                    converted = tensor.to(getattr(torch, wanted[1]))
                    if kind == "_parameters":
                        converted = torch.nn.Parameter(converted, requires_grad=tensor.requires_grad)
                    slots[key] = converted


def broadcast_weights(model: torch.nn.Module, spec: list[tuple[str, list[int], str]], source: dict[str, torch.Tensor] | None,
                      comm: Collectives, device: torch.device) -> None:
    """Fill every tensor of `model` named in process 0's `spec` from its `source` (whole tensors), one at a time.

    On process 0 `source` holds the real values (None elsewhere). The spec's names (a tied weight
    once) fix the order on every process; each process's tensor (or its shard of a DTensor) is
    overwritten, process 0's own included (one code path).
    """
    for name, shape, dtype in spec:
        target = _tensor(model, name)
        if source is not None:
            value = source[name].to(device)
        else:
            value = torch.empty(shape, dtype=getattr(torch, dtype), device=device)
        comm.broadcast_(value)
        if is_dtensor(target) or target.device != value.device or target.data_ptr() != value.data_ptr():
            copy_full_(target, value)


def _tensor(model: torch.nn.Module, name: str) -> torch.Tensor:
    """The parameter or buffer called `name`."""
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    found = module._parameters.get(leaf)
    return found if found is not None else module._buffers[leaf]
