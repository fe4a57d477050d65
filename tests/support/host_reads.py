"""Counting host reads of tensor values: the CPU stand-in for CUDA's sync-debug mode.

On a GPU, every read of a device value on the host (`.item()`, `.tolist()`, `bool(t)`, `float(t)`, `.nonzero()`,
`.cpu()`...) waits until the GPU has finished everything queued before it. On the CPU nothing waits, but the same calls
are made, so counting them during an engine step tells whether the step would wait on a GPU.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from torch.overrides import TorchFunctionMode

HOST_READS = frozenset(
    {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "__complex__", "nonzero", "cpu", "numpy",
     "argwhere", "unique", "masked_select", "_local_scalar_dense"}
)


class HostReads(TorchFunctionMode):
    """`with HostReads() as reads: ...` then `reads.total`, `reads.by_name` (every tensor, any device)."""

    def __init__(self) -> None:
        super().__init__()
        self.by_name: Counter[str] = Counter()

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None) -> Any:
        name = getattr(func, "__name__", "")
        if name in HOST_READS:
            self.by_name[name] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.by_name.values())
