"""The `features/` folder of a run: this process's store, and reading a folder back (`features_from`).

Layouts: one process writes a FeatureStore in `features/`; n processes write one store per shard in
`features/rank-XXXXX-of-NNNNN/` (each with `indices.npy`, the pool index of every row) and a
`shards.json`. A bare folder with `features.npy` + `grad_norms.npy` (no `meta.json`) is read too,
with a warning, as row i = pool index i.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from lightning_tive.tive.store import (
    INDICES,
    SHARD_LAYOUT,
    SHARDS,
    FeatureStore,
    ShardedFeatures,
    shard_indices,
    shard_name,
    write_shard_index,
)
from lightning_tive.tive.values import ArrayFeatures
from lightning_tive.tive_config import COST_FIELDS

# Notices a user must see: logging, which PYTHONWARNINGS=ignore does not silence.
log = logging.getLogger("lightning_tive")


class PlainFeatures(ArrayFeatures):
    """A bare `features.npy` + `grad_norms.npy` folder as a feature source (no per-example columns)."""

    def __init__(self, features: np.ndarray, norms: np.ndarray) -> None:
        super().__init__(features)
        self.norms = norms

    def read_norms(self) -> np.ndarray:
        """The folder's gradient norms."""
        return self.norms

    def read_column(self, name: str) -> np.ndarray:
        """Not recorded in a bare folder: NaN."""
        return np.full(self.num_rows, np.nan, dtype=np.float32)


