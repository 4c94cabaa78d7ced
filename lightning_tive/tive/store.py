"""On-disk, resumable store of per-example gradient features and norms.

Folder layout::

    meta.json        format, pool_size, proj_dim, dtype, chunk_size, num_chunks, extra settings
    features.npy     [pool_size, proj_dim] float16 (or float32); row i = store row i (a lightning_tive run
                     writes unit vectors, the projected gradient's direction; `feature_norms.npy` holds
                     each row's length, so the projected gradient is their product)
    grad_norms.npy   [pool_size] float32; NaN marks an example whose gradient was not finite
    losses.npy       [pool_size] float32 per-example loss under the reference model (NaN: not recorded)
    tokens.npy       [pool_size] float32 supervised tokens per example (NaN: not recorded)
    feature_norms.npy [pool_size] float32 length of each projected gradient (NaN: not recorded)
    done/NNNNNNNN    one empty marker per finished chunk

Chunk ``c`` holds pool indices ``[c*chunk_size, min((c+1)*chunk_size, pool_size))``. A chunk's rows
are flushed to disk before its marker is created, so after a stop the unfinished chunks are exactly
those without a marker; rewriting them gives the same bytes as an uninterrupted run (given
deterministic features). Rows are written and read through windows over the file, so memory holds
about one chunk (writing) or one block (reading), never the whole array.

With several processes, create the store on one of them first (the constructor creates missing
files), then open it on the others; each process may then write its own chunks.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lightning_tive.files import atomic_write

# Notices a user must see: logging, which PYTHONWARNINGS=ignore does not silence.
log = logging.getLogger("lightning_tive")

__all__ = ["FeatureStore", "ShardedFeatures", "shard_indices", "write_shard_index"]

FORMAT = "lightning_tive.features"
VERSION = 3
# Per-example scalars stored beside the norms (name -> file), for baselines and diagnostics.
COLUMNS = {"loss": "losses.npy", "tokens": "tokens.npy", "feature_norm": "feature_norms.npy"}
DTYPES = ("float16", "float32")
FP16_MAX = float(np.finfo(np.float16).max)
# Below this magnitude float16 is subnormal and keeps fewer than 10 significant bits.
FP16_TINY = float(np.finfo(np.float16).tiny)


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _data_offset(path: Path) -> int:
    """Return the byte offset of the array data in an .npy file."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            np.lib.format.read_array_header_1_0(f)
        else:
            np.lib.format.read_array_header_2_0(f)
        return f.tell()


def _flatten(meta: dict, prefix: str = "") -> dict:
    """Nested settings as dotted keys, so a mismatch names the exact setting."""
    out = {}
    for key, value in meta.items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


