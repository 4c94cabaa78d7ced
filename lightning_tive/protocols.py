"""What TIVE needs from a LightningModule and a LightningDataModule: two small protocols."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch


@runtime_checkable
class TIVEModel(Protocol):
    """The model side: a reference adapter to add and remove, and per-example losses.

    Under a sharded strategy (FSDP2 via ModelParallelStrategy) the model also needs
    `reserve_reference_adapter(settings, seed)`: the callback's `setup` calls it before
    `configure_model` shards the model, and `add_reference_adapter` then activates that adapter.
    """

    def add_reference_adapter(self, settings: Any, seed: int) -> list[tuple[str, torch.nn.Linear]]:
        """Add a fresh, seeded adapter as the only trainable part; return its (name, Linear) layers."""
        ...

    def remove_reference_adapter(self) -> None:
        """Remove it and restore exactly which parameters train."""
        ...

    def per_example_loss(self, batch: Any) -> torch.Tensor:
        """Each example's mean loss over its own supervised tokens: [B]."""
        ...

    def supervised_tokens(self, batch: Any) -> torch.Tensor:
        """Each example's number of supervised tokens: [B]."""
        ...

    def projector_parameters(self) -> list[torch.nn.Parameter]:
        """Parameters the warm-up may train besides the adapter (restored afterwards); may be empty."""
        ...


@runtime_checkable
class TIVEData(Protocol):
    """The data side: the pool, its tasks, loaders over pool indices, and the training-set swap.

    Optional: `pool_lengths` (tokens per example: balanced shards, length-sorted valuation batches) and,
    for `tive.valuation_max_length`, `pool_dataloader(..., max_length=N)` (each example cut to its first
    N tokens) with `pool_answer_starts(indices)` (the position of each example's first supervised token).
    """

    pool_size: int
    task_names: list[str]
    pool_task_ids: np.ndarray

    def pool_dataloader(
        self,
        indices: Sequence[int] | None = None,
        batch_size: int | None = None,
        batches: Sequence[Sequence[int]] | None = None,
    ) -> Any:
        """Batches over pool indices in order (each with `pool_index`); `batches` fixes every batch."""
        ...

    def pool_record(self, index: int) -> dict:
        """The record at a pool index (LLaVA format, with its `task`)."""
        ...

    def set_train_indices(self, indices: Sequence[int]) -> None:
        """Train on this multiset of pool indices from the next train loader on."""
        ...


MODEL_METHODS = ("add_reference_adapter", "remove_reference_adapter", "per_example_loss", "supervised_tokens",
                 "projector_parameters")
DATA_MEMBERS = ("pool_size", "task_names", "pool_task_ids", "pool_dataloader", "pool_record", "set_train_indices")


def missing_members(obj: Any, names: Sequence[str]) -> list[str]:
    """The protocol members `obj` lacks (for an error message that names them)."""
    return [name for name in names if not hasattr(type(obj), name) and not hasattr(obj, name)]
