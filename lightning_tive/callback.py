"""TIVESelectionCallback: warm-up → valuation → selection → swap, inside one `trainer.fit`."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info

from lightning_tive import report
from lightning_tive.checkpoints import resolve_checkpoint_path
from lightning_tive.distributed import Collectives
from lightning_tive.feature_folder import check_cost_settings, open_features
from lightning_tive.phases import ReferencePhases
from lightning_tive.protocols import DATA_MEMBERS, MODEL_METHODS, TIVEData, TIVEModel, missing_members
from lightning_tive.proxy import (
    build_reference_model,
    check_same_tokenisation,
    describe_model,
    release_device_memory,
)
from lightning_tive.reference_adapter import unchanged_weights
from lightning_tive.sharding import STRATEGY_HELP, data_parallel_mesh, is_sharded
from lightning_tive.strategies import select_subset
from lightning_tive.tive.values import instance_values
from lightning_tive.tive_config import TIVEConfig

SUPPORTED_STRATEGIES = ("SingleDeviceStrategy", "DDPStrategy", "FSDP2Strategy", "ModelParallelStrategy")
STATE_VERSION = 1


class TIVESelectionCallback(Callback):
    """One-shot TIVE data selection at the start of `fit`, then training on the subset.

    Give a `TIVEConfig`, or its fields as keyword arguments (`TIVESelectionCallback(ratio=0.2)`).
    """

    def __init__(self, config: TIVEConfig | None = None, **settings: Any) -> None:
        if config is not None and settings:
            raise TypeError("give either a TIVEConfig or keyword settings, not both")
        self.config = config if config is not None else TIVEConfig(**settings)
        # Resumable state: the selected multiset and the summary that describes it.
        self.selected: np.ndarray | None = None
        self.summary: dict = {}
        # The checkpoint a fit resumes from, when known before Lightning restores callbacks (the CLI sets
        # it): ModelParallelStrategy restores them only after on_fit_start.
        self.resume_from: str | None = None
        self._swapped: tuple | None = None  # (trainer, datamodule) once the training set was swapped

    # ---------------------------------------------------------------- refusals
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Refuse what the phases cannot serve, before any model work."""
        if not self.config.enabled or stage != "fit":
            return
        name = type(trainer.strategy).__name__
        if name not in SUPPORTED_STRATEGIES:
            raise RuntimeError(
                f"TIVESelectionCallback supports {', '.join(SUPPORTED_STRATEGIES)}, not {name}. To shard the model, "
                f"use FSDP2: {STRATEGY_HELP}. Without sharding use "
                "`trainer.strategy: ddp` (or a single device), or set `tive.enabled: false`."
            )
        if not isinstance(pl_module, TIVEModel):
            raise TypeError(
                f"{type(pl_module).__name__} does not implement TIVE's model protocol: it lacks "
                f"{missing_members(pl_module, MODEL_METHODS)} (see lightning_tive.protocols.TIVEModel)"
            )
        if is_sharded(trainer.strategy):
            data_parallel_mesh(trainer.strategy.device_mesh)  # refuses tensor parallelism
            if self.config.needs_gradients and self.config.features_from is None and self.config.reference_model is None:
                # FSDP2 cannot add parameters after sharding: the adapter exists, frozen and inactive, before
                # configure_model shards the model, and the warm-up activates it.
                if not hasattr(pl_module, "reserve_reference_adapter"):
                    raise TypeError(
                        f"{type(pl_module).__name__} lacks reserve_reference_adapter(settings, seed), which TIVE needs "
                        "under a sharded strategy to add its reference adapter before configure_model shards the model"
                    )
                pl_module.reserve_reference_adapter(self.config.reference_lora, self.config.seed)
        names = getattr(trainer.datamodule, "task_names", None)
        unknown = sorted(set(self.config.exclude_tasks) - set(names or []))
        if names is not None and unknown:
            raise ValueError(f"tive.exclude_tasks names unknown task(s) {unknown}; the pool's tasks are {names}")

    def output_dir(self, trainer: L.Trainer) -> Path:
        """The folder the files go to."""
        return Path(self.config.output_dir or Path(trainer.default_root_dir) / "tive")

    # ---------------------------------------------------------------- the run
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Select (or re-apply a restored selection), swap the training set, rebuild the optimizers."""
        if not self.config.enabled:
            return
        datamodule = trainer.datamodule
        if not isinstance(datamodule, TIVEData):
            raise TypeError(
                f"TIVESelectionCallback needs a DataModule with TIVE's data protocol: "
                f"{type(datamodule).__name__} lacks {missing_members(datamodule, DATA_MEMBERS)} "
                "(see lightning_tive.protocols.TIVEData, or use LlavaDataModule)"
            )
        resume_from = resolve_checkpoint_path(trainer, trainer.ckpt_path or self.resume_from)
        restore_late = trainer.strategy.restore_checkpoint_after_setup
        if self.selected is None and resume_from and restore_late and resume_from.exists():
            # This strategy (ModelParallelStrategy) restores callbacks only after on_fit_start: read ours now.
            self.load_state_dict(_saved_callback_state(resume_from, self.state_key))
        comm = Collectives.of(trainer)
        restored = comm.gather_objects(self.selected is not None)
        if any(restored) and not all(restored):  # some processes would train on the subset, others on the pool
            raise RuntimeError(
                f"a restored TIVE selection is on processes {[r for r, ok in enumerate(restored) if ok]} only: every "
                f"process must read the same checkpoint ({resume_from})"
            )
        if self.selected is not None:
            comm.same_everywhere(self.selected, "the restored TIVE selection")
            rank_zero_info(f"[tive] re-applying the restored selection of {len(self.selected)} examples")
            if is_sharded(trainer.strategy):
                pl_module.remove_reference_adapter()  # the adapter reserved in setup is not needed
            self._swap(trainer, datamodule)
            return
        out = self.output_dir(trainer)
        if trainer.is_global_zero:
            out.mkdir(parents=True, exist_ok=True)
        comm.barrier("tive-output-dir")
        values, timings, run = self._values(trainer, pl_module, datamodule, out, comm)

        def select() -> tuple:
            clock = time.perf_counter()
            result = select_subset(self.config, datamodule, values)
            timings["selection_s"] = time.perf_counter() - clock + timings.pop("values_s", 0.0)
            summary = report.summary(self.config, datamodule, result, timings, run["feature_settings"])
            summary["padding_efficiency"] = {
                "valuation": run["valuation_padding"],
                "training": datamodule.padding_efficiency(result.selected_indices)
                if hasattr(datamodule, "padding_efficiency") else None,
            }
            return result, summary

        # Process 0 selects and writes; a failure there stops every process (not only the one waiting).
        result, summary = comm.on_first(select, "select the subset") or (None, None)
        payload = (result.selected_indices.tolist(), summary) if result is not None else None
        selected, self.summary = comm.broadcast_object(payload)
        self.selected = np.asarray(selected, dtype=np.int64)
        digest = comm.same_everywhere(self.selected, "the TIVE selection")
        report.write_rank_record(out, comm.rank, comm.world_size, digest, run["adapter_sha256"], run["valued_now"])
        comm.on_first(lambda: report.write_outputs(out, datamodule, result, self.selected, self.summary, trainer.loggers),
                      "write the selection's files")
        if self.config.stop_after_selection:
            rank_zero_info(f"[tive] selection written to {out}; stop_after_selection is set, so nothing is trained")
            trainer.should_stop = True
            trainer.limit_train_batches = 0
            trainer.limit_val_batches = 0
            return
        self._swap(trainer, datamodule)

    def _values(self, trainer: L.Trainer, module: Any, datamodule: Any, out: Path, comm: Collectives) -> tuple:
        """Pool-ordered per-example values (norms, instance values, losses, tokens, finite flags); None
        on processes other than 0 when they come from `features_from`."""
        pool, task_ids = datamodule.pool_size, np.asarray(datamodule.pool_task_ids)
        run = {"adapter_sha256": None, "valued_now": 0, "feature_settings": None, "valuation_padding": None}
        if not self.config.needs_gradients:
            nan = np.full(pool, np.nan)
            values = {"norms": nan, "u": nan, "loss": nan, "tokens": nan, "finite": np.ones(pool, dtype=bool)}
            return values, {}, run
        timings: dict[str, float] = {}
        if self.config.features_from is not None:
            source, indices, run["feature_settings"] = open_features(Path(self.config.features_from), datamodule)
            check_cost_settings(self.config, run["feature_settings"])
            if not trainer.is_global_zero:  # checked on every process above; only process 0 selects
                return None, timings, run
            comm = Collectives(1, 0, comm.device)  # process 0 reads the whole folder alone
        else:
            valuation = self._reference_phases(trainer, module, datamodule, out, comm)
            source, indices, timings = valuation.store, valuation.indices, valuation.timings
            run.update(adapter_sha256=valuation.adapter_sha256, valued_now=valuation.valued_now)
            tokens = comm.sum(torch.tensor([valuation.padding["real"], valuation.padding["padded"]], dtype=torch.float64))
            run["valuation_padding"] = float(tokens[0] / tokens[1]) if tokens[1] > 0 else None
        clock = time.perf_counter()
        columns = {"norms": source.read_norms(), "loss": source.read_column("loss"), "tokens": source.read_column("tokens")}
        # Each process passes its own rows; the per-task sums of the first pass are summed over processes.
        columns["u"], columns["finite"] = instance_values(
            source, task_ids[indices], len(datamodule.task_names), np.isfinite(columns["norms"]), all_reduce=comm.sum_,
        )
        values = comm.gather_by_index(pool, indices, columns)
        timings["values_s"] = time.perf_counter() - clock
        return values, timings, run

    def _reference_phases(self, trainer: L.Trainer, module: Any, datamodule: Any, out: Path, comm: Collectives) -> Any:
        """Warm-up and valuation on the main model, or on the proxy `reference_model` (built here, dropped after)."""
        if self.config.reference_model is None:
            return ReferencePhases(self.config, trainer, module, datamodule).run(out)
        device = trainer.strategy.root_device
        clock = time.perf_counter()
        proxy = build_reference_model(self.config.reference_model, device, trainer.precision_plugin)
        built_s = time.perf_counter() - clock
        check_same_tokenisation(module, proxy)
        rank_zero_info(f"[tive] valuing the pool with the proxy reference model ({describe_model(proxy)})")
        # The proxy is one whole copy per process, never wrapped: it runs the unsharded (DDP-style) path,
        # whatever shards the main model. The main model must come out bit for bit as it went in.
        with unchanged_weights(module, comm, "valuation with the proxy reference model"):
            valuation = ReferencePhases(self.config, trainer, proxy, datamodule, sharded=False).run(out)
        valuation.timings["proxy_build_s"] = built_s
        del proxy  # the last reference: its memory goes back before the main training
        release_device_memory(device)
        return valuation

    def _swap(self, trainer: L.Trainer, datamodule: Any) -> None:
        self._swapped = (trainer, datamodule)
        datamodule.set_train_indices(self.selected)
        # The train loader may already exist (the scheduler read estimated_stepping_batches): rebuild it.
        trainer.fit_loop._combined_loader = None
        trainer.strategy.setup_optimizers(trainer)
        from lightning.fabric.utilities.optimizer import _optimizers_to_device

        _optimizers_to_device(trainer.strategy.optimizers, trainer.strategy.root_device)
        rank_zero_info(f"[tive] training on the selected {len(self.selected)} of {datamodule.pool_size} examples")

    # ---------------------------------------------------------------- resume
    def state_dict(self) -> dict:
        """The selected multiset and the summary, so a resumed fit re-applies them."""
        return {
            "version": STATE_VERSION,
            "selected": None if self.selected is None else self.selected.tolist(),
            "summary": self.summary,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore the selection written by an earlier part of this fit.

        A strategy that restores callbacks after on_fit_start (ModelParallelStrategy, resumed without the
        CLI) has swapped in a selection by then: the restored one replaces it.
        """
        restored = state_dict.get("selected")
        self.summary = state_dict.get("summary", {})
        if restored is None:
            return
        swapped, self.selected = self.selected, np.asarray(restored, dtype=np.int64)
        if self._swapped is not None and (swapped is None or not np.array_equal(swapped, self.selected)):
            rank_zero_info(f"[tive] re-applying the restored selection of {len(self.selected)} examples")
            self._swap(*self._swapped)


def _saved_callback_state(ckpt_path: str | Path, key: str) -> dict:
    """A callback's state in a Lightning checkpoint: a file, or a distributed checkpoint's folder."""
    import torch

    path = Path(ckpt_path)
    if path.is_dir():
        from lightning.fabric.utilities.load import _METADATA_FILENAME

        path = path / _METADATA_FILENAME
    checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    return checkpoint.get("callbacks", {}).get(key, {})
