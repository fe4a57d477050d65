"""An in-place update at the first model call of step i is "pause after step i-1, update the latent, resume".

This is the claim `lib_ae.in_sampler.InSamplerExcitation` rests on (docs/host-notes.md §0 item 3, §3): a k-diffusion
sampler hands its own state tensor to the first model call of every step, so writing `x + delta` into that tensor before
the model runs makes the sampler integrate the rest of the run from the updated latent, with nothing else changed.
Checked for every k-diffusion sampler of A1111 v1.10.1, configured as the WebUI configures it
(`A1111_KDIFFUSION_SAMPLERS`: schedule, discarded penultimate sigma, Brownian-tree noise for the SDE samplers), with the
update written by `InSamplerExcitation` itself (a stand-in engine returns `latent + delta` in place of A&E's gradient
pass) at the calls its `StepClock` picks.

The oracle, "pause, update, resume", has to keep everything the sampler carries across steps:

* Single-step samplers (Euler, Heun, DPM2, and the stochastic Euler a, DPM2 a, DPM++ 2S a, DPM++ SDE) carry only x.
  Running the k-diffusion function on sigmas[:i+1], adding delta and running it again on sigmas[i:] is exactly pausing
  and resuming (with A1111's default s_churn = 0, no step of theirs reads sigmas other than sigmas[i] and
  sigmas[i+1]; asserted bit-equal to one uninterrupted run). Their noise depends only on the interval: the
  ancestral ones get `IntervalNoise`, keyed by (sigma, sigma_next); DPM++ SDE gets A1111's seeded
  `BrownianTreeNoiseSampler` over the full sigma range, one instance shared by both halves, so it sees the same
  queries in the same order as an uninterrupted run.
* Multistep samplers (LMS, DPM++ 2M, DPM++ 2M SDE, DPM++ 3M SDE) also carry earlier model outputs. Restarting the
  function on sigmas[i:] throws that history away (asserted to differ), so it is not the oracle. Instead this module
  has its own step-at-a-time implementation of each (`LmsStepper`, ...), written from the samplers' update equations
  (linear multistep over Karras' ODE derivative; DPM-Solver++ in log-sigma with divided differences of the denoised
  history), whose state is explicit: the oracle runs it to step i, replaces x by x + delta, keeps the history, and
  runs on. It is a valid oracle because (a) the pause point and what is kept are explicit in its code, and (b) without
  an update it reproduces k-diffusion's function to 1e-13 in float64 with the same noise (asserted; measured
  <= 8e-16), so it is the same sampler, not an approximation of it. LMS coefficients come from a 4-point
  Gauss-Legendre rule, exact for its cubic Lagrange polynomials (k-diffusion integrates them adaptively with scipy;
  both are exact to rounding). The sigmas are A1111's, cast to float64.

Stochastic runs are compared with their recorded noise: same intervals, same noise tensors, in both runs.
Also checked: model calls per step as `StepClock(calls_per_step)` assumes (step boundaries taken from the sampler's own
callback), the first call's tensor is the object the callback later reports as d['x'], and, as a negative control,
that updating only a copy of x (what editing `params.x` in A1111's `on_cfg_denoiser` amounts to) is not the update.

The denoiser is k-diffusion's `CompVisDenoiser` (A1111's wrapper, with its scaling and sigma -> t interpolation) around
a cheap nonlinear analytic eps model in float64: the claim is about the samplers' bookkeeping, not the network, and a
tiny ldm UNet costs 0.1-0.5 s per call on a busy 2-core CPU, too slow for the ~1500 model calls here.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pytest
import torch
from torch import nn

from lib_ae import AttendAndExcite, InSamplerExcitation, StepClock, StepPlan, StepReport, TokenSelection, UNetRunner
from support.models import sd_alphas_cumprod
from support.thirdparty import A1111_KDIFFUSION_SAMPLERS, A1111Sampler, import_k_diffusion
from support.threads import one_thread  # noqa: F401  (module-scoped, autouse)

# torchsde rounds the Brownian tree's ends to 6 digits and warns when queried at the exact ends (A1111 logs the same).
pytestmark = pytest.mark.filterwarnings("ignore:Should have t:UserWarning")

STEPS = 7
UPDATE_STEPS = (0, 3, STEPS - 1)
"""The first step (nothing carried yet), a middle one (LMS at full order 4, 3M SDE with two earlier outputs), last."""
BATCH, CHANNELS, SIZE = 2, 4, 8
SEEDS = (11, 12)
"""Per-image seeds of the Brownian trees, as A1111 passes them."""
MULTISTEP = ("LMS", "DPM++ 2M", "DPM++ 2M SDE", "DPM++ 3M SDE")
LABELS = list(A1111_KDIFFUSION_SAMPLERS)
STEPPER_TOLERANCE = 1e-13
"""Relative to the latent's scale: float64 rounding of two orderings of the same arithmetic (measured: <= 8e-16)."""
EFFECT = 1e-3
"""A difference this large relative to the latent's scale is a real one, far above any rounding."""
MOVED = 0.05
"""A result that moved by this fraction of |delta|'s largest entry has really moved (rounding: ~1e-16 of the scale);
the updates move results by 0.9-3.4 |delta|, a copy-only update misses the oracle by >= 0.18 |delta|."""

