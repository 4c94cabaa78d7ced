"""LLaVA-1.5 as a LightningModule, split by job; the names a config or a caller uses are re-exported here.

build.py (sources → model + processor, one entry point) · init_from.py (an earlier run's weights) ·
settings.py (tiny / vision tower / LoRA settings) · adapters.py (full / LoRA / QLoRA, TIVE's reference
adapter) · fsdp.py (FSDP2 sharding) · module.py (LlavaModule: hooks, steps, optimizers, checkpoints) ·
losses.py · schedule.py · evaluation.py (held-out metrics, generation) · export.py (merged HF export).
"""

from lightning_tive.model.adapters import REFERENCE_ADAPTER, language_model_target_regex
from lightning_tive.model.build import (
    BuiltLlava,
    LlavaSource,
    build_llava,
    load_llava_projector,
    resize_embeddings,
)
from lightning_tive.model.init_from import BUILD_SOURCE_KEYS, load_init_weights
from lightning_tive.model.losses import NLL_CHUNK_TOKENS, chunked_per_example_nll, per_example_nll
from lightning_tive.model.module import LlavaModule
from lightning_tive.model.schedule import SchedulerCallable, WarmupCosineLR
from lightning_tive.model.settings import (
    LM_ATTENTION,
    LM_MLP,
    FinetuneMode,
    LoraSettings,
    TinyLlavaConfig,
    VisionTowerConfig,
    clip_vision_config,
)

__all__ = [
    "BUILD_SOURCE_KEYS", "LM_ATTENTION", "LM_MLP", "NLL_CHUNK_TOKENS", "REFERENCE_ADAPTER", "BuiltLlava", "FinetuneMode",
    "LlavaModule", "LlavaSource", "LoraSettings", "SchedulerCallable", "TinyLlavaConfig", "VisionTowerConfig",
    "WarmupCosineLR", "build_llava", "chunked_per_example_nll", "clip_vision_config", "language_model_target_regex",
    "load_init_weights", "load_llava_projector", "per_example_nll", "resize_embeddings",
]
