"""Where lightning_tive caches things (kept import-light: the fetch command uses it before torch loads)."""

from __future__ import annotations

import os
from pathlib import Path


def default_cache_root() -> Path:
    """Cache root shared by the demo, the demo tokenizer and fetched weights.

    `$LIGHTNING_TIVE_CACHE`, or `~/.cache/lightning_tive`.
    """
    env = os.environ.get("LIGHTNING_TIVE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lightning_tive"
