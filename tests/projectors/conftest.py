"""Shared set-up for the projector tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_intra_op_thread() -> Iterator[None]:
    """The tests' tensors are tiny: one thread is faster than a pool, and on a machine shared
    with other jobs a pool's barriers make tiny ops 10–100× slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
