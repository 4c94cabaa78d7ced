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
    # the fake group computes nothing, so nothing is copied off the meta device: each copy-back is recorded
    fake.backs = []
    monkeypatch.setattr(
        Collectives, "_back", staticmethod(lambda moved, tensor: fake.backs.append((moved.device.type, tensor.device.type)))
    )
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
    assert group.backs == [("meta", "cpu")] * 7  # every result goes back to the caller's CPU tensor
    # the fake refuses what the code once did: a CPU tensor handed to the group directly
    with pytest.raises(RuntimeError, match="tensor on cpu"):
        distributed.dist.all_reduce(torch.ones(1))


def test_back_copies_the_result_into_the_callers_tensor():
    x = torch.ones(3)
    Collectives._back(torch.full((3,), 2.0), x)
    assert x.tolist() == [2.0, 2.0, 2.0]


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


class TwoProcessView:
    """Process `rank` of two, with process 0's answers scripted: records every collective it enters."""

    def __init__(self, rank: int, from_zero: list) -> None:
        self.rank, self.world_size, self.from_zero, self.entered = rank, 2, from_zero, []

    def broadcast_object(self, obj):
        self.entered.append("broadcast_object")
        return obj if self.rank == 0 else self.from_zero.pop(0)

    def broadcast_(self, tensor):
        self.entered.append("broadcast_")
        if self.rank:
            tensor.copy_(self.from_zero.pop(0))
        return tensor


def test_a_mismatched_saved_adapter_is_refused_by_every_process_before_any_weight_moves(tmp_path):
    from lightning_tive.reference_adapter import load_adapter

    layer = torch.nn.Linear(2, 3, bias=False)
    torch.save({"another.adapter": torch.zeros(3, 2)}, tmp_path / "adapter.pt")
    for rank in (0, 1):  # process 1 learns the verdict from process 0, so neither waits in a broadcast alone
        comm = TwoProcessView(rank, from_zero=[False])
        with pytest.raises(ValueError, match="different reference adapter"):
            load_adapter([("a.lora_A", layer)], [], tmp_path / "adapter.pt", comm)
        assert comm.entered == ["broadcast_object"]
    # a matching file: process 1 takes process 0's weights
    weight = torch.arange(6.0).reshape(3, 2)
    torch.save({"a.lora_A": weight}, tmp_path / "adapter.pt")
    comm = TwoProcessView(1, from_zero=[True, weight])
    load_adapter([("a.lora_A", layer)], [], tmp_path / "adapter.pt", comm)
    assert torch.equal(layer.weight, weight) and comm.entered == ["broadcast_object", "broadcast_"]


class TwoProcesses(Collectives):
    """Process `rank` of two, whose broadcasts carry what process 0 last sent."""

    def __init__(self, rank: int, sent: list) -> None:
        super().__init__(2, rank, "cpu")
        self.sent = sent

    def broadcast_object(self, obj, src=0):
        if self.rank == src:
            self.sent.append(obj)
            return obj
        return self.sent[-1]


def test_a_failure_on_process_zero_stops_every_process_not_only_the_first():
    sent: list = []

    def fails():
        raise ValueError("disk full")

    with pytest.raises(ValueError, match="disk full"):
        TwoProcesses(0, sent).on_first(fails, "write the files")
    with pytest.raises(RuntimeError, match="process 0 failed to write the files: ValueError: disk full"):
        TwoProcesses(1, sent).on_first(lambda: pytest.fail("runs on process 0 only"), "write the files")
    assert TwoProcesses(0, sent).on_first(lambda: 3, "count") == 3
    assert TwoProcesses(1, sent).on_first(lambda: pytest.fail("process 0 only"), "count") is None
