"""The engine driven from inside a sampler (no sampler here): which model call starts a step, and the update in the
sampler's space.

A sampler (k-diffusion's, or A1111's DDIM/PLMS) hands its own state tensor to the first model call of every step
(docs/host-notes.md §0 item 3, verified by tests/test_trajectory.py for every k-diffusion sampler of A1111). Updating
that tensor in place before the model sees it is therefore the same as pausing the sampler, updating its latent and
resuming: the model call and the rest of the step integrate from the updated latent, as in the reference pipeline.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from .binding import BindingSelection
from .config import ConfigError, StepPlan
from .engine import AttendAndExcite, UNetRunner
from .initno import NoiseOptimisation
from .loss import TokenSelection
from .step_report import StepReport

LatentSpace = Literal["sigma", "vp"]
"""'sigma': k-diffusion's x = x0 + sigma * eps, UNet input x / sqrt(1 + sigma^2); 'vp': the UNet input itself."""


def sigma_space_gradient_scale(sigma: torch.Tensor) -> torch.Tensor:
    """Per-image factor (1 + sigma^2) that maps the official VP step into sigma space (docs/algorithm.md §2.2 form A).

    A float64 tensor on sigma's device: computing it on the host would wait for the GPU at every step. In float64,
    as the Python floats of the reference's arithmetic (`1.0 + float(s) ** 2`), bit for bit."""
    s = sigma.detach().to(torch.float64).flatten()
    return 1.0 + s * s


@dataclass
class StepClock:
    """Maps a sampler's model-call index to (step, is first call of that step).

    `calls_per_step`: 1 for first-order samplers (and DDIM), 2 for second-order ones (Heun, DPM2, DPM2 a,
    DPM++ 2S a, DPM++ SDE), whose last step makes a single call.
    """

    calls_per_step: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.calls_per_step, bool) or not isinstance(self.calls_per_step, int) or self.calls_per_step < 1:
            raise ValueError(f"calls_per_step must be a whole number >= 1 (got {self.calls_per_step!r})")

    def step_of(self, call_index: int) -> int | None:
        if call_index % self.calls_per_step:
            return None
        return call_index // self.calls_per_step