Tensor = torch.Tensor
NoiseSampler = Callable[[Tensor, Tensor], Tensor]
Denoiser = Callable[..., Tensor]


# ---------------------------------------------------------------------------------------------------------------------
# The model, the noise, the update


class ToyEpsModel(nn.Module):
    """A stand-in ldm model for `CompVisDenoiser`: SD's alphas_cumprod and a smooth nonlinear eps(x_in, t, cond).

    Mixes channels and neighbouring pixels and depends on t and on the conditioning, so a changed input changes every
    later output; bounded (tanh), so no sampler diverges.
    """

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.mix = torch.randn(CHANNELS, CHANNELS, generator=g, dtype=torch.float64) / CHANNELS**0.5
        self.time = torch.randn(CHANNELS, generator=g, dtype=torch.float64)
        self.alphas_cumprod: Tensor
        self.register_buffer("alphas_cumprod", sd_alphas_cumprod().to(torch.float64))

    def apply_model(self, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        mixed = torch.einsum("oc,bchw->bohw", self.mix, x) + 0.5 * x.roll(1, dims=-1) - 0.25 * x.roll(-1, dims=-2)
        bias = (t / 1000.0)[:, None, None, None] * self.time[None, :, None, None] + cond[:, :, None, None]
        return torch.tanh(mixed + bias)


class IntervalNoise:
    """Noise for the ancestral samplers that depends only on the seed and the interval (sigma, sigma_next).

    Any run that visits an interval draws the same noise for it, whatever ran before: a paused and resumed run gets
    the noise of an uninterrupted one. (A1111 gives these samplers seeded global-RNG noise, which has the same property
    only when the runs draw in the same order.)
    """

    def __init__(self, like: Tensor, seed: int) -> None:
        self.shape, self.dtype, self.seed = like.shape, like.dtype, seed

    def __call__(self, sigma: Tensor, sigma_next: Tensor) -> Tensor:
        key = struct.pack("<q2d", self.seed, float(sigma), float(sigma_next))
        seed = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") & (2**63 - 1)
        return torch.randn(self.shape, generator=torch.Generator().manual_seed(seed), dtype=self.dtype)


@dataclass
class RecordingNoise:
    """Wraps a noise sampler and keeps every interval it was asked for and the noise it gave."""

    inner: NoiseSampler
    drawn: list[tuple[float, float, Tensor]] = field(default_factory=list)

    def __call__(self, sigma: Tensor, sigma_next: Tensor) -> Tensor:
        noise = self.inner(sigma, sigma_next)
        self.drawn.append((float(sigma), float(sigma_next), noise.clone()))
        return noise


def assert_same_noise(got: RecordingNoise | None, expected: RecordingNoise | None) -> None:
    if got is None or expected is None:
        assert got is expected
        return
    assert [(s, n) for s, n, _ in got.drawn] == [(s, n) for s, n, _ in expected.drawn], "the same intervals"
    assert all(torch.equal(a, b) for (_, _, a), (_, _, b) in zip(got.drawn, expected.drawn, strict=True))
    assert got.drawn, "a stochastic sampler must have drawn noise"


class FixedUpdate(AttendAndExcite):
    """Stands in for A&E's gradient pass inside `InSamplerExcitation`: returns latent + delta at the given steps.

    It runs no UNet, so it has no AttentionCapture and skips the base initialiser; `InSamplerExcitation` only calls
    `step`. Every step it is asked about is recorded with the tensor it was given.
    """

    def __init__(self, deltas: Mapping[int, Tensor]) -> None:
        self.deltas = dict(deltas)
        self.seen: list[tuple[int, Tensor]] = []

    def step(
        self,
        latent: Tensor,
        step: int,
        plan: StepPlan,
        selections: Sequence[TokenSelection | None],
        run_unet: UNetRunner,
        should_stop: Callable[[], bool] | None = None,
        on_iteration: Callable[[int, int], None] | None = None,
        gradient_scale: Sequence[float] | None = None,
        keep_maps: bool = False,
    ) -> tuple[Tensor, StepReport]:
        self.seen.append((step, latent))
        delta = self.deltas.get(step)
        report = StepReport(step, delta is not None)
        return (latent if delta is None else latent + delta), report


def no_unet(latent_rows: Tensor, rows: Tensor) -> object:
    raise AssertionError("the stand-in engine runs no UNet")


# ---------------------------------------------------------------------------------------------------------------------
# One sampler's set-up, and the two ways of running it


@dataclass(frozen=True)
class Case:
    """A sampler as A1111 configures it, on the toy model, with fixed inputs (float64 throughout)."""

    label: str
    spec: A1111Sampler
    denoiser: nn.Module
    cond: Tensor
    x0: Tensor
    sigmas: Tensor

    @property
    def calls_per_step(self) -> int:
        return 2 if self.spec.second_order else 1

    def model(self, x: Tensor, sigma: Tensor) -> Tensor:
        out: Tensor = self.denoiser(x, sigma, cond=self.cond)
        return out

    def noise(self) -> RecordingNoise | None:
        """A fresh noise sampler of this sampler's kind (same seeds every time), or None for deterministic ones."""
        if self.spec.brownian_noise:
            return RecordingNoise(self.spec.extra_kwargs(self.x0, self.sigmas, SEEDS)["noise_sampler"])
        if "noise_sampler" in inspect.signature(self.spec.function()).parameters:
            return RecordingNoise(IntervalNoise(self.x0, seed=5))
        return None

    def run(self, x: Tensor, sigmas: Tensor, noise: RecordingNoise | None) -> Tensor:
        """The k-diffusion function on a copy of x (the samplers' in-place edits must not reach the caller's x)."""
        extra = {} if noise is None else {"noise_sampler": noise}
        out: Tensor = self.spec.function()(self.model, x.clone(), sigmas, disable=True, **extra)
        return out


@functools.cache
def case(label: str) -> Case:
    _, external = import_k_diffusion()
    denoiser = external.CompVisDenoiser(ToyEpsModel())
    spec = A1111_KDIFFUSION_SAMPLERS[label]
    # A1111's schedule; Karras/exponential come back in float32, the multistep comparisons want float64 arithmetic.
    sigmas = spec.sigmas(denoiser, STEPS).to(torch.float64)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(BATCH, CHANNELS, SIZE, SIZE, generator=g, dtype=torch.float64) * sigmas[0]
    cond = 0.5 * torch.randn(BATCH, CHANNELS, generator=g, dtype=torch.float64)
    return Case(label, spec, denoiser, cond, x0, sigmas)


def delta_at(c: Case, step: int) -> Tensor:
    """An update of a size A&E's could have: a fifth of the noise level of that step."""
    g = torch.Generator().manual_seed(100 + step)
    return 0.2 * c.sigmas[step] * torch.randn(c.x0.shape, generator=g, dtype=torch.float64)


@dataclass
class InSamplerRun:
    """A sampler run whose model calls go through `InSamplerExcitation`, as the extension's CFG-denoiser wrapper does.

    `mode` 'in_place': the sampler's own tensor is handed to `before_model_call` and to the model (the extension).
    'copy': a copy is updated and only the model sees it (editing `params.x` in `on_cfg_denoiser`).
    """

    case: Case
    deltas: Mapping[int, Tensor]
    mode: Literal["in_place", "copy"] = "in_place"
    inputs: list[Tensor] = field(default_factory=list)
    """The tensor the sampler passed to each model call, in call order."""
    first_calls: dict[int, int] = field(default_factory=dict)
    """step -> index of the call at which InSamplerExcitation ran the engine for that step."""
    callback_x: list[Tensor] = field(default_factory=list)
    calls_before_callback: list[int] = field(default_factory=list)
    noise: RecordingNoise | None = None

    def __post_init__(self) -> None:
        self.engine = FixedUpdate(self.deltas)
        # Every step active, so the engine is asked at the first call of each step and records it.
        plan = StepPlan(STEPS, (0.0,) * STEPS, STEPS, {})
        self.excitation = InSamplerExcitation(self.engine, plan, "sigma", StepClock(self.case.calls_per_step))

    def model(self, x: Tensor, sigma: Tensor) -> Tensor:
        call = len(self.inputs)
        self.inputs.append(x)
        target = x if self.mode == "in_place" else x.clone()
        report = self.excitation.before_model_call(call, target, sigma, [None] * BATCH, no_unet)
        if report is not None:
            self.first_calls[report.step] = call
        return self.case.model(target, sigma)

    def callback(self, d: dict[str, Any]) -> None:
        assert d["i"] == len(self.callback_x)
        self.callback_x.append(d["x"])
        self.calls_before_callback.append(len(self.inputs))

    def run(self) -> Tensor:
        c = self.case
        self.noise = c.noise()
        extra = {} if self.noise is None else {"noise_sampler": self.noise}
        out: Tensor = c.spec.function()(
            self.model, c.x0.clone(), c.sigmas, callback=self.callback, disable=True, **extra
        )
        return out


def resumed_run(c: Case, step: int, delta: Tensor) -> tuple[Tensor, RecordingNoise | None]:
    """Stop after step-1, add delta, resume: the k-diffusion function on sigmas[:step+1], then on sigmas[step:].

    The oracle for samplers that carry nothing but x from one step to the next. One noise sampler serves both halves,
    so it is queried exactly as in one uninterrupted run.
    """
    noise = c.noise()
    x = c.x0 if step == 0 else c.run(c.x0, c.sigmas[: step + 1], noise)
    return c.run(x + delta, c.sigmas[step:], noise), noise


# ---------------------------------------------------------------------------------------------------------------------
# Step-at-a-time implementations of the multistep samplers (the oracle where history is carried)


class Stepper:
    """A multistep sampler advanced one step at a time; everything it carries across steps lives on the instance."""

    def __init__(self, model: Denoiser, sigmas: Tensor, noise: NoiseSampler | None) -> None:
        self.model, self.sigmas, self.noise = model, sigmas, noise

    def denoise(self, x: Tensor, i: int) -> Tensor:
        out: Tensor = self.model(x, self.sigmas[i] * x.new_ones([x.shape[0]]))
        return out

    def step(self, x: Tensor, i: int) -> Tensor:
        raise NotImplementedError

    def sample(self, x: Tensor, updates: Mapping[int, Tensor]) -> Tensor:
        """Run every step; before step i, x is replaced by x + updates[i] (the history is left as it is)."""
        for i in range(len(self.sigmas) - 1):
            if i in updates:
                x = x + updates[i]
            x = self.step(x, i)
        return x

    def draw(self, i: int) -> Tensor:
        if self.noise is None:
            raise AssertionError(f"{type(self).__name__} needs a noise sampler")
        return self.noise(self.sigmas[i], self.sigmas[i + 1])


def lagrange_integrals(nodes: Sequence[float], a: float, b: float) -> list[float]:
    """The integrals over [a, b] of the Lagrange basis polynomials of `nodes` (in their order).

    The polynomials have degree len(nodes) - 1 <= 3; a 4-point Gauss-Legendre rule is exact up to degree 7.
    """
    points, weights = np.polynomial.legendre.leggauss(4)
    tau = 0.5 * (a + b) + 0.5 * (b - a) * points
    integrals = []
    for j, node in enumerate(nodes):
        basis = np.ones_like(tau)
        for k, other in enumerate(nodes):
            if k != j:
                basis = basis * (tau - other) / (node - other)
        integrals.append(float(0.5 * (b - a) * np.dot(weights, basis)))
    return integrals


class LmsStepper(Stepper):
    """Linear multistep (Adams-Bashforth in sigma) on Karras' ODE dx/dsigma = (x - D(x, sigma)) / sigma, order 4.

    Carries the last four derivatives; step i integrates the Lagrange polynomial through the derivatives at
    sigma_i, sigma_{i-1}, ... from sigma_i to sigma_{i+1} (lower order while fewer are known).
    """

    order = 4

    def __init__(self, model: Denoiser, sigmas: Tensor, noise: NoiseSampler | None) -> None:
        super().__init__(model, sigmas, noise)
        self.derivatives: list[Tensor] = []  # newest first

    def step(self, x: Tensor, i: int) -> Tensor:
        sigma = self.sigmas[i]
        self.derivatives = [(x - self.denoise(x, i)) / sigma, *self.derivatives][: self.order]
        nodes = [float(self.sigmas[i - k]) for k in range(len(self.derivatives))]
        increment = torch.zeros_like(x)
        weights = lagrange_integrals(nodes, float(sigma), float(self.sigmas[i + 1]))
        for weight, derivative in zip(weights, self.derivatives, strict=True):
            increment = increment + weight * derivative
        return x + increment


class Dpmpp2mStepper(Stepper):
    """DPM-Solver++(2M) (Lu et al. 2022), in lambda = -log sigma with step h = lambda_{i+1} - lambda_i:

        x_{i+1} = (sigma_{i+1} / sigma_i) x_i + (1 - e^{-h}) (D_i + h / (2 h_{i-1}) (D_i - D_{i-1}))

    first order on the first step, and the last step (to sigma 0) returns D. Carries the previous denoised output.
    """

    def __init__(self, model: Denoiser, sigmas: Tensor, noise: NoiseSampler | None) -> None:
        super().__init__(model, sigmas, noise)
        self.previous: Tensor | None = None

    def step(self, x: Tensor, i: int) -> Tensor:
        sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
        denoised = self.denoise(x, i)
        if sigma_next == 0:
            out = denoised
        else:
            h = sigma.log() - sigma_next.log()
            estimate = denoised
            if self.previous is not None:
                h_previous = self.sigmas[i - 1].log() - sigma.log()
                estimate = denoised + h / (2 * h_previous) * (denoised - self.previous)
            out = (sigma_next / sigma) * x - torch.expm1(-h) * estimate
        self.previous = denoised
        return out


class Dpmpp2mSdeStepper(Stepper):
    """DPM-Solver++(2M) SDE, midpoint correction, eta = 1 (A1111's settings): with h = lambda_{i+1} - lambda_i,

        x_{i+1} = e^{-2h} x_i + (1 - e^{-2h}) D_i + (1 - e^{-2h}) h / (2 h_{i-1}) (D_i - D_{i-1})
                  + sigma_{i+1} sqrt(1 - e^{-2h}) z_i

    (no correction on the first step; the last step returns D). Carries the previous denoised output.
    """

    def __init__(self, model: Denoiser, sigmas: Tensor, noise: NoiseSampler | None) -> None:
        super().__init__(model, sigmas, noise)
        self.previous: Tensor | None = None

    def step(self, x: Tensor, i: int) -> Tensor:
        sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
        denoised = self.denoise(x, i)
        if sigma_next == 0:
            out = denoised
        else:
            h = sigma.log() - sigma_next.log()
            kept = -torch.expm1(-2 * h)  # 1 - e^{-2h}, without cancellation
            out = torch.exp(-2 * h) * x + kept * denoised
            if self.previous is not None:
                h_previous = self.sigmas[i - 1].log() - sigma.log()
                out = out + kept * h / (2 * h_previous) * (denoised - self.previous)
            out = out + self.draw(i) * sigma_next * kept.sqrt()
        self.previous = denoised
        return out


class Dpmpp3mSdeStepper(Stepper):
    """DPM-Solver++(3M) SDE, eta = 1: the exponential integrator over the 2h-long effective step, with the denoised
    output extrapolated by the Newton polynomial through the current and up to two earlier outputs (nodes at
    u = (lambda_{i-k} - lambda_i) / h):

        x_{i+1} = e^{-2h} x + (1 - e^{-2h}) D + phi_2 D'(0) - phi_3 D''(0) / 2 + sigma_{i+1} sqrt(1 - e^{-2h}) z
        phi_2 = (e^{-2h} - 1) / 2h + 1,  phi_3 = phi_2 / 2h - 1/2

    (lower order while fewer outputs are known); the last step returns D. Carries the two previous denoised outputs.
    """

    def __init__(self, model: Denoiser, sigmas: Tensor, noise: NoiseSampler | None) -> None:
        super().__init__(model, sigmas, noise)
        self.history: list[tuple[Tensor, int]] = []  # (denoised, step), newest first

    def step(self, x: Tensor, i: int) -> Tensor:
        sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
        denoised = self.denoise(x, i)
        if sigma_next == 0:
            out = denoised
        else:
            h = sigma.log() - sigma_next.log()
            h2 = 2 * h
            out = torch.exp(-h2) * x - torch.expm1(-h2) * denoised
            nodes = [(denoised, torch.zeros_like(h))] + [
                (d, (sigma.log() - self.sigmas[k].log()) / h) for d, k in self.history
            ]
            phi_2 = torch.expm1(-h2) / h2 + 1
            if len(nodes) >= 2:
                (d0, u0), (d1, u1) = nodes[0], nodes[1]
                first = (d0 - d1) / (u0 - u1)
                if len(nodes) == 2:
                    out = out + phi_2 * first
                else:
                    d2, u2 = nodes[2]
                    second = (first - (d1 - d2) / (u1 - u2)) / (u0 - u2)
                    slope = first + second * (u0 - u1)  # derivative of the Newton polynomial at u0 = 0
                    phi_3 = phi_2 / h2 - 0.5
                    out = out + phi_2 * slope - phi_3 * second
            out = out + self.draw(i) * sigma_next * (-torch.expm1(-h2)).sqrt()
        self.history = [(denoised, i), *self.history][:2]
        return out


STEPPERS: dict[str, type[Stepper]] = {
    "LMS": LmsStepper,
    "DPM++ 2M": Dpmpp2mStepper,
    "DPM++ 2M SDE": Dpmpp2mSdeStepper,
    "DPM++ 3M SDE": Dpmpp3mSdeStepper,
}


def stepper_run(c: Case, updates: Mapping[int, Tensor]) -> tuple[Tensor, RecordingNoise | None]:
    noise = c.noise()
    return STEPPERS[c.label](c.model, c.sigmas, noise).sample(c.x0.clone(), updates), noise


@functools.cache
def oracle(label: str, step: int) -> tuple[Tensor, RecordingNoise | None]:
    """The sampler paused after step-1, its latent updated by `delta_at(step)` and resumed with everything else it
    carries."""
    c = case(label)
    delta = delta_at(c, step)
    return stepper_run(c, {step: delta}) if label in STEPPERS else resumed_run(c, step, delta)


def relative(a: Tensor, b: Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@functools.cache
def plain(label: str) -> Tensor:
    """The run without any update."""
    c = case(label)
    return c.run(c.x0, c.sigmas, c.noise())


# ---------------------------------------------------------------------------------------------------------------------
# Tests




def test_the_table_splits_into_single_step_and_multistep_samplers() -> None:
    assert set(STEPPERS) == set(MULTISTEP) <= set(LABELS) and len(LABELS) == 11
    stochastic = {label for label in LABELS if case(label).noise() is not None}
    assert stochastic == {"Euler a", "DPM2 a", "DPM++ 2S a", "DPM++ SDE", "DPM++ 2M SDE", "DPM++ 3M SDE"}


@pytest.mark.parametrize("label", LABELS)
def test_the_oracle_is_the_sampler_itself(label: str) -> None:
    """Without an update the oracle is the plain run: bit for bit (split) or to rounding (stepper)."""
    c = case(label)
    full_noise = c.noise()
    full = c.run(c.x0, c.sigmas, full_noise)
    split, split_noise = resumed_run(c, 3, torch.zeros_like(c.x0))
    if label in STEPPERS:
        # Restarting the k-diffusion function loses the history: not a pause, hence the stepper.
        assert relative(split, full) > EFFECT
        stepped, stepped_noise = stepper_run(c, {})
        assert relative(stepped, full) < STEPPER_TOLERANCE
        assert_same_noise(stepped_noise, full_noise)
    else:
        assert torch.equal(split, full)
        assert_same_noise(split_noise, full_noise)


@pytest.mark.parametrize("step", UPDATE_STEPS)
@pytest.mark.parametrize("label", LABELS)
def test_in_place_update_at_the_first_call_is_pause_update_resume(label: str, step: int) -> None:
    c = case(label)
    delta = delta_at(c, step)
    run = InSamplerRun(c, {step: delta})
    got = run.run()
    expected, expected_noise = oracle(label, step)
    assert_same_noise(run.noise, expected_noise)
    if label in STEPPERS:
        assert relative(got, expected) < STEPPER_TOLERANCE
    else:
        assert torch.equal(got, expected)
    # The update must matter for the comparison to mean anything: it moves the result by about its own size, even at
    # the last step (where delta is smallest) ~1e9 times the stepper tolerance.
    assert (expected - plain(label)).abs().max() > MOVED * delta.abs().max()
    assert [s for s, _ in run.engine.seen] == list(range(STEPS))


@pytest.mark.parametrize("label", LABELS)
def test_the_first_call_of_each_step_gets_the_sampler_state(label: str) -> None:
    """Model calls per step as StepClock assumes, with step boundaries taken from the sampler's own callback (which
    k-diffusion calls right after a step's first model call), and that call's tensor is the state the callback reports.
    """
    c = case(label)
    run = InSamplerRun(c, {3: delta_at(c, 3)})
    run.run()
    assert len(run.callback_x) == STEPS
    first = [n - 1 for n in run.calls_before_callback]  # the call just before callback i is step i's first
    counts = [b - a for a, b in zip(first, [*first[1:], len(run.inputs)])]
    k = c.calls_per_step
    assert counts == ([2] * (STEPS - 1) + [1] if k == 2 else [1] * STEPS)
    assert len(run.inputs) == c.spec.model_calls(STEPS)
    assert run.first_calls == dict(enumerate(first))
    assert [StepClock(k).step_of(n) for n in range(len(run.inputs))] == [
        first.index(n) if n in first else None for n in range(len(run.inputs))
    ]
    for i, (seen_step, latent) in enumerate(run.engine.seen):
        assert seen_step == i
        assert run.inputs[first[i]] is run.callback_x[i] and latent is run.callback_x[i]


@pytest.mark.parametrize("label", LABELS)
def test_updating_a_copy_of_the_state_is_not_the_update(label: str) -> None:
    """Negative control: the model sees x + delta, the sampler keeps integrating its own x (A1111's params.x)."""
    c = case(label)
    delta = delta_at(c, 3)
    copied = InSamplerRun(c, {3: delta}, mode="copy")
    got = copied.run()
    expected, _ = oracle(label, 3)
    assert (got - expected).abs().max() > MOVED * delta.abs().max()
    assert (got - plain(label)).abs().max() > MOVED * delta.abs().max(), "the copy did change the model's input"
    assert all(latent is not copied.inputs[copied.first_calls[step]] for step, latent in copied.engine.seen)
