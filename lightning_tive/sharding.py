"""The sharded strategy: FSDP2 (`torch.distributed.fsdp.fully_shard`) under Lightning's ModelParallelStrategy.

Lightning 2.6's `FSDPStrategy` (FSDP1) is refused on CPU by its accelerator check, while
`ModelParallelStrategy(data_parallel_size=N, tensor_parallel_size=1)` runs FSDP2 on CPU (gloo) and
GPU (NCCL) alike: the LightningModule shards itself in `configure_model` (see
`LlavaModule.configure_model`). Parameters become DTensors sharded on dim 0; each FSDP unit
all-gathers its parameters for its forward and backward, which makes every forward and backward a
collective: all processes must run the same modules the same number of times, in the same order.
"""

from __future__ import annotations

from typing import Any

import torch

SHARDED_STRATEGIES = ("ModelParallelStrategy",)

STRATEGY_HELP = (
    "trainer.strategy: {class_path: lightning.pytorch.strategies.ModelParallelStrategy, init_args: "
    "{data_parallel_size: <processes>, tensor_parallel_size: 1, save_distributed_checkpoint: false}} "
    "(FSDP2, applied by the module's configure_model)"
)


def is_sharded(strategy: Any) -> bool:
    """Whether the strategy shards the model's parameters with FSDP2."""
    return type(strategy).__name__ in SHARDED_STRATEGIES


def data_parallel_mesh(mesh: Any) -> Any:
    """The 1-D data-parallel mesh of ModelParallelStrategy's 2-D mesh; refuses tensor parallelism."""
    names = tuple(mesh.mesh_dim_names or ())
    if "tensor_parallel" in names and mesh["tensor_parallel"].size() != 1:
        raise ValueError(
            f"tensor_parallel_size={mesh['tensor_parallel'].size()}: lightning_tive shards with FSDP2 only; set "
            "ModelParallelStrategy(data_parallel_size=<processes>, tensor_parallel_size=1)"
        )
    return mesh["data_parallel"] if "data_parallel" in names else mesh


def is_dtensor(tensor: Any) -> bool:
    """Whether `tensor` is a DTensor (a sharded parameter)."""
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's shard of a DTensor, or the tensor itself."""
    return tensor.to_local() if is_dtensor(tensor) else tensor


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: all-gathered from a DTensor (a collective: every process must call it)."""
    return tensor.full_tensor() if is_dtensor(tensor) else tensor


@torch.no_grad()
def copy_full_(param: torch.Tensor, value: torch.Tensor) -> None:
    """Copy a whole tensor, present on every process, into a parameter (its own shard of it when sharded)."""
    if is_dtensor(param):
        from torch.distributed.tensor import distribute_tensor

        shard = distribute_tensor(
            value.to(device=param.device, dtype=param.dtype), param.device_mesh, param.placements, src_data_rank=None
        )
        param.copy_(shard)
    else:
        param.copy_(value)


def sync_mixed_precision(module: torch.nn.Module) -> None:
    """Re-derive each FSDP unit's gradient dtypes from which of its parameters train now.

    FSDP2 fixes a unit's reduce and original dtypes from its trainable parameters at its first
    forward; a unit with none then (the LM during TIVE's warm-up) would reduce the bf16 gradients of
    its later training in bf16 and fail to store them on its fp32 parameters. Uses FSDP2's unit state
    (`fully_shard.state(...)._fsdp_param_groups`, torch 2.13): no public API re-derives them.
    """
    from torch.distributed.fsdp import FSDPModule, fully_shard

    for sub in module.modules():
        if not isinstance(sub, FSDPModule):
            continue
        for group in fully_shard.state(sub)._fsdp_param_groups:
            trains = any(p.sharded_param.requires_grad for p in group.fsdp_params)
            if trains and group._orig_dtype is None:
                group._init_mp_dtypes()
