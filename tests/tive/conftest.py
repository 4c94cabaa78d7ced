"""Shared settings for the tive tests."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread():
    # These tests use tiny tensors: on a busy 2-core machine, thread hand-offs cost more than the work.
    # Scoped to this folder and restored, so other tests keep their settings.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
