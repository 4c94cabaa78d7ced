"""The sharded strategy: FSDP2 (`torch.distributed.fsdp.fully_shard`) under Lightning's ModelParallelStrategy.

Lightning 2.6's `FSDPStrategy` (FSDP1) is refused on CPU by its accelerator check, while
`ModelParallelStrategy(data_parallel_size=N, tensor_parallel_size=1)` runs FSDP2 on CPU (gloo) and
GPU (NCCL) alike: the LightningModule shards itself in `configure_model` (see
`LlavaModule.configure_model`). Parameters become DTensors sharded on dim 0; each FSDP unit
all-gathers its parameters for its forward and backward, which makes every forward and backward a
collective: all processes must run the same modules the same number of times, in the same order.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.strategies import ModelParallelStrategy

STRATEGY_HELP = (
    "trainer.strategy: {class_path: lightning_tive.sharding.FSDP2Strategy, init_args: {replicate_size: 1}} "
    "(FSDP2 over every process, applied by the module's configure_model; replicate_size > 1 for HSDP)"
)


def is_sharded(strategy: Any) -> bool:
    """Whether the strategy shards the model's parameters with FSDP2 (ModelParallelStrategy or FSDP2Strategy)."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    return isinstance(strategy, ModelParallelStrategy)


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


def fsdp_param_groups(state: Any) -> list:
    """An FSDP2 unit's parameter groups: `_fsdp_param_groups` (torch 2.12 on), or its one `_fsdp_param_group` (2.11)."""
    groups = getattr(state, "_fsdp_param_groups", None)
    if groups is not None:
        return list(groups)
    group = getattr(state, "_fsdp_param_group", None)
    return [] if group is None else [group]


def sync_mixed_precision(module: torch.nn.Module) -> None:
    """Re-derive each FSDP unit's gradient dtypes from which of its parameters train now.

    FSDP2 fixes a unit's reduce and original dtypes from its trainable parameters at its first
    forward; a unit with none then (the LM during TIVE's warm-up) would reduce the bf16 gradients of
    its later training in bf16 and fail to store them on its fp32 parameters. Uses FSDP2's unit state
    (see `fsdp_param_groups`): no public API re-derives them.
    """
    from torch.distributed.fsdp import FSDPModule, fully_shard

    for sub in module.modules():
        if not isinstance(sub, FSDPModule):
            continue
        for group in fsdp_param_groups(fully_shard.state(sub)):
            trains = any(p.sharded_param.requires_grad for p in group.fsdp_params)
            if trains and group._orig_dtype is None:
                group._init_mp_dtypes()


class FSDP2Strategy(ModelParallelStrategy):
    """FSDP2 data parallelism over every process (optionally hybrid), with sharded checkpoints of trainable weights.

    Lightning's ModelParallelStrategy with the settings lightning_tive needs and its checkpoints read:
    no tensor parallelism; `data_parallel_size` defaults to every process (devices x nodes);
    `replicate_size` > 1 is HSDP: the processes form `replicate_size` groups (e.g. one per node) that
    each hold the whole model sharded among themselves, so the per-layer all-gathers stay inside a
    group and only the gradient all-reduce crosses groups. Checkpoints are distributed by default:
    each process writes its own shards (a folder; no process gathers 81 GB at 7B), and they hold
    the trainable weights only (`LlavaModule.on_save_checkpoint`), which `load_checkpoint` reads back
    into the sharded model (Lightning's loader would ask for every frozen weight too).

    Args:
        data_parallel_size: processes the model is split over; "auto": all of them.
        replicate_size: HSDP replica groups (1: plain FSDP); must divide `data_parallel_size`.
        save_distributed_checkpoint: each process writes its shards (True), or process 0 gathers one file.
        process_group_backend: as Lightning's (default: nccl on GPUs, gloo on CPUs).
        timeout: the process group's collective timeout.
    """

    def __init__(
        self,
        data_parallel_size: Literal["auto"] | int = "auto",
        replicate_size: int = 1,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        super().__init__(
            data_parallel_size=data_parallel_size, tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint, process_group_backend=process_group_backend,
            timeout=timeout,
        )
        if replicate_size < 1:
            raise ValueError(f"FSDP2Strategy(replicate_size={replicate_size}) must be at least 1")
        self.replicate_size = int(replicate_size)

    def setup_environment(self) -> None:
        """Resolve `data_parallel_size: auto` to every process, then set up as Lightning does."""
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.num_nodes * self.num_processes
        if self._data_parallel_size % self.replicate_size:
            raise ValueError(
                f"FSDP2Strategy: replicate_size={self.replicate_size} must divide data_parallel_size="
                f"{self._data_parallel_size} (devices x nodes)"
            )
        super().setup_environment()

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """Read a checkpoint into the sharded model and optimizers: a full file, or a folder of shards.

        Every process first checks that it sees the checkpoint, and all stop together if one does not.
        A folder is read for the weights it holds (the trainable ones) and the optimizers' states.
        """
        from lightning.fabric.strategies.fsdp import _distributed_checkpoint_load, _is_sharded_checkpoint
        from lightning.fabric.utilities.load import _METADATA_FILENAME
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        path = Path(self.broadcast(str(checkpoint_path)))
        require_checkpoint_everywhere(path, self)
        if not _is_sharded_checkpoint(path):
            return super().load_checkpoint(path, weights_only=weights_only)
        metadata = torch.load(path / _METADATA_FILENAME, map_location="cpu", weights_only=weights_only)
        saved = metadata.get("lightning_tive_trainable")
        module = self.model
        state = get_model_state_dict(module)
        if saved is not None:
            state = {name: value for name, value in state.items() if name in set(saved)}
        _distributed_checkpoint_load({"state_dict": state}, path)
        set_model_state_dict(module, state, options=StateDictOptions(strict=False))
        for index, optimizer in enumerate(self.optimizers):
            key = f"optimizer_{index}"
            optim_state = {key: get_optimizer_state_dict(module, optimizer)}
            _distributed_checkpoint_load(optim_state, path)
            set_optimizer_state_dict(module, optimizer, optim_state_dict=optim_state[key],
                                     options=StateDictOptions(cpu_offload=True))
        return metadata


def checkpoint_visible(path: Path) -> bool:
    """Whether this process can read the checkpoint: a file, or a folder of shards with its metadata."""
    from lightning.fabric.utilities.load import _METADATA_FILENAME

    if path.is_dir():
        return (path / _METADATA_FILENAME).is_file() and (path / ".metadata").is_file()
    return path.is_file()


def require_checkpoint_everywhere(path: Path | None, strategy: Any, named: str | None = None) -> None:
    """Stop every process together, naming those that lack the checkpoint, unless all of them see it.

    A process raising alone would leave the others waiting in their next collective; a run whose
    processes restored different states would diverge silently. `path` None: the name `named`
    ("last") found no checkpoint on this process; when none found one, Lightning starts afresh.
    """
    import socket

    seen = -1 if path is None else int(checkpoint_visible(path))  # -1: the name found nothing here
    verdicts = strategy.all_gather(torch.tensor([seen], device=strategy.root_device)).flatten().tolist()
    if len(set(verdicts)) > 1 or verdicts[0] == 0:  # all -1: no checkpoint anywhere, Lightning starts afresh
        path = path or named
        missing = [rank for rank, ok in enumerate(verdicts) if ok != 1]
        raise FileNotFoundError(
            f"the checkpoint {path} is not visible to process(es) {missing} (this is {socket.gethostname()}, "
            f"rank {strategy.global_rank}): every process reads it on resume, so put the run folder on a filesystem "
            "that every node sees, or copy the checkpoint to the same path on every node"
        )
