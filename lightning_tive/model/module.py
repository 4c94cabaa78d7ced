"""LlavaModule: the LightningModule of LLaVA-1.5 visual instruction tuning (hooks, steps, losses, optimizers).

It builds LLaVA from one source (build.py), sets which weights train (adapters.py), and otherwise
only trains: the losses (losses.py), the optimizer and its schedule (schedule.py), and the checkpoint
hooks. Sharding (fsdp.py), TIVE's reference adapter (adapters.py) and held-out evaluation
(evaluation.py) are mixins, each owning the hooks and state of its job.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable

from lightning_tive.distributed import Collectives
from lightning_tive.model.adapters import ReferenceAdapterMixin, apply_finetune_mode, unwrap_peft
from lightning_tive.model.build import LlavaBuilder, LlavaSource, TorchDtype
from lightning_tive.model.evaluation import EvaluationMixin
from lightning_tive.model.fsdp import FSDPMixin
from lightning_tive.model.losses import NLL_CHUNK_TOKENS, chunked_per_example_nll
from lightning_tive.model.materialize import later_process, materialize_from_first, plain_build_context
from lightning_tive.model.schedule import SchedulerCallable, WarmupCosineLR
from lightning_tive.model.settings import (
    FINETUNE_MODES,
    FinetuneMode,
    LoraSettings,
    TinyLlavaConfig,
    VisionTowerConfig,
)


class LlavaModule(FSDPMixin, ReferenceAdapterMixin, EvaluationMixin, L.LightningModule):
    """LLaVA-1.5 visual instruction tuning.

    Build paths (exactly one): `pretrained` (a HF LLaVA checkpoint or folder); `language_model` +
    (`vision_tower` or `vision_config`) (+ `projector_path` in the original `mm_projector.bin` format),
    as LLaVA-1.5 stage 2 starts; or `tiny` (random weights from a small config, seeded by `init_seed`).

    In a process its launcher ranks other than 0 (`RANK`, `LOCAL_RANK` or `SLURM_PROCID` set and not 0)
    the model is built as a skeleton on the meta device, which `configure_model` fills from process 0;
    outside a fit, call `build_model()` to build it for real there (`on_meta` says which it is).

    Args:
        pretrained: HF LLaVA model id or local folder.
        language_model: causal LM id or folder (path b); with `gguf_file`, the folder holding that file.
        vision_tower: pretrained CLIP vision id or folder (path b).
        projector_path: stage-1 projector weights (`model.mm_projector.{0,2}.*`) (path b); trained against
            the same vision tower (for a `vision_config` tower: the same config and `init_seed`).
        gguf_file: a GGUF file name inside `language_model` (path b); the LM and its tokenizer are read
            from it, dequantised once and cached as safetensors (needs the `gguf` package).
        vision_config: a randomly initialised CLIP vision tower, seeded by `init_seed` (path b, instead of
            `vision_tower`); its image processor is built offline.
        tiny: tiny random LLaVA config (path c).
        tokenizer: tokenizer folder for path c (`demo` builds the offline demo tokenizer).
        finetune: `full`, `lora` or `qlora` (4-bit NF4 base via bitsandbytes).
        lora: LoRA settings for `lora`/`qlora`.
        freeze_vision_tower: keep CLIP frozen (LLaVA-1.5 does).
        freeze_language_model: with `full`, keep the LM (and `lm_head`) frozen, as LLaVA's stage 1 does.
        train_projector: train the multi-modal projector.
        projector_lr: a separate learning rate for the projector (None: the optimizer's).
        gradient_checkpointing: non-reentrant, so `torch.autograd.grad` still works.
        torch_dtype: dtype to load pretrained weights in (`bfloat16`, `float16`, `float32`).
        optimizer: optimizer callable over parameter groups.
        lr_scheduler: `(optimizer, total_steps) -> scheduler`, stepped per optimizer step; None for constant.
        val_max_new_tokens: greedy generation length for validation metrics.
        init_seed: seed for random weights (the tiny model, a `vision_config` tower, a fresh projector),
            so a rebuild from a checkpoint gives the same frozen weights.
        init_from: a checkpoint written by `fit` (e.g. a stage-1 run) whose weights replace the built
            ones before fine-tuning starts; it must come from the same build source (checked).
        language_model_layers: keep only the first N decoder layers of the language model, after
            `init_from` loads (None: all). Meant for a cheaper proxy in `tive.reference_model`: the same
            LM, shallower, with the main model's tokenizer and stage-1 weights.
    """

    def __init__(
        self,
        pretrained: str | None = None,
        language_model: str | None = None,
        vision_tower: str | None = None,
        projector_path: str | None = None,
        gguf_file: str | None = None,
        vision_config: VisionTowerConfig | None = None,
        tiny: TinyLlavaConfig | None = None,
        tokenizer: str | None = None,
        finetune: FinetuneMode = "lora",
        lora: LoraSettings | None = None,
        freeze_vision_tower: bool = True,
        freeze_language_model: bool = False,
        train_projector: bool = True,
        projector_lr: float | None = None,
        gradient_checkpointing: bool = False,
        torch_dtype: TorchDtype | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: SchedulerCallable | None = WarmupCosineLR,
        val_max_new_tokens: int = 16,
        init_seed: int = 0,
        init_from: str | None = None,
        language_model_layers: int | None = None,
    ):
        super().__init__()
        source = LlavaSource(
            pretrained, language_model, vision_tower, projector_path, gguf_file, vision_config, tiny, tokenizer,
            torch_dtype, init_seed, init_from, language_model_layers,
        )
        if finetune not in FINETUNE_MODES:
            raise ValueError(f"model.finetune must be full|lora|qlora, got {finetune!r}")
        # Hyper-parameters keep plain dicts so checkpoints load with `weights_only=True`.
        lora = LoraSettings(**lora) if isinstance(lora, dict) else lora
        tiny = None if source.tiny is None else asdict(source.tiny)  # noqa: F841 (read by save_hyperparameters)
        vision_config = None if source.vision_config is None else asdict(source.vision_config)  # noqa: F841 (idem)
        lora_settings, lora = lora, None if lora is None else asdict(lora)
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.source = source
        self.finetune = finetune
        self.lora_settings = lora_settings or LoraSettings()
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler
        self.projector_lr = projector_lr
        self.val_max_new_tokens = val_max_new_tokens
        # Frozen weights are recoverable from their source, so checkpoints keep trainable ones only.
        self.strict_loading = False
        self.nll_chunk_tokens = NLL_CHUNK_TOKENS

        self._build_settings = (freeze_vision_tower, freeze_language_model, train_projector, gradient_checkpointing)
        self._builder = LlavaBuilder(source)
        self.processor = self._builder.processor()
        self.load_seconds = self._builder.load_seconds  # language-model load timings (GGUF path)
        self._init_evaluation()
        self._init_reference_adapter()
        self._init_sharding()
        # A process other than the run's first builds only the structure: configure_model fills it from process 0.
        self.build_model(on_meta=later_process() and finetune != "qlora")

    def build_model(self, on_meta: bool = False) -> None:
        """Build LLaVA (on the meta device: its structure only) and set which weights train."""
        with plain_build_context():
            if on_meta:
                built = self._builder.skeleton(self.processor)
            else:
                built = self._builder.model(self.processor, quantize_4bit=self.finetune == "qlora")
            self.model = apply_finetune_mode(built, self.finetune, self.lora_settings, *self._build_settings)
        # `from_pretrained` returns a model in eval mode and Lightning (>= 2.3) keeps submodules' modes,
        # so without this LoRA dropout (and checkpointing, which transformers skips in eval) would be off.
        self.model.train(self.training)

    @property
    def on_meta(self) -> bool:
        """Whether the model is still a skeleton on the meta device (configure_model fills it)."""
        return any(p.is_meta for p in self.model.parameters())

    def configure_model(self) -> None:
        """Give every process of the run its weights, and shard them under FSDP2.

        Several processes (DDP or FSDP2): process 0 built the model for real and the others its skeleton
        on the meta device; once sharded (FSDP2) the others allocate their tensors on their device and
        process 0 broadcasts every tensor. One process: the model built in `__init__` (rebuilt for real
        when it is a skeleton). Runs once: a sharded model is left as it is.
        """
        trainer = self._trainer
        if self.sharded:
            return
        if trainer is None or trainer.world_size == 1 or self.finetune == "qlora":
            if self.on_meta:
                self.build_model()
                self._reserve_again()
            self.shard_model()
            return
        materialize_from_first(self, Collectives.of(trainer), trainer.strategy.root_device)

    @property
    def llava(self) -> Any:
        """The underlying `LlavaForConditionalGeneration` (unwrapped from peft)."""
        return unwrap_peft(self.model)

    def forward(self, batch: dict) -> Any:
        """Run LLaVA on a collated batch; returns the model output with logits."""
        return self.model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            pixel_values=self._pixels(batch),
        )

    def _pixels(self, batch: dict) -> torch.Tensor | None:
        pixels = batch.get("pixel_values")
        if pixels is None:
            return None
        tower = self.llava.model.vision_tower
        return pixels.to(next(tower.parameters()).dtype)

    def batch_nll(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed next-token NLL and supervised-token count per example, without full-vocabulary logits.

        Equals `per_example_nll(self(batch).logits, labels)`: the inner LLaVA model gives the last
        hidden states (LoRA layers are injected in place, so they apply without peft's wrapper) and
        only supervised positions meet `lm_head`, in checkpointed chunks of `nll_chunk_tokens`.
        """
        llava = self.llava
        pixels = self._pixels(batch)
        self._needs_dummy_image = self.sharded and pixels is None
        hidden = llava.model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            pixel_values=pixels,
            use_cache=False,  # eval mode would otherwise keep a KV cache of every layer
        ).last_hidden_state
        labels = batch["labels"]
        chunks = 1
        if self.sharded:  # every process calls lm_head (an FSDP unit) equally often
            supervised = int(self.supervised_tokens(batch).sum())
            chunks = self._max_over_processes(max(1, math.ceil(supervised / self.nll_chunk_tokens)), hidden.device)
        return chunked_per_example_nll(hidden, labels, llava.lm_head, self.nll_chunk_tokens, min_chunks=chunks)

    def per_example_loss(self, batch: dict) -> torch.Tensor:
        """Each example's mean NLL over its own supervised tokens: a vector [B]."""
        total, count = self.batch_nll(batch)
        return total / count.clamp(min=1)

    def supervised_tokens(self, batch: dict) -> torch.Tensor:
        """Each example's number of supervised (next-token) positions: a vector [B]."""
        return (batch["labels"][:, 1:] != -100).sum(dim=1)

    def projector_parameters(self) -> list[torch.nn.Parameter]:
        """The multi-modal projector's parameters (TIVE's warm-up may train them, then restores them)."""
        return list(self.llava.model.multi_modal_projector.parameters())

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """LLaVA's loss: the token mean over the batch's supervised tokens."""
        if "input_ids" not in batch:  # every record of this batch was skipped as bad
            if not self.sharded:
                # A zero loss over every trainable weight keeps this process's backward (and DDP's
                # gradient all-reduce) in step with the others.
                return sum(p.sum() for _, p in self.trainable_parameters()) * 0.0
            # Sharded, every process must run the forward and backward: a zero loss on an earlier batch.
            total, count = self.batch_nll(self._spare(batch, "train"))
            return total.sum() * 0.0
        if self.sharded:
            self._spare_batches["train"] = batch
        total, count = self.batch_nll(batch)
        loss = total.sum() / count.sum().clamp(min=1)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(count))
        if batch.get("pixel_values") is None and not self.sharded:
            # A text-only batch never reaches the vision side. Under DDP every process must produce a
            # gradient for every trainable weight in every step, or their all-reduces fall out of step
            # (one process moves on while the others wait): a zero term reaches the projector and tower.
            # (FSDP2 reduces a unit that took no part in the forward in its final backward callback.)
            unreached = [p for n, p in self.trainable_parameters() if "multi_modal_projector" in n or "vision_tower" in n]
            if unreached:
                loss = loss + 0.0 * sum(p.sum() for p in unreached)
        return loss

    def trainable_parameters(self) -> Iterator[tuple[str, torch.nn.Parameter]]:
        """(name, parameter) for every parameter the main fine-tuning trains."""
        return ((n, p) for n, p in self.named_parameters() if p.requires_grad)

    def configure_optimizers(self) -> Any:
        """The optimizer over trainable parameters (projector in its own group) and a per-step schedule.

        Safe to call again (e.g. after TIVE shrinks the training set): the schedule length is read from
        the trainer each time.
        """
        projector, rest = [], []
        for name, param in self.trainable_parameters():
            (projector if "multi_modal_projector" in name else rest).append(param)
        groups = [{"params": rest, "name": "main"}] if rest else []
        if projector:
            group = {"params": projector, "name": "projector"}
            if self.projector_lr is not None:
                group["lr"] = self.projector_lr
            groups.append(group)
        optimizer = self.optimizer_factory(groups)
        if self.scheduler_factory is None:
            return optimizer
        total = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = self.scheduler_factory(optimizer, total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Keep only trainable weights: the frozen rest is rebuilt from its source on load."""
        trainable = {name for name, _ in self.trainable_parameters()}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        checkpoint["lightning_tive_trainable"] = sorted(trainable)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Refuse a checkpoint whose trainable set differs from this module's (wrong config)."""
        expected = checkpoint.get("lightning_tive_trainable")
        if expected is None:
            return
        have = {name for name, _ in self.trainable_parameters()}
        missing = sorted(set(expected) - have)
        if missing:
            raise ValueError(
                f"checkpoint trains {len(missing)} parameters this model does not have (e.g. {missing[:3]}); "
                "build the module with the configuration that wrote the checkpoint"
            )
