"""lightning_tive: LLaVA-1.5 visual instruction tuning in Lightning, with TIVE data selection."""

from lightning_tive.versions import check_versions

__version__ = "0.1.0"

# Refuse too-old torch / transformers now, with the pip command, rather than deep inside a run.
check_versions()
