"""One Attend-and-Excite step on a batch of latents, as the reference pipeline does it per image
(docs/algorithm.md §1.4).

The engine updates whatever latent the caller's UNet runner differentiates against:
    latent <- latent - a_i * gradient_scale_b * grad_latent L
With the VP latent z (diffusers, DDIM, PLMS) gradient_scale is 1. With k-diffusion's sigma-space x, whose UNet input
is x / sqrt(1 + sigma^2), it is 1 + sigma^2 (`lib_ae.sampling.sigma_space_gradient_scale`), which makes the update the
official one mapped exactly into sigma space (docs/algorithm.md §2.2).

One step, in the paper's words (Chefer et al. 2023, Algorithm 1), per image b with subjects S_b at step i:
    evaluate   L = max_s (1 - a_s) and its gradient at z_t          (`_evaluate`: one cond-only forward + backward)
    refine     at a refinement step, while L > 1 - threshold:      (`_refine`: "iterative latent refinement")
                   z_t <- z_t - a_i grad L, evaluate again, at most `max_refinement_steps` times
    update     if i < alter_steps and L != 0: z_t' = z_t - a_i grad L   (`_update`)
Images whose loss reached the target stop moving; the others keep refining in a smaller batch.
A non-finite loss or gradient skips that image's update (a masked update on the device; reported), it never reaches
the latent.

Binding (SynGen, `lib_ae.binding`): with a `BindingConfig` the engine also evaluates SynGen's loss L_bind on the
same maps of the same forward (before A&E's re-softmax), per image with a `BindingSelection`. `bind` alone
(`excite=False`): the loss is L_bind and the plan SynGen's (constant step beta for the first steps, no refinement).
`excite+bind`: one backward on L = L_excite + (beta_i / alpha_i) * w * L_bind and the update z - alpha_i grad L, so
each loss moves the latent by its own step; refinement stops on A&E's maxima only. An image moves when its loss is not
0 (both methods' reference rule).

A step without refinement never waits for the GPU: every value stays on the device, and the report reads it on first
access (see `StepReport`). A refinement step has to read each iteration's loss to know whether to go on; it reads it
while the next iteration already runs (`_refine`), so the GPU never idles waiting for the CPU.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .binding import BindingConfig, BindingIndex, BindingPlan, BindingSelection, binding_loss, spatial_distributions
from .capture import AttentionCapture
from .config import ConfigError, ExciteConfig, StepPlan
from .evaluation import Evaluation, LossGroup, LossPlan
from .graphs import GraphableRunner, GraphEvaluations
from .loss import SelectionIndex, TokenSelection, excite_losses, smoothed_subject_maps, subject_maxima
from .step_report import StepReport, _DeviceValues

logger = logging.getLogger(__name__)

UNetRunner = Callable[[torch.Tensor, torch.Tensor], object]
"""run_unet(latent_rows, rows): run the cond-only UNet on `latent_rows` (UNet-input space) for batch rows `rows`
(a LongTensor of indices into the batch, so the caller can pick each row's conditioning and timestep).
The output is ignored; the attention hooks read what they need (the forward may be cut short)."""

GraphGuard = Callable[[], "Sequence[str] | None"]
"""Called once per sampling pass, before the first graph evaluation: reasons why a graph would be wrong (empty or
None: safe). See `lib_ae.graphs.find_graph_hazards`."""

__all__ = [
    "AttendAndExcite", "Evaluation", "GraphableRunner", "UNetRunner", "frozen_parameters",
]



class AttendAndExcite:
    """The A&E latent update, bound to a UNet through its `AttentionCapture`."""

    def __init__(
        self,
        capture: AttentionCapture,
        config: ExciteConfig | None = None,
        *,
        cuda_graphs: bool = False,
        graph_guard: GraphGuard | None = None,
        binding: BindingConfig | None = None,
        excite: bool = True,
    ) -> None:
        """`binding`: also apply SynGen's binding loss to the images given `bindings` (see the module docstring);
        `excite=False` with a `binding`: the `bind` method alone (its plan, no A&E loss in the update).
        `cuda_graphs`: evaluate through `GraphableRunner`s as replayed CUDA graphs (see `GraphableRunner`); other
        runners, and CPU tensors, are evaluated eagerly as always. Graphs live until `release_graphs()`.
        `graph_guard`: asked once per sampling pass (the first graph evaluation after construction or after
        `release_graphs()`); when it gives reasons, the pass is evaluated eagerly and `graph_fallback_reason` says why.
        """
        if not excite and binding is None:
            raise ConfigError("an engine without the excite loss needs a BindingConfig (the bind method)")
        self.capture = capture
        self.config = config or ExciteConfig()
        self.binding = binding
        self.excite = excite
        self._binding_plans: dict[int, BindingPlan] = {}
        self._binding_indices: dict[tuple[BindingSelection, torch.device], BindingIndex] = {}
        self._ratios: dict[torch.device, torch.Tensor] = {}
        """Per device, beta_i / alpha_i * weight of the current step (excite+bind): a device scalar filled before
        each step's evaluations, so that a captured graph reads the step's value instead of baking one in."""
        self.capture.early_stop = self.config.early_stop
        self._graphs: GraphEvaluations | None = GraphEvaluations(self) if cuda_graphs else None
        self.graph_guard = graph_guard
        self.graph_fallback_reason: str | None = None
        """Why this sampling pass evaluates eagerly although graphs were asked for (None: graphs are used)."""
        self._guard_pending = True
        self._indices: dict[tuple[tuple[int, ...], torch.device], torch.Tensor] = {}
        self._selections: dict[tuple[TokenSelection, torch.device], SelectionIndex] = {}
        self._loss_plans: dict[tuple[tuple[tuple[TokenSelection | None, BindingSelection | None], ...], torch.device],
                               LossPlan] = {}
        self._parameter_list: list[nn.Parameter] | None = None

    def release_graphs(self) -> None:
        """Free the captured CUDA graphs and their memory pool (they are captured again when next needed); the next
        graph evaluation asks the `graph_guard` again (a new sampling pass)."""
        if self._graphs is not None:
            self._graphs.release()
        self._guard_pending = True
        self._parameter_list = None

    def parameters(self) -> list[nn.Parameter]:
        """The UNet's parameters, listed once per sampling pass (until `release_graphs()`): walking the module tree
        at every evaluation costs milliseconds of CPU (SD1.5: 686 parameters in ~400 modules),
        more than the toggling."""
        if self._parameter_list is None:
            self._parameter_list = list(self.capture.unet.parameters())
        return self._parameter_list

    def plan(self, steps: int) -> StepPlan:
        """A&E's plan; for `bind` alone SynGen's: a constant step for the first steps, no refinement."""
        if self.excite:
            return self.config.plan(steps)
        bind = self.binding_plan(steps)
        assert bind is not None  # __init__: no excite without a binding
        return StepPlan(steps, bind.step_sizes, bind.intervention_steps, {})

    def binding_plan(self, steps: int) -> BindingPlan | None:
        """SynGen's schedule for `steps` steps (None without binding)."""
        if self.binding is None:
            return None
        if steps not in self._binding_plans:
            self._binding_plans[steps] = self.binding.plan(steps)
        return self._binding_plans[steps]

    def step(
        self,
        latent: torch.Tensor,
        step: int,
        plan: StepPlan,
        selections: Sequence[TokenSelection | None],
        run_unet: UNetRunner,
        should_stop: Callable[[], bool] | None = None,
        on_iteration: Callable[[int, int], None] | None = None,
        gradient_scale: Sequence[float] | torch.Tensor | None = None,
        keep_maps: bool = False,
        bindings: Sequence[BindingSelection | None] | None = None,
    ) -> tuple[torch.Tensor, StepReport]:
        """Return the updated latent (a new tensor; `latent` is not modified) and a report.

        `bindings[b]`: image b's modifier-noun groups for the binding loss (used when the engine has a `binding`).
        An image takes part when it has subjects (and the engine excites) or binding groups (and the engine binds).

        `keep_maps`: also report the subject maps behind the reported maxima (for heatmaps). Those evaluations run
        eagerly, never from a CUDA graph, and copy the maps to the CPU, so asking at a step or two costs a few ms.

        `gradient_scale[b]` multiplies image b's gradient step (see the module docstring); default 1. A tensor (on
        the latent's device) keeps the step free of host synchronisation.
        `should_stop()` is polled between refinement iterations (interrupt / skip); when it answers True the step
        returns at once with what it has done so far and `report.interrupted` set.
        """
        batch = latent.shape[0]
        if len(selections) != batch:
            raise ValueError(f"{len(selections)} token selections for a batch of {batch}")
        if bindings is not None and len(bindings) != batch:
            raise ValueError(f"{len(bindings)} binding selections for a batch of {batch}")
        if bindings is None or self.binding is None:
            bindings = [None] * batch
        report = StepReport(step, plan.is_active(step), [None] * batch, [None] * batch, [0] * batch, [],
                            maps=[None] * batch, bind_loss=[None] * batch, bind_maps=[None] * batch)
        rows = [b for b in range(batch) if self._takes_part(selections[b], bindings[b])]
        if not report.active or not rows:
            report.active = False
            return latent, report
        size = self.config.attention_size(latent.shape[-2], latent.shape[-1])
        self.config.check_map_size(*size)  # a precise ConfigError before any work, instead of F.pad's
        z = latent.detach().clone()
        coefficient = self._coefficients(plan.step_sizes[step], gradient_scale, z)
        self._set_binding_ratio(plan, step, z.device)
        context = _StepContext(selections, size, run_unet, coefficient, bindings)

        first = self._evaluate(z, rows, context, keep_maps)
        maxima_from: list[tuple[list[int], Evaluation]] = [(rows, first)]
        skipped_from: list[tuple[list[int], Evaluation]] = [(rows, first)]
        skipped: set[int] = set()
        updates: list[tuple[list[int], Evaluation]] = [(rows, first)]

        threshold = plan.refinement_thresholds.get(step)
        if threshold is not None and self.config.max_refinement_steps > 0:
            target = max(0.0, 1.0 - threshold)
            refined = self._refine(z, rows, first, target, context, report, should_stop, on_iteration)
            z, skipped = refined.latent, refined.skipped
            skipped_from = []  # the first evaluation's finiteness was read: it is in `skipped`
            updates = []
            plain_rows = [b for b in rows if b not in refined.rows and b not in skipped]
            if plain_rows:
                updates.append((plain_rows, _rows_of(first, rows, plain_rows, self)))
            if refined.rows and step < plan.alter_steps and not report.interrupted:
                final = refined.final
                if final is None or keep_maps:
                    final = self._evaluate(z, refined.rows, context, keep_maps)
                updates.append((refined.rows, final))
                maxima_from.append((refined.rows, final))
                skipped_from = [(refined.rows, final)]

        if step < plan.alter_steps and not report.interrupted:
            for update_rows, evaluation in updates:
                z = self._update(z, update_rows, evaluation, coefficient)
        if keep_maps:
            for map_rows, evaluation in maxima_from:
                if evaluation.maps is not None:
                    for b, maps in zip(map_rows, evaluation.maps):
                        report.maps[b] = maps if selections[b] is not None else None
                if evaluation.bind_maps is not None:
                    for b, bind_maps in zip(map_rows, evaluation.bind_maps):
                        report.bind_maps[b] = bind_maps
        bound = frozenset(b for b in rows if bindings[b] is not None and bindings[b].groups)  # type: ignore[union-attr]
        report._pending = _DeviceValues(
            batch, rows, first, _exact_rows(maxima_from, self), skipped_from, skipped, binding_rows=bound
        )
        return z, report

    def _takes_part(self, selection: TokenSelection | None, binding: BindingSelection | None) -> bool:
        excites = self.excite and selection is not None and bool(selection.subjects)
        binds = self.binding is not None and binding is not None and bool(binding.groups)
        return excites or binds

    def _set_binding_ratio(self, plan: StepPlan, step: int, device: torch.device) -> None:
        """excite+bind: L = L_excite + (beta_i / alpha_i) * w * L_bind, so that z - alpha_i grad L moves the latent by
        alpha_i along A&E's gradient and by beta_i * w along SynGen's. A device scalar filled in place: no host
        read, and a captured graph sees each step's value. alpha_i = 0 (scale factor 0) moves nothing at all."""
        if self.binding is None or not self.excite:
            return
        bind = self.binding_plan(plan.steps)
        assert bind is not None
        alpha = plan.step_sizes[step]
        ratio = bind.step_size(step) * self.binding.weight / alpha if alpha > 0 else 0.0
        self._ratio(device).fill_(ratio)

    def _ratio(self, device: torch.device) -> torch.Tensor:
        if device not in self._ratios:
            self._ratios[device] = torch.zeros((), dtype=torch.float64, device=device)
        return self._ratios[device]

    # ------------------------------------------------------------------------------------------------ the three parts

    def _evaluate(self, z: torch.Tensor, rows: list[int], context: _StepContext, keep_maps: bool = False) -> Evaluation:
        """L and its gradient at the latent `z` for batch rows `rows` (the paper's forward pass with attention)."""
        loss_plan = self._loss_plan([(context.selections[b], context.bindings[b]) for b in rows], z.device)
        run_unet = context.run_unet
        if (
            self._graphs is not None and isinstance(run_unet, GraphableRunner) and not keep_maps
            and self._graphs_allowed()
        ):
            return self._graphs.evaluate(z, rows, loss_plan, context.size, run_unet)
        index = self.index(rows, z.device)
        latent = z if self.row_index(rows, z) is None else z.index_select(0, index)
        return self.forward_backward(latent, lambda leaf: run_unet(leaf, index), loss_plan, context.size, keep_maps)

    def _refine(
        self,
        z: torch.Tensor,
        rows: list[int],
        first: Evaluation,
        target: float,
        context: _StepContext,
        report: StepReport,
        should_stop: Callable[[], bool] | None,
        on_iteration: Callable[[int, int], None] | None,
    ) -> _Refinement:
        """Iterative latent refinement: z <- z - a_i grad L while L > target, at most `max_refinement_steps` times.

        Deciding whether iteration k+1 runs needs iteration k's loss on the host. Iteration k+1's evaluation is
        launched before that loss is read (speculatively, for every image that has iterations left), so the GPU
        never waits for the CPU; when k's loss says an image is done, its speculative result is just not used (no
        latent is changed by an evaluation, so there is nothing to roll back). The iterations and their updates are
        the reference's, one for one.
        """
        stop = should_stop or (lambda: False)
        limit = self.config.max_refinement_steps
        losses, finite = _HostRead(first.losses, first.finite).values()
        skipped = {b for b, ok in zip(rows, finite) if not ok}
        refining = [b for b, value, ok in zip(rows, losses, finite) if ok and value > target]
        active = list(refining)
        evaluation = _rows_of(first, rows, active, self) if active else first
        last: tuple[list[int], Evaluation] | None = None
        while active:
            if stop():
                report.interrupted = True
                break
            for b in active:
                report.refinement_iterations[b] += 1
                if on_iteration is not None:
                    on_iteration(report.step, report.refinement_iterations[b])
            z = self._update(z, active, evaluation, context.coefficient)
            read = _HostRead(evaluation.losses, evaluation.finite)  # starts the copy, does not wait
            candidates = [b for b in active if report.refinement_iterations[b] < limit]
            speculative = self._evaluate(z, candidates, context) if candidates else None
            losses, finite = read.values()  # waits for iteration k only; k+1 is already queued behind it
            skipped.update(b for b, ok in zip(active, finite) if not ok)
            still = {b: value for b, value in zip(active, losses)}
            active = [b for b in candidates if b not in skipped and still[b] > target]
            last = (candidates, speculative) if speculative is not None else None
            if active:
                assert speculative is not None
                evaluation = _rows_of(speculative, candidates, active, self)
        refined_rows = [b for b in refining if b not in skipped]
        final = None
        if last is not None and last[0] == refined_rows and not report.interrupted:
            final = last[1]  # the speculative evaluation ran at exactly the final latents of exactly these rows
        return _Refinement(z, refined_rows, final, skipped)

    def _update(
        self, z: torch.Tensor, rows: list[int], evaluation: Evaluation, coefficient: torch.Tensor
    ) -> torch.Tensor:
        """z_t' = z_t - a_i * scale_b * grad L for `rows`, where the update applies (finite, L != 0): a masked update
        on the device, so a non-finite image is left as it was without asking the host."""
        index = self.row_index(rows, z)
        current = z if index is None else z.index_select(0, index)
        factor = coefficient if index is None else coefficient.index_select(0, index)
        shape = (-1,) + (1,) * (z.dim() - 1)
        # Product in the coefficient's precision, rounded to the latent's dtype: what `z[b] -= python_float * g` does.
        delta = (factor.view(shape) * evaluation.grads).to(z.dtype)
        updated = torch.where(evaluation.moves.view(shape), current - delta, current)
        return updated if index is None else z.index_copy(0, index, updated)

    # ---------------------------------------------------------------------------------------- the device computation

    def forward_backward(
        self,
        latent: torch.Tensor,
        run: Callable[[torch.Tensor], object],
        loss_plan: LossPlan,
        size: tuple[int, int],
        keep_maps: bool = False,
    ) -> Evaluation:
        """The whole evaluation on the device, with no host synchronisation (also what a CUDA graph captures)."""
        cfg = self.config
        self._probe_last_layer(size, lambda: run(latent.detach()))
        with torch.enable_grad(), frozen_parameters(self.parameters()):
            leaf = latent.detach().requires_grad_(True)
            with self.capture.record(*size) as recording:
                run(leaf)
            attention = recording.maps()
            parts: list[tuple[torch.Tensor, ...]] = []
            kept: list[torch.Tensor] = []
            kept_binding: list[torch.Tensor | None] = []
            for group in loss_plan.groups:
                group_attention = attention if group.positions is None else attention.index_select(0, group.positions)
                count = group_attention.shape[0]
                if group.selection is not None:
                    maps = smoothed_subject_maps(
                        group_attention,
                        group.selection,
                        smooth_attentions=cfg.smooth_attentions,
                        kernel_size=cfg.kernel_size,
                        sigma=cfg.sigma,
                        temperature=cfg.softmax_temperature,
                        index=group.index,
                    )
                    values = subject_maxima(maps)
                    if keep_maps:
                        kept.extend(maps.detach().float().cpu().unbind(0))
                    values_finite = torch.isfinite(values).all(dim=-1)
                    # A non-finite image contributes a zero loss, which is all it can change.
                    losses = torch.where(values_finite, excite_losses(values), torch.zeros_like(values[..., 0]))
                else:  # binding only: no subjects, no A&E terms
                    values = group_attention.new_zeros(count, 0)
                    values_finite = torch.ones(count, dtype=torch.bool, device=attention.device)
                    losses = group_attention.new_zeros(count)
                    if keep_maps:
                        kept.extend(group_attention.new_zeros(count, 0, *size).float().cpu().unbind(0))
                if values.shape[-1] < loss_plan.width:
                    values = torch.nn.functional.pad(values, (0, loss_plan.width - values.shape[-1]), value=math.nan)
                binding, objective = self._binding_terms(group, group_attention, losses)
                if keep_maps:
                    kept_binding.extend(self._binding_maps(group, group_attention, size))
                parts.append((losses, values, values_finite, binding, objective))
            losses, values, values_finite, binding, objective = (
                torch.cat(p) if len(parts) > 1 else p[0] for p in zip(*parts)
            )
            if loss_plan.order is not None:
                losses, values, values_finite, binding, objective = (
                    t.index_select(0, loss_plan.order) for t in (losses, values, values_finite, binding, objective)
                )
                if keep_maps:
                    kept = [kept[j] for j in loss_plan.order_list]
                    kept_binding = [kept_binding[j] for j in loss_plan.order_list]
            objective_finite = torch.isfinite(objective)
            # A non-finite binding loss would spread NaN through the sum's gradient: that row contributes 0 instead
            # and is reported as skipped, as a non-finite excite loss is.
            safe_objective = torch.where(objective_finite, objective, torch.zeros_like(objective))
            (grads,) = torch.autograd.grad(safe_objective.sum(), [leaf])
        finite = values_finite & objective_finite & torch.isfinite(grads.flatten(1)).all(dim=1)
        return Evaluation(losses.detach(), values.detach(), values_finite, finite, grads.detach(),
                          binding.detach(), safe_objective.detach(), kept if keep_maps else None,
                          kept_binding if keep_maps else None)

    def _binding_terms(
        self, group: LossGroup, attention: torch.Tensor, losses: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(SynGen's loss per row, the objective to differentiate) for one loss group: A&E's loss alone without
        binding (exactly as before: the reference's computation is untouched), L_bind for `bind`, and
        L_excite + ratio * L_bind for `excite+bind`."""
        if self.binding is None or group.binding is None:
            bind = torch.zeros(losses.shape, dtype=torch.promote_types(losses.dtype, torch.float32),
                               device=losses.device)
            return bind, (losses if self.excite else bind)
        bind = binding_loss(attention, group.binding, group.binding_index)
        if not self.excite:
            return bind, bind
        return bind, losses + self._ratio(attention.device) * bind

    @staticmethod
    def _binding_maps(group: LossGroup, attention: torch.Tensor, size: tuple[int, int]) -> list[torch.Tensor | None]:
        """Per row, (K, h, w): each binding group's noun then its modifiers (first word piece), as the loss sees
        them (spatial distributions); None per row without binding groups. Only with keep_maps (eager)."""
        count = attention.shape[0]
        if group.binding is None or not group.binding.groups:
            return [None] * count
        columns = [c for g in group.binding.groups for c in (g.noun[0], *(m[0] for m in g.modifiers))]
        distributions = spatial_distributions(attention.detach().float(), columns)  # (R, K, h*w)
        return list(distributions.reshape(count, len(columns), *size).cpu().unbind(0))

    def _probe_last_layer(self, size: tuple[int, int], forward: Callable[[], object]) -> None:
        """Before the first gradient forward at this map size: one no-grad forward to learn where it may stop."""
        if self.capture.early_stop and not self.capture.knows_last_layer(*size):
            with torch.no_grad(), self.capture.probe(*size):
                forward()

    # ------------------------------------------------------------------------------------------------- bookkeeping

    def _graphs_allowed(self) -> bool:
        if self._guard_pending:
            self._guard_pending = False
            self.graph_fallback_reason = None
            if self.graph_guard is not None:
                try:
                    reasons = list(self.graph_guard() or [])
                except Exception as error:  # noqa: BLE001 - a broken check must not break sampling: be safe instead
                    reasons = [f"the graph safety check failed ({error})"]
                if reasons:
                    self.graph_fallback_reason = "; ".join(reasons)
                    logger.warning("A&E evaluates without CUDA graphs in this pass: %s", self.graph_fallback_reason)
        return self.graph_fallback_reason is None

    def index(self, rows: Sequence[int], device: torch.device) -> torch.Tensor:
        """`rows` as a LongTensor on `device`, cached: a fresh host-to-device copy would wait for the GPU."""
        key = (tuple(rows), device)
        if key not in self._indices:
            self._indices[key] = torch.as_tensor(rows, device=device, dtype=torch.long)
        return self._indices[key]

    def row_index(self, rows: Sequence[int], z: torch.Tensor) -> torch.Tensor | None:
        """The index of `rows` in `z`, or None when they are all of its rows in order (nothing to select)."""
        if len(rows) == z.shape[0] and all(b == j for j, b in enumerate(rows)):
            return None
        return self.index(rows, z.device)

    def _loss_plan(
        self, targets: list[tuple[TokenSelection | None, BindingSelection | None]], device: torch.device
    ) -> LossPlan:
        """Rows grouped by (subjects, binding groups); every index tensor built here, before any graph capture."""
        key = (tuple(targets), device)
        plan = self._loss_plans.get(key)
        if plan is None:
            distinct = list(dict.fromkeys(targets))
            groups = []
            order_of_rows: list[int] = []
            for selection, binding in distinct:
                positions = [j for j, t in enumerate(targets) if t == (selection, binding)]
                order_of_rows += positions
                has_subjects = selection is not None and bool(selection.subjects)
                binds = self.binding is not None and binding is not None and bool(binding.groups)
                groups.append(
                    LossGroup(
                        self._selection_index(selection, device) if has_subjects else None,  # type: ignore[arg-type]
                        selection if has_subjects else None,
                        None if len(distinct) == 1 else torch.as_tensor(positions, device=device),
                        binding if binds else None,
                        self._binding_index(binding, device) if binds else None,  # type: ignore[arg-type]
                    )
                )
            order, inverse = None, list(range(len(targets)))
            if order_of_rows != list(range(len(targets))):
                inverse = [0] * len(order_of_rows)
                for concatenated, row in enumerate(order_of_rows):
                    inverse[row] = concatenated
                order = torch.as_tensor(inverse, device=device)
            width = max((len(g.selection.subjects) for g in groups if g.selection is not None), default=0)
            plan = LossPlan(tuple(targets), tuple(groups), order, tuple(inverse), width)
            self._loss_plans[key] = plan
        return plan

    def _binding_index(self, binding: BindingSelection, device: torch.device) -> BindingIndex:
        key = (binding, device)
        if key not in self._binding_indices:
            self._binding_indices[key] = BindingIndex.build(binding, device)
        return self._binding_indices[key]

    def _selection_index(self, selection: TokenSelection, device: torch.device) -> SelectionIndex:
        key = (selection, device)
        if key not in self._selections:
            self._selections[key] = SelectionIndex.build(selection, device)
        return self._selections[key]

    @staticmethod
    def _coefficients(
        step_size: float, gradient_scale: Sequence[float] | torch.Tensor | None, z: torch.Tensor
    ) -> torch.Tensor:
        """(B,) a_i * scale_b in the precision the update multiplies in (float32 for half latents)."""
        dtype = torch.promote_types(z.dtype, torch.float32)
        if gradient_scale is None:
            return torch.full((z.shape[0],), step_size, dtype=dtype, device=z.device)
        if isinstance(gradient_scale, torch.Tensor):
            scale = gradient_scale.detach().to(device=z.device, dtype=torch.float64).flatten()
        else:  # a host list: one host-to-device copy (pass a device tensor to avoid it)
            scale = torch.tensor([float(v) for v in gradient_scale], dtype=torch.float64).to(z.device)
        # a_i * scale_b in float64, as the reference's Python floats, then rounded once.
        return (scale * step_size).to(dtype)


@dataclass
class _StepContext:
    selections: Sequence[TokenSelection | None]
    size: tuple[int, int]
    run_unet: UNetRunner
    coefficient: torch.Tensor
    bindings: Sequence[BindingSelection | None]


@dataclass
class _Refinement:
    latent: torch.Tensor
    rows: list[int]  # the refined rows that stayed finite
    final: Evaluation | None  # an evaluation of exactly `rows` at `latent`, when one is already there
    skipped: set[int]  # rows found non-finite (read on the host)


def _rows_of(evaluation: Evaluation, rows: list[int], wanted: list[int], engine: AttendAndExcite) -> Evaluation:
    """The part of `evaluation` (of batch rows `rows`) for batch rows `wanted` (a subsequence of `rows`)."""
    if wanted == rows:
        return evaluation
    positions = [rows.index(b) for b in wanted]
    return evaluation.select(positions, engine.index(positions, evaluation.losses.device))


def _exact_rows(
    sources: list[tuple[list[int], Evaluation]], engine: AttendAndExcite
) -> list[tuple[list[int], Evaluation]]:
    """Later sources override earlier ones row by row: keep each earlier source only for the rows no later one has."""
    result: list[tuple[list[int], Evaluation]] = []
    taken: set[int] = set()
    for rows, evaluation in reversed(sources):
        kept = [b for b in rows if b not in taken]
        if kept:
            result.append((kept, _rows_of(evaluation, rows, kept, engine)))
            taken.update(kept)
    return list(reversed(result))


class _HostRead:
    """Small device tensors copied to the host without waiting; `values()` waits only for the work queued before."""

    def __init__(self, *tensors: torch.Tensor) -> None:
        packed = torch.cat([t.detach().to(torch.float64).flatten() for t in tensors])
        self.sizes = [t.numel() for t in tensors]
        self.event: Any = None
        if packed.is_cuda:
            self.host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
            self.host.copy_(packed, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = packed

    def values(self) -> list[list[float]]:
        if self.event is not None:
            self.event.synchronize()
        flat = self.host.tolist()
        out, offset = [], 0
        for size in self.sizes:
            out.append(flat[offset : offset + size])
            offset += size
        return out


@contextlib.contextmanager
def frozen_parameters(module: nn.Module | Sequence[nn.Parameter]) -> Iterator[None]:
    """Parameters (of a module, or listed) temporarily not requiring grad: autograd then saves no activations for
    weight gradients."""
    parameters = module.parameters() if isinstance(module, nn.Module) else module
    frozen = [p for p in parameters if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(True)
