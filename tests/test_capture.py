"""Attention capture on the real CompVis ldm UNet (random weights): what it reads, and that it leaves no trace."""

from __future__ import annotations

import contextlib
from typing import Iterator

import pytest
import torch

import lib_ae.capture

from lib_ae import AttendAndExcite, AttentionCapture, CaptureError, ExciteConfig, TokenSelection, frozen_parameters
from support.models import SD1_LIKE, SD2_LIKE, SDXL_LIKE, make_unet

CONFIGS = {"sd1": SD1_LIKE, "sd2": SD2_LIKE, "sdxl": SDXL_LIKE}


@contextlib.contextmanager
def captured_layers(unet: torch.nn.Module) -> Iterator[list[str]]:
    """The names of the layers whose probabilities the capture computes, in order (seen through the public
    `attention_probabilities` it calls for each captured layer)."""
    names = {module: name for name, module in unet.named_modules()}
    seen: list[str] = []
    original = lib_ae.capture.attention_probabilities

    def recording(module: torch.nn.Module, hidden: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        seen.append(names[module])
        return original(module, hidden, context)

    lib_ae.capture.attention_probabilities = recording
    try:
        yield seen
    finally:
        lib_ae.capture.attention_probabilities = original


def inputs(unet: torch.nn.Module, batch: int = 1, side: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    dtype = next(unet.parameters()).dtype
    context_dim = next(m for n, m in unet.named_modules() if n.endswith("attn2")).to_k.in_features
    x = torch.randn(batch, 4, side, side, generator=g, dtype=dtype)
    t = torch.full((batch,), 500.0, dtype=dtype)
    context = torch.randn(batch, 77, context_dim, generator=g, dtype=dtype)
    return x, t, context


def explicit_maps(unet: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, size: int) -> tuple[torch.Tensor, list[str]]:
    """Reference aggregation: each matching attn2 runs the vanilla CompVis math (softmax(q k^T * scale)) itself."""
    found: list[tuple[str, torch.Tensor]] = []

    def hook(name: str):
        def fn(module: torch.nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> None:
            hidden, ctx = args[0], kwargs["context"]
            if hidden.shape[1] != size * size:
                return
            h = module.heads
            q = module.to_q(hidden)
            k = module.to_k(ctx)
            d = q.shape[-1] // h
            q = q.reshape(q.shape[0], -1, h, d).permute(0, 2, 1, 3).reshape(-1, q.shape[1], d)
            k = k.reshape(k.shape[0], -1, h, d).permute(0, 2, 1, 3).reshape(-1, k.shape[1], d)
            sim = torch.einsum("bid,bjd->bij", q, k) * module.scale
            found.append((name, sim.softmax(-1).reshape(x.shape[0], h, size * size, -1)))

        return fn

    handles = [m.register_forward_hook(hook(n), with_kwargs=True) for n, m in unet.named_modules() if n.endswith("attn2")]
    unet(x, t, context=context)
    for handle in handles:
        handle.remove()
    stacked = torch.cat([maps for _, maps in found], dim=1)  # (B, layers*heads, N, T)
    return stacked.mean(1).reshape(x.shape[0], size, size, -1), [name for name, _ in found]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_maps_equal_explicit_softmax_mean_over_layers_and_heads(name: str) -> None:
    unet = make_unet(CONFIGS[name], seed=1, dtype=torch.float64)
    x, t, context = inputs(unet, batch=2)
    expected, layers = explicit_maps(unet, x, t, context, 8)
    assert layers, "the tiny config must have cross-attention at 1/4 of the latent"
    capture = AttentionCapture(unet, early_stop=False)
    with captured_layers(unet) as recorded_layers, capture.record(8, 8) as recording:
        unet(x, t, context=context)
    assert recorded_layers == layers
    assert torch.allclose(recording.maps(), expected, atol=1e-14)
    capture.remove()


def test_hooks_survive_class_level_forward_swap() -> None:
    """A1111 assigns CrossAttention.forward at class level (sd_hijack.apply_optimizations); instance hooks stay."""
    from ldm.modules.attention import CrossAttention

    unet = make_unet(SD1_LIKE, seed=2)
    x, t, context = inputs(unet)
    capture = AttentionCapture(unet)
    original = CrossAttention.forward

    def swapped(self: CrossAttention, x: torch.Tensor, context: torch.Tensor | None = None, mask: object = None, **kw: object) -> torch.Tensor:
        heads, ctx = self.heads, x if context is None else context
        q, k, v = self.to_q(x), self.to_k(ctx), self.to_v(ctx)
        b = q.shape[0]
        q, k, v = (z.reshape(b, -1, heads, z.shape[-1] // heads).transpose(1, 2) for z in (q, k, v))
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(b, -1, out.shape[1] * out.shape[-1]))

    try:
        with captured_layers(unet) as layers_before, capture.record(8, 8) as before:
            unet(x, t, context=context)
        CrossAttention.forward = swapped
        with captured_layers(unet) as layers_after, capture.record(8, 8) as after:
            unet(x, t, context=context)
    finally:
        CrossAttention.forward = original
    assert layers_after == layers_before and layers_before
    assert torch.allclose(after.maps(), before.maps(), atol=1e-6)
    capture.remove()


def test_remove_leaves_no_trace_and_idle_capture_changes_nothing() -> None:
    unet = make_unet(SD2_LIKE, seed=3)
    x, t, context = inputs(unet)
    with torch.no_grad():
        baseline = unet(x, t, context=context)
    hooks_before = {n: (dict(m._forward_hooks), dict(m._forward_hooks_with_kwargs)) for n, m in unet.named_modules()}
    capture = AttentionCapture(unet)
    with torch.no_grad():
        idle = unet(x, t, context=context)
    assert torch.equal(idle, baseline), "an attached but idle capture must leave the UNet output bit-identical"
    capture.remove()
    assert not capture.attached
    hooks_after = {n: (dict(m._forward_hooks), dict(m._forward_hooks_with_kwargs)) for n, m in unet.named_modules()}
    assert hooks_after == hooks_before
    with torch.no_grad():
        assert torch.equal(unet(x, t, context=context), baseline)
    with pytest.raises(CaptureError):
        with capture.record(8, 8):
            pass


def test_early_stop_gives_the_same_gradient_with_fewer_layers() -> None:
    unet = make_unet(SD1_LIKE, seed=4, dtype=torch.float64)
    x, t, context = inputs(unet)
    selection = TokenSelection.official(77, [[2], [5]])
    grads = {}
    reached_output: dict[bool, int] = {}
    for early in (False, True):
        outputs = [0]
        handle = unet.out.register_forward_pre_hook(lambda *_: outputs.__setitem__(0, outputs[0] + 1))
        capture = AttentionCapture(unet, early_stop=early)
        engine = AttendAndExcite(capture, ExciteConfig(early_stop=early, thresholds={}))
        plan = engine.plan(10)
        ran: list[int] = []

        def run_unet(latent: torch.Tensor, rows: torch.Tensor) -> None:
            ran.append(1)
            unet(latent, t[rows], context=context[rows])

        engine.step(x, 0, plan, [selection], run_unet)  # first forward: learns which layer is last at 8x8
        outputs[0] = 0
        updated, report = engine.step(x, 1, plan, [selection], run_unet)
        reached_output[early] = outputs[0]
        grads[early] = updated - x
        capture.remove()
        handle.remove()
    assert reached_output == {False: 1, True: 0}, "with early stop the forward must end before the output layers"
    assert torch.allclose(grads[True], grads[False], atol=1e-14, rtol=0)
    assert grads[True].abs().max() > 0


def test_even_the_first_gradient_forward_stops_early() -> None:
    """The layer order is learned by one no-grad probe forward, so no gradient forward ever runs the whole UNet (its
    activations would be the run's memory peak)."""
    unet = make_unet(SD1_LIKE, seed=4, dtype=torch.float64)
    x, t, context = inputs(unet)
    reached: list[bool] = []
    handle = unet.out.register_forward_pre_hook(lambda *_: reached.append(torch.is_grad_enabled()))
    capture = AttentionCapture(unet)
    engine = AttendAndExcite(capture, ExciteConfig(thresholds={}))

    def run_unet(latent: torch.Tensor, rows: torch.Tensor) -> None:
        unet(latent, t[rows], context=context[rows])

    for step in (0, 1):
        engine.step(x, step, engine.plan(10), [TokenSelection.official(77, [[2], [5]])], run_unet)
    handle.remove()
    capture.remove()
    assert reached == [False], "only the probe (no grad) may reach the output layers"


def test_missing_resolution_is_a_clear_error() -> None:
    unet = make_unet(SD1_LIKE, seed=5)
    x, t, context = inputs(unet)
    capture = AttentionCapture(unet)
    with pytest.raises(CaptureError, match="5x5"):
        with capture.record(5, 5):
            unet(x, t, context=context)
    capture.remove()


def test_frozen_parameters_are_restored() -> None:
    unet = make_unet(SD1_LIKE, seed=6)
    next(unet.parameters()).requires_grad_(False)
    before = [p.requires_grad for p in unet.parameters()]
    with frozen_parameters(unet):
        assert not any(p.requires_grad for p in unet.parameters())
    assert [p.requires_grad for p in unet.parameters()] == before


def explicit_self_attention(unet: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                            size: int) -> torch.Tensor:
    """Reference: every attn1 at this size runs softmax(q k^T * scale) over all its patches; (B, N, N), the mean over
    layers and heads (the official `aggregate_attention(is_cross=False)`)."""
    found: list[torch.Tensor] = []

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> None:
        hidden = args[0]
        if hidden.shape[1] != size * size or kwargs.get("context") is not None:
            return
        h = module.heads
        q, k = module.to_q(hidden), module.to_k(hidden)
        d = q.shape[-1] // h
        q = q.reshape(q.shape[0], -1, h, d).transpose(1, 2)
        k = k.reshape(k.shape[0], -1, h, d).transpose(1, 2)
        found.append((q @ k.transpose(-1, -2) * module.scale).softmax(-1))

    handles = [m.register_forward_hook(hook, with_kwargs=True) for n, m in unet.named_modules() if n.endswith("attn1")]
    unet(x, t, context=context)
    for handle in handles:
        handle.remove()
    return torch.cat(found, dim=1).mean(1)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_self_attention_rows_equal_the_explicit_maps_and_their_gradient(name: str) -> None:
    """`self_attention_rows` (each layer's probabilities recomputed in the backward, never kept) gives the rows and
    the gradient of the full explicit maps; the self-attention hooks are attached only once asked for."""
    unet = make_unet(CONFIGS[name], seed=1, dtype=torch.float64)
    x, t, context = inputs(unet, batch=2)
    capture = AttentionCapture(unet, early_stop=False)
    plain_hooks = sum(len(m._forward_hooks) for m in unet.modules())
    weights = torch.rand(2, 3, 64, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    leaf = x.clone().requires_grad_(True)
    with capture.record(8, 8, self_attention=True) as recording:
        unet(leaf, t, context=context)
    rows = recording.self_attention_rows(weights)
    (ours,) = torch.autograd.grad((rows * rows).sum(), [leaf])
    leaf = x.clone().requires_grad_(True)
    explicit = explicit_self_attention(unet, leaf, t, context, 8)
    assert torch.allclose(rows, weights @ explicit, rtol=1e-12, atol=1e-15)
    (theirs,) = torch.autograd.grad(((weights @ explicit) ** 2).sum(), [leaf])
    assert torch.allclose(ours, theirs, rtol=1e-10, atol=1e-14)
    assert sum(len(m._forward_hooks) for m in unet.modules()) > plain_hooks
    with pytest.raises(CaptureError, match="self-attention"), capture.record(8, 8) as without:
        unet(x, t, context=context)
        without.self_attention_rows(weights)
    capture.remove()
    assert sum(len(m._forward_hooks) for m in unet.modules()) == 0
