"""What `differentiable_unet`'s weight replacement costs in GPU memory, at SD1.5's size in float16 (the stand-in of
tests/support/forge_standin.py with random weights): "clone" raises the peak of a forward and backward by the UNet's
weights and frees them on exit, "alias" costs nothing. Needs CUDA (skipped elsewhere); also runs as a script,
`python tests/test_forge_gpu_memory.py`, printing the figures.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

if __name__ == "__main__":  # lib_ae and tests/support importable when run as a script
    sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

import pytest
import torch

from lib_ae.comfy_unet import WeightMode, differentiable_latent, differentiable_unet
from support.forge_standin import make_forge_standin

logger = logging.getLogger(__name__)

MIB = 2**20


def sd15_config() -> object:
    """SD1.5's UNet (860M parameters): the stand-in reads only these fields (support.models.TinyUnetConfig's)."""
    from types import SimpleNamespace

    return SimpleNamespace(
        channel_mult=(1, 2, 4, 4), attention_resolutions=(4, 2, 1), context_dim=768, num_heads=8,
        num_head_channels=-1, transformer_depth=1, use_linear_in_transformer=False, model_channels=320,
        num_res_blocks=2, in_channels=4, out_channels=4, middle_factor=8,
    )


def measure() -> dict[str, float]:
    """Peak memory above the resting state of one forward and backward (batch 1, 64x64 latent) per weight mode, and
    what stays allocated after the block, in MiB."""
    device = torch.device("cuda")
    unet = make_forge_standin(sd15_config(), None, dtype=torch.float16, device=device)  # type: ignore[arg-type]
    weight_bytes = sum(p.numel() * p.element_size() for p in unet.parameters())
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.inference_mode():
        x = torch.randn(1, 4, 64, 64, generator=generator, device=device, dtype=torch.float16)
        t = torch.full((1,), 500.0, device=device)
        context = torch.randn(1, 77, 768, generator=generator, device=device, dtype=torch.float16)
    figures = {"weights_mib": weight_bytes / MIB}
    modes: tuple[WeightMode, ...] = ("alias", "clone", "alias")  # alias twice: the first warms the kernels up
    for index, mode in enumerate(modes):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        resting = torch.cuda.memory_allocated()
        with torch.inference_mode(), differentiable_unet(unet, weights=mode):
            leaf = differentiable_latent(x).requires_grad_(True)
            out = unet(leaf, t, context=context, transformer_options={})
            (grad,) = torch.autograd.grad(out.float().square().mean(), [leaf])
            assert torch.isfinite(grad).all()
            del out, grad, leaf
        torch.cuda.synchronize()
        if index > 0:
            figures[f"{mode}_peak_mib"] = (torch.cuda.max_memory_allocated() - resting) / MIB
            figures[f"{mode}_left_mib"] = (torch.cuda.memory_allocated() - resting) / MIB
    return figures


@pytest.mark.skipif(not torch.cuda.is_available(), reason="measures CUDA memory")
def test_clone_costs_the_weights_once_and_alias_nothing() -> None:
    figures = measure()
    logger.info("Forge pass weight memory at SD1.5 fp16: %s", figures)
    assert abs(figures["clone_peak_mib"] - figures["alias_peak_mib"] - figures["weights_mib"]) \
        <= 0.02 * figures["weights_mib"]
    assert figures["clone_left_mib"] < 1 and figures["alias_left_mib"] < 1


if __name__ == "__main__":
    print(json.dumps(measure()))
