"""SDXL's timestep embedding computed on the device, for the A&E pass.

sgm's `timestep_embedding` (generative-models, sgm/modules/diffusionmodules/util.py) builds its frequency table on
the CPU and copies it to the device at every UNet call. A1111 moves ldm's table to the device but only wraps sgm's
(sd_hijack_unet.py: its own `timestep_embedding` for ldm; `timestep_embedding_cast_result` casts the result of both to
the UNet's dtype). A host-to-device copy cannot be captured in a CUDA graph, so an SDXL A&E pass could never be
replayed.

While the A&E pass evaluates an sgm UNet, the module-level `timestep_embedding` its UNetModel calls is replaced by
`device_timestep_embedding`: the same table, computed on the CPU exactly as sgm computes it and kept on the device,
then the same operations, then A1111's cast. Same numbers bit for bit (tests/test_sgm_timestep.py); restored after
each evaluation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from types import ModuleType
from typing import Any

import torch

SGM_UNET_MODULE = "sgm.modules.diffusionmodules.openaimodel"

_frequencies: dict[tuple[int, int, torch.device], torch.Tensor] = {}


def frequencies(half: int, max_period: int, device: torch.device) -> torch.Tensor:
    """sgm's table, computed on the CPU by sgm's own expression, copied to `device` once."""
    key = (half, max_period, device)
    if key not in _frequencies:
        table = torch.exp(-math.log(max_period) * torch.arange(start=0, end=half, dtype=torch.float32) / half)
        _frequencies[key] = table.to(device=device)
    return _frequencies[key]


def device_timestep_embedding(
    timesteps: torch.Tensor,
    dim: int,
    max_period: int = 10000,
    repeat_only: bool = False,
    *,
    original: Callable[..., torch.Tensor],
    output_dtype: Callable[[torch.Tensor], torch.dtype],
) -> torch.Tensor:
    """sgm's sinusoidal embedding with the table on the device, cast like A1111 casts it."""
    if repeat_only:  # no table, nothing copied: the original is capturable as it is
        return original(timesteps, dim, max_period=max_period, repeat_only=True)
    freqs = frequencies(dim // 2, max_period, timesteps.device)
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding.to(dtype=output_dtype(timesteps))


@contextmanager
def device_side_embedding(
    unet: Any,
    output_dtype: Callable[[torch.Tensor], torch.dtype],
    loaded_module: Callable[[str], ModuleType | None],
    also_in: Sequence[dict[str, Any]] = (),
) -> Iterator[None]:
    """Within: an sgm UNet computes its timestep embedding on the device, and so does every module namespace of
    `also_in` that imported sgm's function by name (ControlNet's cldm.py, which A1111's sgm tree makes take sgm's
    even beside an SD1 UNet). Other UNets and namespaces: nothing changes. `loaded_module` finds sgm's module among
    those the host imported (`host.loaded_module`)."""
    module = loaded_module(SGM_UNET_MODULE)
    original = getattr(module, "timestep_embedding", None)
    namespaces: list[dict[str, Any]] = []
    if module is not None and original is not None:
        if type(unet).__module__ == SGM_UNET_MODULE:
            namespaces.append(vars(module))
        namespaces += [n for n in also_in if n.get("timestep_embedding") is original and n is not vars(module)]
    if not namespaces or original is None:
        yield
        return

    def embedding(
        timesteps: torch.Tensor, dim: int, max_period: int = 10000, repeat_only: bool = False
    ) -> torch.Tensor:
        return device_timestep_embedding(
            timesteps, dim, max_period, repeat_only, original=original, output_dtype=output_dtype
        )

    for namespace in namespaces:
        namespace["timestep_embedding"] = embedding
    try:
        yield
    finally:
        for namespace in namespaces:
            namespace["timestep_embedding"] = original
