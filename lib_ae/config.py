"""The methods' hyper-parameters and the per-run step plan derived from them.

`ExciteConfig`: Attend-and-Excite's, with the official defaults (`config.py` of yuval-alaluf/Attend-and-Excite,
identical to diffusers' `StableDiffusionAttendAndExcitePipeline`), defined for 50 sampler steps. For other step counts
the plan scales the step indices proportionally (see `StepPlan.build`), which is the identity at 50 steps.
`BindingConfig`: SynGen's schedule (Rassin et al. 2023), official defaults: a constant step, no refinement.
Both give a `StepPlan`, the one shape the engine follows.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

REFERENCE_STEPS = 50
"""The step count the official refinement indices (0, 10, 20) and `max_iter_to_alter = 25` were chosen for."""

OFFICIAL_THRESHOLDS: Mapping[int, float] = {0: 0.05, 10: 0.5, 20: 0.8}


class ConfigError(ValueError):
    """A parameter is out of its documented range; the message names the parameter and the range."""


@dataclass(frozen=True)
class ExciteConfig:
    """Everything that shapes the latent update. All fields have the official defaults.

    `alter_fraction` / `max_iter_to_alter`: the update runs for loop index `i < max_iter_to_alter`; when
    `max_iter_to_alter` is None it is `round(alter_fraction * steps)` (25 of 50 officially).
    `thresholds`: refinement thresholds keyed by step index *at `REFERENCE_STEPS` steps*; with
    `scale_thresholds_with_steps` each key k moves to `round(k * steps / 50)`
    (colliding keys keep the highest threshold),
    otherwise the keys are used verbatim (the reference pipeline's behaviour for any step count).
    `attention_res`: (height, width) of the cross-attention maps used; None = 1/32 of the image, i.e.
    `ceil(latent_h / 4) x ceil(latent_w / 4)` (16x16 at 512x512, 32x32 at 1024x1024).
    `normalize_eot`: SD2.1 mode of the official code: the re-softmax covers only the prompt's own tokens
    (start token and end-of-text/padding excluded) instead of columns 1..T-2.
    `step_size`: the official `scale_factor`, alpha in alpha_i = step_size * sqrt(linspace(1, 0.5)[i]) (the user's
    "Scale factor"). `max_refinement_iterations`: the official `max_refinement_steps`, which counts iterations.
    """

    step_size: float = 20.0
    scale_range: tuple[float, float] = (1.0, 0.5)
    alter_fraction: float = 0.5
    max_iter_to_alter: int | None = None
    thresholds: Mapping[int, float] = field(default_factory=lambda: dict(OFFICIAL_THRESHOLDS))
    scale_thresholds_with_steps: bool = True
    max_refinement_iterations: int = 20
    smooth_attentions: bool = True
    sigma: float = 0.5
    kernel_size: int = 3
    attention_res: tuple[int, int] | None = None
    normalize_eot: bool = False
    softmax_temperature: float = 100.0
    early_stop: bool = True
    """Abort the gradient forward right after the last layer whose maps the loss needs (same gradient, less work)."""

    def __post_init__(self) -> None:
        _check_finite_range("step_size", self.step_size, 0.0, 1e4)
        if len(self.scale_range) != 2:
            raise ConfigError("scale_range must be two numbers (start, end)")
        for value in self.scale_range:
            _check_finite_range("scale_range", value, 0.0, 1.0e3)
        _check_finite_range("alter_fraction", self.alter_fraction, 0.0, 1.0)
        if self.max_iter_to_alter is not None:
            _check_int_range("max_iter_to_alter", self.max_iter_to_alter, 0, 10_000)
        for step, threshold in self.thresholds.items():
            _check_int_range("thresholds step", step, 0, 10_000)
            _check_finite_range("thresholds value", threshold, 0.0, 1.0)
        _check_int_range("max_refinement_iterations", self.max_refinement_iterations, 0, 1000)
        _check_finite_range("sigma", self.sigma, 1e-3, 100.0)
        _check_int_range("kernel_size", self.kernel_size, 1, 31)
        if self.kernel_size % 2 == 0:
            raise ConfigError(f"kernel_size must be odd (got {self.kernel_size})")
        if self.attention_res is not None:
            if len(self.attention_res) != 2:
                raise ConfigError("attention_res must be (height, width)")
            for side in self.attention_res:
                _check_int_range("attention_res", side, 1, 1024)
        _check_finite_range("softmax_temperature", self.softmax_temperature, 1e-3, 1e4)

    def attention_size(self, latent_height: int, latent_width: int) -> tuple[int, int]:
        """Map size (h, w) at which the loss reads attention for a latent of this size."""
        if self.attention_res is not None:
            return self.attention_res
        return math.ceil(latent_height / 4), math.ceil(latent_width / 4)

    def check_map_size(self, height: int, width: int) -> None:
        """Raise `ConfigError` when the smoothing cannot run on maps of this size: the official smoothing
        reflect-pads by kernel_size // 2, which must be smaller than each side (torch.nn.functional.pad)."""
        if self.smooth_attentions and self.kernel_size // 2 >= min(height, width):
            largest = 2 * min(height, width) - 1
            raise ConfigError(
                f"the smoothing kernel size {self.kernel_size} is too large for the {height}x{width} attention maps "
                f"of this image (at most {largest}); use a smaller kernel size, a larger attention size, or turn "
                "smoothing off"
            )

    def plan(self, steps: int) -> StepPlan:
        return StepPlan.build(self, steps)


@dataclass(frozen=True)
class StepPlan:
    """What happens at each of the `steps` sampler steps of one run."""

    steps: int
    step_sizes: tuple[float, ...]
    alter_steps: int
    refinement_thresholds: Mapping[int, float]

    @staticmethod
    def build(config: ExciteConfig, steps: int) -> StepPlan:
        if steps < 1:
            raise ConfigError(f"steps must be at least 1 (got {steps})")
        # Computed exactly as the reference: float64 numpy, alpha_i = scale * sqrt(linspace(1, 0.5, N)[i]).
        scale_range = np.linspace(config.scale_range[0], config.scale_range[1], steps)
        step_sizes = tuple(float(v) for v in config.step_size * np.sqrt(scale_range))
        if config.max_iter_to_alter is not None:
            alter_steps = config.max_iter_to_alter
        else:
            alter_steps = int(math.floor(config.alter_fraction * steps + 0.5))
        thresholds: dict[int, float] = {}
        for step, threshold in config.thresholds.items():
            scaled = int(math.floor(step * steps / REFERENCE_STEPS + 0.5))
            index = scaled if config.scale_thresholds_with_steps else step
            if index < steps:
                thresholds[index] = max(threshold, thresholds.get(index, 0.0))
        return StepPlan(steps, step_sizes, min(alter_steps, steps), thresholds)

    def is_active(self, step: int) -> bool:
        """Whether step `step` needs the gradient pass at all (the reference also runs it when idle; we don't)."""
        return step < self.alter_steps or step in self.refinement_thresholds

    def step_size(self, step: int) -> float:
        """The step size at `step`; 0 outside the plan."""
        return self.step_sizes[step] if 0 <= step < self.steps else 0.0


OFFICIAL_BINDING_STEP_SIZE = 20.0
"""SynGen's `syngen_step_size` (syngen_diffusion_pipeline.py `SynGenDiffusionPipeline.__call__`; run.py --step_size
default)."""


@dataclass(frozen=True)
class BindingConfig:
    """SynGen's schedule parameters, official defaults.

    `step_size`: the constant step (no decay over the steps, unlike A&E's 20 * sqrt(linspace(1, 0.5))).
    `intervention_steps`: the update runs at loop index i < intervention_steps. None = round(fraction * steps), which
    is the official 25 at 50 steps; an int is used verbatim, as the official pipeline does for any step count.
    `weight`: the factor on this loss when it is added to A&E's (`excite+bind`); 1 for `bind` alone.
    """

    step_size: float = OFFICIAL_BINDING_STEP_SIZE
    intervention_fraction: float = 0.5
    intervention_steps: int | None = None
    weight: float = 1.0

    def __post_init__(self) -> None:
        for name, value, high in (("step_size", self.step_size, 1e4), ("weight", self.weight, 1e4)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"{name} must be a finite number (got {value!r})")
            if not 0.0 <= value <= high:
                raise ConfigError(f"{name} must be in [0, {high:g}] (got {value!r})")
        if not 0.0 <= self.intervention_fraction <= 1.0:
            raise ConfigError(f"intervention_fraction must be in [0, 1] (got {self.intervention_fraction!r})")
        if self.intervention_steps is not None and (
            isinstance(self.intervention_steps, bool) or not isinstance(self.intervention_steps, int)
            or self.intervention_steps < 0
        ):
            raise ConfigError(f"intervention_steps must be a whole number >= 0 (got {self.intervention_steps!r})")

    def plan(self, steps: int) -> StepPlan:
        return binding_plan(steps, self)


def binding_plan(steps: int, config: BindingConfig | None = None) -> StepPlan:
    """SynGen's per-step schedule: `step_sizes[i]` > 0 means one update z <- z - step_sizes[i] * grad_z L at step i
    (VP space) after a single cond-only forward; 0 means no gradient pass. No refinement. Officially, 50 steps give
    20.0 at steps 0..24 and nothing at 25..49."""
    config = config or BindingConfig()
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"steps must be a whole number >= 1 (got {steps!r})")
    if config.intervention_steps is not None:
        active = config.intervention_steps
    else:
        active = int(math.floor(config.intervention_fraction * steps + 0.5))
    active = min(active, steps)
    sizes = tuple(float(config.step_size) if i < active else 0.0 for i in range(steps))
    return StepPlan(steps, sizes, active, {})


def _check_finite_range(name: str, value: float, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name} must be a number (got {type(value).__name__})")
    if not math.isfinite(value) or not low <= value <= high:
        raise ConfigError(f"{name} must be a finite number in [{low:g}, {high:g}] (got {value!r})")


def _check_int_range(name: str, value: int, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ConfigError(f"{name} must be a whole number (got {type(value).__name__})")
    if not low <= value <= high:
        raise ConfigError(f"{name} must be in [{low}, {high}] (got {value})")
