"""Collectives: every tensor reaches the process group on the group's device; none bypasses them."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

import lightning_tive.distributed as distributed
from lightning_tive.distributed import Collectives
from lightning_tive.tive.values import instance_values

PACKAGE = Path(distributed.__file__).parent


class FakeGroup:
    """A 2-process group that, like NCCL with CUDA, accepts tensors on its own device only."""

    def __init__(self, device: str) -> None:
        self.device = torch.device(device)
        self.calls: list[str] = []
        self.ReduceOp = torch.distributed.ReduceOp

    def _check(self, name: str, tensor: torch.Tensor) -> None:
        if tensor.device != self.device:
            raise RuntimeError(f"{name}: tensor on {tensor.device}, the group works on {self.device}")
        self.calls.append(name)

    def all_reduce(self, tensor, op=None, group=None):
        self._check("all_reduce", tensor)

    def broadcast(self, tensor, src=0, group=None):
        self._check("broadcast", tensor)

    def all_gather_object(self, out, obj):
        out[:] = [obj] * len(out)


@pytest.fixture
def group(monkeypatch):
    fake = FakeGroup("meta")  # a device no caller's tensor is on
    monkeypatch.setattr(distributed, "dist", fake)
    # the fake group computes nothing, so there is no result to copy back off the meta device
    monkeypatch.setattr(Collectives, "_back", staticmethod(lambda moved, tensor: None))
    return fake


def test_every_tensor_collective_reaches_the_group_on_its_device(group):
    comm = Collectives(world_size=2, rank=0, device="meta")
    comm.sum_(torch.ones(3))
    comm.max_(torch.ones(2, dtype=torch.float64))
    comm.sum(torch.ones(1))
    comm.any(True)
    comm.broadcast_(torch.nn.Parameter(torch.zeros(4)))
    # the values' first pass sums per-task statistics held as CPU float64 tensors
    features = np.random.default_rng(0).standard_normal((6, 4)).astype(np.float32)
    instance_values(features, np.array([0, 1, 0, 1, 0, 1]), 2, all_reduce=comm.sum_)
    assert group.calls.count("all_reduce") == 6 and group.calls.count("broadcast") == 1
    # the fake refuses what the code once did: a CPU tensor handed to the group directly
    with pytest.raises(RuntimeError, match="tensor on cpu"):
        distributed.dist.all_reduce(torch.ones(1))


def test_one_process_needs_no_group():
    comm = Collectives(world_size=1, rank=0, device="cpu")
    x = torch.ones(2)
    assert comm.sum_(x) is x and comm.any(False) is False
    assert comm.gather_objects("a") == ["a"] and comm.broadcast_object(3) == 3


def test_no_collective_bypasses_the_helpers():
    pattern = re.compile(r"\b(torch\.distributed|dist)\.(all_reduce|broadcast|all_gather|barrier|reduce|gather)")
    offenders = [
        f"{path.relative_to(PACKAGE)}:{number}"
        for path in PACKAGE.rglob("*.py")
        if path.name != "distributed.py"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert offenders == []