class FeatureStore:
    """Features ``[pool_size, proj_dim]`` and norms ``[pool_size]`` streamed to ``folder`` in chunks."""

    FEATURES = "features.npy"
    NORMS = "grad_norms.npy"
    META = "meta.json"
    DONE = "done"

    def __init__(
        self,
        folder: str | os.PathLike,
        pool_size: int,
        proj_dim: int,
        dtype: str = "float16",
        chunk_size: int = 4096,
        extra: dict | None = None,
    ) -> None:
        """Open the store in ``folder``, creating it if absent; refuse a folder whose meta disagrees."""
        dtype = np.dtype(dtype).name
        if dtype not in DTYPES:
            raise ValueError(f"feature dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        # A store may be empty: the shard of a process that got no chunk of a small pool.
        if int(pool_size) != pool_size or int(pool_size) < 0:
            raise ValueError(f"pool_size must be a non-negative integer, got {pool_size!r}")
        for name, value in (("proj_dim", proj_dim), ("chunk_size", chunk_size)):
            if int(value) != value or int(value) <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.folder = Path(folder)
        self.pool_size, self.proj_dim, self.chunk_size = int(pool_size), int(proj_dim), int(chunk_size)
        self.dtype = np.dtype(dtype)
        self.num_chunks = -(-self.pool_size // self.chunk_size)
        self.meta = {
            "format": FORMAT,
            "version": VERSION,
            "pool_size": self.pool_size,
            "proj_dim": self.proj_dim,
            "dtype": dtype,
            "chunk_size": self.chunk_size,
            "num_chunks": self.num_chunks,
            "extra": json.loads(json.dumps(extra or {})),
        }
        meta_path = self.folder / self.META
        if meta_path.exists():
            self._check_meta(json.loads(meta_path.read_text()))
        else:
            self._create()
        self._offsets = (_data_offset(self.folder / self.FEATURES), _data_offset(self.folder / self.NORMS))
        self._column_offsets = {name: _data_offset(self.folder / file) for name, file in COLUMNS.items()}
        self._warned_range = False

    @classmethod
    def open(cls, folder: str | os.PathLike) -> FeatureStore:
        """Open an existing store with the settings recorded in its ``meta.json``."""
        meta_path = Path(folder) / cls.META
        if not meta_path.exists():
            raise FileNotFoundError(f"{meta_path} not found: {folder} is not a feature store")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"{meta_path} has format {meta.get('format')!r}, expected {FORMAT!r}")
        return cls(
            folder, meta["pool_size"], meta["proj_dim"], meta["dtype"], meta["chunk_size"], meta.get("extra")
        )

    def _check_meta(self, found: dict) -> None:
        have, want = _flatten(found), _flatten(self.meta)
        diffs = [
            f"{key}: folder has {have.get(key)!r}, requested {want.get(key)!r}"
            for key in sorted(set(have) | set(want))
            if have.get(key) != want.get(key)
        ]
        if diffs:
            raise ValueError(
                f"feature store {self.folder} does not match the requested settings ({'; '.join(diffs)}); "
                "use another folder or delete this one"
            )
        for name, shape in (
            (self.FEATURES, (self.pool_size, self.proj_dim)),
            (self.NORMS, (self.pool_size,)),
            *((file, (self.pool_size,)) for file in COLUMNS.values()),
        ):
            arr = np.load(self.folder / name, mmap_mode="r")
            if arr.shape != shape:
                raise ValueError(f"{self.folder / name} has shape {arr.shape}, meta.json says {shape}")
            del arr

    def _create(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        done = self.folder / self.DONE
        done.mkdir(exist_ok=True)
        for marker in done.iterdir():  # stale markers of an interrupted creation
            marker.unlink()
        # open_memmap writes the header and leaves a sparse file; rows are filled chunk by chunk.
        feats = np.lib.format.open_memmap(
            self.folder / self.FEATURES, mode="w+", dtype=self.dtype, shape=(self.pool_size, self.proj_dim)
        )
        del feats
        for file in (self.NORMS, *COLUMNS.values()):
            column = np.lib.format.open_memmap(self.folder / file, mode="w+", dtype=np.float32, shape=(self.pool_size,))
            column[:] = np.nan  # unwritten rows read as "not recorded"
            del column
        # meta.json last: its presence means the files above are complete.
        atomic_write(self.folder / self.META, json.dumps(self.meta, indent=2, sort_keys=True))

    def __len__(self) -> int:
        return self.pool_size

    @property
    def num_rows(self) -> int:
        """Number of rows (the pool size)."""
        return self.pool_size

    @property
    def dim(self) -> int:
        """Feature dimension (``proj_dim``)."""
        return self.proj_dim

    def chunk_range(self, chunk_id: int) -> tuple[int, int]:
        """Return the ``[start, stop)`` pool indices of chunk ``chunk_id``."""
        if not 0 <= chunk_id < self.num_chunks:
            raise IndexError(f"chunk {chunk_id} out of range [0, {self.num_chunks})")
        start = chunk_id * self.chunk_size
        return start, min(start + self.chunk_size, self.pool_size)

    def _marker(self, chunk_id: int) -> Path:
        return self.folder / self.DONE / f"{chunk_id:08d}"

    def missing_chunks(self) -> list[int]:
        """Return the ids of the chunks not yet written, in increasing order."""
        return [c for c in range(self.num_chunks) if not self._marker(c).exists()]

    def is_complete(self) -> bool:
        """Return True when every chunk has been written."""
        return not self.missing_chunks()

    def write_chunk(
        self, chunk_id: int, indices: Sequence[int] | Any, features: Any, norms: Any, columns: dict | None = None
    ) -> None:
        """Write chunk ``chunk_id``: ``features`` [n, proj_dim], ``norms`` [n] and ``columns`` [n] for ``indices``."""
        start, stop = self.chunk_range(chunk_id)
        idx = _to_numpy(indices).astype(np.int64).reshape(-1)
        feats = _to_numpy(features)
        nrm = _to_numpy(norms).astype(np.float32).reshape(-1)
        n = stop - start
        unknown = sorted(set(columns or {}) - set(COLUMNS))
        if unknown:
            raise ValueError(f"unknown store column(s) {unknown}; known: {sorted(COLUMNS)}")
        cols = {name: _to_numpy(v).astype(np.float32).reshape(-1) for name, v in (columns or {}).items()}
        if any(c.shape != (n,) for c in cols.values()):
            raise ValueError(f"chunk {chunk_id}: every column needs {n} values, got {[c.shape for c in cols.values()]}")
        if idx.shape[0] != n or not np.array_equal(np.sort(idx), np.arange(start, stop)):
            raise ValueError(f"chunk {chunk_id} must hold exactly pool indices [{start}, {stop}), each once")
        if feats.shape != (n, self.proj_dim) or nrm.shape != (n,):
            raise ValueError(
                f"chunk {chunk_id}: expected features {(n, self.proj_dim)} and norms {(n,)}, "
                f"got {feats.shape} and {nrm.shape}"
            )
        if not np.array_equal(idx, np.arange(start, stop)):
            order = np.argsort(idx, kind="stable")
            feats, nrm = feats[order], nrm[order]
            cols = {name: c[order] for name, c in cols.items()}
        if self.dtype == np.float16 and feats.dtype.itemsize > 2:
            self._check_fp16_range(feats, nrm)
        row_bytes = self.proj_dim * self.dtype.itemsize
        window = np.memmap(
            self.folder / self.FEATURES,
            dtype=self.dtype,
            mode="r+",
            offset=self._offsets[0] + start * row_bytes,
            shape=(n, self.proj_dim),
        )
        with np.errstate(over="ignore"):  # reported once by _check_fp16_range
            window[:] = feats  # casts while copying, without a full-size temporary
        window.flush()
        del window
        window = np.memmap(
            self.folder / self.NORMS,
            dtype=np.float32,
            mode="r+",
            offset=self._offsets[1] + start * 4,
            shape=(n,),
        )
        window[:] = nrm
        window.flush()
        del window
        for name, values in cols.items():
            window = np.memmap(
                self.folder / COLUMNS[name], dtype=np.float32, mode="r+",
                offset=self._column_offsets[name] + start * 4, shape=(n,),
            )
            window[:] = values
            window.flush()
            del window
        self._marker(chunk_id).touch()

    def _check_fp16_range(self, feats: np.ndarray, norms: np.ndarray) -> None:
        if self._warned_range:
            return
        finite = np.isfinite(norms) & np.isfinite(feats).all(axis=1)
        if not finite.any():
            return
        rows = feats[finite] if not finite.all() else feats
        peak = np.maximum(rows.max(axis=1), -rows.min(axis=1)).astype(np.float64)
        rms = np.sqrt(np.einsum("ij,ij->i", rows, rows, dtype=np.float64) / rows.shape[1])
        # Overflow turns a row into inf; a typical entry below float16's smallest normal keeps < 10 bits.
        if (peak > FP16_MAX).any() or ((rms > 0) & (rms < FP16_TINY)).any():
            self._warned_range = True
            log.warning(
                "some gradient features fall outside float16's range (an entry above 65504 overflows; a row "
                f"whose typical entry is below {FP16_TINY:.1e} loses precision); store them as float32 "
                "(dtype='float32')"
            )

    def read_norms(self) -> np.ndarray:
        """Return all gradient norms as a float32 array [pool_size] (NaN = not finite)."""
        with open(self.folder / self.NORMS, "rb") as f:
            f.seek(self._offsets[1])
            return np.fromfile(f, dtype=np.float32, count=self.pool_size)

    def read_column(self, name: str) -> np.ndarray:
        """Return a per-example column (`loss`, `tokens`) as float32 [pool_size] (NaN = not recorded)."""
        if name not in COLUMNS:
            raise ValueError(f"unknown store column {name!r}; known: {sorted(COLUMNS)}")
        with open(self.folder / COLUMNS[name], "rb") as f:
            f.seek(self._column_offsets[name])
            return np.fromfile(f, dtype=np.float32, count=self.pool_size)

    def iter_blocks(
        self, block_rows: int = 8192, start: int = 0, stop: int | None = None, reuse_buffer: bool = False
    ) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(first_row, rows)`` blocks of stored features (stored dtype) over ``[start, stop)``.

        With ``reuse_buffer`` every block is read into the same array, which saves the page faults of a
        fresh allocation per block; a block is then only valid until the next one is requested.
        """
        stop = self.pool_size if stop is None else min(stop, self.pool_size)
        if block_rows <= 0:
            raise ValueError(f"block_rows must be positive, got {block_rows}")
        row_bytes = self.proj_dim * self.dtype.itemsize
        buffer = None
        # Plain reads rather than a memory map: mapped pages would count towards the process's RSS.
        with open(self.folder / self.FEATURES, "rb", buffering=0) as f:
            for first in range(start, stop, block_rows):
                n = min(block_rows, stop - first)
                if buffer is None or not reuse_buffer:
                    buffer = np.empty((min(block_rows, stop - start), self.proj_dim), dtype=self.dtype)
                block = buffer[:n]
                f.seek(self._offsets[0] + first * row_bytes)
                view = memoryview(block).cast("B")
                got = 0
                while got < n * row_bytes:  # readinto may return fewer bytes than asked
                    step = f.readinto(view[got:])
                    if not step:
                        raise OSError(f"short read from {self.folder / self.FEATURES} at row {first}")
                    got += step
                yield first, block

    def read_rows(self, start: int, stop: int) -> np.ndarray:
        """Return stored feature rows ``[start, stop)`` as one array."""
        if stop <= start:
            return np.empty((0, self.proj_dim), dtype=self.dtype)
        return next(self.iter_blocks(max(stop - start, 1), start, stop))[1]


SHARDS = "shards.json"
INDICES = "indices.npy"


def shard_indices(pool_size: int, world_size: int, rank: int, lengths: np.ndarray | None = None) -> np.ndarray:
    """Pool indices one process values, in the order it values them: an equal share of the examples (±1).

    Without lengths, or with one process, the pool is dealt round-robin (ascending). With lengths (tokens per example),
    examples are dealt in order of decreasing length, snaking over the processes (0..W-1, W-1..0, ...):
    every share holds about as many tokens (no process waits long for another at the end), and each
    share comes longest first, so consecutive rows (a chunk, a batch) have similar lengths, and the
    processes' batches of one step too (FSDP runs them in lockstep).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside [0, {world_size})")
    if lengths is None or world_size == 1:  # one process writes row i = pool index i
        return np.arange(rank, pool_size, world_size, dtype=np.int64)
    lengths = np.abs(np.asarray(lengths))
    if len(lengths) != pool_size:
        raise ValueError(f"{len(lengths)} lengths for a pool of {pool_size} examples")
    order = np.argsort(-lengths, kind="stable")
    turn = np.arange(pool_size) % world_size
    snake = np.where((np.arange(pool_size) // world_size) % 2 == 0, turn, world_size - 1 - turn)
    return order[snake == rank].astype(np.int64)


def shard_name(world_size: int, rank: int) -> str:
    """Folder name of one process's shard."""
    return f"rank-{rank:05d}-of-{world_size:05d}"


SHARD_LAYOUT = "balanced-v1"  # how `shard_indices` deals the pool (older runs dealt whole chunks)


def write_shard_index(folder: str | os.PathLike, pool_size: int, chunk_size: int, world_size: int) -> None:
    """`shards.json`: which shard folders make up a pool's features (each has its own `indices.npy`)."""
    payload = {
        "format": FORMAT,
        "layout": SHARD_LAYOUT,
        "pool_size": int(pool_size),
        "chunk_size": int(chunk_size),
        "world_size": int(world_size),
        "shards": [shard_name(world_size, r) for r in range(world_size)],
    }
    atomic_write(Path(folder) / SHARDS, json.dumps(payload, indent=2) + "\n")


class ShardedFeatures:
    """Per-process shards read as one feature source (shard order), with the pool index of every row."""

    def __init__(self, folder: str | os.PathLike) -> None:
        """Open every shard listed in `shards.json` and check that together they cover the pool once."""
        self.folder = Path(folder)
        spec = json.loads((self.folder / SHARDS).read_text())
        self.stores = [FeatureStore.open(self.folder / name) for name in spec["shards"]]
        self.indices = np.concatenate([np.load(self.folder / name / INDICES) for name in spec["shards"]])
        self.pool_size = int(spec["pool_size"])
        covered = np.bincount(self.indices, minlength=self.pool_size) if len(self.indices) else np.zeros(0)
        if len(covered) != self.pool_size or not (covered == 1).all():
            raise ValueError(f"{self.folder}: the shards do not cover pool indices [0, {self.pool_size}) exactly once")
        dims = {store.proj_dim for store in self.stores}
        if len(dims) != 1:
            raise ValueError(f"{self.folder}: shards disagree on the feature dimension {sorted(dims)}")

    @property
    def num_rows(self) -> int:
        """Rows over all shards (= the pool size)."""
        return len(self.indices)

    @property
    def dim(self) -> int:
        """Feature dimension."""
        return self.stores[0].proj_dim

    def is_complete(self) -> bool:
        """Every shard fully written."""
        return all(store.is_complete() for store in self.stores)

    def read_norms(self) -> np.ndarray:
        """Gradient norms in shard order (pair them with `indices`)."""
        return np.concatenate([store.read_norms() for store in self.stores])

    def read_column(self, name: str) -> np.ndarray:
        """A per-example column in shard order (pair it with `indices`)."""
        return np.concatenate([store.read_column(name) for store in self.stores])

    def iter_blocks(
        self, block_rows: int = 8192, start: int = 0, stop: int | None = None, reuse_buffer: bool = False
    ) -> Iterator[tuple[int, np.ndarray]]:
        """Blocks of every shard in turn, numbered in shard order."""
        if start != 0 or stop not in (None, self.num_rows):
            raise ValueError("ShardedFeatures reads whole shards only")
        offset = 0
        for store in self.stores:
            for first, block in store.iter_blocks(block_rows, reuse_buffer=reuse_buffer):
                yield offset + first, block
            offset += store.pool_size
