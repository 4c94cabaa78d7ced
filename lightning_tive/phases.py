"""TIVE's reference phases inside a fit: the warm-up of a throw-away adapter, then the valuation.

`ReferencePhases.run` adds the reference adapter, trains it on the task-balanced warm-up slice
(resuming from its saved copy when a valuation was interrupted), writes one feature row per pool
example of this process's shard, removes the adapter and checks that the main model is bit for bit
what it was. Under DDP, gradients go through `torch.autograd.grad` on the unwrapped module, so DDP's
reducer never sees the adapter. Under FSDP (ModelParallelStrategy, `lightning_tive.sharding`) the
adapter was reserved before sharding, the warm-up is an ordinary backward and optimizer step over its
shards, and every process runs each forward and backward in lockstep (they are collectives).
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info

from lightning_tive.distributed import Collectives
from lightning_tive.feature_folder import open_process_store, pool_fingerprint
from lightning_tive.files import atomic_torch_save
from lightning_tive.reference_adapter import (
    adapter_digest,
    adapter_state,
    feature_layers,
    load_adapter,
    only_differentiating,
    reference_model,
    saved_digest,
)
from lightning_tive.sharding import is_sharded
from lightning_tive.tive.grads import layer_shapes, per_example_grads
from lightning_tive.tive.modes import deterministic_train_mode
from lightning_tive.tive.projection import (
    MAX_COST_SETTING,
    ProjectionTooSlow,
    Projector,
    build_projector,
    check_projection_cost,
    estimate_projection_cost,
    format_projection_cost,
)
from lightning_tive.tive.store import FeatureStore
from lightning_tive.tive.warmup import balanced_warmup_indices
from lightning_tive.tive_config import TIVEConfig

ADAPTER_FILE = "reference_adapter.pt"


@dataclass
class Valuation:
    """What the reference phases left on this process."""

    store: FeatureStore
    indices: np.ndarray  # pool index of each store row
    adapter_sha256: str | None  # the reference model the features come from
    valued_now: int  # examples valued by this run (fewer after a resume)
    timings: dict[str, float]
    padding: dict[str, int]  # real and padded tokens of this process's valuation batches


class ReferencePhases:
    """Warm-up and valuation of the reference model for one fit."""

    def __init__(self, config: TIVEConfig, trainer: Any, module: Any, datamodule: Any, sharded: bool | None = None) -> None:
        self.config, self.trainer, self.module, self.datamodule = config, trainer, module, datamodule
        self.comm = Collectives.of(trainer)
        # Whether `module` is sharded: by default the strategy's; a proxy reference model never is.
        self.sharded = is_sharded(trainer.strategy) if sharded is None else sharded
        self._spare: dict | None = None  # a loaded batch, for a sharded process with nothing to run
        # Tokens per pool example when the DataModule knows them: balanced shards, length-sorted batches.
        lengths = getattr(datamodule, "pool_lengths", None)
        self.lengths = None if lengths is None else np.abs(np.asarray(lengths, dtype=np.int64))
        # Valuation sees examples cut to `valuation_max_length`: shards and batches go by those lengths.
        cut = config.valuation_max_length
        self.valuation_lengths = self.lengths if self.lengths is None or cut is None else np.minimum(self.lengths, cut)
        self.padding = {"real": 0, "padded": 0}  # tokens in this process's valuation batches

    # ---------------------------------------------------------------- the run
    def run(self, out: Path) -> Valuation:
        """Warm up (or resume), value this process's shard into `out/features`, and restore the model."""
        config, trainer = self.config, self.trainer
        timings: dict[str, float] = {}
        self.check_truncation()
        with reference_model(self.module, config, self.comm) as (adapter, extra_params):
            layers = feature_layers(adapter, config.gradient_modules, config.gradient_layers)
            projector = self.projector(layers)
            store, indices = open_process_store(
                out / "features", self.datamodule.pool_size, config.chunk_size, self.comm.world_size, self.comm.rank,
                projector.proj_dim, config.feature_dtype, self.fingerprint(projector), trainer.is_global_zero,
                self.comm.barrier, self.valuation_lengths,
            )
            adapter_file = out / ADAPTER_FILE
            needs_valuation = self.comm.any(bool(store.missing_chunks()))
            if needs_valuation:
                self.check_cost(projector)
            resume = needs_valuation and self.comm.any(trainer.is_global_zero and adapter_file.exists())
            clock = time.perf_counter()
            if resume:
                # A valuation was interrupted: its adapter makes the remaining features match the stored ones.
                load_adapter(adapter, extra_params, adapter_file, self.comm)
                rank_zero_info(f"[tive] resuming valuation with the reference adapter from {adapter_file}")
            elif needs_valuation:
                self.warm_up(extra_params)
            state = adapter_state(adapter, extra_params) if needs_valuation else None  # a collective when sharded
            if needs_valuation and not resume and trainer.is_global_zero:
                atomic_torch_save(state, adapter_file)
            timings["warmup_s"] = time.perf_counter() - clock
            if needs_valuation:
                digest = adapter_digest(state)
            else:  # one process reads the saved adapter (GBs at 7B) for the others
                digest = self.comm.broadcast_object(saved_digest(adapter_file) if self.comm.rank == 0 else None)
            clock = time.perf_counter()
            # Only the feature layers' weights need a graph: below the lowest of them nothing is
            # recorded, and the backward stops there. (Sharded parameters keep their flags: FSDP2
            # copies them when it unshards.)
            with only_differentiating(adapter, layers, enabled=not self.sharded):
                valued = self.value(layers, projector, store, indices)
            timings["valuation_s"] = time.perf_counter() - clock
        return Valuation(store, indices, digest, valued, timings, self.padding)

    def projector(self, layers: list) -> Projector:
        """The configured projector for the feature layers (`identity` keeps the adapter's full size)."""
        dim = None if self.config.projector == "identity" else self.config.proj_dim
        return build_projector(self.config.projector, dim, self.config.seed, layer_shapes(layers))

    def check_cost(self, projector: Projector) -> None:
        """Estimate the projection's cost on this run's device, print it, and refuse it above the limit."""
        tokens = int(getattr(self.datamodule, "max_length", 1024))
        if self.config.valuation_max_length is not None:
            tokens = min(tokens, self.config.valuation_max_length)
        estimate = estimate_projection_cost(
            projector, self.trainer.strategy.root_device, self.valuation_batch_size(), tokens=tokens,
        )
        rank_zero_info(f"[tive] valuation: {format_projection_cost(estimate)}")
        try:
            check_projection_cost(estimate, self.config.max_projection_s_per_example)
            refused = None
        except ProjectionTooSlow as err:
            refused = err
        # Every process refuses together (one going on alone would wait for the others forever).
        if self.comm.any(refused is not None):
            raise refused or ProjectionTooSlow(
                f"another process estimated the projection above {MAX_COST_SETTING}={self.config.max_projection_s_per_example:g}"
            )

    def check_truncation(self) -> None:
        """Refuse a `valuation_max_length` that would cut some example's whole answer (it would vanish as NaN)."""
        cut, data = self.config.valuation_max_length, self.datamodule
        if cut is None:
            return
        loader = getattr(data, "pool_dataloader", None)
        if not hasattr(data, "pool_answer_starts") or "max_length" not in inspect.signature(loader).parameters:
            raise TypeError(
                f"tive.valuation_max_length needs a DataModule whose pool_dataloader takes max_length and that has "
                f"pool_answer_starts(indices); {type(data).__name__} lacks them"
            )
        if self.lengths is None:
            raise TypeError(f"tive.valuation_max_length needs the DataModule's pool_lengths; {type(data).__name__} lacks them")
        long = np.flatnonzero(self.lengths > cut)  # shorter examples are not cut
        starts = np.asarray(data.pool_answer_starts(long), dtype=np.int64)
        lost = long[starts >= cut]
        if len(lost):
            first = data.pool_record(int(lost[0])).get("id")
            raise ValueError(
                f"tive.valuation_max_length={cut} cuts every answer token of {len(lost)} pool example(s) (the first: "
                f"pool index {int(lost[0])}, id {first!r}, whose answer starts at token {int(starts[starts >= cut][0])}); "
                f"use at least {int(starts.max()) + 1}, or null"
            )

    def valuation_batch_size(self) -> int:
        """Examples per per-example-gradient batch."""
        return self.config.valuation_batch_size or getattr(self.datamodule, "batch_size", 8)

    def warmup_batch_size(self) -> int:
        """The global warm-up batch size (split over processes)."""
        return self.config.warmup_batch_size or getattr(self.datamodule, "batch_size", 8) * self.comm.world_size

    def fingerprint(self, projector: Projector) -> dict:
        """Everything that changes a feature: settings, resolved batch, precision, projection, model, pool."""
        hparams = dict(getattr(self.module, "hparams", {}))
        model = {k: v for k, v in hparams.items() if isinstance(v, (str, int, float, bool, type(None), dict, list))}
        return {
            "pool": pool_fingerprint(self.datamodule),
            "model": model,
            "settings": self.config.feature_settings(),
            "warmup_global_batch": self.warmup_batch_size(),
            "precision": str(self.trainer.precision),
            "projection": projector.describe(),
            "rows": "unit",
        }

    # ---------------------------------------------------------------- warm-up
    def warm_up(self, extra_params: list[torch.nn.Parameter]) -> None:
        """Train the reference adapter (and the projector); each process runs its slice of every global batch."""
        from lightning_tive.model import WarmupCosineLR

        config, trainer, module, comm = self.config, self.trainer, self.module, self.comm
        size = int(round(config.warmup_ratio * self.datamodule.pool_size))
        indices = balanced_warmup_indices(self.datamodule.pool_task_ids, len(self.datamodule.task_names), size, config.seed)
        groups = [{"params": [p for p in module.parameters() if p.requires_grad], "lr": config.warmup_lr}]
        if config.warmup_projector_lr is not None and extra_params:
            for p in extra_params:
                p.requires_grad_(True)
            groups.append({"params": extra_params, "lr": config.warmup_projector_lr})
        params = [p for group in groups for p in group["params"]]
        global_batch = self.warmup_batch_size()
        steps_per_epoch = max(1, math.ceil(len(indices) / global_batch))
        optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
        scheduler = WarmupCosineLR(optimizer, total_steps=steps_per_epoch * config.warmup_epochs)
        module.train()
        step = 0
        bar = progress(trainer, steps_per_epoch * config.warmup_epochs, "TIVE warm-up")
        for epoch in range(config.warmup_epochs):
            global_batches = self.warmup_batches(indices, global_batch, epoch)
            loader = self.datamodule.pool_dataloader(batches=[b[comm.rank :: comm.world_size] for b in global_batches])
            for batch, whole in zip(loader, global_batches, strict=True):
                if self.sharded:
                    loss = self._warmup_step_sharded(batch, len(whole), indices)
                else:
                    loss = self._warmup_step(batch, len(whole), params)
                if config.warmup_grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(params, config.warmup_grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                step += 1
                if trainer.is_global_zero:
                    for logger in trainer.loggers:
                        logger.log_metrics({"tive/warmup_loss": loss}, step=step)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}")
        bar.close()
        for p in extra_params:  # valuation differentiates the adapter only
            p.requires_grad_(False)

    def warmup_batches(self, indices: np.ndarray, global_batch: int, epoch: int) -> list[np.ndarray]:
        """The warm-up epoch's global batches: shuffled, or (with the DataModule's `group_by_length` and
        known lengths) grouped by length as the training batches are, so the processes' slices of a
        step are alike in length (each process takes every W-th example of a sorted global batch)."""
        if self.lengths is None or not getattr(self.datamodule, "group_by_length", False):
            order = np.random.default_rng([self.config.seed, epoch]).permutation(indices)
            return [order[k : k + global_batch] for k in range(0, len(order), global_batch)]
        from lightning_tive.data.sampling import epoch_plan

        plan = epoch_plan(self.lengths[indices], global_batch, 1, self.config.seed, epoch, group_by_length=True)
        return [indices[b] for b in plan]

    def _warmup_step(self, batch: dict, global_size: int, params: list) -> float:
        """Set `.grad` of `params` to the global batch's gradient; returns the global batch's loss."""
        trainer, module, comm = self.trainer, self.module, self.comm
        present = "input_ids" in batch  # False when every record of this slice was skipped (or it is empty)
        if present:
            batch = trainer.strategy.batch_to_device(batch)
        # Each process's loss is its slice's share of the global mean, so the gradients summed over
        # processes are the global batch's, whatever the number of processes.
        denominator = self._warmup_denominator(batch, present, global_size)
        if present:
            with trainer.precision_plugin.forward_context():
                loss = warmup_loss(module, batch, self.config.warmup_loss, denominator)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]
            value = loss.detach().float().reshape(1)
        else:
            grads = [torch.zeros_like(p) for p in params]
            value = torch.zeros(1)
        for p, g in zip(params, grads, strict=True):
            p.grad = comm.sum_(g).to(p.dtype)
        return float(comm.sum_(value)[0])

    def _warmup_step_sharded(self, batch: dict, global_size: int, indices: np.ndarray) -> float:
        """`_warmup_step` under FSDP: an ordinary backward, whose reduce-scatter leaves each shard's gradient.

        Every process runs a forward and backward (they are collectives); one whose slice is empty runs
        a spare batch with its loss times 0.
        """
        trainer, module, comm = self.trainer, self.module, self.comm
        present = "input_ids" in batch
        if present:
            batch = trainer.strategy.batch_to_device(batch)
            self._spare = batch
        run = batch if present else self.spare_batch(indices)
        denominator = self._warmup_denominator(batch, present, global_size)
        with trainer.precision_plugin.forward_context():
            loss = warmup_loss(module, run, self.config.warmup_loss, denominator)
        if not present:
            loss = loss * 0.0
        # FSDP averages the gradients over processes; each loss is its slice's share of the global mean,
        # so times the number of processes the average is the global batch's gradient.
        (loss * comm.world_size).backward()
        value = loss.detach().float().reshape(1)
        return float(comm.sum_(value)[0])

    def _warmup_denominator(self, batch: dict, present: bool, global_size: int) -> torch.Tensor:
        """What each process divides its slice's loss by: the global batch's supervised tokens, or its size."""
        if self.config.warmup_loss == "token_mean":
            tokens = self.module.supervised_tokens(batch).sum().float() if present else torch.zeros(())
            denominator = self.comm.sum(tokens.reshape(1)).clamp(min=1)[0]
        else:
            denominator = torch.tensor(float(global_size))
        return denominator.to(self.trainer.strategy.root_device)

    def spare_batch(self, indices: np.ndarray) -> dict:
        """A batch on the device for a sharded process that has none to run (the first one that loads)."""
        if self._spare is None:
            for index in indices:
                batch = next(iter(self.datamodule.pool_dataloader([int(index)], batch_size=1)))
                if "input_ids" in batch:
                    self._spare = self.trainer.strategy.batch_to_device(batch)
                    break
            else:
                raise RuntimeError("no pool example loads: nothing to run the sharded model on")
        return self._spare

    # ---------------------------------------------------------------- valuation
    def value(self, layers: list, projector: Projector, store: FeatureStore, indices: np.ndarray) -> int:
        """Features of this process's rows, chunk by chunk into its store; returns how many were valued.

        Sharded, the processes step together until the last one is done; one with no batch (left) runs
        a spare batch and discards its features.
        """
        trainer, module = self.trainer, self.module
        missing = store.missing_chunks()
        total = int(sum(np.diff(store.chunk_range(c))[0] for c in missing))
        bar = progress(trainer, total, "TIVE valuation")
        steps = self._valuation_batches(store, indices, missing, bar)
        while True:
            item = next(steps, None)
            more = self.comm.any(item is not None) if self.sharded else item is not None
            if not more:
                break
            batch, record = item if item is not None else (None, None)
            if batch is None and not self.sharded:
                continue
            run = batch if batch is not None else self.spare_batch(range(self.datamodule.pool_size))
            # Training mode keeps gradient checkpointing on (transformers skips it in eval);
            # every dropout is off, so features are deterministic.
            with trainer.precision_plugin.forward_context(), deterministic_train_mode(module):
                grads = per_example_grads(layers, projector, module.per_example_loss, run, sync_backward=self.sharded)
            if record is not None:
                record(grads)
        bar.close()
        # Not a barrier: a process that finished early would hold a collective open (NCCL's timeout
        # counts from there) while the last one still values its share.
        self.comm.wait_for_all("tive-valuation", what="finish valuation")
        if not store.is_complete():
            raise RuntimeError(f"feature store {store.folder} is incomplete after valuation: {store.missing_chunks()[:5]}")
        return total  # every missing chunk was written (checked above)

    def _valuation_batches(
        self, store: FeatureStore, indices: np.ndarray, missing: list, bar: Any
    ) -> Iterator[tuple[dict | None, Any]]:
        """(batch on the device, a function that records its results) per valuation batch; (None, None)
        for a batch whose records were all skipped. Each chunk is written once its batches are recorded."""
        trainer, module = self.trainer, self.module
        batch_size = self.valuation_batch_size()
        for chunk in missing:
            start, stop = store.chunk_range(chunk)
            pool_indices = indices[start:stop]
            position = {int(p): k for k, p in enumerate(pool_indices)}
            lengths = self.valuation_lengths
            if lengths is not None:  # batches of similar length: little padding
                pool_indices = pool_indices[np.argsort(-lengths[pool_indices], kind="stable")]
                for k in range(0, len(pool_indices), batch_size):
                    batch_lengths = lengths[pool_indices[k : k + batch_size]]
                    self.padding["real"] += int(batch_lengths.sum())
                    self.padding["padded"] += len(batch_lengths) * int(batch_lengths.max())
            features = np.zeros((stop - start, store.proj_dim), dtype=np.float32)
            norms = np.full(stop - start, np.nan, dtype=np.float32)  # stays NaN for a record skipped as bad
            losses, tokens, norms_of_features = (np.full_like(norms, np.nan) for _ in range(3))
            for batch in self.pool_loader(pool_indices, batch_size):
                count = len(batch["pool_index"]) + len(batch.get("skipped_pool_index", []))
                if "input_ids" in batch:
                    rows = [position[int(p)] for p in batch["pool_index"]]
                    batch = trainer.strategy.batch_to_device(batch)
                    if self._spare is None:
                        self._spare = batch

                    def record(grads: Any, batch: dict = batch, rows: list = rows,
                               out: tuple = (features, norms, losses, tokens, norms_of_features)) -> None:
                        # Unit rows: float16 keeps ~3 digits of any direction, where a raw row of a small
                        # gradient (entries below float16's normal range) would lose most of them.
                        projected = grads.features.float()
                        length = projected.norm(dim=1)
                        out[0][rows] = (projected / length.clamp_min(1e-30)[:, None]).cpu().numpy()
                        out[1][rows] = grads.norms.float().cpu().numpy()
                        out[2][rows] = grads.losses.float().cpu().numpy()
                        out[3][rows] = module.supervised_tokens(batch).float().cpu().numpy()
                        out[4][rows] = length.cpu().numpy()

                    yield batch, record
                else:
                    yield None, None
                bar.update(count)
            store.write_chunk(
                chunk, np.arange(start, stop), features, norms,
                columns={"loss": losses, "tokens": tokens, "feature_norm": norms_of_features},
            )

    def pool_loader(self, indices: np.ndarray, batch_size: int) -> Any:
        """The valuation loader over pool indices: examples cut to `valuation_max_length` when it is set."""
        if self.config.valuation_max_length is None:
            return self.datamodule.pool_dataloader(indices, batch_size=batch_size)
        return self.datamodule.pool_dataloader(indices, batch_size=batch_size, max_length=self.config.valuation_max_length)


def warmup_loss(module: Any, batch: dict, kind: str, denominator: torch.Tensor) -> torch.Tensor:
    """This slice's share of the warm-up loss: summed token NLL (`token_mean`) or example means, / denominator."""
    losses = module.per_example_loss(batch)
    if kind == "token_mean":
        losses = losses * module.supervised_tokens(batch)
    return losses.sum() / denominator


def progress(trainer: Any, total: int, desc: str) -> Any:
    """A tqdm bar on global rank 0 when the trainer shows progress."""
    from tqdm.auto import tqdm

    enabled = trainer.is_global_zero and trainer.progress_bar_callback is not None
    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True)
