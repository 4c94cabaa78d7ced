"""TIVESelectionCallback: warm-up → valuation → selection → swap, inside one `trainer.fit`."""

from __future__ import annotations

import hashlib
import json
import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import lightning as L
import numpy as np
import torch
from jsonargparse.typing import PositiveFloat, PositiveInt, restricted_number_type
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info

from lightning_tive import report
from lightning_tive.tive.grads import layer_shapes, per_example_grads
from lightning_tive.tive.modes import deterministic_train_mode
from lightning_tive.tive.projection import PROJECTOR_KINDS, build_projector
from lightning_tive.tive.selection import SAMPLING_MODES, select_from_values, select_top_scores
from lightning_tive.tive.store import (
    INDICES,
    SHARDS,
    FeatureStore,
    ShardedFeatures,
    shard_indices,
    shard_name,
    write_shard_index,
)
from lightning_tive.tive.values import instance_values
from lightning_tive.tive.warmup import balanced_warmup_indices

SUPPORTED_STRATEGIES = ("SingleDeviceStrategy", "DDPStrategy")
# Selection strategies: TIVE, its two ablations, and baselines (see docs/tive.md).
SELECTION_STRATEGIES = ("tive", "tive_uniform", "instance_only", "random", "gradnorm", "length")
NEEDS_GRADIENTS = ("tive", "tive_uniform", "instance_only", "gradnorm")
# Types the CLI checks while parsing, so a bad `tive:` value fails before any model is loaded.
Fraction = restricted_number_type("Fraction", float, [(">", 0), ("<=", 1)], docstring="a number in (0, 1]")
STATE_VERSION = 1


@dataclass
class ReferenceLora:
    """The throw-away reference adapter (paper: r=128, alpha=256 on q/k/v/o of the LM)."""

    r: int = 128
    alpha: int = 256
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@runtime_checkable
class TIVEModel(Protocol):
    """What the callback needs from a LightningModule."""

    def add_reference_adapter(self, settings: Any, seed: int) -> list[tuple[str, torch.nn.Linear]]: ...

    def remove_reference_adapter(self) -> None: ...

    def per_example_loss(self, batch: Any) -> torch.Tensor: ...


@runtime_checkable
class TIVEData(Protocol):
    """What the callback needs from a LightningDataModule."""

    pool_size: int
    task_names: list[str]
    pool_task_ids: np.ndarray

    def pool_dataloader(self, indices: Any = None, batch_size: int | None = None) -> Any: ...

    def pool_record(self, index: int) -> dict: ...

    def set_train_indices(self, indices: Any) -> None: ...


