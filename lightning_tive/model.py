"""LlavaModule: builds or loads LLaVA-1.5, applies full / LoRA / QLoRA fine-tuning, trains and evaluates."""

from __future__ import annotations

import math
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler
from torch.utils.checkpoint import checkpoint

from lightning_tive.metrics import MeanScore, exact_match, token_f1

FinetuneMode = Literal["full", "lora", "qlora"]
LM_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
LM_MLP = ("gate_proj", "up_proj", "down_proj")
REFERENCE_ADAPTER = "tive_reference"


@dataclass
class TinyLlavaConfig:
    """A tiny LLaVA (CLIP tower + projector + Llama LM) with random weights, for the demo and tests."""

    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    vision_hidden_size: int = 64
    vision_intermediate_size: int = 128
    vision_layers: int = 2
    vision_heads: int = 4
    image_size: int = 64
    patch_size: int = 16
    max_position_embeddings: int = 1024
    #: LM vocabulary size; None takes the tokenizer's length (a larger one adds untrained rows).
    vocab_size: int | None = None


@dataclass
class LoraSettings:
    """LoRA hyper-parameters; `target_modules` are suffixes inside the language model's layers only."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: list(LM_ATTENTION + LM_MLP))


def language_model_target_regex(targets: list[str]) -> str:
    """A peft `target_modules` regex anchored on the LM's layers, so CLIP's q/k/v_proj stay out."""
    for name in targets:
        if not re.fullmatch(r"[A-Za-z0-9_]+", name):
            raise ValueError(f"LoRA target module names are plain suffixes like 'q_proj', got {name!r}")
    return rf".*language_model\.layers\.\d+\.(self_attn|mlp)\.({'|'.join(targets)})"


class WarmupCosineLR(LambdaLR):
    """Linear warm-up then cosine decay to zero over `total_steps` (LLaVA's schedule)."""

    def __init__(self, optimizer: Optimizer, total_steps: int, warmup_ratio: float = 0.03, min_lr_ratio: float = 0.0):
        if total_steps <= 0:
            raise ValueError(f"WarmupCosineLR needs total_steps > 0, got {total_steps}")
        self.total_steps = int(total_steps)
        self.warmup_steps = int(math.ceil(warmup_ratio * total_steps))

        def factor(step: int) -> float:
            if step < self.warmup_steps:
                return (step + 1) / (self.warmup_steps + 1)
            progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
            return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

        super().__init__(optimizer, factor)


SchedulerCallable = Callable[[Optimizer, int], LRScheduler]


#: Supervised tokens per lm_head + cross-entropy chunk of :func:`chunked_per_example_nll`.
NLL_CHUNK_TOKENS = 1024


def per_example_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token NLL and supervised-token count per example (labels -100 are ignored).

    The reference definition, from full logits; training and valuation use
    :func:`chunked_per_example_nll`, which gives the same numbers without ``[B, T, V]`` logits.
    """
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    mask = shift_labels != -100
    nll = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.clamp(min=0).reshape(-1),
        reduction="none",
    ).view_as(shift_labels)
    nll = nll * mask
    return nll.sum(dim=1), mask.sum(dim=1)


def _token_nll(states: torch.Tensor, targets: torch.Tensor, head: torch.nn.Module) -> torch.Tensor:
    return F.cross_entropy(head(states).float(), targets, reduction="none")


def chunked_per_example_nll(
    hidden: torch.Tensor, labels: torch.Tensor, head: torch.nn.Module, chunk_tokens: int = NLL_CHUNK_TOKENS
) -> tuple[torch.Tensor, torch.Tensor]:
    """`per_example_nll(head(hidden), labels)` from last hidden states, never holding more than one chunk's logits.

    Only supervised positions go through ``head`` (in float32 after it, as in the reference), in chunks
    of ``chunk_tokens``, each under non-reentrant checkpointing so its logits are recomputed in
    backward instead of kept from the forward.
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    shift_labels = labels[:, 1:]
    mask = shift_labels != -100
    rows, cols = mask.nonzero(as_tuple=True)
    states, targets = hidden[rows, cols], shift_labels[rows, cols]
    checkpointed = torch.is_grad_enabled()
    pieces = []
    # At least one (maybe empty) chunk, so the result stays attached to the graph without supervision.
    for start in range(0, max(len(targets), 1), chunk_tokens):
        piece = (states[start : start + chunk_tokens], targets[start : start + chunk_tokens], head)
        if checkpointed:
            pieces.append(checkpoint(_token_nll, *piece, use_reentrant=False))
        else:
            pieces.append(_token_nll(*piece))
    nll = torch.cat(pieces)
    # Scattered back to [B, T-1] and summed along T, so the sums add up in the reference's order.
    per_token = torch.zeros(mask.shape, dtype=nll.dtype, device=nll.device).index_put((rows, cols), nll)
    return per_token.sum(dim=1), mask.sum(dim=1)


class LlavaModule(L.LightningModule):
    """LLaVA-1.5 visual instruction tuning.

    Build paths (exactly one): `pretrained` (a HF LLaVA checkpoint or folder); `language_model` +
    `vision_tower` (+ `projector_path` in the original `mm_projector.bin` format), as LLaVA-1.5 stage 2
    starts; or `tiny` (random weights from a small config, seeded by `init_seed`).

    Args:
        pretrained: HF LLaVA model id or local folder.
        language_model: causal LM id or folder (path b).
        vision_tower: CLIP vision id or folder (path b).
        projector_path: stage-1 projector weights (`model.mm_projector.{0,2}.*`) (path b).
        tiny: tiny random LLaVA config (path c).
        tokenizer: tokenizer folder for path c (`demo` builds the offline demo tokenizer).
        finetune: `full`, `lora` or `qlora` (4-bit NF4 base via bitsandbytes).
        lora: LoRA settings for `lora`/`qlora`.
        freeze_vision_tower: keep CLIP frozen (LLaVA-1.5 does).
        train_projector: train the multi-modal projector.
        projector_lr: a separate learning rate for the projector (None: the optimizer's).
        gradient_checkpointing: non-reentrant, so `torch.autograd.grad` still works.
        torch_dtype: dtype to load pretrained weights in (`bfloat16`, `float16`, `float32`).
        optimizer: optimizer callable over parameter groups.
        lr_scheduler: `(optimizer, total_steps) -> scheduler`, stepped per optimizer step; None for constant.
        val_max_new_tokens: greedy generation length for validation metrics.
        init_seed: seed for the tiny model's random weights (so a rebuild gives the same weights).
    """

    def __init__(
        self,
        pretrained: str | None = None,
        language_model: str | None = None,
        vision_tower: str | None = None,
        projector_path: str | None = None,
        tiny: TinyLlavaConfig | None = None,
        tokenizer: str | None = None,
        finetune: FinetuneMode = "lora",
        lora: LoraSettings | None = None,
        freeze_vision_tower: bool = True,
        train_projector: bool = True,
        projector_lr: float | None = None,
        gradient_checkpointing: bool = False,
        torch_dtype: Literal["bfloat16", "float16", "float32"] | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: SchedulerCallable | None = WarmupCosineLR,
        val_max_new_tokens: int = 16,
        init_seed: int = 0,
    ):
        super().__init__()
        sources = [pretrained is not None, language_model is not None or vision_tower is not None, tiny is not None]
        if sum(sources) != 1:
            raise ValueError(
                "model: give exactly one of `pretrained`, (`language_model` + `vision_tower`), or `tiny`"
            )
        if (language_model is None) != (vision_tower is None):
            raise ValueError("model: `language_model` and `vision_tower` go together")
        if finetune not in ("full", "lora", "qlora"):
            raise ValueError(f"model.finetune must be full|lora|qlora, got {finetune!r}")
        if torch_dtype not in (None, "bfloat16", "float16", "float32"):
            raise ValueError(f"model.torch_dtype must be bfloat16|float16|float32, got {torch_dtype!r}")
        # Dataclass arguments may arrive as dicts (LightningCLI, load_from_checkpoint); hyper-parameters
        # keep plain dicts so checkpoints load with `weights_only=True`.
        tiny = TinyLlavaConfig(**tiny) if isinstance(tiny, dict) else tiny
        lora = LoraSettings(**lora) if isinstance(lora, dict) else lora
        self.tiny = tiny
        tiny = None if tiny is None else asdict(tiny)  # noqa: F841 (read by save_hyperparameters)
        lora_settings, lora = lora, None if lora is None else asdict(lora)
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        lora = lora_settings
        self.sources = {
            "pretrained": pretrained,
            "language_model": language_model,
            "vision_tower": vision_tower,
            "projector_path": projector_path,
            "tokenizer": tokenizer,
        }
        self.torch_dtype = torch_dtype
        self.init_seed = init_seed
        self.finetune = finetune
        self.lora_settings = lora or LoraSettings()
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler
        self.projector_lr = projector_lr
        self.val_max_new_tokens = val_max_new_tokens
        # Frozen weights are recoverable from their source, so checkpoints keep trainable ones only.
        self.strict_loading = False
        self.nll_chunk_tokens = NLL_CHUNK_TOKENS

        self.processor = self._build_processor()
        self.model = self._build_model()
        self._apply_finetune_mode(freeze_vision_tower, train_projector, gradient_checkpointing)
        self.val_metrics: torch.nn.ModuleDict | None = None
        self._requires_grad_before_reference: dict[str, bool] | None = None

    # ---------------------------------------------------------------- building
    @property
    def llava(self) -> Any:
        """The underlying `LlavaForConditionalGeneration` (unwrapped from peft)."""
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    def _load_dtype(self) -> torch.dtype | None:
        return getattr(torch, self.torch_dtype) if self.torch_dtype else None

    def _build_processor(self) -> Any:
        from transformers import AutoProcessor, AutoTokenizer, LlavaProcessor
        from transformers.models.clip import CLIPImageProcessorPil

        src = self.sources
        if src["pretrained"] is not None:
            return AutoProcessor.from_pretrained(src["pretrained"])
        if self.tiny is not None:
            tok_path = src["tokenizer"]
            if tok_path is None or tok_path == "demo":
                from lightning_tive.data.tokenizer import demo_tokenizer_path

                tok_path = str(demo_tokenizer_path())
            tokenizer = AutoTokenizer.from_pretrained(tok_path)
            size = self.tiny.image_size
            image_processor = CLIPImageProcessorPil(
                size={"shortest_edge": size}, crop_size={"height": size, "width": size}
            )
            patch = self.tiny.patch_size
        else:
            from transformers import CLIPVisionConfig

            tokenizer = AutoTokenizer.from_pretrained(src["language_model"], use_fast=True)
            image_processor = CLIPImageProcessorPil.from_pretrained(src["vision_tower"])
            patch = CLIPVisionConfig.from_pretrained(src["vision_tower"]).patch_size
        _ensure_special_tokens(tokenizer)
        return LlavaProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            patch_size=patch,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
        )

    def _quantization_config(self) -> Any:
        from transformers import BitsAndBytesConfig

        compute = self._load_dtype() or torch.float32
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute,
            # patterns match from the start of the module name (or as a suffix): anchor with .*
            llm_int8_skip_modules=[r".*vision_tower", r".*multi_modal_projector", "lm_head"],
        )

    def _build_model(self) -> Any:
        from transformers import LlavaForConditionalGeneration

        quant = self._quantization_config() if self.finetune == "qlora" else None
        if self.sources["pretrained"] is not None:
            return LlavaForConditionalGeneration.from_pretrained(
                self.sources["pretrained"], dtype=self._load_dtype(), quantization_config=quant
            )
        if self.tiny is not None:
            model = self._build_tiny()
        else:
            model = self._compose_from_parts()
        if quant is None:
            return model
        # 4-bit loading goes through from_pretrained; a temporary folder makes it one code path.
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            return LlavaForConditionalGeneration.from_pretrained(tmp, dtype=self._load_dtype(), quantization_config=quant)

    def _llava_config(self, vision_config: Any, text_config: Any) -> Any:
        from transformers import LlavaConfig

        tokenizer = self.processor.tokenizer
        return LlavaConfig(
            vision_config=vision_config,
            text_config=text_config,
            image_token_index=tokenizer.convert_tokens_to_ids(self.processor.image_token),
            image_seq_length=_image_tokens(self.processor),
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
            projector_hidden_act="gelu",
        )

    def _build_tiny(self) -> Any:
        from transformers import CLIPVisionConfig, LlamaConfig, LlavaForConditionalGeneration

        t: TinyLlavaConfig = self.tiny
        tokenizer = self.processor.tokenizer
        if t.vocab_size is not None and t.vocab_size < len(tokenizer):
            raise ValueError(f"tiny.vocab_size={t.vocab_size} is smaller than the tokenizer ({len(tokenizer)} tokens)")
        vision = CLIPVisionConfig(
            hidden_size=t.vision_hidden_size,
            intermediate_size=t.vision_intermediate_size,
            num_hidden_layers=t.vision_layers,
            num_attention_heads=t.vision_heads,
            image_size=t.image_size,
            patch_size=t.patch_size,
            projection_dim=t.vision_hidden_size,
        )
        text = LlamaConfig(
            vocab_size=len(tokenizer) if t.vocab_size is None else t.vocab_size,
            hidden_size=t.hidden_size,
            intermediate_size=t.intermediate_size,
            num_hidden_layers=t.num_hidden_layers,
            num_attention_heads=t.num_attention_heads,
            num_key_value_heads=t.num_attention_heads,
            max_position_embeddings=t.max_position_embeddings,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.init_seed)
            model = LlavaForConditionalGeneration(self._llava_config(vision, text))
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        return model

    def _compose_from_parts(self) -> Any:
        from transformers import AutoModelForCausalLM, CLIPVisionModel, LlavaForConditionalGeneration

        src = self.sources
        lm = AutoModelForCausalLM.from_pretrained(src["language_model"], dtype=self._load_dtype())
        vision = CLIPVisionModel.from_pretrained(src["vision_tower"], dtype=self._load_dtype())
        tokenizer = self.processor.tokenizer
        if len(tokenizer) > lm.get_input_embeddings().weight.shape[0]:
            lm.resize_token_embeddings(len(tokenizer))
        config = self._llava_config(vision.config, lm.config)
        with torch.device("meta"):
            model = LlavaForConditionalGeneration(config)
        model.model.vision_tower = vision
        model.model.language_model = lm.model
        model.lm_head = lm.lm_head
        projector = type(model.model.multi_modal_projector)(config)  # fresh, on CPU
        if src["projector_path"] is not None:
            projector.load_state_dict(load_llava_projector(src["projector_path"]))
        model.model.multi_modal_projector = projector.to(self._load_dtype() or torch.float32)
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        return model

    def _apply_finetune_mode(self, freeze_vision: bool, train_projector: bool, checkpointing: bool) -> None:
        llava = self.model
        if checkpointing:
            llava.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if self.finetune == "qlora":
            from peft import prepare_model_for_kbit_training

            llava = prepare_model_for_kbit_training(
                llava,
                use_gradient_checkpointing=checkpointing,
                gradient_checkpointing_kwargs={"use_reentrant": False},
            )
        if self.finetune in ("lora", "qlora"):
            from peft import LoraConfig, get_peft_model

            for p in llava.parameters():
                p.requires_grad_(False)
            s = self.lora_settings
            config = LoraConfig(
                r=s.r,
                lora_alpha=s.alpha,
                lora_dropout=s.dropout,
                target_modules=language_model_target_regex(s.target_modules),
                bias="none",
            )
            self.model = get_peft_model(llava, config)
        base = self.llava
        if self.finetune == "full":
            for p in base.model.language_model.parameters():
                p.requires_grad_(True)
            for p in base.lm_head.parameters():
                p.requires_grad_(True)
        for p in base.model.vision_tower.parameters():
            p.requires_grad_(not freeze_vision and self.finetune == "full")
        for p in base.model.multi_modal_projector.parameters():
            p.requires_grad_(train_projector)
        if checkpointing:
            base.enable_input_require_grads()

    # ---------------------------------------------------------------- forward and losses
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
        hidden = llava.model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            pixel_values=self._pixels(batch),
            use_cache=False,  # eval mode would otherwise keep a KV cache of every layer
        ).last_hidden_state
        return chunked_per_example_nll(hidden, batch["labels"], llava.lm_head, self.nll_chunk_tokens)

    def per_example_loss(self, batch: dict) -> torch.Tensor:
        """Each example's mean NLL over its own supervised tokens: a vector [B]."""
        total, count = self.batch_nll(batch)
        return total / count.clamp(min=1)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor | None:
        """LLaVA's loss: the token mean over the batch's supervised tokens."""
        if "input_ids" not in batch:  # every item of this batch was a skipped bad record
            return None
        total, count = self.batch_nll(batch)
        loss = total.sum() / count.sum().clamp(min=1)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(count))
        return loss

    # ---------------------------------------------------------------- evaluation
    def setup(self, stage: str) -> None:
        """Create per-task metrics for the tasks the DataModule holds out."""
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is None or self.val_metrics is not None or not hasattr(datamodule, "task_eval_kind"):
            return
        datamodule.setup(stage)
        if datamodule.val_pool is None:
            return
        self.task_names = list(datamodule.task_names)
        present = sorted(set(datamodule.val_pool.task_ids.tolist()))
        self.eval_kinds = {self.task_names[t]: datamodule.task_eval_kind(self.task_names[t]) for t in present}
        metrics = {}
        for task, kind in self.eval_kinds.items():
            metrics[_key(task, "loss")] = MeanScore()
            if kind != "loss_only":
                metrics[_key(task, kind)] = MeanScore()
        self.val_metrics = torch.nn.ModuleDict(metrics)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """Per-task loss, and greedy-generation scores for tasks that have them."""
        self._eval_step(batch)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        """Same metrics as validation."""
        self._eval_step(batch)

    def _eval_step(self, batch: dict) -> None:
        if self.val_metrics is None or "input_ids" not in batch:
            return
        losses = self.per_example_loss(batch)
        tasks = [self.task_names[t] for t in batch["task_id"].tolist()]
        for task in set(tasks):
            rows = torch.tensor([t == task for t in tasks], device=losses.device)
            self.val_metrics[_key(task, "loss")].update(losses[rows])
        need = [self.eval_kinds.get(t, "loss_only") != "loss_only" for t in tasks]
        if not any(need):
            return
        predictions = self.generate_answers(batch)
        for task, kind, prediction, answer, has_prompt in zip(
            tasks,
            (self.eval_kinds[t] for t in tasks),
            predictions,
            batch["answers"],
            batch["has_prompt"].tolist(),
            strict=True,
        ):
            if kind == "loss_only":
                continue
            score = 0.0 if not has_prompt else (exact_match if kind == "exact_match" else token_f1)(prediction, answer)
            self.val_metrics[_key(task, kind)].update(torch.tensor([score], device=losses.device))

    @torch.no_grad()
    def generate_answers(self, batch: dict, max_new_tokens: int | None = None) -> list[str]:
        """Greedy answers to each example's last question (the prompt before its last answer)."""
        tokenizer = self.processor.tokenizer
        inputs = {"input_ids": batch["prompt_ids"], "attention_mask": batch["prompt_attention_mask"]}
        pixels = self._pixels(batch)
        if pixels is not None:  # transformers 5 generate() runs the vision tower even on pixel_values=None
            inputs["pixel_values"] = pixels
        output = self.model.generate(
            **inputs,
            max_new_tokens=max_new_tokens or self.val_max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        new_tokens = output[:, batch["prompt_ids"].shape[1] :]
        return [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]

    def on_validation_epoch_end(self) -> None:
        """Log `val/<task>/<metric>`, `val/loss` and `val/avg_accuracy`."""
        self._log_eval("val")

    def on_test_epoch_end(self) -> None:
        """Log `test/<task>/<metric>`."""
        self._log_eval("test")

    def _log_eval(self, prefix: str) -> None:
        if self.val_metrics is None:
            return
        losses, accuracies, scores = [], [], []
        for task, kind in self.eval_kinds.items():
            if not self.val_metrics[_key(task, "loss")].update_called:
                continue  # this task had no batch (e.g. limit_val_batches)
            loss = self.val_metrics[_key(task, "loss")].compute()
            if not torch.isnan(loss):
                losses.append(loss)
                self.log(f"{prefix}/{task}/loss", loss, sync_dist=False)
            if kind != "loss_only" and self.val_metrics[_key(task, kind)].update_called:
                value = self.val_metrics[_key(task, kind)].compute()
                if not torch.isnan(value):
                    name = "accuracy" if kind == "exact_match" else "token_f1"
                    self.log(f"{prefix}/{task}/{name}", value, sync_dist=False)
                    scores.append(value)
                    if kind == "exact_match":
                        accuracies.append(value)
        for metric in self.val_metrics.values():
            metric.reset()
        if losses:
            self.log(f"{prefix}/loss", torch.stack(losses).mean(), prog_bar=True, sync_dist=False)
        if accuracies:
            self.log(f"{prefix}/avg_accuracy", torch.stack(accuracies).mean(), prog_bar=True, sync_dist=False)
        if scores:
            self.log(f"{prefix}/avg_score", torch.stack(scores).mean(), sync_dist=False)

    # ---------------------------------------------------------------- optimisation
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

    # ---------------------------------------------------------------- TIVE reference adapter
    def add_reference_adapter(self, settings: LoraSettings, seed: int) -> list[tuple[str, torch.nn.Linear]]:
        """Add a fresh, seeded LoRA adapter on the LM as the only active and trainable one.

        Returns the adapter's `lora_A`/`lora_B` Linear layers, whose weights TIVE differentiates.
        """
        from peft import LoraConfig, get_peft_model

        from lightning_tive.tive.grads import find_lora_layers

        if self._requires_grad_before_reference is not None:
            raise RuntimeError("a TIVE reference adapter is already present")
        self._requires_grad_before_reference = {n: p.requires_grad for n, p in self.named_parameters()}
        config = LoraConfig(
            r=settings.r,
            lora_alpha=settings.alpha,
            lora_dropout=settings.dropout,
            target_modules=language_model_target_regex(settings.target_modules),
            bias="none",
        )
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(seed)
            if hasattr(self.model, "add_adapter") and hasattr(self.model, "peft_config"):
                self.model.add_adapter(REFERENCE_ADAPTER, config)
                self.model.set_adapter(REFERENCE_ADAPTER)
            else:  # full fine-tuning: wrap for the warm-up, unwrapped again in remove_reference_adapter
                self.model = get_peft_model(self.model, config, adapter_name=REFERENCE_ADAPTER)
        for name, param in self.named_parameters():
            param.requires_grad_(f".{REFERENCE_ADAPTER}." in name)
        return find_lora_layers(self.model, REFERENCE_ADAPTER)

    def remove_reference_adapter(self) -> None:
        """Drop the reference adapter and restore exactly which parameters train."""
        if self._requires_grad_before_reference is None:
            return
        if self.finetune == "full":
            self.model = self.model.unload()
        else:
            self.model.set_adapter("default")
            self.model.delete_adapter(REFERENCE_ADAPTER)
        before = self._requires_grad_before_reference
        for name, param in self.named_parameters():
            param.requires_grad_(before[name])
        self._requires_grad_before_reference = None

    # ---------------------------------------------------------------- checkpoints and export
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

    def merged_model(self) -> Any:
        """A plain `LlavaForConditionalGeneration` with LoRA merged in (for export)."""
        if hasattr(self.model, "merge_and_unload"):
            return self.model.merge_and_unload()
        return self.model

    def export(self, output_dir: str | os.PathLike) -> Path:
        """Write a merged HF model and processor that `from_pretrained` loads."""
        output_dir = Path(output_dir)
        merged = self.merged_model()
        merged.save_pretrained(output_dir)
        self.processor.save_pretrained(output_dir)
        return output_dir


def load_llava_projector(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read an original LLaVA `mm_projector.bin` and map its keys onto transformers' projector."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    mapping = {"0.weight": "linear_1.weight", "0.bias": "linear_1.bias", "2.weight": "linear_2.weight", "2.bias": "linear_2.bias"}
    out = {}
    for key, value in state.items():
        suffix = key.split("mm_projector.")[-1]
        if suffix not in mapping:
            raise KeyError(f"{path}: unexpected projector key {key!r} (expected model.mm_projector.{{0,2}}.{{weight,bias}})")
        out[mapping[suffix]] = value
    if len(out) != 4:
        raise KeyError(f"{path}: expected 4 projector tensors, found {sorted(state)}")
    return out


def _ensure_special_tokens(tokenizer: Any) -> None:
    if "<image>" not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    if tokenizer.pad_token is None:
        # LLaVA-1.5 pads vicuna with <unk>; no new embedding row is needed.
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token


def _image_tokens(processor: Any) -> int:
    from lightning_tive.data.images import image_token_count

    return image_token_count(processor)


def _key(task: str, metric: str) -> str:
    return f"{re.sub(r'[^A-Za-z0-9_]', '_', task)}__{metric}"
