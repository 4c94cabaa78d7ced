"""Shared fixtures: an isolated cache, the offline tokenizer and a tiny LLaVA module."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    """Tokenizer and demo caches live in a per-session folder, never the user's home."""
    if "LIGHTNING_TIVE_CACHE" not in os.environ:
        os.environ["LIGHTNING_TIVE_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    return os.environ["LIGHTNING_TIVE_CACHE"]


@pytest.fixture(scope="session")
def tiny_module():
    """A tiny LoRA LlavaModule (random weights, offline tokenizer)."""
    from lightning_tive.model import LlavaModule, TinyLlavaConfig

    return LlavaModule(tiny=TinyLlavaConfig(), finetune="lora")


@pytest.fixture(scope="session")
def processor(tiny_module):
    """The tiny module's LlavaProcessor."""
    return tiny_module.processor


@pytest.fixture(scope="session")
def tokenizer(processor):
    """The offline demo tokenizer."""
    return processor.tokenizer
