"""One sampler run with an objective, for any host: its life cycle, per image what its loss reads, and what the user
is told.

    run = SamplingRun(engine, targeting, "sigma", report=say)   # `targeting`: lib_ae.targeting.ImageTargeting
    run.start(steps, calls_per_step)            # at the sampler's first model call (the plan needs its step count)
    step = run.due_step(call_index)             # the active step whose first model call this is, else None
    run.apply(call_index, x, sigma, targets, run_unet, ...)   # the step's update, in place on the sampler's x
    run.finish(image_suffix)                    # after sampling: the reports read once, every problem said once

A failure never reaches the sampler: `failure(error)` turns it into the user's line and the run goes inert, so the image
is still produced. The host decides where a model call comes from, which rows condition each image, how its UNet is
called, and where the messages go (A1111: `lib_ae.webui.sampling_pass`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch

from .capture import CaptureError
from .config import ConfigError, StepPlan
from .engine import AttendAndExcite, UNetRunner
from .evaluation import Target
from .in_sampler import InSamplerExcitation, LatentSpace, StepClock
from .step_report import StepReport, read_reports
from .targeting import ImageTargeting

logger = logging.getLogger(__name__)

TITLE = "Attend and Excite"
"""The extension's name, as hosts list it (A1111's `alwayson_scripts` key) and as its messages begin."""


def heatmap_steps(plan: StepPlan, heatmaps: bool, first_step: bool) -> frozenset[int]:
    """The steps whose subject maps are kept: the last step the plan runs, and with `first_step` the first one."""
    if not heatmaps:
        return frozenset()
    active = [step for step in range(plan.steps) if plan.is_active(step)]
    if not active:
        return frozenset()
    return frozenset({active[-1], active[0]} if first_step else {active[-1]})


class SamplingRun:
    """The objective of `engine` over one sampler run. `report(message)`: where the user reads a problem (A1111: the
    image's "AE error" and the console)."""

    def __init__(
        self,
        engine: AttendAndExcite,
        targeting: ImageTargeting,
        space: LatentSpace,
        *,
        report: Callable[[str], None],
        heatmaps: bool = False,
        heatmaps_first_step: bool = False,
    ) -> None:
        self.engine = engine
        self.targeting = targeting
        self.space: LatentSpace = space
        self.report = report
        self.heatmaps = heatmaps
        self.heatmaps_first_step = heatmaps_first_step
        self.excitation: InSamplerExcitation | None = None
        self.active = True
        self.step: int | None = None
        """The step being updated (None before the first active step of a call)."""
        self.finished = False
        self.eager_reason: str | None = None
        """Why this run evaluated eagerly although CUDA graphs were asked for (for the trace)."""
        self.memory_modes: list[str] = []
        """How its gradient passes kept their memory ("keep", "recompute"; `lib_ae.pass_memory`), for the trace."""

    @property
    def reports(self) -> list[StepReport]:
        return self.excitation.reports if self.excitation is not None else []

    def start(
        self,
        steps: int,
        calls_per_step: int,
        *,
        fresh_noise: Callable[[int, int], torch.Tensor] | None = None,
        noise_scale: Callable[[torch.Tensor], torch.Tensor] | None = None,
        optimise_noise: bool = True,
        timestep_of: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> InSamplerExcitation:
        """The step plan for `steps` sampler steps of `calls_per_step` model calls each; for InitNO, where its rounds'
        noise comes from and how the host scaled the first latent's (`InSamplerExcitation`)."""
        plan = self.engine.plan(steps)
        logger.debug(
            "%s: %d steps, %d model calls per step, %d altered, refinement at %s",
            TITLE, steps, calls_per_step, plan.alter_steps, dict(plan.refinement_thresholds),
        )
        self.excitation = InSamplerExcitation(
            self.engine, plan, self.space, StepClock(calls_per_step),
            map_steps=heatmap_steps(plan, self.heatmaps, self.heatmaps_first_step), fresh_noise=fresh_noise,
            noise_scale=noise_scale, optimise_noise=optimise_noise, timestep_of=timestep_of,
        )
        return self.excitation

    def due_step(self, index: int | None) -> int | None:
        """The step whose first model call has clock index `index`, when the plan changes it; None otherwise."""
        self.step = None
        excitation = self.excitation
        if excitation is None or index is None:
            return None
        step = excitation.clock.step_of(index)
        if step is None or step >= excitation.plan.steps or not excitation.plan.is_active(step):
            return None
        self.step = step
        return step

    def apply(
        self,
        index: int,
        x: torch.Tensor,
        sigma: torch.Tensor,
        targets: Sequence[Target],
        run_unet: UNetRunner,
        *,
        should_stop: Callable[[], bool] | None = None,
        progress: Callable[[str], None] | None = None,
    ) -> None:
        """The update of the due step, written into `x` in place (nothing when no image has a target). The report is
        not read here (reading it may wait for the device): `finish` reads them all at once."""
        assert self.excitation is not None and self.step is not None, "apply() follows a due_step()"
        if all(target == (None, None) for target in targets):
            return
        show = progress or (lambda _: None)
        limit = self.engine.config.max_refinement_iterations

        def on_iteration(step: int, iteration: int) -> None:
            show(f"{TITLE}: step {step + 1}, refinement {iteration}/{limit}")

        show(f"{TITLE}: step {self.step + 1}")
        self.excitation.before_model_call(
            index, x, sigma, [subjects for subjects, _ in targets], run_unet, should_stop=should_stop,
            on_iteration=on_iteration, bindings=[bindings for _, bindings in targets],
        )

    def where(self, call: int) -> str:
        """The step being updated, in the user's 1-based numbering (the model call before the plan exists)."""
        return f"step {self.step + 1}" if self.step is not None else f"model call {call}"

    def failure(self, error: Exception, call: int, advice: Callable[[Exception, str], str]) -> str:
        """The user's line for a failure at model call `call`, after which the run is inert. Settings that do not fit
        this model or image size (raised before that step changed the latent) say so; anything else is logged with
        its traceback and worded by the host's `advice(error, where)` (e.g. what to change after an out-of-memory)."""
        self.active = False
        where = self.where(call)
        if isinstance(error, (ConfigError, CaptureError)):
            ran = any(r.active for r in self.reports)
            return f"A&E {'stopped at ' + where if ran else 'was not applied'}: {error}"
        logger.error("%s failed at %s; sampling continues without it", TITLE, where, exc_info=error)
        return advice(error, where)

    def stop(self, message: str) -> None:
        """End the run here (e.g. the host swapped the model mid-run), saying why."""
        self.active = False
        self.report(message)

    def finish(self, image_suffix: Callable[[int], str] = lambda b: "") -> None:
        """After sampling (or an interrupt): read the step reports once, say what they report (each image's first
        non-finite step; `image_suffix(b)` names the image), and free the graphs. Idempotent."""
        if self.finished:
            return
        self.finished = True
        self.active = False  # inert even if the host still calls
        try:
            reports = self.reports
            read_reports(reports)  # one host transfer for the whole run
            _log_reports(reports)
            reported: set[int] = set()
            for report in reports:
                for b in report.skipped_nonfinite:
                    if b not in reported:  # once per image and run: the step where it first happened
                        reported.add(b)
                        self.report(
                            f"non-finite attention loss or gradient at step {report.step + 1}; that update was skipped"
                            + image_suffix(b)
                        )
            fallback = self.engine.graph_fallback_reason
            if fallback:
                self.eager_reason = fallback
        finally:
            self.memory_modes = self.engine.evaluator.memory_modes_used  # read before the release forgets them
            self.engine.release_graphs()


def _log_reports(reports: Sequence[StepReport]) -> None:
    """The per-step figures on the debug log, read once after the run (reading a report may wait for the device)."""
    if not logger.isEnabledFor(logging.DEBUG):
        return
    for report in reports:
        logger.debug(
            "%s step %d: loss %s, refinement iterations %s%s",
            TITLE,
            report.step,
            [None if v is None else round(v, 4) for v in report.loss],
            report.refinement_iterations,
            " (interrupted)" if report.interrupted else "",
        )
