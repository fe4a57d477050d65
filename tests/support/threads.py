"""One intra-op thread for a test module of tiny tensors: on a busy 2-core machine a second thread only adds
synchronisation (10x slower measured). Import `one_thread` into a module to apply it there."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
