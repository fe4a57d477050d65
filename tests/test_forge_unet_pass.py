"""A differentiable pass through Forge's UNet (lib_ae.comfy_unet), on the stand-in of
tests/support/forge_standin.py (CI) and, where AE_FORGE_DIR names a Forge checkout, on Forge's own `backend.nn.unet` (in
a subprocess: this file is also its worker, `python tests/test_forge_unet_pass.py FORGE_DIR`).

The reference is the ldm UNet of tests/support/models.py with the same weights, run outside inference mode: in float64,
the gradient with respect to the latent of a plain function of the UNet output (ControlNet residuals included) and of
the A&E objective (lib_ae's capture and Evaluator) must be the ldm UNet's, bit for bit where both attend with SDPA, else
within 1e-12 of the gradient's scale. The stand-in must also be able to fail: without the pass's changes, or with any
one of them left out, the backward breaks.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

if __name__ == "__main__":  # the real-Forge worker: lib_ae and tests/support importable before the imports below
    sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

import pytest
import torch
from torch import nn

import support.forge_standin as standin
from lib_ae import AttentionCapture, Excite, ExciteConfig, TokenSelection
from lib_ae.evaluator import Evaluator
from lib_ae.comfy_unet import (
    UnsupportedForgePatch,
    WeightMode,
    differentiable_latent,
    differentiable_unet,
    forge_namespace,
    normal_weights,
    out_of_place_blocks,
    out_of_place_control,
    own_attention,
    unsupported_patches,
    update_in_inference_mode,
)
from lib_ae.pass_memory import PassAttention, PassMemory, lean_forward
from support.models import SD1_LIKE, SD2_LIKE, SDXL_LIKE, TinyUnetConfig, make_unet
from support.threads import one_thread  # noqa: F401  (module-scoped, autouse)

CONFIGS = {"sd1": SD1_LIKE, "sd2": SD2_LIKE, "sdxl": SDXL_LIKE}
SELECTION = TokenSelection.official(77, [[2], [5]])
MEMORIES = {
    "own-attention-keep": PassMemory("keep", PassAttention()),
    "own-attention-recompute": PassMemory("recompute", PassAttention()),
    "host-attention-keep": PassMemory("keep", None),
}
TOLERANCE = 1e-12
"""Relative to the largest gradient entry, where ldm attends with its einsum and softmax and Forge's pass with SDPA (the
last bits move); where both attend with SDPA the comparisons are bit for bit."""
FORGE_DIR_VARIABLE = "AE_FORGE_DIR"
FAILURES = {
    "all": "Inference tensors cannot be saved for backward",
    "weights": "Inference tensors cannot be saved for backward",
    "blocks": "modified by an inplace operation",
    "control": "modified by an inplace operation",
    "attention": re.escape(standin.NO_BACKWARD_MESSAGE),
}
"""What autograd says when one of the four changes is missing ("all": none applied)."""


# -- Inputs, ControlNet residuals, references -------------------------------------------------------------------------


class Inputs:
    """One batch in float64 (timesteps float32, as Forge's KModel passes them; 16x16 latents, A&E maps 4x4), with the ControlNet residuals and the
    weights of the plain objective; `in_inference_mode()` gives the tensors as Forge's sampler holds them."""

    def __init__(self, config: TinyUnetConfig, ldm: nn.Module, batch: int = 2, side: int = 16) -> None:
        g = torch.Generator().manual_seed(3)
        self.x = torch.randn(batch, 4, side, side, generator=g, dtype=torch.float64)
        self.t = torch.tensor([700.0, 300.0][:batch], dtype=torch.float32)
        self.context = torch.randn(batch, 77, config.context_dim, generator=g, dtype=torch.float64)
        self.output_weights = torch.randn(batch, 4, side, side, generator=g, dtype=torch.float64)
        shapes = _block_output_shapes(ldm, self.x, self.t, self.context)
        self.input_residuals = [0.1 * torch.randn(s, generator=g, dtype=torch.float64) for s in shapes["input"]]
        self.middle_residual = 0.1 * torch.randn(shapes["middle"][0], generator=g, dtype=torch.float64)
        # Output block j concatenates the skip of input block (n - 1 - j).
        self.output_residuals = [0.1 * torch.randn(s, generator=g, dtype=torch.float64)
                                 for s in reversed(shapes["input"])]

    def in_inference_mode(self) -> Inputs:
        copy = object.__new__(Inputs)
        with torch.inference_mode():
            for name, value in vars(self).items():
                setattr(copy, name, [v.clone() for v in value] if isinstance(value, list) else value.clone())
        return copy

    def control(self) -> dict[str, list[torch.Tensor]]:
        """Forge's control dict: lists consumed with `pop()` from the end as the blocks run (a fresh one per call)."""
        return {"input": list(reversed(self.input_residuals)), "middle": [self.middle_residual],
                "output": list(reversed(self.output_residuals))}


def _block_output_shapes(ldm: nn.Module, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor
                         ) -> dict[str, list[torch.Size]]:
    shapes: dict[str, list[torch.Size]] = {"input": [], "middle": []}
    handles = [block.register_forward_hook(lambda m, a, out: shapes["input"].append(out.shape))
               for block in ldm.input_blocks]  # type: ignore[union-attr]
    handles.append(ldm.middle_block.register_forward_hook(  # type: ignore[union-attr]
        lambda m, a, out: shapes["middle"].append(out.shape)))
    try:
        with torch.no_grad():
            ldm(x, t, context=context)
    finally:
        for handle in handles:
            handle.remove()
    return shapes


@contextlib.contextmanager
def ldm_control(ldm: nn.Module, inputs: Inputs) -> Iterator[None]:
    """The ldm UNet with Forge's ControlNet arithmetic, through hooks: each input block's and the middle block's output
    plus its residual, and each output block's skip half of its input plus its residual."""
    handles = []
    for block, residual in zip(ldm.input_blocks, inputs.input_residuals):  # type: ignore[arg-type]
        handles.append(block.register_forward_hook(lambda m, a, out, r=residual: out + r))
    handles.append(ldm.middle_block.register_forward_hook(  # type: ignore[union-attr]
        lambda m, a, out: out + inputs.middle_residual))

    def add_to_skip(residual: torch.Tensor) -> Callable[[nn.Module, tuple[Any, ...]], tuple[Any, ...]]:
        def pre_hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
            h, skip = args[0].split([args[0].shape[1] - residual.shape[1], residual.shape[1]], dim=1)
            return (torch.cat([h, skip + residual], dim=1), *args[1:])
        return pre_hook

    for block, residual in zip(ldm.output_blocks, inputs.output_residuals):  # type: ignore[arg-type]
        handles.append(block.register_forward_pre_hook(add_to_skip(residual)))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def ldm_plain_gradient(ldm: nn.Module, inputs: Inputs, control: bool, sdpa: bool = False) -> torch.Tensor:
    """`sdpa`: attention computed by lib_ae's pass attention (SDPA) instead of ldm's einsum and softmax."""
    with contextlib.ExitStack() as stack:
        if control:
            stack.enter_context(ldm_control(ldm, inputs))
        if sdpa:
            capture = AttentionCapture(ldm)
            stack.callback(capture.remove)
            stack.enter_context(lean_forward(ldm, capture, PassMemory("keep", PassAttention()), recompute=False))
        leaf = inputs.x.clone().requires_grad_(True)
        out = ldm(leaf, inputs.t, context=inputs.context)
        (grad,) = torch.autograd.grad((out * inputs.output_weights).sum(), [leaf])
    return grad


def forge_plain_gradient(forge: nn.Module, inputs: Inputs, control: bool, weights: WeightMode = "clone",
                         attention: bool = True) -> torch.Tensor:
    host = inputs.in_inference_mode()
    with torch.inference_mode():  # Forge's generation
        with differentiable_unet(forge, weights=weights, attention=attention):
            leaf = differentiable_latent(host.x).requires_grad_(True)
            out = forge(leaf, host.t, context=host.context, control=host.control() if control else None,
                        transformer_options={})
            (grad,) = torch.autograd.grad((out * inputs.output_weights).sum(), [leaf])
    return grad


def ae_gradient(unet: nn.Module, latent: torch.Tensor, run: Callable[[torch.Tensor], object], memory: PassMemory
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The A&E objective's gradient and losses at `latent`, through lib_ae's capture and Evaluator."""
    capture = AttentionCapture(unet)
    try:
        evaluator = Evaluator(capture, Excite(ExciteConfig(thresholds={})), memory)
        plan = evaluator.loss_plan([(SELECTION, None)] * latent.shape[0], latent.device)
        size = evaluator.objective.config.attention_size(*latent.shape[-2:])
        evaluation = evaluator.forward_backward(latent, run, plan, size)
        return evaluation.grads, evaluation.losses
    finally:
        capture.remove()


def ldm_ae_gradient(ldm: nn.Module, inputs: Inputs, memory: PassMemory, control: bool
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    with ldm_control(ldm, inputs) if control else contextlib.nullcontext():
        return ae_gradient(ldm, inputs.x, lambda leaf: ldm(leaf, inputs.t, context=inputs.context), memory)


def forge_ae_gradient(forge: nn.Module, inputs: Inputs, memory: PassMemory, control: bool
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    host = inputs.in_inference_mode()

    def run(leaf: torch.Tensor) -> object:
        # A fresh transformer_options and control dict per call: the UNet writes into the first and consumes the second.
        return forge(leaf, host.t, context=host.context, control=host.control() if control else None,
                     transformer_options={})

    with torch.inference_mode(), differentiable_unet(forge):
        return ae_gradient(forge, differentiable_latent(host.x), run, memory)


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    scale = expected.abs().max().item()
    assert scale > 0
    difference = (actual - expected).abs().max().item()
    assert difference <= TOLERANCE * scale, f"max difference {difference:.3g} at scale {scale:.3g}"


def twins(config: TinyUnetConfig, make_forge: Callable[[TinyUnetConfig, Mapping[str, torch.Tensor]], nn.Module]
          ) -> tuple[nn.Module, nn.Module, Inputs]:
    ldm = make_unet(config, seed=4, dtype=torch.float64)
    forge = make_forge(config, ldm.state_dict())
    assert set(forge.state_dict()) == set(ldm.state_dict())
    return ldm, forge, Inputs(config, ldm)


# -- Checks shared by the stand-in tests and the real-Forge worker -----------------------------------------------------


def check_plain_gradients(ldm: nn.Module, forge: nn.Module, inputs: Inputs) -> None:
    """Bit for bit against the ldm UNet whose attention is SDPA too (lib_ae's own pass attention); within `TOLERANCE`
    against ldm's own einsum attention."""
    for control in (False, True):
        expected = ldm_plain_gradient(ldm, inputs, control, sdpa=True)
        assert torch.equal(forge_plain_gradient(forge, inputs, control), expected)
    assert_close(forge_plain_gradient(forge, inputs, True), ldm_plain_gradient(ldm, inputs, True))


AE_CASES = (("own-attention-keep", True), ("own-attention-recompute", False), ("host-attention-keep", False))
"""(memory, ControlNet residuals) of the A&E comparisons."""


def check_ae_gradients(ldm: nn.Module, forge: nn.Module, inputs: Inputs) -> None:
    """Bit for bit where both UNets attend with lib_ae's own pass attention (SDPA; the Forge pass's attention defers
    to `differentiable_unet`'s), within `TOLERANCE` where ldm keeps its own attention."""
    for memory_name, control in AE_CASES:
        memory = MEMORIES[memory_name]
        expected, expected_losses = ldm_ae_gradient(ldm, inputs, memory, control)
        actual, losses = forge_ae_gradient(forge, inputs, memory, control)
        if memory.attention is not None:
            assert torch.equal(actual, expected) and torch.equal(losses, expected_losses)
        else:
            assert_close(actual, expected)
            assert_close(losses, expected_losses)


def check_restored(forge: nn.Module, namespace: Mapping[str, Any], body: Callable[[], None]) -> None:
    """After `differentiable_unet` around `body` (which raises ValueError): the original inference tensors, no
    instance forwards, the module's own apply_control, inference mode as before."""
    originals = {name: p for name, p in forge.named_parameters()}
    apply_control = namespace["apply_control"]
    with torch.inference_mode():
        with pytest.raises(ValueError, match="body"):
            with differentiable_unet(forge) as setup:
                assert setup.weights.tensors == len(originals) and setup.blocks > 0 and setup.attention_layers > 0
                assert not torch.is_inference_mode_enabled() and torch.is_grad_enabled()
                assert not any(p.is_inference() for p in forge.parameters())
                assert namespace["apply_control"] is not apply_control
                body()
        assert torch.is_inference_mode_enabled()
    assert {name: p for name, p in forge.named_parameters()} == originals
    assert all(p.is_inference() for p in forge.parameters())
    assert not [name for name, m in forge.named_modules() if "forward" in m.__dict__]
    assert namespace["apply_control"] is apply_control


def forge_patches() -> dict[str, list[Callable[..., Any]]]:
    """Differentiable patches of every kind a transformer block honours, each reading its extra_options."""

    def scaled(n: torch.Tensor, extra: Mapping[str, Any]) -> torch.Tensor:
        assert extra["n_heads"] > 0 and extra["dim_head"] > 0 and extra["block"][0] in ("input", "middle", "output")
        return n * 0.9

    return {
        "attn1_patch": [lambda n, c, v, extra: (n, c * 1.1, v * 0.8)],
        "attn1_output_patch": [scaled],
        "middle_patch": [lambda x, extra: x + 0.01 * x.tanh()],
        "attn2_patch": [lambda n, c, v, extra: (n * 1.05, c, v * 1.2)],
        "attn2_output_patch": [scaled, lambda n, extra: n + 0.02],
    }


def check_patches_honoured(forge: nn.Module, inputs: Inputs) -> None:
    """With every in-line patch kind set, the pass's forward gives Forge's own output bit for bit, and its gradient
    is the derivative of that output (central difference along a random direction)."""
    host = inputs.in_inference_mode()

    def forward(x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = forge(x, host.t, context=host.context, transformer_options={"patches": forge_patches()})
        return out

    with torch.inference_mode():
        expected = forward(host.x)
        plain: torch.Tensor = forge(host.x, host.t, context=host.context, transformer_options={})
        assert (expected - plain).abs().max() > 1e-3  # the patches do change the output
        with differentiable_unet(forge):
            leaf = differentiable_latent(host.x).requires_grad_(True)
            out = forward(leaf)
            assert torch.equal(out.detach(), expected)
            (grad,) = torch.autograd.grad((out * inputs.output_weights).sum(), [leaf])
            direction = torch.randn(leaf.shape, generator=torch.Generator().manual_seed(9), dtype=leaf.dtype)
            eps = 1e-5
            with torch.no_grad():
                f_plus = (forward(leaf + eps * direction) * inputs.output_weights).sum()
                f_minus = (forward(leaf - eps * direction) * inputs.output_weights).sum()
            numeric = ((f_plus - f_minus) / (2 * eps)).item()
            analytic = (grad * direction).sum().item()
            assert abs(numeric - analytic) <= 1e-6 * abs(analytic), (numeric, analytic)


def check_ae_with_patches(forge: nn.Module, inputs: Inputs) -> None:
    """The A&E pass through a patched UNet runs in every memory mode, with the same bytes: lib_ae's own attention
    defers to the pass's (it sees `transformer_options`, and the patches' tensor `value`), recomputation repeats the
    patches."""
    host = inputs.in_inference_mode()

    def run(leaf: torch.Tensor) -> object:
        return forge(leaf, host.t, context=host.context, transformer_options={"patches": forge_patches()})

    results = []
    for memory in MEMORIES.values():
        with torch.inference_mode(), differentiable_unet(forge):
            results.append(ae_gradient(forge, differentiable_latent(host.x), run, memory))
    for grads, losses in results[1:]:
        assert torch.equal(grads, results[0][0]) and torch.equal(losses, results[0][1])
    assert torch.isfinite(results[0][0]).all() and results[0][0].abs().max() > 0


def check_replacement_refused(forge: nn.Module, inputs: Inputs) -> None:
    host = inputs.in_inference_mode()
    # The first transformer block sits in an input block: Forge's key for it is ("input", that block's index).
    first = next(name for name, m in forge.named_modules() if name.endswith("transformer_blocks.0"))
    side, index = first.split(".")[:2]
    assert side == "input_blocks"
    key = ("input", int(index))
    options = {"patches_replace": {"attn2": {key: lambda q, k, v, extra: q}}}
    assert "attn2 replacement" in (unsupported_patches(options) or "")
    with torch.inference_mode(), differentiable_unet(forge):
        with pytest.raises(UnsupportedForgePatch, match=r"attn2 of transformer block"):
            forge(differentiable_latent(host.x), host.t, context=host.context, transformer_options=options)
    assert unsupported_patches({"patches": forge_patches()}) is None


def check_blocker(forge: nn.Module, inputs: Inputs, missing: str) -> None:
    """Forward and backward (with ControlNet residuals) with every change of `differentiable_unet` but `missing` fail
    with `FAILURES[missing]`; "all": with none of them, only inference mode off and grad mode on."""
    host = inputs.in_inference_mode()
    namespace = forge_namespace(forge)
    with torch.inference_mode(), torch.inference_mode(False), torch.enable_grad(), contextlib.ExitStack() as stack:
        if missing != "all":
            if missing != "weights":
                stack.enter_context(normal_weights(forge))
            if missing != "blocks":
                stack.enter_context(out_of_place_blocks(forge, namespace))
            if missing != "control":
                stack.enter_context(out_of_place_control(namespace))
            if missing != "attention":
                stack.enter_context(own_attention(forge, namespace))
        leaf = differentiable_latent(host.x).requires_grad_(True)
        with pytest.raises(RuntimeError, match=FAILURES[missing]):
            out = forge(leaf, host.t, context=host.context, control=host.control(), transformer_options={})
            torch.autograd.grad(out.sum(), [leaf])


# -- The stand-in ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def standin_twins(request: pytest.FixtureRequest) -> tuple[nn.Module, nn.Module, Inputs]:
    return twins(CONFIGS[request.param], standin.make_forge_standin)


@pytest.fixture(scope="module")
def sd1_twins() -> tuple[nn.Module, nn.Module, Inputs]:
    return twins(SD1_LIKE, standin.make_forge_standin)


def test_standin_reproduces_forge_traits(sd1_twins: tuple[nn.Module, nn.Module, Inputs]) -> None:
    """Inference-mode frozen weights; the same function as the ldm UNet; the UNet writes into transformer_options."""
    ldm, forge, inputs = sd1_twins
    assert all(p.is_inference() and not p.requires_grad for p in forge.parameters())
    host = inputs.in_inference_mode()
    options: dict[str, Any] = {}
    with torch.inference_mode():
        out = forge(host.x, host.t, context=host.context, transformer_options=options)
    assert {"original_shape", "transformer_index", "block", "block_index"} <= set(options)
    with torch.no_grad():
        assert_close(out, ldm(inputs.x, inputs.t, context=inputs.context))


@pytest.mark.parametrize("missing", sorted(FAILURES))
def test_backward_fails_without_each_change(sd1_twins: tuple[nn.Module, nn.Module, Inputs], missing: str) -> None:
    """Inside Forge's inference mode, `inference_mode(False)` + `enable_grad()` alone ("all" missing), or with any one
    of the four changes left out, a forward and backward with ControlNet residuals fails: the stand-in reproduces each
    blocker, and each change is needed."""
    check_blocker(sd1_twins[1], sd1_twins[2], missing)


def test_plain_gradient_equals_ldm(standin_twins: tuple[nn.Module, nn.Module, Inputs]) -> None:
    check_plain_gradients(*standin_twins)


def test_ae_gradient_equals_ldm(standin_twins: tuple[nn.Module, nn.Module, Inputs]) -> None:
    check_ae_gradients(*standin_twins)


def test_host_attention_with_a_backward(sd1_twins: tuple[nn.Module, nn.Module, Inputs],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """`attention=False` keeps the host's attention function: right where that kernel has a backward (Forge's SDPA
    path), refused by autograd where it has none."""
    ldm, forge, inputs = sd1_twins
    expected = ldm_plain_gradient(ldm, inputs, control=True)
    with pytest.raises(RuntimeError, match=re.escape(standin.NO_BACKWARD_MESSAGE)):
        forge_plain_gradient(forge, inputs, control=True, attention=False)

    def differentiable_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                              mask: torch.Tensor | None = None) -> torch.Tensor:
        q4, k4, v4 = (t.reshape(t.shape[0], -1, heads, t.shape[-1] // heads).transpose(1, 2) for t in (q, k, v))
        out = torch.nn.functional.scaled_dot_product_attention(q4, k4, v4, attn_mask=mask)
        return out.transpose(1, 2).reshape(q.shape)

    monkeypatch.setattr(standin, "attention_function", differentiable_kernel)
    assert_close(forge_plain_gradient(forge, inputs, control=True, attention=False), expected)


def test_everything_restored_also_on_error(sd1_twins: tuple[nn.Module, nn.Module, Inputs]) -> None:
    _, forge, inputs = sd1_twins
    host = inputs.in_inference_mode()

    def body() -> None:
        leaf = differentiable_latent(host.x).requires_grad_(True)
        forge(leaf, host.t, context=host.context, control=host.control(), transformer_options={}).sum().backward()
        raise ValueError("the body raised")

    check_restored(forge, vars(standin), body)


def test_an_extensions_instance_forward_is_put_back(sd1_twins: tuple[nn.Module, nn.Module, Inputs]) -> None:
    forge = sd1_twins[1]
    block = next(m for m in forge.modules() if isinstance(m, standin.BasicTransformerBlock))
    attention = block.attn2
    theirs = {module: module.forward for module in (block, attention)}  # bound methods, as another extension's
    for module, forward in theirs.items():
        module.__dict__["forward"] = forward
    try:
        with torch.inference_mode(), differentiable_unet(forge):
            assert all(module.forward is not forward for module, forward in theirs.items())
        assert all(module.__dict__["forward"] is forward for module, forward in theirs.items())
    finally:
        for module in theirs:
            del module.__dict__["forward"]


def test_patches_honoured_and_replacements_refused(sd1_twins: tuple[nn.Module, nn.Module, Inputs]) -> None:
    _, forge, inputs = sd1_twins
    check_patches_honoured(forge, inputs)
    check_ae_with_patches(forge, inputs)
    check_replacement_refused(forge, inputs)


def test_weight_memory(sd1_twins: tuple[nn.Module, nn.Module, Inputs]) -> None:
    """"clone" costs the UNet's weights once (every parameter is an inference tensor here), "alias" nothing: its
    tensors share the originals' memory. Both give the same gradient bit for bit."""
    _, forge, inputs = sd1_twins
    weight_bytes = sum(p.numel() * p.element_size() for p in forge.parameters())
    data = {name: p.data_ptr() for name, p in forge.named_parameters()}
    with torch.inference_mode():
        with differentiable_unet(forge, weights="clone") as setup:
            assert setup.weights.extra_bytes == weight_bytes
            assert not any(p.data_ptr() == data[name] for name, p in forge.named_parameters())
        with differentiable_unet(forge, weights="alias") as setup:
            assert setup.weights.extra_bytes == 0 and setup.weights.tensors == len(data)
            assert all(p.data_ptr() == data[name] and not p.is_inference() for name, p in forge.named_parameters())
    assert torch.equal(forge_plain_gradient(forge, inputs, True, weights="clone"),
                       forge_plain_gradient(forge, inputs, True, weights="alias"))


def test_latent_in_and_out_of_inference_mode(sd1_twins: tuple[nn.Module, nn.Module, Inputs]) -> None:
    """The sampler's latent (an inference tensor) is differentiated through a normal copy, and written back inside
    inference mode; inside the pass a plain `copy_` into it fails."""
    _, forge, inputs = sd1_twins
    host = inputs.in_inference_mode()
    with torch.inference_mode():
        latent = host.x.clone()  # the sampler's x
        with differentiable_unet(forge):
            leaf = differentiable_latent(latent)
            assert not leaf.is_inference() and leaf.data_ptr() != latent.data_ptr()
            leaf.requires_grad_(True)
            out = forge(leaf, host.t, context=host.context, transformer_options={})
            (grad,) = torch.autograd.grad(out.square().sum(), [leaf])
            updated = leaf.detach() - 1e-3 * grad
            with pytest.raises(RuntimeError, match="Inplace update to inference tensor outside InferenceMode"):
                latent.copy_(updated)
            update_in_inference_mode(latent, updated)
    assert torch.equal(latent, updated)


# -- Real Forge (AE_FORGE_DIR) -----------------------------------------------------------------------------------------


def test_real_forge_unet() -> None:
    """The same checks on Forge's own `backend.nn.unet`, in a subprocess (Forge's backend parses sys.argv, prints and
    sets process state at import). Needs the checkout's Python imports (einops, diffusers, psutil, gguf, safetensors;
    Neo also comfy-kitchen) on PYTHONPATH."""
    forge_dir = os.environ.get(FORGE_DIR_VARIABLE)
    if not forge_dir:
        pytest.skip(f"{FORGE_DIR_VARIABLE} is not set (the path of a Forge or Forge Neo checkout: the folder with "
                    "backend/)")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(root), str(root / "tests"), *filter(None, [os.environ.get("PYTHONPATH")])])}
    result = subprocess.run([sys.executable, __file__, forge_dir], env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, f"real-Forge worker failed:\n{result.stdout[-4000:]}\n{result.stderr[-8000:]}"
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["passed"] == sorted(CONFIGS), summary


def _raising_body() -> None:
    raise ValueError("the body raised")


def _import_forge_unet(forge_dir: Path) -> tuple[Any, Any, Any]:
    """Forge's `backend.nn.unet`, `backend.operations` and `backend.attention`, imported on the CPU. Forge's
    backend/args.py parses sys.argv at import: Forge wants --always-cpu, Neo --cpu."""
    args_text = (forge_dir / "backend" / "args.py").read_text()
    cpu_flag = "--always-cpu" if '"--always-cpu"' in args_text else "--cpu"
    argv = sys.argv
    sys.argv = [argv[0], cpu_flag]
    sys.path.insert(0, str(forge_dir))
    try:
        import backend.attention as attention
        import backend.nn.unet as unet
        import backend.operations as operations
    finally:
        sys.argv = argv
    return unet, operations, attention


def _forge_unet_config(config: TinyUnetConfig) -> dict[str, Any]:
    """`IntegratedUNet2DConditionModel` keyword arguments for `config`: per-block transformer depths where ldm has
    attention resolutions (the form huggingface_guess gives Forge)."""
    depth_in: list[int] = []
    depth_out: list[int] = []
    for level in range(len(config.channel_mult)):
        depth = config.transformer_depth if 2**level in config.attention_resolutions else 0
        depth_in += [depth] * config.num_res_blocks
        depth_out += [depth] * (config.num_res_blocks + 1)
    return {
        "in_channels": config.in_channels, "out_channels": config.out_channels,
        "model_channels": config.model_channels, "num_res_blocks": config.num_res_blocks,
        "channel_mult": list(config.channel_mult), "num_heads": config.num_heads,
        "num_head_channels": config.num_head_channels, "use_spatial_transformer": True,
        "use_linear_in_transformer": config.use_linear_in_transformer, "context_dim": config.context_dim,
        "transformer_depth": depth_in, "transformer_depth_output": depth_out,
        "transformer_depth_middle": config.transformer_depth, "use_checkpoint": False,
    }


def _make_real_forge(forge_unet: Any, operations: Any, manual_cast: bool, config: TinyUnetConfig,
                     state_dict: Mapping[str, torch.Tensor]) -> nn.Module:
    """Forge's UNet as its loader builds one: under inference mode, with Forge's operations (`manual_cast`: weights cast
    per call, as for partial loading), then the weights loaded (inference copies of `state_dict`)."""
    with torch.inference_mode():
        weights = {k: v.clone() for k, v in state_dict.items()}
        with operations.using_forge_operations(device=torch.device("cpu"), dtype=torch.float64,
                                               manual_cast_enabled=manual_cast):
            unet = forge_unet.IntegratedUNet2DConditionModel.from_config(_forge_unet_config(config))
            unet = unet.to(device="cpu", dtype=torch.float64)
        missing, unexpected = unet.load_state_dict(weights, strict=False)
        assert not unexpected and not missing, (missing, unexpected)
    unet.eval()
    return unet  # type: ignore[no-any-return]


def _real_forge_worker(forge_dir: Path) -> int:
    forge_unet, operations, attention = _import_forge_unet(forge_dir)
    torch.set_num_threads(1)
    passed = []
    for family, config in sorted(CONFIGS.items()):
        for manual_cast in (False, True):
            make_forge = functools.partial(_make_real_forge, forge_unet, operations, manual_cast)
            ldm, forge, inputs = twins(config, make_forge)
            assert all(p.is_inference() for p in forge.parameters())
            assert forge_namespace(forge) is vars(forge_unet)
            host = inputs.in_inference_mode()
            with torch.inference_mode():  # Forge's own forward (its CPU kernel upcasts attention to float32)
                out = forge(host.x, host.t, context=host.context, transformer_options={})
            with torch.no_grad():
                reference = ldm(inputs.x, inputs.t, context=inputs.context)
            assert (out - reference).abs().max() <= 1e-5 * reference.abs().max()
            check_plain_gradients(ldm, forge, inputs)
            check_ae_gradients(ldm, forge, inputs)
            check_restored(forge, vars(forge_unet), _raising_body)
            # Forge's CPU attention kernels have a backward: the other three blockers are Forge's own.
            for missing in ("all", "weights", "blocks", "control"):
                check_blocker(forge, inputs, missing)
            # Bit-for-bit comparisons against Forge's own forward with its 'pytorch' (SDPA) attention kernel.
            kernel = forge_unet.attention_function
            forge_unet.attention_function = attention.attention_pytorch
            try:
                check_patches_honoured(forge, inputs)
                check_ae_with_patches(forge, inputs)
                assert_close(forge_plain_gradient(forge, inputs, control=True, attention=False),
                             ldm_plain_gradient(ldm, inputs, control=True))
            finally:
                forge_unet.attention_function = kernel
            check_replacement_refused(forge, inputs)
            print(f"{family} (manual cast {manual_cast}): passed", file=sys.stderr)
        passed.append(family)
    print(json.dumps({"passed": passed, "forge_dir": str(forge_dir)}))
    return 0


if __name__ == "__main__":
    sys.exit(_real_forge_worker(Path(sys.argv[1])))