class TIVESelectionCallback(Callback):
    """One-shot TIVE data selection at the start of `fit`, then training on the subset.

    Args:
        enabled: run TIVE; off, the fit trains on the whole pool.
        strategy: `tive`; its ablations `tive_uniform` (task values, uniform inside tasks) and
            `instance_only` (task shares by size, instance values inside); baselines `random`
            (proportional to task size), `gradnorm` (largest gradient norms, GraNd-like) and `length`
            (longest responses). `random` and `length` need no warm-up or valuation.
        ratio: budget as a fraction of the pool, B = round(ratio * |D|), in (0, 1].
        warmup_ratio: size of the task-balanced warm-up set as a fraction of the pool.
        warmup_epochs: epochs of reference-adapter training.
        warmup_lr: AdamW learning rate of the reference adapter (cosine schedule, 3% warm-up).
        warmup_batch_size: global warm-up batch size, split over the processes (default: the
            DataModule's batch size times the number of processes).
        reference_lora: the reference adapter's LoRA settings.
        projector: `kronecker` (structured, never forms the full gradient), `rademacher` or `identity`.
        proj_dim: feature dimension (8192 in the paper); ignored by `identity` (the adapter's size).
        sampling: `softmax` (∝ exp(u/temperature)), `topk` or `uniform` inside each task.
        temperature: softmax temperature; → 0 is top-k, large is uniform (authors' code: 1000).
        exclude_tasks: tasks that get no budget (authors' code: TextCaps).
        seed: seed of the warm-up draw, the adapter init, the projection and the sampling.
        output_dir: where the files go (default: `<default_root_dir>/tive`).
        stop_after_selection: write the files and stop; train nothing.
        features_from: a folder with `features.npy` + `grad_norms.npy`: skip warm-up and valuation.
        valuation_batch_size: per-example gradient batch size (default: the DataModule's).
        feature_dtype: `float16` (default) or `float32` storage of the features.
        chunk_size: pool examples per feature-store chunk (the unit of resume).
    """

    def __init__(
        self,
        enabled: bool = True,
        strategy: Literal["tive", "tive_uniform", "instance_only", "random", "gradnorm", "length"] = "tive",
        ratio: Fraction = 0.15,
        warmup_ratio: Fraction = 0.08,
        warmup_epochs: PositiveInt = 1,
        warmup_lr: PositiveFloat = 2e-5,
        warmup_batch_size: PositiveInt | None = None,
        reference_lora: ReferenceLora | None = None,
        projector: Literal["kronecker", "rademacher", "identity"] = "kronecker",
        proj_dim: PositiveInt = 8192,
        sampling: Literal["softmax", "topk", "uniform"] = "softmax",
        temperature: PositiveFloat = 1.0,
        exclude_tasks: list[str] | None = None,
        seed: int = 0,
        output_dir: str | None = None,
        stop_after_selection: bool = False,
        features_from: str | None = None,
        valuation_batch_size: PositiveInt | None = None,
        feature_dtype: Literal["float16", "float32"] = "float16",
        chunk_size: PositiveInt = 1024,
    ):
        if strategy not in SELECTION_STRATEGIES:
            raise ValueError(f"tive.strategy must be one of {SELECTION_STRATEGIES}, got {strategy!r}")
        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"tive.ratio must be in (0, 1], got {ratio}")
        if not 0.0 < warmup_ratio <= 1.0:
            raise ValueError(f"tive.warmup_ratio must be in (0, 1], got {warmup_ratio}")
        if warmup_epochs < 1:
            raise ValueError(f"tive.warmup_epochs must be >= 1, got {warmup_epochs}")
        if projector not in PROJECTOR_KINDS:
            raise ValueError(f"tive.projector must be one of {PROJECTOR_KINDS}, got {projector!r}")
        if proj_dim <= 0:
            raise ValueError(f"tive.proj_dim must be positive, got {proj_dim}")
        if sampling not in SAMPLING_MODES:
            raise ValueError(f"tive.sampling must be one of {SAMPLING_MODES}, got {sampling!r}")
        if not temperature > 0 or not math.isfinite(temperature):
            raise ValueError(f"tive.temperature must be a positive number, got {temperature}")
        if feature_dtype not in ("float16", "float32"):
            raise ValueError(f"tive.feature_dtype must be float16 or float32, got {feature_dtype!r}")
        if chunk_size <= 0:
            raise ValueError(f"tive.chunk_size must be positive, got {chunk_size}")
        if isinstance(reference_lora, dict):
            reference_lora = ReferenceLora(**reference_lora)
        # Plain builtins: the CLI's restricted types would otherwise be pickled into checkpoints.
        ratio, warmup_ratio, warmup_lr, temperature = float(ratio), float(warmup_ratio), float(warmup_lr), float(temperature)
        warmup_epochs, proj_dim, chunk_size = int(warmup_epochs), int(proj_dim), int(chunk_size)
        warmup_batch_size = None if warmup_batch_size is None else int(warmup_batch_size)
        valuation_batch_size = None if valuation_batch_size is None else int(valuation_batch_size)
        self.strategy = strategy
        self.enabled, self.ratio, self.warmup_ratio = enabled, ratio, warmup_ratio
        self.warmup_epochs, self.warmup_lr, self.warmup_batch_size = warmup_epochs, warmup_lr, warmup_batch_size
        self.reference_lora = reference_lora or ReferenceLora()
        self.projector_kind, self.proj_dim = projector, proj_dim
        self.sampling, self.temperature = sampling, temperature
        self.exclude_tasks = list(exclude_tasks or [])
        self.seed, self.output_dir_arg = seed, output_dir
        self.stop_after_selection, self.features_from = stop_after_selection, features_from
        self.valuation_batch_size, self.feature_dtype, self.chunk_size = valuation_batch_size, feature_dtype, chunk_size
        # Resumable state: the selection and what produced it.
        self.selected: np.ndarray | None = None
        self.summary: dict = {}

    # ---------------------------------------------------------------- settings and refusals
    def settings(self) -> dict:
        """Every setting, as written to summary.json."""
        return {
            "strategy": self.strategy,
            "ratio": self.ratio,
            "warmup_ratio": self.warmup_ratio,
            "warmup_epochs": self.warmup_epochs,
            "warmup_lr": self.warmup_lr,
            "reference_lora": asdict(self.reference_lora),
            "projector": self.projector_kind,
            "proj_dim": self.proj_dim,
            "sampling": self.sampling,
            "temperature": self.temperature,
            "exclude_tasks": self.exclude_tasks,
            "seed": self.seed,
            "features_from": self.features_from,
            "feature_dtype": self.feature_dtype,
            "chunk_size": self.chunk_size,
        }

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Refuse what the phases cannot serve, before any model work."""
        if not self.enabled or stage != "fit":
            return
        name = type(trainer.strategy).__name__
        if name not in SUPPORTED_STRATEGIES:
            raise RuntimeError(
                f"TIVESelectionCallback supports {' and '.join(SUPPORTED_STRATEGIES)}, not {name}: its warm-up and "
                "per-example gradients need whole (unsharded) adapter weights on every process. Use "
                "`trainer.strategy: ddp` (or a single device), or set `tive.enabled: false`."
            )
        if not isinstance(pl_module, TIVEModel):
            raise TypeError(
                f"{type(pl_module).__name__} does not implement TIVE's model protocol "
                "(add_reference_adapter, remove_reference_adapter, per_example_loss)"
            )
        datamodule = trainer.datamodule
        names = getattr(datamodule, "task_names", None)
        unknown = sorted(set(self.exclude_tasks) - set(names or []))
        if names is not None and unknown:
            raise ValueError(f"tive.exclude_tasks names unknown task(s) {unknown}; the pool's tasks are {names}")

    def output_dir(self, trainer: L.Trainer) -> Path:
        """The folder the files go to."""
        return Path(self.output_dir_arg) if self.output_dir_arg else Path(trainer.default_root_dir) / "tive"

    # ---------------------------------------------------------------- the run
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Select (or re-apply a restored selection), swap the training set, rebuild the optimizers."""
        if not self.enabled:
            return
        datamodule = trainer.datamodule
        if not isinstance(datamodule, TIVEData):
            raise TypeError(
                "TIVESelectionCallback needs a DataModule with pool_size, task_names, pool_task_ids, "
                "pool_dataloader, pool_record and set_train_indices (e.g. LlavaDataModule)"
            )
        if self.selected is not None:
            rank_zero_info(f"[tive] re-applying the restored selection of {len(self.selected)} examples")
            self._swap(trainer, pl_module, datamodule)
            return
        out = self.output_dir(trainer)
        if trainer.is_global_zero:
            out.mkdir(parents=True, exist_ok=True)
        trainer.strategy.barrier("tive-output-dir")
        timings: dict[str, float] = {}
        task_ids = np.asarray(datamodule.pool_task_ids)
        clock = time.perf_counter()
        if self.strategy in NEEDS_GRADIENTS:
            sharded = False
            if self.features_from is not None:
                source, indices, norms = self._open_features(Path(self.features_from), datamodule)
            else:
                source, indices = self._warm_up_and_value(trainer, pl_module, datamodule, out, timings)
                norms = source.read_norms()
                sharded = trainer.world_size > 1
            clock = time.perf_counter()
            # Each process passes its own rows; pass 1's per-task sums are summed across processes.
            u, finite = instance_values(
                source, task_ids[indices], len(datamodule.task_names), np.isfinite(norms),
                all_reduce=_all_reduce_sum if sharded else None,
            )
            norms, u, finite = _gather_by_index(datamodule.pool_size, indices, norms, u, finite, sharded)
        else:
            norms = u = np.full(datamodule.pool_size, np.nan)
            finite = np.ones(datamodule.pool_size, dtype=bool)
        result = None
        if trainer.is_global_zero:
            result = self._select(datamodule, task_ids, norms, u, finite)
            timings["selection_s"] = time.perf_counter() - clock
            payload = (result.selected_indices.tolist(), self._summary(datamodule, result, timings))
        else:
            payload = None
        selected, self.summary = trainer.strategy.broadcast(payload, src=0)
        self.selected = np.asarray(selected, dtype=np.int64)
        self._check_same_everywhere(trainer, out)
        if trainer.is_global_zero:
            self._write_outputs(trainer, datamodule, result, out)
        trainer.strategy.barrier("tive-outputs")
        if self.stop_after_selection:
            rank_zero_info(f"[tive] selection written to {out}; stop_after_selection is set, so nothing is trained")
            trainer.should_stop = True
            trainer.limit_train_batches = 0
            trainer.limit_val_batches = 0
            return
        self._swap(trainer, pl_module, datamodule)

    def _select(self, datamodule: Any, task_ids: np.ndarray, norms: np.ndarray, u: np.ndarray, finite: np.ndarray) -> Any:
        """The configured strategy's selection from pool-ordered values."""
        names = datamodule.task_names
        common = {"ratio": self.ratio, "exclude_tasks": self.exclude_tasks}
        if self.strategy in ("gradnorm", "length"):
            scores = norms if self.strategy == "gradnorm" else _response_lengths(datamodule)
            return select_top_scores(scores, norms, u, finite, task_ids, names, **common)
        if self.strategy == "random":
            # Budgets by task size and a uniform draw need no gradients: stand-in values, reported as NaN.
            ones = np.ones(len(norms))
            result = select_from_values(
                ones, ones, finite, task_ids, names, **common, sampling="uniform", seed=self.seed, budget_by="size"
            )
            result.grad_norms, result.instance_values = norms, u
            for row in result.tasks:
                row.task_value = float("nan")
            return result
        return select_from_values(
            norms, u, finite, task_ids, names, **common,
            sampling="uniform" if self.strategy == "tive_uniform" else self.sampling,
            temperature=self.temperature, seed=self.seed,
            budget_by="size" if self.strategy == "instance_only" else "value",
        )

    def _warm_up_and_value(
        self, trainer: L.Trainer, module: Any, datamodule: Any, out: Path, timings: dict
    ) -> tuple[FeatureStore, np.ndarray]:
        before = _trainable_fingerprint(module)
        was_training = module.training
        world, rank = trainer.world_size, trainer.global_rank
        layers = module.add_reference_adapter(self.reference_lora, self.seed)
        try:
            projector = self._projector(layers)
            folder = out / "features"
            _check_layout(folder, world)
            if world > 1:
                if trainer.is_global_zero:
                    folder.mkdir(parents=True, exist_ok=True)
                    write_shard_index(folder, datamodule.pool_size, self.chunk_size, world)
                trainer.strategy.barrier("tive-shard-index")
                folder = folder / shard_name(world, rank)
            indices = shard_indices(datamodule.pool_size, self.chunk_size, world, rank)
            store = FeatureStore(
                folder,
                len(indices),
                projector.proj_dim,
                dtype=self.feature_dtype,
                chunk_size=self.chunk_size,
                extra={**self._fingerprint(module, datamodule), "world_size": world, "rank": rank},
            )
            np.save(folder / INDICES, indices)
            adapter_file = out / "reference_adapter.pt"
            needs_valuation = _any_rank(trainer, bool(store.missing_chunks()))
            resume = needs_valuation and _any_rank(trainer, trainer.is_global_zero and adapter_file.exists())
            clock = time.perf_counter()
            if resume:
                # A valuation was interrupted: reuse its adapter so the remaining features match.
                if trainer.is_global_zero:
                    _load_adapter(layers, adapter_file)
                    rank_zero_info(f"[tive] resuming valuation with the reference adapter from {adapter_file}")
                _broadcast_layers(layers, world)
            elif needs_valuation:
                self._warm_up(trainer, module, datamodule)
                if trainer.is_global_zero:
                    _save_adapter(layers, adapter_file)
            timings["warmup_s"] = time.perf_counter() - clock
            self.adapter_sha256 = _layers_sha256(layers)
            clock = time.perf_counter()
            self._value(trainer, module, datamodule, layers, projector, store, indices)
            timings["valuation_s"] = time.perf_counter() - clock
        finally:
            module.remove_reference_adapter()
            module.train(was_training)
        after = _trainable_fingerprint(module)
        if after != before:
            changed = sorted(k for k in before if before[k] != after.get(k))[:5]
            raise RuntimeError(f"the warm-up changed the main model's trainable weights (e.g. {changed})")
        return store, indices

    def _warm_up(self, trainer: L.Trainer, module: Any, datamodule: Any) -> None:
        """Train the reference adapter; every process runs its slice of each global batch."""
        from lightning_tive.model import WarmupCosineLR

        size = int(round(self.warmup_ratio * datamodule.pool_size))
        indices = balanced_warmup_indices(datamodule.pool_task_ids, len(datamodule.task_names), size, self.seed)
        params = [p for p in module.parameters() if p.requires_grad]
        world, rank = trainer.world_size, trainer.global_rank
        global_batch = self.warmup_batch_size or getattr(datamodule, "batch_size", 8) * world
        steps_per_epoch = max(1, math.ceil(len(indices) / global_batch))
        optimizer = torch.optim.AdamW(params, lr=self.warmup_lr, weight_decay=0.0)
        scheduler = WarmupCosineLR(optimizer, total_steps=steps_per_epoch * self.warmup_epochs)
        module.train()
        step = 0
        bar = _progress(trainer, steps_per_epoch * self.warmup_epochs, "TIVE warm-up")
        for epoch in range(self.warmup_epochs):
            order = np.random.default_rng([self.seed, epoch]).permutation(indices)
            global_batches = [order[k : k + global_batch] for k in range(0, len(order), global_batch)]
            local = [b[rank::world] for b in global_batches]
            loader = datamodule.pool_dataloader(batches=local)
            for batch, whole in zip(loader, global_batches, strict=True):
                if "input_ids" in batch:
                    batch = trainer.strategy.batch_to_device(batch)
                    with trainer.precision_plugin.forward_context():
                        # Sum over this slice / size of the whole batch: summed over processes, the
                        # mean over the global batch, whatever the number of processes.
                        loss = module.per_example_loss(batch).sum() / len(whole)
                    grads = list(torch.autograd.grad(loss, params))
                    loss_value = loss.detach().float()
                else:  # this slice was all skipped records (or G < world): it still joins the all-reduce
                    grads = [torch.zeros_like(p) for p in params]
                    loss_value = torch.zeros((), device=trainer.strategy.root_device)
                if world > 1:
                    for g in grads:
                        _all_reduce_sum(g)
                    _all_reduce_sum(loss_value)
                for p, g in zip(params, grads, strict=True):
                    p.grad = g.to(p.dtype)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                step += 1
                if trainer.is_global_zero:
                    for logger in trainer.loggers:
                        logger.log_metrics({"tive/warmup_loss": float(loss_value)}, step=step)
                bar.update(1)
                bar.set_postfix(loss=f"{float(loss_value):.3f}")
        bar.close()

    def _projector(self, layers: list) -> Any:
        # `identity` keeps the whole gradient: its dimension is the adapter's size, not proj_dim.
        dim = None if self.projector_kind == "identity" else self.proj_dim
        return build_projector(self.projector_kind, dim, self.seed, layer_shapes(layers))

    def _value(
        self,
        trainer: L.Trainer,
        module: Any,
        datamodule: Any,
        layers: list,
        projector: Any,
        store: FeatureStore,
        indices: np.ndarray,
    ) -> None:
        """Features of this process's pool indices, chunk by chunk into its store."""
        missing = store.missing_chunks()
        module.eval()  # dropout off: features are deterministic
        batch_size = self.valuation_batch_size or getattr(datamodule, "batch_size", 8)
        bar = _progress(trainer, sum(np.diff(store.chunk_range(c))[0] for c in missing), "TIVE valuation")
        self.valued_now = 0
        for chunk in missing:
            start, stop = store.chunk_range(chunk)
            pool_indices = indices[start:stop]
            position = {int(p): k for k, p in enumerate(pool_indices)}
            features = np.zeros((stop - start, store.proj_dim), dtype=np.float32)
            norms = np.full(stop - start, np.nan, dtype=np.float32)  # stays NaN for a record skipped as bad
            for batch in datamodule.pool_dataloader(pool_indices, batch_size=batch_size):
                count = len(batch["pool_index"]) + len(batch.get("skipped_pool_index", []))
                if "input_ids" in batch:
                    rows = [position[int(p)] for p in batch["pool_index"]]
                    batch = trainer.strategy.batch_to_device(batch)
                    with trainer.precision_plugin.forward_context(), deterministic_train_mode(module):
                        grads = per_example_grads(layers, projector, module.per_example_loss, batch)
                    features[rows] = grads.features.float().cpu().numpy()
                    norms[rows] = grads.norms.float().cpu().numpy()
                bar.update(count)
            store.write_chunk(chunk, np.arange(start, stop), features, norms)
            self.valued_now += stop - start
        bar.close()
        trainer.strategy.barrier("tive-valuation")
        if not store.is_complete():
            raise RuntimeError(f"feature store {store.folder} is incomplete after valuation: {store.missing_chunks()[:5]}")

    def _open_features(self, folder: Path, datamodule: Any) -> tuple[Any, np.ndarray, np.ndarray]:
        """(source, pool index of each source row, norms) from a features folder of any layout."""
        pool = datamodule.pool_size
        if (folder / SHARDS).exists():
            source = ShardedFeatures(folder)
            _check_pool(folder, [s.meta["extra"] for s in source.stores], datamodule)
            if source.pool_size != pool:
                raise ValueError(
                    f"tive.features_from={folder} holds {source.pool_size} examples, the pool has {pool}: "
                    "it was computed for another pool"
                )
            if not source.is_complete():
                raise ValueError(f"tive.features_from={folder} is incomplete")
            return source, source.indices, source.read_norms()
        if (folder / FeatureStore.META).exists():
            store = FeatureStore.open(folder)
            _check_pool(folder, [store.meta["extra"]], datamodule)
            if store.pool_size != pool:
                raise ValueError(
                    f"tive.features_from={folder} holds {store.pool_size} examples, the pool has "
                    f"{pool}: it was computed for another pool"
                )
            if not store.is_complete():
                raise ValueError(f"tive.features_from={folder} is incomplete (chunks {store.missing_chunks()[:5]} missing)")
            return store, np.arange(pool), store.read_norms()
        features = np.load(folder / "features.npy", mmap_mode="r")
        norms = np.load(folder / "grad_norms.npy").astype(np.float32)
        if features.ndim != 2 or features.shape[0] != pool or norms.shape != (pool,):
            raise ValueError(
                f"tive.features_from={folder}: features {features.shape} / grad_norms {norms.shape} do not match "
                f"the pool of {pool} examples"
            )
        warnings.warn(
            f"tive.features_from={folder} has no meta.json: its shape matches the pool, but which model, "
            "adapter and projection produced it cannot be checked",
            stacklevel=2,
        )
        return np.asarray(features), np.arange(pool), norms

    def _check_same_everywhere(self, trainer: L.Trainer, out: Path) -> None:
        """Every process must train on the identical multiset (else the DistributedSampler hangs)."""
        digest = hashlib.sha256(self.selected.tobytes()).hexdigest()
        record = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "selection_sha256": digest,
            "reference_adapter_sha256": getattr(self, "adapter_sha256", None),
            "valued_this_run": getattr(self, "valued_now", 0),
        }
        (out / "ranks").mkdir(parents=True, exist_ok=True)
        report.write_json(out / "ranks" / f"rank-{trainer.global_rank:05d}.json", record)
        if trainer.world_size > 1:
            digests = [None] * trainer.world_size
            torch.distributed.all_gather_object(digests, digest)
            if len(set(digests)) != 1:
                raise RuntimeError(f"processes disagree on the TIVE selection: {digests}")

    def _swap(self, trainer: L.Trainer, module: Any, datamodule: Any) -> None:
        datamodule.set_train_indices(self.selected)
        # The train loader may already exist (the scheduler read estimated_stepping_batches): rebuild it.
        trainer.fit_loop._combined_loader = None
        trainer.strategy.setup_optimizers(trainer)
        from lightning.fabric.utilities.optimizer import _optimizers_to_device

        _optimizers_to_device(trainer.strategy.optimizers, trainer.strategy.root_device)
        rank_zero_info(f"[tive] training on the selected {len(self.selected)} of {datamodule.pool_size} examples")

    # ---------------------------------------------------------------- outputs
    def _fingerprint(self, module: Any, datamodule: Any) -> dict:
        """What produced a feature store: pool, model, adapter, projection and warm-up settings."""
        model = {
            k: v
            for k, v in dict(getattr(module, "hparams", {})).items()
            if isinstance(v, (str, int, float, bool, type(None), dict, list))
        }
        return {
            "pool": _pool_fingerprint(datamodule),
            "model": model,
            "reference_lora": asdict(self.reference_lora),
            "projector": self.projector_kind,
            "seed": self.seed,
            "warmup": {"ratio": self.warmup_ratio, "epochs": self.warmup_epochs, "lr": self.warmup_lr},
        }

    def _summary(self, datamodule: Any, result: Any, timings: dict) -> dict:
        finite = np.asarray(result.finite)
        return {
            "pool_size": int(datamodule.pool_size),
            "budget": int(result.budget),
            "selected": int(len(result.selected_indices)),
            "distinct_selected": int((np.asarray(result.times_selected) > 0).sum()),
            "ratio": self.ratio,
            "seed": self.seed,
            "non_finite_examples": int((~finite).sum()),
            "tasks": result.task_table(),
            "settings": self.settings(),
            "timings_s": {**timings, **{f"selection_{k}": v for k, v in result.timings.items()}},
        }

    def _write_outputs(self, trainer: L.Trainer, datamodule: Any, result: Any, out: Path) -> None:
        task_ids = np.asarray(datamodule.pool_task_ids)
        names = datamodule.task_names
        records = [datamodule.pool_record(i) for i in range(datamodule.pool_size)]
        report.write_tasks_csv(out / "tasks.csv", result.task_table())
        report.write_values_csv(
            out / "values.csv",
            [r.get("id") for r in records],
            [names[t] for t in task_ids],
            np.asarray(result.grad_norms),
            np.asarray(result.instance_values),
            np.asarray(result.times_selected),
        )
        report.write_json(out / "subset.json", [records[i] for i in self.selected])
        report.write_json(out / "summary.json", self.summary)
        png = out / "report.png"
        report.plot_report(png, result.task_table(), task_ids, np.asarray(result.instance_values), np.asarray(result.grad_norms))
        scalars = {
            "tive/pool_size": self.summary["pool_size"],
            "tive/budget": self.summary["budget"],
            **{f"tive/{k}": v for k, v in self.summary["timings_s"].items()},
        }
        report.log_to_wandb(
            trainer.loggers, result.task_table(), task_ids, np.asarray(result.instance_values),
            np.asarray(result.grad_norms), scalars, png,
        )
        rank_zero_info(f"[tive] selected {len(self.selected)} of {datamodule.pool_size}; files in {out}")

    # ---------------------------------------------------------------- resume
    def state_dict(self) -> dict:
        """The selected multiset and the summary, so a resumed fit re-applies them."""
        return {
            "version": STATE_VERSION,
            "selected": None if self.selected is None else self.selected.tolist(),
            "summary": self.summary,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore the selection written by an earlier part of this fit."""
        if state_dict.get("selected") is not None:
            self.selected = np.asarray(state_dict["selected"], dtype=np.int64)
        self.summary = state_dict.get("summary", {})


def _response_lengths(datamodule: Any) -> np.ndarray:
    """Words in each pool example's assistant turns (the `length` baseline's score)."""
    return np.array(
        [
            sum(len(t["value"].split()) for t in datamodule.pool_record(i)["conversations"] if t["from"] == "gpt")
            for i in range(datamodule.pool_size)
        ],
        dtype=np.float64,
    )


def _all_reduce_sum(tensor: torch.Tensor) -> None:
    """In-place sum over processes (gloo/NCCL); tensors stay where they are."""
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)


def _any_rank(trainer: L.Trainer, flag: bool) -> bool:
    """True if `flag` holds on any process."""
    if trainer.world_size == 1:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=trainer.strategy.root_device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return bool(value.item() > 0)


def _gather_by_index(
    pool_size: int, indices: np.ndarray, norms: np.ndarray, u: np.ndarray, finite: np.ndarray, sharded: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pool-ordered norms, instance values and finite flags; gathered from every process when sharded."""
    parts = [(indices, norms, u, finite)]
    if sharded:
        parts = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(parts, (indices, norms, u, finite))
    out_norms = np.full(pool_size, np.nan, dtype=np.float64)
    out_u = np.full(pool_size, np.nan, dtype=np.float64)
    out_finite = np.zeros(pool_size, dtype=bool)
    seen = np.zeros(pool_size, dtype=np.int64)
    for idx, n, v, f in parts:
        out_norms[idx], out_u[idx], out_finite[idx] = n, v, f
        seen[idx] += 1
    if not (seen == 1).all():
        raise RuntimeError(f"valuation covered {int((seen == 0).sum())} pool indices 0 times and {int((seen > 1).sum())} more than once")
    return out_norms, out_u, out_finite


