"""The test doubles themselves: tiny CompVis UNets (and their diffusers twins), k-diffusion, the CLIP tokenizer.

Everything else in the suite trusts these: that the ldm UNet has cross-attention where the real models have it, that
the diffusers conversion is exact (so reference-pipeline comparisons compare algorithms, not weights), that
k-diffusion's samplers run on the ldm wrapper the way A1111 drives them, and that token ids are the real CLIP ids.
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from support.models import (
    SD1_LIKE,
    SD2_LIKE,
    SDXL_LIKE,
    LdmDenoiserModel,
    TinyUnetConfig,
    make_unet,
    sd_alphas_cumprod,
    to_diffusers_unet,
)
from support.thirdparty import A1111_KDIFFUSION_SAMPLERS, clip_tokenizer, import_k_diffusion
from torch import nn

CONFIGS = {"sd1": SD1_LIKE, "sd2": SD2_LIKE, "sdxl": SDXL_LIKE}

# Cross-attention modules (relative to the UNet) whose query is the 1/4-resolution latent grid; the same indices as
# the real SD1/SD2 (16x16 on a 64x64 latent) and SDXL (32x32 on a 128x128 latent) UNets.
QUARTER_ATTN2 = {
    "sd1": [
        "input_blocks.7.1.transformer_blocks.0.attn2",
        "input_blocks.8.1.transformer_blocks.0.attn2",
        "output_blocks.3.1.transformer_blocks.0.attn2",
        "output_blocks.4.1.transformer_blocks.0.attn2",
        "output_blocks.5.1.transformer_blocks.0.attn2",
    ],
    "sdxl": [
        f"{block}.1.transformer_blocks.{i}.attn2"
        for block in (
            "input_blocks.7",
            "input_blocks.8",
            "middle_block",
            "output_blocks.0",
            "output_blocks.1",
            "output_blocks.2",
        )
        for i in (0, 1)
    ],
}
QUARTER_ATTN2["sd2"] = QUARTER_ATTN2["sd1"]
MIDDLE_ATTN2 = ["middle_block.1.transformer_blocks.0.attn2"]


@functools.cache
def cached_unet(name: str, dtype: torch.dtype) -> nn.Module:
    """One UNet per config and dtype for the read-only tests of this module (hooks are always removed again)."""
    return make_unet(CONFIGS[name], seed=0, dtype=dtype)


def unet_inputs(
    config: TinyUnetConfig, dtype: torch.dtype, batch: int, height: int, width: int, seed: int = 1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Latent, fractional timesteps (as CompVisDenoiser passes them) and a 77-token context."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, height, width, generator=g, dtype=dtype)
    t = torch.linspace(999.0, 37.25, batch, dtype=dtype)
    context = torch.randn(batch, 77, config.context_dim, generator=g, dtype=dtype)
    return x, t, context


def attn2_calls(unet: nn.Module, run: Callable[[], Any]) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
    """(name, query input, softmax(q k^T * scale) per head) of every attn2 call while `run()` executes."""
    seen: list[tuple[str, torch.Tensor, torch.Tensor]] = []

    def hook(name: str) -> Callable[..., None]:
        def record(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: torch.Tensor) -> None:
            hidden, context = args[0], kwargs["context"]
            q, k = module.to_q(hidden), module.to_k(context)
            heads, width = module.heads, q.shape[-1] // module.heads
            q = q.reshape(q.shape[0], -1, heads, width).transpose(1, 2)
            k = k.reshape(k.shape[0], -1, heads, width).transpose(1, 2)
            seen.append((name, hidden, (q @ k.transpose(-1, -2) * module.scale).softmax(-1)))

        return record

    handles = [
        m.register_forward_hook(hook(n), with_kwargs=True) for n, m in unet.named_modules() if n.endswith("attn2")
    ]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return iter(seen)


def unet_heads(unet: nn.Module, layer: str) -> int:
    """Head count of one attention module."""
    heads: int = unet.get_submodule(layer).heads
    return heads


# ---------------------------------------------------------------------------------------------------------------------
# The tiny UNets


def test_make_unet_is_deterministic_and_leaves_the_global_rng_alone() -> None:
    state = torch.get_rng_state()
    first, again, other = make_unet(SD2_LIKE, seed=7), make_unet(SD2_LIKE, seed=7), make_unet(SD2_LIKE, seed=8)
    wide = make_unet(SD2_LIKE, seed=7, dtype=torch.float64)
    assert torch.equal(torch.get_rng_state(), state)
    pairs = list(zip(first.parameters(), again.parameters(), other.parameters(), wide.parameters(), strict=True))
    assert all(torch.equal(a, b) for a, b, _, _ in pairs)
    assert all(torch.equal(a.double(), w) and w.dtype == torch.float64 for a, _, _, w in pairs)
    assert sum(not torch.equal(a, c) for a, _, c, _ in pairs) == len(pairs)
    # ldm's zero-initialised layers (ResBlock out conv, transformer proj_out, final conv) are random too.
    assert all(p.abs().sum() > 0 for p in first.parameters())
    assert not first.training and all(p.requires_grad for p in first.parameters())


@pytest.mark.parametrize("name", ["sd1", "sd2", "sdxl"])
def test_cross_attention_sits_at_a_quarter_of_the_latent(name: str) -> None:
    config = CONFIGS[name]
    unet = cached_unet(name, torch.float64)
    x, t, context = unet_inputs(config, torch.float64, batch=1, height=32, width=32)
    with torch.no_grad():
        calls = list(attn2_calls(unet, lambda: unet(x, t, context=context)))
    by_length: dict[int, list[str]] = {}
    for layer, hidden, probs in calls:
        by_length.setdefault(hidden.shape[1], []).append(layer)
        assert probs.shape == (1, unet_heads(unet, layer), hidden.shape[1], 77)
        # Random weights, yet far from uniform attention (1/77): the maps carry signal for A&E's loss.
        assert probs.max(-1).values.mean() > 3 / 77
    assert by_length[(32 // 4) * (32 // 4)] == QUARTER_ATTN2[name]
    if name == "sdxl":
        assert set(by_length) == {16 * 16, 8 * 8}, "SDXL has no cross-attention at full resolution"
    else:
        assert set(by_length) == {32 * 32, 16 * 16, 8 * 8, 4 * 4}
        assert by_length[(32 // 8) * (32 // 8)] == MIDDLE_ATTN2


@pytest.mark.parametrize("name", ["sd1", "sd2"])
def test_gradients_reach_the_latent(name: str) -> None:
    config = CONFIGS[name]
    unet = cached_unet(name, torch.float64)
    x, t, context = unet_inputs(config, torch.float64, batch=2, height=16, width=24)  # non-square: 4 x 6 at 1/4
    x.requires_grad_(True)
    out: list[torch.Tensor] = []
    calls = list(attn2_calls(unet, lambda: out.append(unet(x, t, context=context))))
    quarter = [probs for layer, _, probs in calls if layer in QUARTER_ATTN2[name]]
    assert len(quarter) == len(QUARTER_ATTN2[name]) and all(probs.shape[2] == 4 * 6 for probs in quarter)
    # A&E-like loss: the strongest 1/4-level response of two token columns.
    excite = sum(probs[..., [2, 5]].mean(1).amax(1).sum() for probs in quarter)
    (grad_excite,) = torch.autograd.grad(excite, x, retain_graph=True)
    (grad_out,) = torch.autograd.grad(out[0].square().mean(), x)
    for grad in (grad_excite, grad_out):
        assert torch.isfinite(grad).all()
        assert (grad.flatten(1).abs().amax(1) > 0).all(), "every image of the batch gets a gradient"
    assert all(p.grad is None for p in unet.parameters())


def test_alphas_cumprod_are_diffusers_scaled_linear() -> None:
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    assert torch.equal(sd_alphas_cumprod(), scheduler.alphas_cumprod)
    assert sd_alphas_cumprod().dtype == torch.float32
    assert LdmDenoiserModel(cached_unet("sd1", torch.float64)).alphas_cumprod.dtype == torch.float64
    assert LdmDenoiserModel(cached_unet("sd1", torch.float32)).alphas_cumprod.dtype == torch.float32


@pytest.mark.parametrize("name", ["sd1", "sd2", "sdxl"])
def test_diffusers_conversion_is_exact_in_float64(name: str) -> None:
    config = CONFIGS[name]
    unet = cached_unet(name, torch.float64)
    converted = to_diffusers_unet(unet, config)
    assert next(converted.parameters()).dtype == torch.float64 and not converted.training
    assert converted.config.use_linear_projection == config.use_linear_in_transformer
    # Weights are copies, not shared storage.
    assert not {p.data_ptr() for p in converted.parameters()} & {p.data_ptr() for p in unet.parameters()}
    x, t, context = unet_inputs(config, torch.float64, batch=2, height=24, width=16)
    with torch.no_grad():
        expected = unet(x, t, context=context)
        got = converted(x, t, encoder_hidden_states=context).sample
    assert expected.abs().max() > 0.1
    assert (got - expected).abs().max() / expected.abs().max() < 1e-10


# ---------------------------------------------------------------------------------------------------------------------
# k-diffusion, as A1111 drives it


def test_k_diffusion_imports_without_its_package_init() -> None:
    sampling, external = import_k_diffusion()
    assert import_k_diffusion() == (sampling, external)
    package = sys.modules["k_diffusion"]
    assert package.sampling is sampling and package.external is external
    assert not hasattr(package, "Denoiser"), "k_diffusion/__init__.py must not have run"
    stub = sys.modules.get("torchvision")
    assert stub is None or type(stub).__name__ != "_TorchvisionStub", "the stub is only registered during the import"


def test_euler_runs_the_ldm_unet_through_compvis_denoiser() -> None:
    sampling, external = import_k_diffusion()
    unet = cached_unet("sd1", torch.float32)
    denoiser = external.CompVisDenoiser(LdmDenoiserModel(unet))
    # SD's discrete sigma range (what A1111 shows as sigma min/max for SD1/SD2).
    assert math.isclose(denoiser.sigma_min.item(), 0.0292, abs_tol=1e-4)
    assert math.isclose(denoiser.sigma_max.item(), 14.6146, abs_tol=1e-4)
    _, _, context = unet_inputs(SD1_LIKE, torch.float32, batch=2, height=16, width=16)
    sigmas = denoiser.get_sigmas(3)
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3)) * sigmas[0]

    timesteps: list[torch.Tensor] = []
    handle = unet.register_forward_pre_hook(lambda module, args: timesteps.append(args[1].detach().clone()))
    try:
        with torch.no_grad():
            sample = sampling.sample_euler(denoiser, x, sigmas, extra_args={"cond": context}, disable=True)
            first = sampling.sample_euler(denoiser, x, sigmas[:2], extra_args={"cond": context}, disable=True)
            eps = unet(x / (sigmas[0] ** 2 + 1) ** 0.5, torch.full((2,), 999.0), context=context)
            # A1111's CFGDenoiser hands the ldm model a dict; c_concat is ignored by a crossattn model.
            as_dict = denoiser(x, sigmas[0].expand(2), cond={"c_crossattn": [context], "c_concat": [None]})
            as_tensor = denoiser(x, sigmas[0].expand(2), cond=context)
    finally:
        handle.remove()
    assert len(timesteps) == 3 + 1 + 1 + 2
    assert torch.allclose(timesteps[0], torch.full((2,), 999.0)), "t = 999 at sigma_max"
    assert sample.shape == x.shape and torch.isfinite(sample).all() and not torch.equal(sample, x)
    # One Euler step is x + (sigma_1 - sigma_0) * eps(x / sqrt(sigma_0^2 + 1), t_0): the CompVis wiring is exact.
    assert (first - (x + (sigmas[1] - sigmas[0]) * eps)).abs().max() < 1e-5 * x.abs().max()
    assert torch.equal(as_dict, as_tensor)


# torchsde rounds the Brownian tree's ends to 6 digits, so querying at the exact float32 sigma_min / sigma_max warns
# (A1111 logs the same); harmless.
@pytest.mark.filterwarnings("ignore:Should have t:UserWarning")
def test_a1111_sampler_table_runs_with_its_model_call_counts() -> None:
    _, external = import_k_diffusion()
    assert list(A1111_KDIFFUSION_SAMPLERS) == [
        "Euler",
        "Euler a",
        "LMS",
        "Heun",
        "DPM2",
        "DPM2 a",
        "DPM++ 2S a",
        "DPM++ 2M",
        "DPM++ SDE",
        "DPM++ 2M SDE",
        "DPM++ 3M SDE",
    ]

    class Shrink(nn.Module):
        """A stand-in ldm model: eps = x / 2, enough for counting model calls."""

        alphas_cumprod = sd_alphas_cumprod()

        def apply_model(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
            return x / 2

    denoiser = external.CompVisDenoiser(Shrink())
    counted = CountingDenoiser(denoiser)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    with torch.random.fork_rng(devices=[]):  # the ancestral samplers draw from the global RNG
        run_every_sampler(denoiser, counted, x)
    assert A1111_KDIFFUSION_SAMPLERS["DPM++ SDE"].options == {
        "scheduler": "karras",
        "second_order": True,
        "brownian_noise": True,
    }


def run_every_sampler(denoiser: nn.Module, counted: CountingDenoiser, x: torch.Tensor) -> None:
    for label, spec in A1111_KDIFFUSION_SAMPLERS.items():
        steps = 4
        sigmas = spec.sigmas(denoiser, steps)
        assert len(sigmas) == steps + 1 and sigmas[-1] == 0 and (sigmas[:-1] > 0).all(), label
        if spec.scheduler == "karras":
            assert math.isclose(sigmas[0].item(), denoiser.sigma_max.item(), rel_tol=1e-5), label
        counted.calls = 0
        with torch.no_grad():
            out = spec.function()(
                counted,
                x * sigmas[0],
                sigmas,
                extra_args={"cond": None},
                disable=True,
                **spec.extra_kwargs(x, sigmas, seeds=[11, 12]),
            )
        assert torch.isfinite(out).all(), label
        assert counted.calls == spec.model_calls(steps), label
        assert ("noise_sampler" in spec.extra_kwargs(x, sigmas, [1, 2])) == spec.brownian_noise


class CountingDenoiser(nn.Module):
    """Counts model calls of a k-diffusion sampler."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.calls = 0

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        self.calls += 1
        out: torch.Tensor = self.inner(x, sigma, **kwargs)
        return out


# ---------------------------------------------------------------------------------------------------------------------
# CLIP tokenizer


def test_open_clip_tokenizer_encodes_offline_without_the_package() -> None:
    tokenizer = clip_tokenizer()
    assert clip_tokenizer() is tokenizer
    ids = tokenizer.encode("a cat and a dog")
    assert len(ids) == 5
    assert ids[1] == tokenizer.encoder["cat</w>"] == 2368
    assert ids[4] == tokenizer.encoder["dog</w>"] == 1929
    assert ids[0] == ids[3] == tokenizer.encoder["a</w>"]
    row = tokenizer("a cat and a dog")[0]
    assert row.shape == (77,)
    assert row[:7].tolist() == [tokenizer.sot_token_id, *ids, tokenizer.eot_token_id]
    assert (tokenizer.sot_token_id, tokenizer.eot_token_id) == (49406, 49407)
    assert "open_clip" not in sys.modules
