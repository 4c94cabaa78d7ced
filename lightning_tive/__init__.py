"""lightning_tive: LLaVA-1.5 visual instruction tuning in Lightning, with TIVE data selection."""

__version__ = "0.1.0"