def pool_fingerprint(datamodule: Any) -> str:
    """A digest of the pool's records (ids, images, conversations) and tasks, in pool order.

    A DataModule with a `pool_digest` (LlavaDataModule's comes from its index's per-record digests)
    gives it directly; otherwise every record is serialised once.
    """
    if hasattr(datamodule, "pool_digest"):
        return datamodule.pool_digest
    digest = hashlib.sha256()
    for i in range(datamodule.pool_size):
        digest.update(json.dumps(datamodule.pool_record(i), sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


def check_layout(folder: Path, world: int) -> None:
    """Refuse to mix features written by a different number of processes, or another shard layout, into this run."""
    written = None
    if (folder / SHARDS).exists():
        spec = json.loads((folder / SHARDS).read_text())
        written = spec["world_size"]
        if written == world and spec.get("layout") != SHARD_LAYOUT:
            raise RuntimeError(
                f"{folder} holds features sharded by an older layout ({spec.get('layout', 'whole chunks')}); this "
                f"version deals the pool as {SHARD_LAYOUT!r}. Re-select from it with `tive.features_from: {folder}`, "
                "or value again into another `tive.output_dir`."
            )
    elif (folder / FeatureStore.META).exists():
        written = 1
    if written is not None and written != world:
        raise RuntimeError(
            f"{folder} holds features written by {written} process(es), and this run has {world}. "
            f"Rerun with {written} process(es) to resume that valuation, re-select from it with "
            f"`tive.features_from: {folder}`, or choose another `tive.output_dir`."
        )


def open_process_store(
    folder: Path, pool_size: int, chunk_size: int, world: int, rank: int, proj_dim: int, dtype: str,
    fingerprint: dict, is_global_zero: bool, barrier: Any, lengths: np.ndarray | None = None,
) -> tuple[FeatureStore, np.ndarray]:
    """This process's store (created or resumed) and the pool index of each of its rows.

    Shards are balanced by examples and, with `lengths`, by tokens (`shard_indices`). A process with
    no example (a pool smaller than the processes) gets an empty shard: it joins every collective
    with nothing to value.
    """
    check_layout(folder, world)
    if world > 1:
        if is_global_zero:
            folder.mkdir(parents=True, exist_ok=True)
            write_shard_index(folder, pool_size, chunk_size, world)
        barrier("tive-shard-index")
        folder = folder / shard_name(world, rank)
    indices = shard_indices(pool_size, world, rank, lengths)
    store = FeatureStore(
        folder, len(indices), proj_dim, dtype=dtype, chunk_size=chunk_size,
        extra={**fingerprint, "world_size": world, "rank": rank},
    )
    saved = folder / INDICES
    if saved.exists() and not np.array_equal(np.load(saved), indices):
        raise RuntimeError(
            f"{folder} was written for other pool indices than this process values now (the examples' lengths "
            "changed?); value again into another `tive.output_dir`"
        )
    np.save(saved, indices)
    return store, indices


def open_features(folder: Path, datamodule: Any) -> tuple[Any, np.ndarray, dict]:
    """(source, pool index of each row, the settings that produced it) from a features folder of any layout."""
    pool = datamodule.pool_size
    if (folder / SHARDS).exists():
        source = ShardedFeatures(folder)
        extras = [s.meta["extra"] for s in source.stores]
        _check_pool(folder, extras, datamodule, source.pool_size)
        if not source.is_complete():
            raise ValueError(f"tive.features_from={folder} is incomplete")
        return source, source.indices, _shared_settings(extras)
    if (folder / FeatureStore.META).exists():
        store = FeatureStore.open(folder)
        _check_pool(folder, [store.meta["extra"]], datamodule, store.pool_size)
        if not store.is_complete():
            raise ValueError(f"tive.features_from={folder} is incomplete (chunks {store.missing_chunks()[:5]} missing)")
        return store, np.arange(pool), _shared_settings([store.meta["extra"]])
    features = np.load(folder / "features.npy", mmap_mode="r")
    norms = np.load(folder / "grad_norms.npy").astype(np.float32)
    if features.ndim != 2 or features.shape[0] != pool or norms.shape != (pool,):
        raise ValueError(
            f"tive.features_from={folder}: features {features.shape} / grad_norms {norms.shape} do not match "
            f"the pool of {pool} examples"
        )
    log.warning(
        f"tive.features_from={folder} has no meta.json: its shape matches the pool, but which model, "
        "adapter and projection produced it cannot be checked"
    )
    return PlainFeatures(np.asarray(features), norms), np.arange(pool), {}


def check_cost_settings(config: Any, stored: dict) -> None:
    """Refuse features valued with other cheaper-valuation settings (`COST_FIELDS`) than `config` sets.

    The other feature settings are taken from the folder as they are (its `seed`, say, may differ: the
    run's seed also drives the sampling). A folder without settings (bare .npy files) cannot be checked.
    """
    settings = stored.get("settings")
    if not settings:
        return
    diffs = [f"{name}: folder has {settings.get(name)!r}, this run sets {getattr(config, name)!r}"
             for name in COST_FIELDS if settings.get(name) != getattr(config, name)]
    if diffs:
        raise ValueError(
            f"tive.features_from={config.features_from} was valued with other settings ({'; '.join(diffs)}); set "
            "them as the folder has them, or value again without tive.features_from"
        )


def _shared_settings(extras: list[dict]) -> dict:
    """The fingerprint every shard shares (its rank and world size left out)."""
    first = {k: v for k, v in extras[0].items() if k not in ("rank",)}
    return first


def _check_pool(folder: Path, extras: list[dict], datamodule: Any, stored_size: int) -> None:
    """Refuse features of another pool: another size, or the same size with other records or tasks."""
    if stored_size != datamodule.pool_size:
        raise ValueError(
            f"tive.features_from={folder} holds {stored_size} examples, the pool has {datamodule.pool_size}: "
            "it was computed for another pool"
        )
    recorded = {extra.get("pool") for extra in extras if extra.get("pool")}
    if not recorded:
        log.warning(f"tive.features_from={folder} records no pool fingerprint; it cannot be checked")
        return
    current = pool_fingerprint(datamodule)
    if recorded != {current}:
        raise ValueError(
            f"tive.features_from={folder} was computed for a different pool (fingerprint {sorted(recorded)} vs "
            f"{current} now): the same number of examples but other records, order or tasks. Recompute the features "
            "for this pool (drop tive.features_from), or point it at the run that used this data."
        )
