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
from typing import Literal

import torch

from .binding import BindingSelection
from .config import StepPlan
from .engine import AttendAndExcite, UNetRunner
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
        scale = sigma_space_gradient_scale(sigma) if self.space == "sigma" else None
        # `bindings` only when given: an engine (or stand-in) without binding keeps its call unchanged.
        binding_args = {"bindings": bindings} if bindings is not None else {}
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
