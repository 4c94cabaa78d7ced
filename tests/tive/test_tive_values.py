"""Task values and streamed instance values against brute force."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tive_testutils import brute_instance_values

from lightning_tive.tive.store import FeatureStore
from lightning_tive.tive.values import SUB_BLOCK, instance_values, task_values


def make_pool(n=300, d=12, tasks=4, seed=0):
    rng = np.random.default_rng(seed)
    task_ids = rng.integers(0, tasks, n)
    centres = rng.standard_normal((tasks, d))
    feats = (centres[task_ids] + rng.standard_normal((n, d))).astype(np.float32)
    norms = rng.uniform(0.1, 3.0, n)
    return feats, norms, task_ids


def test_task_values_are_mean_finite_norms():
    norms = np.array([1.0, 3.0, np.nan, 2.0, 4.0, np.inf, np.nan])
    tids = np.array([0, 0, 0, 1, 1, 1, 2])
    stats = task_values(norms, tids, 4)
    assert stats.sizes.tolist() == [3, 3, 1, 0]
    assert stats.finite_counts.tolist() == [2, 2, 0, 0]
    np.testing.assert_array_equal(stats.values[:2], [2.0, 3.0])
    assert np.isnan(stats.values[2:]).all()
    # an extra finite mask (e.g. from non-finite features) removes examples too
    masked = task_values(norms, tids, 4, finite=np.array([1, 0, 1, 1, 1, 1, 1], bool))
    assert masked.values[0] == 1.0


def test_instance_values_match_brute_force_with_non_finite_and_zero_rows():
    feats, norms, tids = make_pool()
    norms[[5, 50]] = np.nan  # non-finite gradient: features are zeros
    feats[[5, 50]] = 0
    feats[77, 3] = np.nan  # non-finite feature with a finite norm
    feats[99, 0] = np.inf
    feats[120] = 0  # a finite zero gradient: cosine 0 with everything, still counted
    u, finite = instance_values(feats, tids, 4, finite=np.isfinite(norms))
    expected_finite = np.ones(len(feats), bool)
    expected_finite[[5, 50, 77, 99]] = False
    np.testing.assert_array_equal(finite, expected_finite)
    ref = brute_instance_values(feats, tids, expected_finite)
    assert np.isnan(u[~expected_finite]).all()
    np.testing.assert_allclose(u[expected_finite], ref[expected_finite], rtol=0, atol=1e-6)
    assert u[120] == 0
    # self included: a task holding one finite example has u = 1
    single = instance_values(feats[:3], np.array([0, 1, 1]), 2)[0]
    assert single[0] == pytest.approx(1.0, abs=1e-6)


def test_instance_values_identical_across_blocking_and_sources(tmp_path):
    n = 2 * SUB_BLOCK + 777  # several sub-blocks and a ragged tail
    feats, norms, tids = make_pool(n=n, d=8, tasks=3, seed=1)
    feats16 = feats.astype(np.float16)
    store = FeatureStore(tmp_path, n, 8, chunk_size=1000)
    for c in store.missing_chunks():
        a, b = store.chunk_range(c)
        store.write_chunk(c, np.arange(a, b), feats16[a:b], norms[a:b])
    base, _ = instance_values(feats16, tids, 3, block_rows=SUB_BLOCK)
    for source, rows in [
        (feats16, 1),
        (feats16, 10**6),
        (store, 3000),
        (store, SUB_BLOCK),
        (torch.from_numpy(feats16), 5000),
    ]:
        np.testing.assert_array_equal(instance_values(source, tids, 3, block_rows=rows)[0], base)
    np.testing.assert_allclose(base, brute_instance_values(feats16, tids, np.ones(n, bool)), atol=1e-5)


def test_bad_task_ids_are_refused():
    with pytest.raises(ValueError, match=r"task ids must lie in \[0, 2\)"):
        instance_values(np.ones((3, 2)), [0, 1, 2], 2)
    with pytest.raises(ValueError, match="3 entries"):
        task_values(np.ones(4), [0, 1, 1], 2)


def test_float16_unit_rows_keep_instance_values_where_raw_small_gradients_lose_them():
    """Why the store holds unit vectors: a gradient of norm 1e-5 over 8192 dims has entries far below
    float16's normal range, so raw rows lose their directions; unit rows keep ~3 digits.

    Measured (this test's data): max |du| raw vs unit 2.8e-5 / 4e-6 at norm 1e-3, 3.3e-4 / 4e-6 at 1e-4,
    9.2e-3 / 4e-6 at 1e-5, where the top-20% overlap with float32 falls to 0.875 raw and stays 1.0 unit.
    """
    from lightning_tive.tive.selection import select_from_values

    rng = np.random.default_rng(0)
    n, d, tasks = 600, 8192, 3
    tid = np.arange(n) % tasks
    centres = rng.standard_normal((tasks, d))
    f = (centres[tid] + 1.5 * rng.standard_normal((n, d))).astype(np.float32)
    f *= (1e-5 / np.linalg.norm(f, axis=1))[:, None]  # small gradients (well-learnt examples)
    exact, _ = instance_values(f, tid, tasks)
    raw16, _ = instance_values(f.astype(np.float16), tid, tasks)
    unit16, _ = instance_values((f / np.linalg.norm(f, axis=1, keepdims=True)).astype(np.float16), tid, tasks)
    raw_error, unit_error = np.abs(raw16 - exact).max(), np.abs(unit16 - exact).max()
    assert unit_error < 1e-5 and raw_error > 5e-3, (unit_error, raw_error)

    def chosen(u):
        result = select_from_values(np.ones(n), u, np.ones(n, bool), tid, ["a", "b", "c"], ratio=0.2, sampling="topk")
        return set(result.selected_indices.tolist())

    assert chosen(unit16) == chosen(exact)
    assert len(chosen(raw16) & chosen(exact)) < 0.95 * len(chosen(exact))
