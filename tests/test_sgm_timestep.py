"""SDXL's timestep embedding computed on the device (lib_ae/webui/sgm_timestep.py) gives sgm's numbers bit for bit.

The reference is sgm's `timestep_embedding` (Stability-AI/generative-models, sgm/modules/diffusionmodules/util.py),
written out below as sgm computes it (the table made on the CPU, then moved to the timesteps' device), followed by
A1111's cast of the result (sd_hijack_unet.py L145-150). When sgm itself is importable it is compared too.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from types import ModuleType
from typing import Any

import pytest
import torch

from lib_ae.webui import sgm_timestep


def sgm_reference(timesteps: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(start=0, end=half, dtype=torch.float32) / half).to(
        device=timesteps.device
    )
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


def never(*args: Any, **kwargs: Any) -> torch.Tensor:
    raise AssertionError("the original is only used for repeat_only")


TIMESTEPS = [
    torch.tensor([999.0, 500.5, 0.0, 1.0]),
    torch.tensor([981, 1, 0, 640]),  # DDIM/PLMS give integer timesteps
    torch.linspace(0, 999, 64, dtype=torch.float16),
]


@pytest.mark.parametrize("dim", [320, 256, 7, 1])
@pytest.mark.parametrize("timesteps", TIMESTEPS, ids=["float", "int", "half"])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_device_embedding_is_sgm_bit_for_bit(dim: int, timesteps: torch.Tensor, out_dtype: torch.dtype) -> None:
    expected = sgm_reference(timesteps, dim).to(out_dtype)
    got = sgm_timestep.device_timestep_embedding(timesteps, dim, original=never, output_dtype=lambda t: out_dtype)
    assert got.dtype == expected.dtype and torch.equal(got, expected)
    # The table is cached per device and size: the second call reads the cached copy and gives the same bits.
    again = sgm_timestep.device_timestep_embedding(timesteps, dim, original=never, output_dtype=lambda t: out_dtype)
    assert torch.equal(again, expected)


def test_repeat_only_goes_to_the_original() -> None:
    calls: list[tuple[int, bool]] = []

    def original(t: torch.Tensor, dim: int, max_period: int = 10000, repeat_only: bool = False) -> torch.Tensor:
        calls.append((dim, repeat_only))
        return t[:, None].expand(-1, dim)

    sgm_timestep.device_timestep_embedding(
        torch.ones(2), 4, repeat_only=True, original=original, output_dtype=lambda t: torch.float32
    )
    assert calls == [(4, True)]


def test_only_an_sgm_unet_gets_the_device_embedding_and_only_within() -> None:
    fake = ModuleType(sgm_timestep.SGM_UNET_MODULE)
    fake.timestep_embedding = sgm_reference  # type: ignore[attr-defined]
    unet_class = type("UNetModel", (torch.nn.Module,), {"__module__": sgm_timestep.SGM_UNET_MODULE})
    saved = sys.modules.get(sgm_timestep.SGM_UNET_MODULE)
    sys.modules[sgm_timestep.SGM_UNET_MODULE] = fake
    try:
        with sgm_timestep.device_side_embedding(unet_class(), lambda t: torch.float32, sys.modules.get):
            inside = fake.timestep_embedding  # type: ignore[attr-defined]
            assert inside is not sgm_reference
            t = torch.tensor([3.0, 700.0])
            assert torch.equal(inside(t, 9), sgm_reference(t, 9))
        assert fake.timestep_embedding is sgm_reference  # type: ignore[attr-defined]
        ldm_unet = torch.nn.Linear(1, 1)  # any other UNet: nothing replaced
        with sgm_timestep.device_side_embedding(ldm_unet, lambda t: torch.float32, sys.modules.get):
            assert fake.timestep_embedding is sgm_reference  # type: ignore[attr-defined]
    finally:
        if saved is None:
            del sys.modules[sgm_timestep.SGM_UNET_MODULE]
        else:
            sys.modules[sgm_timestep.SGM_UNET_MODULE] = saved


@pytest.mark.skipif(importlib.util.find_spec("sgm") is None, reason="sgm (generative-models) is not installed")
def test_equal_to_sgm_itself() -> None:
    from sgm.modules.diffusionmodules.util import timestep_embedding

    for timesteps in TIMESTEPS:
        got = sgm_timestep.device_timestep_embedding(
            timesteps, 320, original=never, output_dtype=lambda t: torch.float32
        )
        assert torch.equal(got, timestep_embedding(timesteps, 320))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bit_identical_on_cuda_and_capturable() -> None:
    timesteps = torch.tensor([999.0, 10.0], device="cuda")
    expected = sgm_reference(timesteps, 320)
    got = sgm_timestep.device_timestep_embedding(timesteps, 320, original=never, output_dtype=lambda t: torch.float32)
    assert torch.equal(got, expected)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # no host-to-device copy inside: the table is already on the device
        captured = sgm_timestep.device_timestep_embedding(
            timesteps, 320, original=never, output_dtype=lambda t: torch.float32
        )
    graph.replay()
    assert torch.equal(captured, expected)


def test_namespaces_that_imported_sgms_function_get_the_device_embedding_beside_any_unet() -> None:
    """ControlNet's cldm.py imports sgm's `timestep_embedding` by name (A1111's sgm tree is importable, so even an SD1
    ControlNet takes it): within the pass its namespace gets the same device-side function, then its own back."""
    fake = ModuleType(sgm_timestep.SGM_UNET_MODULE)
    fake.timestep_embedding = sgm_reference  # type: ignore[attr-defined]
    saved = sys.modules.get(sgm_timestep.SGM_UNET_MODULE)
    sys.modules[sgm_timestep.SGM_UNET_MODULE] = fake
    cldm: dict[str, Any] = {"timestep_embedding": sgm_reference}
    other: dict[str, Any] = {"timestep_embedding": lambda *a, **k: None}
    try:
        ldm_unet = torch.nn.Linear(1, 1)
        with sgm_timestep.device_side_embedding(ldm_unet, lambda t: torch.float32, sys.modules.get, [cldm, other]):
            assert fake.timestep_embedding is sgm_reference  # type: ignore[attr-defined]  # an SD1 UNet's own
            inside = cldm["timestep_embedding"]
            assert inside is not sgm_reference and other["timestep_embedding"] is not inside
            t = torch.tensor([3.0, 700.0])
            assert torch.equal(inside(t, 9), sgm_reference(t, 9))
        assert cldm["timestep_embedding"] is sgm_reference
    finally:
        if saved is None:
            del sys.modules[sgm_timestep.SGM_UNET_MODULE]
        else:
            sys.modules[sgm_timestep.SGM_UNET_MODULE] = saved
