"""The attention maps the official losses were recorded on: float64, from libm's sine (the same bits on every CPU),
softmax-normalised as real maps are.

`cross_maps` (h, w, T): a softmax over the text tokens (tests/test_binding.py's `_maps`, shifted by `phase`).
`self_maps` (h, w, h*w): per query patch a softmax over the key patches, as `aggregate_attention(is_cross=False)` gives.
"""

from __future__ import annotations

import math

import torch


def _sines(angles: torch.Tensor) -> torch.Tensor:
    values = [math.sin(a) for a in angles.flatten().tolist()]
    return torch.tensor(values, dtype=torch.float64).reshape(angles.shape)


def cross_maps(h: int = 16, w: int = 16, tokens: int = 77, phase: float = 0.0, drawn: bool = False) -> torch.Tensor:
    """`drawn`: tokens 2 to 9 each also hold a blob of attention around their own centre (tokens 2 and 5 overlapping),
    as a trained UNet's maps of drawn subjects do, so that A&E's loss is well below 0.5 and the conflict terms of
    InitNO and Self-Cross count; otherwise flat maps (A&E's loss near 1)."""
    y = torch.arange(h, dtype=torch.float64)[:, None, None]
    x = torch.arange(w, dtype=torch.float64)[None, :, None]
    k = torch.arange(tokens, dtype=torch.float64)[None, None, :]
    angles = 0.7 * y * (k % 5 + 1) + 1.3 * x * (k % 3 + 1) + 0.5 * k + phase
    logits = 3 * _sines(angles)
    if drawn:
        for token in range(2, 10):
            cy = (h - 1) / 2 + (h / 3) * _sines(torch.tensor([0.8 * token + phase]))[0]
            cx = (w - 1) / 2 + (w / 3) * _sines(torch.tensor([0.8 * token + phase + math.pi / 2]))[0]
            if token == 5:  # overlapping token 2's blob
                cy = (h - 1) / 2 + (h / 3) * math.sin(1.6 + phase) + 1.5
                cx = (w - 1) / 2 + (w / 3) * math.sin(1.6 + phase + math.pi / 2)
            blob = torch.exp(-((y[..., 0] - cy) ** 2 + (x[..., 0] - cx) ** 2) / 8.0)
            logits[..., token] = logits[..., token] + 6.0 * blob
    return torch.softmax(logits, dim=-1)


def self_maps(h: int = 16, w: int = 16, phase: float = 0.0) -> torch.Tensor:
    p = torch.arange(h * w, dtype=torch.float64)[:, None]
    q = torch.arange(h * w, dtype=torch.float64)[None, :]
    qy, qx = q // w, q % w
    py, px = p // w, p % w
    # Each query patch attends most to patches near it, with a patch-dependent ripple (as real self-attention does).
    near = -((qy - py) ** 2 + (qx - px) ** 2) / (2.0 + (p % 5))
    angles = 0.37 * (p % 11 + 1) * (qx + 1) + 0.23 * (q % 7) * (py + 1) + 0.5 + phase
    return torch.softmax(near + 1.5 * _sines(angles), dim=-1).reshape(h, w, h * w)
