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

from lightning_tive.metrics import exact_match, token_f1

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
class VisionTowerConfig:
    """A randomly initialised CLIP vision tower (seeded by `init_seed`), to compose with a pretrained LM."""

    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    image_size: int = 64
    patch_size: int = 16

    def __post_init__(self) -> None:
        if self.num_hidden_layers < 2:
            raise ValueError("vision_config.num_hidden_layers must be >= 2 (LLaVA reads the second-to-last layer)")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("vision_config.hidden_size must be a multiple of num_attention_heads")
        if self.image_size % self.patch_size:
            raise ValueError("vision_config.image_size must be a multiple of patch_size")

    def clip_config(self) -> Any:
        """The `CLIPVisionConfig` it describes."""
        return clip_vision_config(
            self.hidden_size, self.intermediate_size, self.num_hidden_layers, self.num_attention_heads,
            self.image_size, self.patch_size,
        )


def clip_vision_config(hidden: int, intermediate: int, layers: int, heads: int, image_size: int, patch_size: int) -> Any:
    """A `CLIPVisionConfig` for a randomly initialised tower (projection width = hidden width)."""
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=heads,
        image_size=image_size, patch_size=patch_size, projection_dim=hidden,
    )


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
    hidden: torch.Tensor, labels: torch.Tensor, head: torch.nn.Module, chunk_tokens: int = NLL_CHUNK_TOKENS,
    min_chunks: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`per_example_nll(head(hidden), labels)` from last hidden states, never holding more than one chunk's logits.

    Only supervised positions go through ``head`` (in float32 after it, as in the reference), in chunks
    of ``chunk_tokens``, each under non-reentrant checkpointing so its logits are recomputed in
    backward instead of kept from the forward. ``min_chunks`` pads with empty chunks, so ``head`` runs
    that many times at least (under FSDP every process must run it equally often).
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
    for start in range(0, max(len(targets), 1, min_chunks * chunk_tokens), chunk_tokens):
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
    (`vision_tower` or `vision_config`) (+ `projector_path` in the original `mm_projector.bin` format),
    as LLaVA-1.5 stage 2 starts; or `tiny` (random weights from a small config, seeded by `init_seed`).

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
        torch_dtype: Literal["bfloat16", "float16", "float32"] | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: SchedulerCallable | None = WarmupCosineLR,
        val_max_new_tokens: int = 16,
        init_seed: int = 0,
        init_from: str | None = None,
    ):
        super().__init__()
        composed = language_model is not None or vision_tower is not None or vision_config is not None
        if sum([pretrained is not None, composed, tiny is not None]) != 1:
            raise ValueError(
                "model: give exactly one of `pretrained`, (`language_model` + `vision_tower` or "
                "`vision_config`), or `tiny`"
            )
        if composed and language_model is None:
            raise ValueError("model: `vision_tower` / `vision_config` need a `language_model` to compose with")
        if composed and (vision_tower is None) == (vision_config is None):
            raise ValueError(
                "model: `language_model` takes exactly one vision source: `vision_tower` (pretrained CLIP) "
                "or `vision_config` (random CLIP tower)"
            )
        if gguf_file is not None and language_model is None:
            raise ValueError("model: `gguf_file` names a file inside the `language_model` folder; give both")
        if projector_path is not None and not composed:
            raise ValueError("model: `projector_path` is for the composed path (`language_model` + vision tower)")
        if tokenizer is not None and tiny is None:
            raise ValueError(
                "model: `tokenizer` is for the `tiny` path; `pretrained` and `language_model` bring their own"
            )
        if finetune not in ("full", "lora", "qlora"):
            raise ValueError(f"model.finetune must be full|lora|qlora, got {finetune!r}")
        if torch_dtype not in (None, "bfloat16", "float16", "float32"):
            raise ValueError(f"model.torch_dtype must be bfloat16|float16|float32, got {torch_dtype!r}")
        # Dataclass arguments may arrive as dicts (LightningCLI, load_from_checkpoint); hyper-parameters
        # keep plain dicts so checkpoints load with `weights_only=True`.
        tiny = TinyLlavaConfig(**tiny) if isinstance(tiny, dict) else tiny
        vision_config = VisionTowerConfig(**vision_config) if isinstance(vision_config, dict) else vision_config
        lora = LoraSettings(**lora) if isinstance(lora, dict) else lora
        self.tiny = tiny
        self.vision_config = vision_config
        tiny = None if tiny is None else asdict(tiny)  # noqa: F841 (read by save_hyperparameters)
        vision_config = None if vision_config is None else asdict(vision_config)  # noqa: F841 (idem)
        lora_settings, lora = lora, None if lora is None else asdict(lora)
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        lora = lora_settings
        self.sources = {
            "pretrained": pretrained,
            "language_model": language_model,
            "vision_tower": vision_tower,
            "projector_path": projector_path,
            "gguf_file": gguf_file,
            "tokenizer": tokenizer,
        }
        self.load_seconds: dict[str, float | bool] = {}  # language-model load timings (GGUF path)
        self._lm_dir: str | None = None
        self.torch_dtype = torch_dtype
        self.init_seed = init_seed
        self.init_from = init_from
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
        self._apply_finetune_mode(freeze_vision_tower, freeze_language_model, train_projector, gradient_checkpointing)
        # `from_pretrained` returns a model in eval mode and Lightning (>= 2.3) keeps submodules' modes,
        # so without this LoRA dropout (and checkpointing, which transformers skips in eval) would be off.
        self.train()
        self.val_metrics: torch.nn.ModuleDict | None = None
        # The TIVE reference adapter: None, or its settings key, the trainable flags from before it and
        # whether it is active (added early and inactive when FSDP must shard it with the model).
        self._reference: dict | None = None
        self._shard_group: Any = None  # the data-parallel process group once configure_model sharded the model
        self._needs_dummy_image = False
        self._spare_batches: dict[str, dict] = {}  # sharded: the last batch of each stage, run by a process with none

    # ---------------------------------------------------------------- building
    @property
    def llava(self) -> Any:
        """The underlying `LlavaForConditionalGeneration` (unwrapped from peft)."""
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    def _load_dtype(self) -> torch.dtype | None:
        return getattr(torch, self.torch_dtype) if self.torch_dtype else None

    def _language_model_dir(self) -> str:
        """Where the composed path loads the LM and its tokenizer: `language_model`, or the float cache
        of `gguf_file` (dequantised the first time)."""
        if self._lm_dir is None:
            src = self.sources
            if src["gguf_file"] is None:
                self._lm_dir = src["language_model"]
            else:
                from lightning_tive.weights import gguf_language_model_dir

                folder, timings = gguf_language_model_dir(Path(src["language_model"]) / src["gguf_file"])
                self._lm_dir = str(folder)
                self.load_seconds.update(timings)
        return self._lm_dir

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
            image_processor, patch = _offline_image_processor(self.tiny.image_size), self.tiny.patch_size
        else:
            from transformers import CLIPVisionConfig

            tokenizer = AutoTokenizer.from_pretrained(self._language_model_dir(), use_fast=True)
            if self.vision_config is not None:
                image_processor = _offline_image_processor(self.vision_config.image_size)
                patch = self.vision_config.patch_size
            else:
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
            if quant is not None and self.init_from is not None:
                raise ValueError(
                    "model.init_from cannot be applied to a 4-bit `pretrained` load; export the init_from run "
                    "(`python -m lightning_tive export`) and pass that folder as model.pretrained"
                )
            model = LlavaForConditionalGeneration.from_pretrained(
                self.sources["pretrained"], dtype=self._load_dtype(), quantization_config=quant
            )
        elif self.tiny is not None:
            model = self._build_tiny()
        else:
            model = self._compose_from_parts()
        if self.init_from is not None:
            load_init_weights(model, self.init_from, self._build_source())
        if quant is None or self.sources["pretrained"] is not None:
            return model
        # 4-bit loading goes through from_pretrained; a temporary folder makes it one code path.
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            return LlavaForConditionalGeneration.from_pretrained(tmp, dtype=self._load_dtype(), quantization_config=quant)

    def _build_source(self) -> dict:
        """The hyper-parameters that decide the built (pre-fine-tuning) weights."""
        return {key: self.hparams.get(key) for key in BUILD_SOURCE_KEYS}

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
        from transformers import LlamaConfig, LlavaForConditionalGeneration

        t: TinyLlavaConfig = self.tiny
        tokenizer = self.processor.tokenizer
        if t.vocab_size is not None and t.vocab_size < len(tokenizer):
            raise ValueError(f"tiny.vocab_size={t.vocab_size} is smaller than the tokenizer ({len(tokenizer)} tokens)")
        vision = clip_vision_config(
            t.vision_hidden_size, t.vision_intermediate_size, t.vision_layers, t.vision_heads, t.image_size, t.patch_size
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
        import time

        from transformers import AutoModelForCausalLM, CLIPVisionModel, LlavaForConditionalGeneration

        src = self.sources
        dtype = self._load_dtype() or torch.float32
        start = time.perf_counter()
        lm = AutoModelForCausalLM.from_pretrained(self._language_model_dir(), dtype=self._load_dtype())
        self.load_seconds["language_model_s"] = time.perf_counter() - start
        tokenizer = self.processor.tokenizer
        resize_embeddings(lm, len(tokenizer))
        if self.vision_config is not None:
            vision_config = self.vision_config.clip_config()
            vision = None
        else:
            vision = CLIPVisionModel.from_pretrained(src["vision_tower"], dtype=self._load_dtype())
            vision_config = vision.config
        config = self._llava_config(vision_config, lm.config)
        with torch.device("meta"):
            model = LlavaForConditionalGeneration(config)
        # Random parts come from `init_seed` alone, so a rebuild (checkpoint load, export) matches.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.init_seed)
            if vision is None:
                vision = CLIPVisionModel(vision_config).to(dtype)
            projector = type(model.model.multi_modal_projector)(config)  # fresh, on CPU
        model.model.vision_tower = vision
        model.model.language_model = lm.model
        model.lm_head = lm.lm_head
        if src["projector_path"] is not None:
            projector.load_state_dict(load_llava_projector(src["projector_path"]))
        model.model.multi_modal_projector = projector.to(dtype)
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        eos = lm.generation_config.eos_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id if eos is None else eos
        return model

    def _apply_finetune_mode(
        self, freeze_vision: bool, freeze_language: bool, train_projector: bool, checkpointing: bool
    ) -> None:
        llava = self.model
        if checkpointing:
            llava.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if self.finetune == "qlora":
            from peft import prepare_model_for_kbit_training

            _keep_4bit_layout_on_cpu(llava)

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
                p.requires_grad_(not freeze_language)
            for p in base.lm_head.parameters():
                p.requires_grad_(not freeze_language)
        for p in base.model.vision_tower.parameters():
            p.requires_grad_(not freeze_vision and self.finetune == "full")
        for p in base.model.multi_modal_projector.parameters():
            p.requires_grad_(train_projector)
        if checkpointing:
            base.enable_input_require_grads()

    # ---------------------------------------------------------------- sharding (FSDP2)
    @property
    def sharded(self) -> bool:
        """Whether configure_model sharded the model with FSDP2."""
        return self._shard_group is not None

    def configure_model(self) -> None:
        """Shard with FSDP2 under ModelParallelStrategy; nothing under any other strategy.

        One FSDP unit per decoder layer of the LM and of the vision tower, one for `lm_head`, and the
        LLaVA model (embeddings, projector, norms) as the root. A TIVE reference adapter reserved before
        (`reserve_reference_adapter`) is sharded with the layers that hold it. Under `bf16-mixed` the
        weights stay fp32 (the optimizer's master copy) and FSDP gathers and computes them in bf16.
        """
        mesh = self.device_mesh
        if mesh is None or self.sharded:
            return
        from torch.distributed.fsdp import fully_shard

        from lightning_tive.sharding import data_parallel_mesh

        if self.finetune == "qlora":
            raise ValueError("model.finetune=qlora keeps 4-bit base weights, which FSDP2 does not shard here; use lora")
        strategy = self._trainer.strategy if self._trainer is not None else None
        if getattr(strategy, "_save_distributed_checkpoint", False):
            # Checkpoints keep trainable weights only, and a distributed checkpoint loads only in full.
            raise ValueError(
                "set ModelParallelStrategy(save_distributed_checkpoint=False): lightning_tive's checkpoints keep the "
                "trainable weights only, gathered into one file by process 0, which `fit --ckpt_path` and `export` read"
            )
        mesh = data_parallel_mesh(mesh)
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
        fully_shard(llava.model, **options)
        if "mp_policy" in options:
            from lightning_tive.sharding import sync_mixed_precision

            # after FSDP's own pre-forward hooks, which fix the dtypes at the first forward
            llava.model.register_forward_pre_hook(lambda *_: sync_mixed_precision(llava))
        llava.model.language_model.register_forward_pre_hook(self._dummy_image_hook, with_kwargs=True)
        self._shard_group = mesh.get_group()

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
        from torchmetrics import MeanMetric

        metrics = {}
        for task, kind in self.eval_kinds.items():
            metrics[_key(task, "loss")] = MeanMetric()
            if kind != "loss_only":
                metrics[_key(task, kind)] = MeanMetric()
        self.val_metrics = torch.nn.ModuleDict(metrics)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """Per-task loss, and greedy-generation scores for tasks that have them."""
        self._eval_step(batch)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        """Same metrics as validation."""
        self._eval_step(batch)

    def _eval_step(self, batch: dict) -> None:
        if self.val_metrics is None:
            return
        if "input_ids" not in batch:
            if self.sharded:  # every process runs the same forwards: a spare batch, not counted
                spare = self._spare(batch, "eval")
                self.per_example_loss(spare)
                if self._max_over_processes(0, self.device):
                    self.generate_answers(spare)
            return
        if self.sharded:
            self._spare_batches["eval"] = batch
        losses = self.per_example_loss(batch)
        tasks = [self.task_names[t] for t in batch["task_id"].tolist()]
        for task in set(tasks):
            rows = torch.tensor([t == task for t in tasks], device=losses.device)
            self.val_metrics[_key(task, "loss")].update(losses[rows])
        need = any(self.eval_kinds.get(t, "loss_only") != "loss_only" for t in tasks)
        if self.sharded:  # generation runs the model: on every process, or on none
            need = bool(self._max_over_processes(int(need), losses.device))
        if not need:
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
        if self.sharded:  # every process runs as many steps as the longest answer takes, and the vision tower
            inputs["synced_gpus"] = True
            self._needs_dummy_image = pixels is None
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
        import warnings

        losses, accuracies, scores = [], [], []
        # Every process computes every metric in the same order: compute() is a collective, and
        # processes that saw different tasks would otherwise wait on each other forever. A task no
        # process saw (e.g. limit_val_batches) computes to NaN and is not logged.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*compute.*before the.*update.*")
            computed = {key: metric.compute() for key, metric in self.val_metrics.items()}
        for task, kind in self.eval_kinds.items():
            loss = computed[_key(task, "loss")]
            if not torch.isnan(loss):
                losses.append(loss)
                self.log(f"{prefix}/{task}/loss", loss, sync_dist=False)
            if kind == "loss_only":
                continue
            value = computed[_key(task, kind)]
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

        Returns the adapter's `lora_A`/`lora_B` Linear layers, whose weights TIVE differentiates. An
        adapter reserved with the same settings (`reserve_reference_adapter`) is activated instead.
        """
        from lightning_tive.tive.grads import find_lora_layers

        key = {"settings": asdict(settings), "seed": seed}
        if self._reference is None:
            self._inject_reference(settings, seed)
        elif self._reference["active"]:
            raise RuntimeError("a TIVE reference adapter is already present")
        elif self._reference["key"] != key:
            raise ValueError(f"the reserved reference adapter has settings {self._reference['key']}, not {key}")
        if self.finetune == "full":
            self.model.base_model.enable_adapter_layers()
        else:
            self.model.set_adapter(REFERENCE_ADAPTER)
        for name, param in self.named_parameters():
            param.requires_grad_(f".{REFERENCE_ADAPTER}." in name)
        self._reference["active"] = True
        return find_lora_layers(self.model, REFERENCE_ADAPTER)

    def reserve_reference_adapter(self, settings: LoraSettings, seed: int) -> None:
        """Add the reference adapter now, frozen and inactive, for `add_reference_adapter` to activate later.

        Under FSDP the adapter must exist when `configure_model` shards the model; it is initialised
        exactly as `add_reference_adapter` would initialise it.
        """
        if self._reference is not None:
            raise RuntimeError("a TIVE reference adapter is already present")
        if self.sharded:
            raise RuntimeError("reserve the reference adapter before configure_model shards the model")
        self._inject_reference(settings, seed)
        if self.finetune == "full":
            self.model.base_model.disable_adapter_layers()
        else:
            self.model.set_adapter("default")
        before = self._reference["flags"]
        wrapped = self.finetune == "full"  # peft's wrapper renames the base weights until unload()
        for name, param in self.named_parameters():
            param.requires_grad_(before.get(_without_reference_wrapper(name) if wrapped else name, False))

    def _inject_reference(self, settings: LoraSettings, seed: int) -> None:
        from peft import LoraConfig, get_peft_model

        self._reference = {
            "key": {"settings": asdict(settings), "seed": seed},
            "flags": {n: p.requires_grad for n, p in self.named_parameters()},
            "active": False,
        }
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
            else:  # full fine-tuning: wrap for the warm-up, unwrapped again in remove_reference_adapter
                self.model = get_peft_model(self.model, config, adapter_name=REFERENCE_ADAPTER)

    def remove_reference_adapter(self) -> None:
        """Drop the reference adapter and restore exactly which parameters train.

        Under FSDP its (frozen) shards stay in the FSDP units of the layers that held it: FSDP2 cannot
        regroup parameters after sharding, so they are all-gathered with those layers but no longer
        part of the model, its optimizer or its checkpoints.
        """
        if self._reference is None:
            return
        from lightning_tive.tive.grads import find_lora_layers

        for _, layer in find_lora_layers(self.model, REFERENCE_ADAPTER):
            layer.requires_grad_(False)
        if self.finetune == "full":
            self.model = self.model.unload()
        else:
            self.model.set_adapter("default")
            self.model.delete_adapter(REFERENCE_ADAPTER)
        before = self._reference["flags"]
        for name, param in self.named_parameters():
            param.requires_grad_(before[name])
        self._reference = None

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


BUILD_SOURCE_KEYS = (
    "pretrained", "language_model", "gguf_file", "vision_tower", "vision_config", "projector_path", "tiny", "tokenizer",
    "init_seed",
)


def _with_defaults(key: str, value: Any) -> Any:
    """A build setting with its dataclass defaults filled in, so a field added later compares equal."""
    kinds = {"tiny": TinyLlavaConfig, "vision_config": VisionTowerConfig}
    if key in kinds and isinstance(value, dict):
        return asdict(kinds[key](**value))
    return value


def load_init_weights(model: torch.nn.Module, ckpt_path: str | os.PathLike, source: dict, _seen: tuple = ()) -> None:
    """Load a `fit` checkpoint's weights into a freshly built LLaVA (its own `init_from` chain first).

    Checkpoints keep trainable weights only; the rest is rebuilt from the build source, so the
    checkpoint must come from the same source (same pretrained parts, tiny config, seed).
    """
    path = Path(ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(f"model.init_from={path} does not exist (run the stage that writes it first)")
    if path.resolve() in _seen:
        raise ValueError(f"model.init_from chain loops back to {path}")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    hparams = checkpoint.get("hyper_parameters", {})
    for key in BUILD_SOURCE_KEYS:
        if _with_defaults(key, hparams.get(key)) != _with_defaults(key, source.get(key)):
            raise ValueError(
                f"model.init_from={path} was trained from another build source: {key}={hparams.get(key)!r} there, "
                f"{source.get(key)!r} here. Build this model from the same source as that run."
            )
    if hparams.get("init_from"):
        load_init_weights(model, hparams["init_from"], source, (*_seen, path.resolve()))
    state = {}
    for key, value in checkpoint["state_dict"].items():
        name = key.removeprefix("model.").removeprefix("base_model.model.")
        if ".lora_" in name:
            raise ValueError(
                f"model.init_from={path} holds LoRA weights ({name}); export that run "
                "(`python -m lightning_tive export`) and start from the merged folder with model.pretrained"
            )
        state[name] = value
    own = model.state_dict()
    unknown = sorted(k for k in state if k not in own)
    if unknown:
        raise ValueError(f"model.init_from={path} has weights this model lacks (e.g. {unknown[:3]})")
    wrong = sorted(k for k in state if own[k].shape != state[k].shape)
    if wrong:
        raise ValueError(f"model.init_from={path}: shapes differ for {wrong[:3]}")
    with torch.no_grad():
        for name, value in state.items():
            own[name].copy_(value.to(own[name].dtype))


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


def _keep_4bit_layout_on_cpu(model: torch.nn.Module) -> None:
    """Stop bitsandbytes from repacking 4-bit weights on CPU during eval-mode, no-grad forwards.

    On CPUs with AVX512-BF16, `Linear4bit.forward` converts its weight to a CPU-only packed layout the
    first time it runs in eval mode without gradients (validation, generation, a loss probe) and does
    not convert back; training forwards afterwards then get near-zero gradients through the LM, and the
    frozen 4-bit state changes bit-wise. Keeping the standard layout trades that eval fast path for
    correct training.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def resize_embeddings(lm: Any, size: int) -> None:
    """Grow the LM's token embeddings (and an untied `lm_head`) to `size` rows, deterministically.

    Existing rows are kept bit for bit; each new row is the mean of the old ones (no random draw, so a
    rebuild from a checkpoint gives the same frozen weights). Tied embeddings stay tied.
    """
    old = lm.get_input_embeddings().weight.shape[0]
    if size <= old:
        return
    lm.resize_token_embeddings(size, mean_resizing=False)
    with torch.no_grad():
        embed = lm.get_input_embeddings().weight
        embed[old:] = embed[:old].mean(dim=0, keepdim=True)
        head = lm.get_output_embeddings()
        if head is not None and head.weight is not embed:
            head.weight[old:] = head.weight[:old].mean(dim=0, keepdim=True)


def _offline_image_processor(size: int) -> Any:
    """A CLIP-style image processor for `size`-pixel images, built without any download."""
    from transformers.models.clip import CLIPImageProcessorPil

    return CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def _ensure_special_tokens(tokenizer: Any) -> None:
    if "<image>" not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    if tokenizer.pad_token is None:
        # LLaVA-1.5 pads vicuna with <unk>; no new embedding row is needed.
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token


def _without_reference_wrapper(name: str) -> str:
    """A parameter's name without the peft wrapper that a full fine-tune's reference adapter adds."""
    return name.replace(".base_model.model.", ".", 1).replace(".base_layer.", ".")


def _layer_lists(module: torch.nn.Module) -> list[torch.nn.ModuleList]:
    """The `layers` ModuleLists (decoder or encoder blocks) inside `module`."""
    return [sub for name, sub in module.named_modules() if name.split(".")[-1] == "layers" and isinstance(sub, torch.nn.ModuleList)]


def _image_tokens(processor: Any) -> int:
    from lightning_tive.data.images import image_token_count

    return image_token_count(processor)


def _key(task: str, metric: str) -> str:
    return f"{re.sub(r'[^A-Za-z0-9_]', '_', task)}__{metric}"