def _pool_fingerprint(datamodule: Any) -> str:
    """A digest of the pool's records (ids, images, conversations) and tasks, in pool order."""
    digest = hashlib.sha256()
    for i in range(datamodule.pool_size):
        digest.update(json.dumps(datamodule.pool_record(i), sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


def _check_pool(folder: Path, extras: list[dict], datamodule: Any) -> None:
    """Refuse features whose recorded pool is not this one (same size, other records or tasks)."""
    recorded = {extra.get("pool") for extra in extras if extra.get("pool")}
    if not recorded:
        warnings.warn(f"tive.features_from={folder} records no pool fingerprint; it cannot be checked", stacklevel=3)
        return
    current = _pool_fingerprint(datamodule)
    if recorded != {current}:
        raise ValueError(
            f"tive.features_from={folder} was computed for a different pool (fingerprint {sorted(recorded)} vs "
            f"{current} now): the same number of examples but other records, order or tasks. Recompute the features "
            "for this pool (drop tive.features_from), or point it at the run that used this data."
        )


def _check_layout(folder: Path, world: int) -> None:
    """Refuse to mix features written by a different number of processes into this run."""
    written = None
    if (folder / SHARDS).exists():
        written = json.loads((folder / SHARDS).read_text())["world_size"]
    elif (folder / FeatureStore.META).exists():
        written = 1
    if written is not None and written != world:
        raise RuntimeError(
            f"{folder} holds features written by {written} process(es), and this run has {world}. "
            f"Rerun with {written} process(es) to resume that valuation, re-select from it with "
            f"`tive.features_from: {folder}`, or choose another `tive.output_dir`."
        )


def _layers_sha256(layers: list) -> str:
    digest = hashlib.sha256()
    for name, layer in layers:
        digest.update(name.encode())
        digest.update(layer.weight.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def _broadcast_layers(layers: list, world: int) -> None:
    if world > 1:
        for _, layer in layers:
            torch.distributed.broadcast(layer.weight.data, src=0)


def _trainable_fingerprint(module: torch.nn.Module) -> dict[str, str]:
    out = {}
    for name, param in module.named_parameters():
        if param.requires_grad:
            data = param.detach()
            raw = data.view(torch.uint8) if data.element_size() == 1 else data.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[data.element_size()])
            out[name] = hashlib.blake2b(raw.cpu().contiguous().numpy().tobytes(), digest_size=16).hexdigest()
    return out


def _save_adapter(layers: list, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save({name: layer.weight.detach().cpu() for name, layer in layers}, tmp)
    tmp.replace(path)


def _load_adapter(layers: list, path: Path) -> None:
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if set(saved) != {name for name, _ in layers}:
        raise ValueError(f"{path} was written for a different reference adapter; delete it to warm up again")
    with torch.no_grad():
        for name, layer in layers:
            layer.weight.copy_(saved[name])


def _progress(trainer: L.Trainer, total: int, desc: str) -> Any:
    from tqdm.auto import tqdm

    enabled = trainer.is_global_zero and trainer.progress_bar_callback is not None
    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True)
