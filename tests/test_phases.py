"""ReferencePhases' warm-up order: every warm-up example once per epoch; grouped by length when the data is."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from lightning_tive.data.sampling import padding_efficiency
from lightning_tive.phases import ReferencePhases
from lightning_tive.tive_config import TIVEConfig


def phases(lengths: np.ndarray, group_by_length: bool) -> ReferencePhases:
    trainer = SimpleNamespace(world_size=1, global_rank=0, strategy=SimpleNamespace(root_device="cpu"))
    datamodule = SimpleNamespace(pool_lengths=lengths, group_by_length=group_by_length)
    return ReferencePhases(TIVEConfig(seed=4), trainer, module=None, datamodule=datamodule)


@pytest.mark.parametrize("group", [False, True])
def test_warmup_batches_cover_the_slice_once_per_epoch(group):
    rng = np.random.default_rng(0)
    lengths = rng.integers(600, 2048, size=5000)
    indices = np.sort(rng.choice(5000, size=803, replace=False))
    ref = phases(lengths, group)
    for epoch in (0, 1):
        batches = ref.warmup_batches(indices, 64, epoch)
        assert sorted(np.concatenate(batches).tolist()) == indices.tolist()
        assert all(len(b) == 64 for b in batches[:-1]) and len(batches[-1]) == 803 - 12 * 64
    if not group:  # the order the warm-up always had
        order = np.random.default_rng([4, 0]).permutation(indices)
        assert all(np.array_equal(a, order[k * 64 : (k + 1) * 64]) for k, a in enumerate(ref.warmup_batches(indices, 64, 0)))


def test_grouped_warmup_slices_are_alike_in_length_on_every_process():
    rng = np.random.default_rng(1)
    lengths = np.where(rng.random(20000) < 0.1, rng.integers(100, 2048, 20000), rng.integers(600, 900, 20000))
    indices = np.arange(20000)
    world = 8

    def slices(group: bool) -> list[np.ndarray]:
        return [b[r::world] for b in phases(lengths, group).warmup_batches(indices, 128, 0) for r in range(world)]

    grouped, shuffled = padding_efficiency(slices(True), lengths), padding_efficiency(slices(False), lengths)
    assert grouped > 0.97 and shuffled < 0.8, (grouped, shuffled)
