"""The model's settings a config names: tiny and vision-tower shapes, LoRA hyper-parameters, fine-tuning modes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

FinetuneMode = Literal["full", "lora", "qlora"]
FINETUNE_MODES = ("full", "lora", "qlora")
LM_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
LM_MLP = ("gate_proj", "up_proj", "down_proj")


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
