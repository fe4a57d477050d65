"""Stand-in for modules/devices.py: only `torch_gc` (devices.py L77-92 empties the CUDA/MPS/XPU caches)."""

from __future__ import annotations

import torch


def torch_gc() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