@dataclass
class InSamplerExcitation:
    """Runs A&E at the first model call of each step and writes the result into the sampler's latent in place."""

    engine: AttendAndExcite
    plan: StepPlan
    space: LatentSpace
    clock: StepClock = field(default_factory=StepClock)
    reports: list[StepReport] = field(default_factory=list)
    map_steps: frozenset[int] = frozenset()
    """Steps whose reports carry the subject maps (`StepReport.maps`), e.g. for heatmaps; none by default."""
    fresh_noise: Callable[[int, int], torch.Tensor] | None = None
    """fresh_noise(b, r): standard normal noise for image b's InitNO round r >= 1, shaped like one image's latent
    (None: the r-th float64 draw of a CPU generator seeded with b)."""
    noise_scale: Callable[[torch.Tensor], torch.Tensor] | None = None
    """noise_scale(sigma): what the host multiplied standard noise by to make the first latent (None: sigma in sigma
    space, k-diffusion's txt2img `noise * sigmas[0]`; 1 in VP space)."""
    timestep_of: Callable[[torch.Tensor], torch.Tensor] | None = None
    """timestep_of(sigma): the DDPM timestep of a sigma-space step (k-diffusion's `sigma_to_t`), for an objective that
    `reads_timestep`; in VP space the sampler's `sigma` argument is the timestep itself."""
    optimise_noise: bool = True
    """Whether an objective that `optimises_initial_noise` does it here (off where the first latent is not noise,
    e.g. img2img or a hires pass)."""
    noise_reports: list[NoiseOptimisation | None] = field(default_factory=list)
    """Per image, what InitNO's optimisation of its initial noise did (empty for other objectives)."""

    def before_model_call(
        self,
        call_index: int,
        x: torch.Tensor,
        sigma: torch.Tensor,
        selections: Sequence[TokenSelection | None],
        run_unet: UNetRunner,
        should_stop: Callable[[], bool] | None = None,
        on_iteration: Callable[[int, int], None] | None = None,
        bindings: Sequence[BindingSelection | None] | None = None,
    ) -> StepReport | None:
        """Call with the exact tensor the sampler passes to its model, before the model runs. `bindings`: each
        image's modifier-noun groups, for an engine with binding."""
        step = self.clock.step_of(call_index)
        if step is None or step >= self.plan.steps or not self.plan.is_active(step):
            return None
        objective = getattr(self.engine, "objective", None)  # a stand-in engine may have none
        optimises = self.optimise_noise and bool(getattr(objective, "optimises_initial_noise", False))
        if step == 0 and optimises and not self.noise_reports:
            self._optimise_initial_noise(x, sigma, selections, run_unet, should_stop)
        scale = sigma_space_gradient_scale(sigma) if self.space == "sigma" else None
        # `bindings` only when given: an engine (or stand-in) without binding keeps its call unchanged.
        binding_args: dict[str, Any] = {"bindings": bindings} if bindings is not None else {}
        if getattr(objective, "reads_timestep", False):
            binding_args["timestep"] = self._timestep(sigma)
        updated, report = self.engine.step(
            x,
            step,
            self.plan,
            selections,
            run_unet,
            should_stop=should_stop,
            on_iteration=on_iteration,
            gradient_scale=scale,
            keep_maps=step in self.map_steps,
            **binding_args,
        )
        if report.active:
            with torch.no_grad():
                x.copy_(updated)
        self.reports.append(report)
        return report

    def _timestep(self, sigma: torch.Tensor) -> float:
        first = sigma.detach().flatten()[:1]
        if self.space == "vp":
            return float(first)
        if self.timestep_of is None:
            raise ConfigError("this objective needs the sampler's timesteps; give InSamplerExcitation timestep_of")
        return float(self.timestep_of(first))

    def _optimise_initial_noise(
        self, x: torch.Tensor, sigma: torch.Tensor, selections: Sequence[TokenSelection | None],
        run_unet: UNetRunner, should_stop: Callable[[], bool] | None,
    ) -> None:
        s = sigma.detach().to(torch.float64).flatten().to(x.device)
        to_unet_input = 1.0 / torch.sqrt(1.0 + s * s) if self.space == "sigma" else torch.ones_like(s)
        if self.noise_scale is not None:
            noise_scale = self.noise_scale(s).to(torch.float64).flatten().expand_as(s)
        else:
            noise_scale = s if self.space == "sigma" else torch.ones_like(s)
        source = self.fresh_noise or _seeded_noise(x)
        scales = noise_scale.tolist()

        def fresh(b: int, r: int) -> torch.Tensor:
            return (source(b, r).to(torch.float64) * scales[b]).to(x.device, x.dtype).reshape(1, *x.shape[1:])

        updated, self.noise_reports = self.engine.optimise_initial_noise(
            x, selections, run_unet, to_unet_input, fresh, should_stop
        )
        with torch.no_grad():
            x.copy_(updated)


def seeded_noise(shape: Sequence[int], seeds: Sequence[int]) -> Callable[[int, int], torch.Tensor]:
    """fresh_noise for InitNO's rounds: image b's round r is the r-th float64 draw (of `shape`) of a CPU generator
    seeded with seeds[b]: the same numbers on every machine and device, so the same request gives the same image."""
    generators: dict[int, tuple[torch.Generator, list[torch.Tensor]]] = {}

    def draw(b: int, r: int) -> torch.Tensor:
        generator, draws = generators.setdefault(b, (torch.Generator().manual_seed(int(seeds[b])), []))
        while len(draws) < r:
            draws.append(torch.randn(tuple(shape), generator=generator, dtype=torch.float64))
        return draws[r - 1]

    return draw


def _seeded_noise(x: torch.Tensor) -> Callable[[int, int], torch.Tensor]:
    return seeded_noise(x.shape[1:], range(x.shape[0]))
