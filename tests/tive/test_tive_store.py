"""Feature store: layout, chunked writes, resume, meta checks, block reads."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lightning_tive.tive.store import FeatureStore

POOL, DIM, CHUNK = 23, 6, 5


def pool_rows(seed: int = 0):
    rng = np.random.default_rng(seed)
    feats = rng.standard_normal((POOL, DIM)).astype(np.float32)
    norms = rng.uniform(0.5, 2.0, POOL).astype(np.float32)
    norms[[4, 17]] = np.nan
    feats[[4, 17]] = 0
    return feats, norms


def write_all(store: FeatureStore, feats, norms, chunks=None, shuffle_seed=None):
    rng = np.random.default_rng(shuffle_seed)
    for c in store.missing_chunks() if chunks is None else chunks:
        start, stop = store.chunk_range(c)
        idx = np.arange(start, stop)
        if shuffle_seed is not None:
            idx = rng.permutation(idx)
        store.write_chunk(c, idx, feats[idx], norms[idx])


def file_bytes(folder):
    return {name: (folder / name).read_bytes() for name in (FeatureStore.FEATURES, FeatureStore.NORMS)}


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_rows_land_at_their_pool_index(tmp_path, dtype):
    feats, norms = pool_rows()
    store = FeatureStore(tmp_path, POOL, DIM, dtype=dtype, chunk_size=CHUNK)
    assert store.num_chunks == 5 and store.missing_chunks() == [0, 1, 2, 3, 4]
    write_all(store, feats, norms, chunks=[3, 0, 4, 1, 2], shuffle_seed=1)
    assert store.is_complete()
    on_disk = np.load(tmp_path / "features.npy")
    assert on_disk.dtype == np.dtype(dtype) and on_disk.shape == (POOL, DIM)
    np.testing.assert_array_equal(on_disk, feats.astype(dtype))
    np.testing.assert_array_equal(np.load(tmp_path / "grad_norms.npy"), norms)
    np.testing.assert_array_equal(store.read_norms(), norms)
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["pool_size"] == POOL and meta["proj_dim"] == DIM and meta["dtype"] == dtype


@pytest.mark.parametrize("block_rows", [1, 4, 7, 100])
def test_iter_blocks_covers_the_rows_in_order(tmp_path, block_rows):
    feats, norms = pool_rows()
    store = FeatureStore(tmp_path, POOL, DIM, chunk_size=CHUNK)
    write_all(store, feats, norms)
    starts, blocks = zip(*store.iter_blocks(block_rows), strict=True)
    assert list(starts) == list(range(0, POOL, block_rows))
    np.testing.assert_array_equal(np.concatenate(blocks), feats.astype(np.float16))
    np.testing.assert_array_equal(store.read_rows(3, 9), feats[3:9].astype(np.float16))
    assert store.read_rows(5, 5).shape == (0, DIM)


def test_resume_writes_only_missing_chunks_and_gives_identical_files(tmp_path):
    feats, norms = pool_rows()
    straight = FeatureStore(tmp_path / "a", POOL, DIM, chunk_size=CHUNK)
    write_all(straight, feats, norms)

    folder = tmp_path / "b"
    first = FeatureStore(folder, POOL, DIM, chunk_size=CHUNK)
    write_all(first, feats, norms, chunks=[0, 2])

    # A chunk whose rows were written but whose marker never was (stopped in between) is redone.
    class Stop(Exception):
        pass

    def stop_before_marker(chunk_id):
        raise Stop

    first._marker = stop_before_marker
    with pytest.raises(Stop):
        write_all(first, feats * 0 + 7, norms, chunks=[1])
    del first

    resumed = FeatureStore(folder, POOL, DIM, chunk_size=CHUNK)
    assert resumed.missing_chunks() == [1, 3, 4]
    written = []
    for c in resumed.missing_chunks():
        written.append(c)
        write_all(resumed, feats, norms, chunks=[c])
    assert written == [1, 3, 4] and resumed.is_complete()
    assert file_bytes(folder) == file_bytes(tmp_path / "a")


@pytest.mark.parametrize(
    "change, match",
    [
        ({"proj_dim": DIM + 1}, "proj_dim: folder has 6, requested 7"),
        ({"dtype": "float32"}, "dtype: folder has 'float16', requested 'float32'"),
        ({"chunk_size": CHUNK + 1}, "chunk_size"),
        ({"pool_size": POOL - 1}, "pool_size"),
        ({"extra": {"projector": "rademacher"}}, "extra"),
    ],
)
def test_a_folder_with_other_settings_is_refused(tmp_path, change, match):
    settings = {
        "pool_size": POOL,
        "proj_dim": DIM,
        "dtype": "float16",
        "chunk_size": CHUNK,
        "extra": {"projector": "kronecker"},
    }
    FeatureStore(tmp_path, **settings)
    with pytest.raises(ValueError, match=match):
        FeatureStore(tmp_path, **{**settings, **change})


def test_open_reads_settings_from_meta(tmp_path):
    feats, norms = pool_rows()
    store = FeatureStore(tmp_path, POOL, DIM, dtype="float32", chunk_size=CHUNK, extra={"seed": 3})
    write_all(store, feats, norms)
    again = FeatureStore.open(tmp_path)
    assert (again.pool_size, again.proj_dim, again.dtype, again.chunk_size) == (POOL, DIM, np.float32, CHUNK)
    assert again.meta["extra"] == {"seed": 3} and again.is_complete()
    with pytest.raises(FileNotFoundError):
        FeatureStore.open(tmp_path / "nothing")


def test_bad_chunks_are_refused(tmp_path):
    feats, norms = pool_rows()
    store = FeatureStore(tmp_path, POOL, DIM, chunk_size=CHUNK)
    with pytest.raises(ValueError, match=r"exactly pool indices \[5, 10\)"):
        store.write_chunk(1, np.arange(4, 9), feats[4:9], norms[4:9])
    with pytest.raises(ValueError, match="expected features"):
        store.write_chunk(1, np.arange(5, 10), feats[5:10, :3], norms[5:10])
    with pytest.raises(IndexError):
        store.write_chunk(5, np.arange(0), feats[:0], norms[:0])
    with pytest.raises(ValueError, match="dtype"):
        FeatureStore(tmp_path / "x", POOL, DIM, dtype="int8")
    with pytest.raises(ValueError, match="proj_dim"):
        FeatureStore(tmp_path / "y", POOL, 0)
    assert store.missing_chunks() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(
    "row, warns",
    [
        ([1e5, 0.0, 0.0], True),
        ([1e-6, 2e-6, 1e-6], True),
        ([1e-3, 2e-3, 0.0], False),
        ([0.0, 0.0, 0.0], False),
    ],
)
def test_float16_range_problems_warn(tmp_path, row, warns, caplog):
    store = FeatureStore(tmp_path, 2, 3, chunk_size=2)
    feats = np.array([[1.0, 2.0, 3.0], row], dtype=np.float32)
    store.write_chunk(0, np.arange(2), feats, np.ones(2))
    assert ("outside float16's range" in caplog.text) == warns


def test_columns_land_at_their_pool_index_and_unwritten_rows_read_nan(tmp_path):
    feats, norms = pool_rows()
    loss = np.arange(POOL, dtype=np.float32) / 10
    tokens = np.arange(POOL, dtype=np.float32) + 3
    store = FeatureStore(tmp_path, POOL, DIM, chunk_size=CHUNK)
    rng = np.random.default_rng(2)
    for c in (2, 0, 4, 1):  # chunk 3 never written
        start, stop = store.chunk_range(c)
        idx = rng.permutation(np.arange(start, stop))
        store.write_chunk(c, idx, feats[idx], norms[idx], columns={"loss": loss[idx], "tokens": tokens[idx]})
    written = np.ones(POOL, dtype=bool)
    written[15:20] = False
    reopened = FeatureStore.open(tmp_path)
    for name, want in (("loss", loss), ("tokens", tokens)):
        got = reopened.read_column(name)
        np.testing.assert_array_equal(got[written], want[written])
        assert np.isnan(got[~written]).all()
    with pytest.raises(ValueError, match="unknown store column"):
        store.write_chunk(3, np.arange(15, 20), feats[15:20], norms[15:20], columns={"perplexity": loss[15:20]})
    with pytest.raises(ValueError, match="every column needs 5 values"):
        store.write_chunk(3, np.arange(15, 20), feats[15:20], norms[15:20], columns={"loss": loss[:3]})


def test_an_empty_store_is_complete_and_reads_as_no_rows(tmp_path):
    from lightning_tive.tive.values import instance_values

    store = FeatureStore(tmp_path, 0, DIM, chunk_size=CHUNK, extra={"rank": 2})
    assert store.num_chunks == 0 and store.is_complete() and store.missing_chunks() == []
    again = FeatureStore.open(tmp_path)
    assert again.read_norms().shape == (0,) and again.read_column("loss").shape == (0,)
    assert [block for _, block in again.iter_blocks()] == []
    u, finite = instance_values(again, np.zeros(0, dtype=np.int64), 3)
    assert u.shape == (0,) and finite.shape == (0,)
    with pytest.raises(ValueError, match="non-negative"):
        FeatureStore(tmp_path / "bad", -1, DIM)


@pytest.mark.parametrize("world", [1, 2, 3, 8])
@pytest.mark.parametrize("with_lengths", [False, True])
def test_shards_split_examples_and_tokens_evenly(world, with_lengths):
    from lightning_tive.tive.store import shard_indices

    rng = np.random.default_rng(0)
    lengths = np.where(rng.random(1001) < 0.1, rng.integers(100, 2048, 1001), rng.integers(600, 900, 1001))
    shards = [shard_indices(1001, world, r, lengths if with_lengths else None) for r in range(world)]
    assert sorted(np.concatenate(shards).tolist()) == list(range(1001))
    if with_lengths and world > 1:  # longest first: consecutive rows (chunks, batches) of similar length
        assert all((np.diff(lengths[s]) <= 0).all() for s in shards)
    else:
        assert all((np.diff(s) > 0).all() for s in shards)
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1
    if with_lengths:
        # every process's share of the tokens is within one longest example of the others'
        tokens = [int(lengths[s].sum()) for s in shards]
        assert max(tokens) - min(tokens) <= lengths.max()
    if world == 1:
        assert shards[0].tolist() == list(range(1001))  # one process: row i is pool index i
    assert shard_indices(2, 3, 2, lengths[:2] if with_lengths else None).tolist() == []  # fewer examples than processes
