"""How `LlavaModule` shards itself with FSDP2 under ModelParallelStrategy, and keeps its processes in step.

One FSDP unit per decoder layer of the LM and of the vision tower, one for `lm_head`, and the LLaVA
model (embeddings, projector, norms) as the root; under `bf16-mixed`, fp32 weights gathered and
computed in bf16. Every forward and backward of a sharded model is a collective, so a process runs
the vision side on a blank image when its batch has none, and an earlier batch when it has none at
all. The strategy-level helpers (is the strategy sharded, DTensor shards) are in `lightning_tive.sharding`.
"""

from __future__ import annotations

from typing import Any

import torch


class FSDPMixin:
    """`LlavaModule`'s `configure_model` hook and what a sharded step needs.

    Uses the module's `llava`, `finetune`, `device_mesh` and trainer; its state: the data-parallel
    process group once sharded, whether the next LM forward needs a dummy image, and a spare batch per
    stage for a process that has none.
    """

    def _init_sharding(self) -> None:
        self._shard_group: Any = None  # the data-parallel process group once configure_model sharded the model
        self._needs_dummy_image = False
        self._spare_batches: dict[str, dict] = {}  # sharded: the last batch of each stage, run by a process with none

    @property
    def sharded(self) -> bool:
        """Whether configure_model sharded the model with FSDP2."""
        return self._shard_group is not None

    def shard_model(self) -> None:
        """Shard with FSDP2 under ModelParallelStrategy / FSDP2Strategy; nothing under any other strategy.

        One FSDP unit per decoder layer of the LM and of the vision tower, one for `lm_head`, and the
        LLaVA model (embeddings, projector, norms) as the root. A TIVE reference adapter reserved before
        (`reserve_reference_adapter`) is sharded with the layers that hold it. Under `bf16-mixed` the
        weights stay fp32 (the optimizer's master copy) and FSDP gathers and computes them in bf16.
        """
        mesh = self.device_mesh
        if mesh is None or self.sharded:
            return
        from torch.distributed.fsdp import fully_shard

        from lightning_tive.sharding import STRATEGY_HELP, FSDP2Strategy, data_parallel_mesh

        if self.finetune == "qlora":
            raise ValueError("model.finetune=qlora keeps 4-bit base weights, which FSDP2 does not shard here; use lora")
        strategy = self._trainer.strategy if self._trainer is not None else None
        if getattr(strategy, "_save_distributed_checkpoint", False) and not isinstance(strategy, FSDP2Strategy):
            # Lightning's own loader asks a folder of shards for every weight; ours hold the trainable ones.
            raise ValueError(
                "sharded checkpoints of ModelParallelStrategy cannot be read back (they hold the trainable weights "
                f"only): use {STRATEGY_HELP}, or ModelParallelStrategy(save_distributed_checkpoint=False)"
            )
        mesh = data_parallel_mesh(mesh)
        group = mesh.get_group()  # every data-parallel process steps together (HSDP: across replicas too)
        replicas = getattr(strategy, "replicate_size", 1)
        if replicas > 1:  # HSDP: shard within each replica group, replicate across them
            from torch.distributed.device_mesh import init_device_mesh

            mesh = init_device_mesh(
                mesh.device_type, (replicas, mesh.size() // replicas), mesh_dim_names=("replicate", "shard")
            )
        llava = self.llava
        head = llava.lm_head
        if head.weight is llava.model.language_model.get_input_embeddings().weight:
            raise ValueError(
                "the language model ties lm_head to the input embeddings; sharding it with FSDP2 needs both in one "
                "unit, which lightning_tive does not build: use DDP for this model"
            )
        options: dict[str, Any] = {"mesh": mesh}
        if strategy is not None and str(self.trainer.precision) == "bf16-mixed":
            from torch.distributed.fsdp import MixedPrecisionPolicy

            # bf16 all-gathers and compute, fp32 master weights and gradient reduction. Under autocast
            # alone, its cache would keep a bf16 copy of every all-gathered weight until the forward ends.
            options["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for blocks in _layer_lists(llava.model.vision_tower) + _layer_lists(llava.model.language_model):
            for block in blocks:
                fully_shard(block, **options)
        fully_shard(head, **options)
        # its own unit: a float32 projector beside bf16 embeddings (FSDP2 gathers one dtype per unit)
        fully_shard(llava.model.multi_modal_projector, **options)
        fully_shard(llava.model, **options)
        if "mp_policy" in options:
            from lightning_tive.sharding import sync_mixed_precision

            # after FSDP's own pre-forward hooks, which fix the dtypes at the first forward
            llava.model.register_forward_pre_hook(lambda *_: sync_mixed_precision(llava))
        llava.model.language_model.register_forward_pre_hook(self._dummy_image_hook, with_kwargs=True)
        self._shard_group = group

    def _dummy_image_hook(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple | None:
        """Sharded, a batch without images still runs the vision tower and projector (on a blank image, times 0).

        Every process must run the same FSDP units in the same order; LLaVA's own training does the
        same for text-only samples under ZeRO-3.
        """
        if not self._needs_dummy_image or kwargs.get("inputs_embeds") is None:
            return None
        self._needs_dummy_image = False
        llava, embeds = self.llava, kwargs["inputs_embeds"]
        size = llava.config.vision_config.image_size
        tower = llava.model.vision_tower
        pixels = torch.zeros(1, 3, size, size, device=embeds.device, dtype=next(tower.parameters()).dtype)
        out = llava.model.get_image_features(
            pixel_values=pixels,
            vision_feature_layer=llava.config.vision_feature_layer,
            vision_feature_select_strategy=llava.config.vision_feature_select_strategy,
        )
        features = out.pooler_output if hasattr(out, "pooler_output") else out
        total = sum(f.float().sum() for f in (features if isinstance(features, (list, tuple)) else [features]))
        return args, {**kwargs, "inputs_embeds": embeds + (0.0 * total).to(embeds.dtype)}

    def _max_over_processes(self, value: int, device: torch.device) -> int:
        """The largest `value` over the data-parallel processes (sharded only)."""
        import torch.distributed as dist

        from lightning_tive.distributed import Collectives

        comm = Collectives(dist.get_world_size(self._shard_group), 0, device, group=self._shard_group)
        return int(comm.max_(torch.tensor([value], dtype=torch.int64)).item())

    def _spare(self, batch: dict, stage: str) -> dict:
        """An earlier batch to run for the collectives' sake when this process has none (its result is unused)."""
        if stage not in self._spare_batches:
            raise RuntimeError(
                f"under FSDP every process must run each step, and this process's first {stage} batch holds only "
                f"skipped records ({batch.get('skipped_pool_index')}); fix or remove them (data.on_bad_record)"
            )
        return self._spare_batches[stage]


def _layer_lists(module: torch.nn.Module) -> list[torch.nn.ModuleList]:
    """The `layers` ModuleLists (decoder or encoder blocks) inside `module`."""
    return [sub for name, sub in module.named_modules() if name.split(".")[-1] == "layers" and isinstance(sub, torch.nn.ModuleList)]
