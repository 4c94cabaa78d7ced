"""Writing files and cache folders so that a crash never leaves a half-written one in place."""

from __future__ import annotations

import hashlib
import json
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


def sha256_file(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def memoised_sha256(path: str | os.PathLike, memo_dir: str | os.PathLike) -> str:
    """The file's sha256, hashed again only when its path, size or mtime changed.

    Hashing a 7B GGUF (~3.9 GB) or LLaVA-665K's JSON (~1 GB) takes seconds on every start and in
    every process; the memo makes a repeated start a `stat` and a small read.
    """
    path = Path(path)
    stat = path.stat()
    key = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:24]
    memo = Path(memo_dir) / f"{key}.json"
    stamp = {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    try:
        saved = json.loads(memo.read_text())
        if {k: saved.get(k) for k in stamp} == stamp and isinstance(saved.get("sha256"), str):
            return saved["sha256"]
    except (OSError, ValueError):
        pass
    sha = sha256_file(path)
    memo.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(memo, json.dumps({**stamp, "sha256": sha}) + "\n")
    return sha
