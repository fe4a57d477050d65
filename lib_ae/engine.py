"""One Attend-and-Excite step on a batch of latents, as the reference pipeline does it per image (algorithm.md §1.4).

The engine updates whatever latent the caller's UNet runner differentiates against:
    latent <- latent - a_i * gradient_scale_b * grad_latent L
With the VP latent z (diffusers, DDIM, PLMS) gradient_scale is 1. With k-diffusion's sigma-space x, whose UNet input
is x / sqrt(1 + sigma^2), it is 1 + sigma^2 (`lib_ae.spaces.sigma_space_gradient_scale`), which makes the update the
official one mapped exactly into sigma space (algorithm.md §2.2).

Per image b with subjects S_b, at sampler step i (step size a_i):
    L, g = loss and gradient at z                                      (one cond-only forward + backward)
    if i is a refinement step and L > 1 - threshold:                   (iterative refinement)
        repeat: z <- z - a_i g (if L != 0); L, g <- at z   while L(previous z) > target, at most `max_refinement_steps`
        L, g <- at the final z
    if i < alter_steps and L != 0: z <- z - a_i g
Images whose loss reached the target stop moving; the others keep refining in a smaller batch.
A non-finite loss or gradient skips that image's update (reported), it never reaches the latent.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from .capture import AttentionCapture
from .config import ExciteConfig, StepPlan
from .loss import TokenSelection, excite_loss, subject_maxima

logger = logging.getLogger(__name__)

UNetRunner = Callable[[torch.Tensor, torch.Tensor], object]
"""run_unet(latent_rows, rows): run the cond-only UNet on `latent_rows` (UNet-input space) for batch rows `rows`
(a LongTensor of indices into the batch, so the caller can pick each row's conditioning and timestep).
The output is ignored; the attention hooks read what they need (the forward may be cut short)."""


@dataclass
class StepReport:
    """What one step did, per image of the batch (None / 0 for images without subjects)."""

    step: int
    active: bool
    loss: list[float | None] = field(default_factory=list)
    """Loss at the latent the step started from."""
    maxima: list[list[float] | None] = field(default_factory=list)
    """Max attention per subject at the latent the final update was computed from."""
    refinement_iterations: list[int] = field(default_factory=list)
    skipped_nonfinite: list[int] = field(default_factory=list)
    interrupted: bool = False


@dataclass
class _Evaluation:
    losses: list[float]
    maxima: list[list[float] | None]
    grads: torch.Tensor | None
    finite: list[bool]


class AttendAndExcite:
    """The A&E latent update, bound to a UNet through its `AttentionCapture`."""

    def __init__(self, capture: AttentionCapture, config: ExciteConfig | None = None) -> None:
        self.capture = capture
        self.config = config or ExciteConfig()
        self.capture.early_stop = self.config.early_stop

    def plan(self, steps: int) -> StepPlan:
        return self.config.plan(steps)

    def step(
        self,
        latent: torch.Tensor,
        step: int,
        plan: StepPlan,
        selections: Sequence[TokenSelection | None],
        run_unet: UNetRunner,
        should_stop: Callable[[], bool] | None = None,
        on_iteration: Callable[[int, int], None] | None = None,
        gradient_scale: Sequence[float] | None = None,
    ) -> tuple[torch.Tensor, StepReport]:
        """Return the updated latent (a new tensor; `latent` is not modified) and a report.

        `gradient_scale[b]` multiplies image b's gradient step (see the module docstring); default 1.
        `should_stop()` is polled between refinement iterations (interrupt / skip); when it answers True the step
        returns at once with what it has done so far and `report.interrupted` set.
        """
        batch = latent.shape[0]
        if len(selections) != batch:
            raise ValueError(f"{len(selections)} token selections for a batch of {batch}")
        report = StepReport(step, plan.is_active(step), [None] * batch, [None] * batch, [0] * batch)
        rows = [b for b in range(batch) if selections[b] is not None and selections[b].subjects]
        if not report.active or not rows:
            report.active = False
            return latent, report
        stop = should_stop or (lambda: False)
        z = latent.detach().clone()
        step_size = plan.step_sizes[step]
        scales = [1.0] * batch if gradient_scale is None else [float(v) for v in gradient_scale]
        size = self.config.attention_size(latent.shape[-2], latent.shape[-1])

        def evaluate(subset: list[int]) -> _Evaluation:
            return self._evaluate(z, subset, selections, size, run_unet)

        current = evaluate(rows)
        loss = dict(zip(rows, current.losses))
        for b, value in loss.items():
            report.loss[b] = value
        grad = {b: _row(current, rows, b) for b in rows}
        maxima = dict(zip(rows, current.maxima))
        bad = {b for b, ok in zip(rows, current.finite) if not ok}

        threshold = plan.refinement_thresholds.get(step)
        if threshold is not None:
            target = max(0.0, 1.0 - threshold)
            refining = [b for b in rows if b not in bad and loss[b] > target]
            active, evaluation, first = list(refining), current, True
            while active:
                if stop():
                    report.interrupted = True
                    break
                if not first:  # the first iteration's forward is the one already done at this very latent
                    evaluation = evaluate(active)
                    bad.update(b for b, ok in zip(active, evaluation.finite) if not ok)
                first = False
                for b in active:
                    report.refinement_iterations[b] += 1
                    g = _row(evaluation, active, b)
                    if b not in bad and g is not None:
                        z[b] -= step_size * scales[b] * g
                    if on_iteration is not None:
                        on_iteration(step, report.refinement_iterations[b])
                still = {b: l for b, l in zip(active, evaluation.losses)}
                active = [
                    b
                    for b in active
                    if b not in bad and still[b] > target and report.refinement_iterations[b] < self.config.max_refinement_steps
                ]
            refined = [b for b in refining if b not in bad]
            if refined and step < plan.alter_steps and not report.interrupted:
                final = evaluate(refined)
                for j, b in enumerate(refined):
                    loss[b] = final.losses[j]
                    maxima[b] = final.maxima[j]
                    grad[b] = _row(final, refined, b)
                    if not final.finite[j]:
                        bad.add(b)

        if step < plan.alter_steps and not report.interrupted:
            for b in rows:
                g = grad[b]
                if b not in bad and g is not None:
                    z[b] -= step_size * scales[b] * g
        for b in rows:
            report.maxima[b] = maxima[b]
        report.skipped_nonfinite = sorted(bad)
        if bad:
            logger.warning("step %d: non-finite attention loss or gradient for image(s) %s; their update was skipped", step, report.skipped_nonfinite)
        return z, report

    def _evaluate(
        self,
        z: torch.Tensor,
        rows: list[int],
        selections: Sequence[TokenSelection | None],
        size: tuple[int, int],
        run_unet: UNetRunner,
    ) -> _Evaluation:
        cfg = self.config
        index = torch.as_tensor(rows, device=z.device)
        with torch.enable_grad(), frozen_parameters(self.capture.unet):
            leaf = z.index_select(0, index).detach().requires_grad_(True)
            with self.capture.record(*size) as recording:
                run_unet(leaf, index)
            maps = recording.maps()
            losses: list[torch.Tensor] = []
            maxima: list[list[float] | None] = []
            finite: list[bool] = []
            for j, b in enumerate(rows):
                selection = selections[b]
                assert selection is not None
                values = subject_maxima(
                    maps[j],
                    selection,
                    smooth_attentions=cfg.smooth_attentions,
                    kernel_size=cfg.kernel_size,
                    sigma=cfg.sigma,
                    temperature=cfg.softmax_temperature,
                )
                ok = bool(torch.isfinite(values).all())
                finite.append(ok)
                maxima.append([float(v) for v in values.detach()] if ok else None)
                losses.append(excite_loss(values) if ok else values.new_zeros(()))
            total = torch.stack(losses).sum()
            grads = torch.autograd.grad(total, [leaf])[0] if total.requires_grad else None
        if grads is not None:
            per_row_finite = torch.isfinite(grads.flatten(1)).all(dim=1).tolist()
            finite = [f and g for f, g in zip(finite, per_row_finite)]
        loss_values = [float(l.detach()) if f else math.nan for l, f in zip(losses, finite)]
        return _Evaluation(loss_values, maxima, grads.detach() if grads is not None else None, finite)


def _row(evaluation: _Evaluation, rows: list[int], b: int) -> torch.Tensor | None:
    """Gradient of batch image b, or None when its loss was exactly 0 (the reference skips the update then)."""
    j = rows.index(b)
    if evaluation.grads is None or not evaluation.finite[j] or evaluation.losses[j] == 0:
        return None
    return evaluation.grads[j]


@contextlib.contextmanager
def frozen_parameters(module: nn.Module) -> Iterator[None]:
    """Parameters temporarily not requiring grad: autograd then saves no activations for weight gradients."""
    frozen = [p for p in module.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(True)
