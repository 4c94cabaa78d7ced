"""Which weights train: full / LoRA / QLoRA on a built LLaVA, and TIVE's reference adapter beside them.

LoRA targets only the language model (a regex anchored on its layers keeps CLIP's q/k/v_proj out).
The reference adapter is a second, seeded LoRA adapter that TIVE warms up and differentiates; it is
added active (`add_reference_adapter`), or reserved inactive before FSDP shards the model
(`reserve_reference_adapter`), and removed with the trainable flags restored exactly.
"""

from __future__ import annotations

import re
from dataclasses import asdict
from typing import Any

import torch

from lightning_tive.model.settings import FinetuneMode, LoraSettings

REFERENCE_ADAPTER = "tive_reference"


def language_model_target_regex(targets: list[str]) -> str:
    """A peft `target_modules` regex anchored on the LM's layers, so CLIP's q/k/v_proj stay out."""
    for name in targets:
        if not re.fullmatch(r"[A-Za-z0-9_]+", name):
            raise ValueError(f"LoRA target module names are plain suffixes like 'q_proj', got {name!r}")
    return rf".*language_model\.layers\.\d+\.(self_attn|mlp)\.({'|'.join(targets)})"


def lora_config(settings: LoraSettings) -> Any:
    """The peft `LoraConfig` of `settings`, on the language model's layers only."""
    from peft import LoraConfig

    return LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=language_model_target_regex(settings.target_modules),
        bias="none",
    )


def unwrap_peft(model: Any) -> Any:
    """The `LlavaForConditionalGeneration` inside a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def apply_finetune_mode(
    model: Any, finetune: FinetuneMode, lora: LoraSettings, freeze_vision: bool, freeze_language: bool,
    train_projector: bool, checkpointing: bool,
) -> Any:
    """Set which weights train (wrapping the model with peft for LoRA / QLoRA); returns the model to train."""
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if finetune == "qlora":
        from peft import prepare_model_for_kbit_training

        keep_4bit_layout_on_cpu(model)

        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    if finetune in ("lora", "qlora"):
        from peft import get_peft_model

        for p in model.parameters():
            p.requires_grad_(False)
        # On a skeleton peft would draw the adapter on the CPU first (1.3 GB at 7B, r=128) only to move it.
        model = get_peft_model(model, lora_config(lora), low_cpu_mem_usage=_on_meta(model))
    base = unwrap_peft(model)
    if finetune == "full":
        for p in base.model.language_model.parameters():
            p.requires_grad_(not freeze_language)
        for p in base.lm_head.parameters():
            p.requires_grad_(not freeze_language)
    for p in base.model.vision_tower.parameters():
        p.requires_grad_(not freeze_vision and finetune == "full")
    projector = base.model.multi_modal_projector
    for p in projector.parameters():
        p.requires_grad_(train_projector)
    if train_projector:
        keep_projector_fp32(projector)
    if checkpointing:
        base.enable_input_require_grads()
    return model


def keep_projector_fp32(projector: torch.nn.Module) -> None:
    """A trained projector keeps float32 weights whatever dtype the rest loaded in.

    In bf16 an AdamW step at lr 2e-5 (~2e-5 per weight) is below half an ulp of a weight of ~0.02
    (~6e-5), so most updates would round away. Its input is cast to its dtype (under autocast the
    matmuls still run in bf16); LLaVA casts its output to the embeddings' dtype.
    """
    if all(p.dtype == torch.float32 for p in projector.parameters()):
        return
    projector.float()
    projector.register_forward_pre_hook(_inputs_to_float32)


def _inputs_to_float32(module: torch.nn.Module, args: tuple) -> tuple:
    return tuple(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)


def keep_4bit_layout_on_cpu(model: torch.nn.Module) -> None:
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


class ReferenceAdapterMixin:
    """`LlavaModule`'s TIVE reference adapter: add, reserve (for FSDP) and remove it.

    Uses the module's `model`, `finetune` and `sharded`; its state is `_reference`: None, or the
    adapter's settings key, the trainable flags from before it and whether it is active.
    """

    def _init_reference_adapter(self) -> None:
        self._reference: dict | None = None

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

    def _reserve_again(self) -> None:
        """After the model was rebuilt: reserve the adapter that was reserved on the one it replaced."""
        if self._reference is not None:
            settings, seed = self._reference["key"]["settings"], self._reference["key"]["seed"]
            self._reference = None
            self.reserve_reference_adapter(LoraSettings(**settings), seed)

    def _inject_reference(self, settings: LoraSettings, seed: int) -> None:
        from peft import get_peft_model

        self._reference = {
            "key": {"settings": asdict(settings), "seed": seed},
            "flags": {n: p.requires_grad for n, p in self.named_parameters()},
            "active": False,
        }
        config = lora_config(settings)
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(seed)
            if hasattr(self.model, "add_adapter") and hasattr(self.model, "peft_config"):
                self.model.add_adapter(REFERENCE_ADAPTER, config, low_cpu_mem_usage=_on_meta(self.model))
            else:  # full fine-tuning: wrap for the warm-up, unwrapped again in remove_reference_adapter
                self.model = get_peft_model(
                    self.model, config, adapter_name=REFERENCE_ADAPTER, low_cpu_mem_usage=_on_meta(self.model)
                )

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


def _without_reference_wrapper(name: str) -> str:
    """A parameter's name without the peft wrapper that a full fine-tune's reference adapter adds."""
    return name.replace(".base_model.model.", ".", 1).replace(".base_layer.", ".")


def _on_meta(model: torch.nn.Module) -> bool:
    """Whether `model` is a skeleton on the meta device (its first parameter tells)."""
    return next(model.parameters()).is_meta
