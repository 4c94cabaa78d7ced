"""Writing files and cache folders so that a crash never leaves a half-written one in place."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_write(path: str | os.PathLike, content: str | bytes | Callable[[Any], None], binary: bool = False) -> None:
    """Write `content` (text, bytes, or a function given the open file) to a temporary file, fsync, rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    binary = binary or isinstance(content, bytes)
    options = {} if binary else {"encoding": "utf-8", "newline": ""}
    try:
        with open(tmp, "wb" if binary else "w", **options) as f:
            if callable(content):
                content(f)
            else:
                f.write(content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """`torch.save` through `atomic_write`."""
    import torch

    atomic_write(path, lambda f: torch.save(obj, f), binary=True)


def build_cache_folder(final: Path, build: Callable[[Path], None], complete_marker: str) -> Path:
    """Build a cache folder once, race-safe: `build(tmp)` fills a temporary folder that is renamed into place.

    A folder holding `complete_marker` is complete (it only appears by rename); when another process
    renames its copy first, that one is used.
    """
    if (final / complete_marker).is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        build(tmp)
        os.rename(tmp, final)
    except OSError as err:
        if not (final / complete_marker).is_file():
            raise RuntimeError(f"could not create the cache folder {final} (incomplete? delete it): {err}") from err
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final
