"""Data layer: LLaVA-format records, conversation template, collator, tasks, DataModule, demo."""

from lightning_tive.data.datamodule import LlavaDataModule
from lightning_tive.data.demo import DemoConfig

__all__ = ["DemoConfig", "LlavaDataModule"]
