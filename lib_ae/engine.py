"""One Attend-and-Excite step on a batch of latents: Algorithm 1 of Chefer et al. 2023, for any objective
(`lib_ae.objectives`), per image as the reference pipeline does it (docs/algorithm.md §1.4).

The engine updates whatever latent the caller's UNet runner differentiates against:
    latent <- latent - a_i * gradient_scale_b * grad_latent L
With the VP latent z (diffusers, DDIM, PLMS) gradient_scale is 1. With k-diffusion's sigma-space x, whose UNet input
is x / sqrt(1 + sigma^2), it is 1 + sigma^2 (`lib_ae.in_sampler.sigma_space_gradient_scale`), which makes the update
the official one mapped exactly into sigma space (docs/algorithm.md §2.2).

One step, per image b with targets at step i (a_i: the plan's step size):
    evaluate   L and its gradient at z_t                              (`Evaluator`: one cond-only forward + backward)
    refine     at a refinement step, while L > 1 - threshold:        (`_refine`: "iterative latent refinement")
                   z_t <- z_t - a_i grad L, evaluate again, at most `max_refinement_iterations` times
    update     if i < alter_steps and L != 0: z_t' = z_t - a_i grad L   (`_update`)
Images whose loss reached the target stop moving; the others keep refining in a smaller batch.
A non-finite loss or gradient skips that image's update (a masked update on the device; reported), it never reaches
the latent.

A step without refinement never waits for the GPU: every value stays on the device, and the report reads it on first
access (see `StepReport`). A refinement step has to read each iteration's loss to know whether to go on; it reads it
while the next iteration already runs (`_refine`), so the GPU never idles waiting for the CPU.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .binding import BindingSelection
from .capture import AttentionCapture
from .config import ExciteConfig, StepPlan
from .evaluation import CarryStore, Evaluation, HostRead, LossPlan, Target, exact_rows, rows_of
from .evaluator import Evaluator, frozen_parameters
from .graphs import GraphableRunner, GraphBackend, GraphConditions, GraphEvaluations, GraphGuard
from .initno import NoiseOptimisation, optimise_initial_noise
from .loss import TokenSelection
from .objectives import Excite, Initno, Objective, Purpose
from .pass_memory import PassMemory
from .step_report import StepReport, _DeviceValues

logger = logging.getLogger(__name__)

UNetRunner = Callable[[torch.Tensor, torch.Tensor], object]
"""run_unet(latent_rows, rows): run the cond-only UNet on `latent_rows` (UNet-input space) for batch rows `rows`
(a LongTensor of indices into the batch, so the caller can pick each row's conditioning and timestep).
The output is ignored; the attention hooks read what they need (the forward may be cut short)."""

__all__ = ["AttendAndExcite", "Evaluation", "GraphableRunner", "UNetRunner", "frozen_parameters"]


class AttendAndExcite:
    """The latent update of one objective, bound to a UNet through its `AttentionCapture`."""

    def __init__(
        self,
        capture: AttentionCapture,
        objective: Objective | ExciteConfig | None = None,
        *,
        cuda_graphs: bool = False,
        graph_guard: GraphGuard | GraphConditions | None = None,
        graph_backend: GraphBackend | None = None,
        pass_memory: PassMemory | None = None,
    ) -> None:
        """`objective`: the method (`lib_ae.objectives`); an `ExciteConfig` or None is Attend-and-Excite with it.
        `cuda_graphs`: evaluate through `GraphableRunner`s as replayed CUDA graphs (`graph_backend`: where, CUDA by
        default); other runners, and CPU tensors, are evaluated eagerly. Graphs live until `release_graphs()`.
        `graph_guard`: asked once per sampling pass (the first graph evaluation after construction or after
        `release_graphs()`); when it gives reasons, the pass is evaluated eagerly and `graph_fallback_reason` says why.
        As `GraphConditions`, it also names the host's per-call state, each value of which is its own graph.
        `pass_memory`: how the gradient pass bounds its memory (`lib_ae.pass_memory`; default: own attention, and
        recomputation where keeping the activations would not fit).
        """
        self.objective = objective if isinstance(objective, Objective) else Excite(objective)
        self.config = self.objective.config
        self.capture = capture
        self.capture.early_stop = self.config.early_stop
        self.evaluator = Evaluator(capture, self.objective, pass_memory)
        self._graphs = GraphEvaluations(self.evaluator, graph_backend, graph_guard) if cuda_graphs else None
        self._carries = CarryStore()

    @property
    def graph_fallback_reason(self) -> str | None:
        """Why this sampling pass evaluates eagerly although graphs were asked for (None: graphs are used)."""
        if self._graphs is None:
            return None
        return self.objective.graph_unsafe or self._graphs.fallback_reason

    def release_graphs(self) -> None:
        """Free the captured CUDA graphs and their memory pool (they are captured again when next needed); the next
        graph evaluation asks the `graph_guard` again (a new sampling pass)."""
        if self._graphs is not None:
            self._graphs.release()
        self.evaluator.release()

    def plan(self, steps: int) -> StepPlan:
        return self.objective.plan(steps)

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
        timestep: float | None = None,
    ) -> tuple[torch.Tensor, StepReport]:
        """Return the updated latent (a new tensor; `latent` is not modified) and a report.

        `selections[b]`: image b's subject columns; `bindings[b]`: its modifier-noun groups, read by an objective that
        `uses_modifier_pairs`. The objective says which images take part (`Objective.takes_part`).

        `keep_maps`: also report the subject maps behind the reported maxima (for heatmaps). Those evaluations run
        eagerly, never from a CUDA graph, and copy the maps to the CPU, so asking at a step or two costs a few ms.

        `gradient_scale[b]` multiplies image b's gradient step (see the module docstring); default 1. A tensor (on
        the latent's device) keeps the step free of host synchronisation.
        `timestep`: the step's DDPM timestep, for an objective that `reads_timestep`.
        `should_stop()` is polled between refinement iterations (interrupt / skip); when it answers True the step
        returns at once with what it has done so far and `report.interrupted` set.
        """
        batch = latent.shape[0]
        if len(selections) != batch:
            raise ValueError(f"{len(selections)} token selections for a batch of {batch}")
        if bindings is not None and len(bindings) != batch:
            raise ValueError(f"{len(bindings)} binding selections for a batch of {batch}")
        if bindings is None or not self.objective.uses_modifier_pairs:
            bindings = [None] * batch
        targets: list[Target] = list(zip(selections, bindings))
        report = StepReport(step, plan.is_active(step), [None] * batch, [None] * batch, [0] * batch, [],
                            maps=[None] * batch, bind_loss=[None] * batch, bind_maps=[None] * batch)
        rows = [b for b in range(batch) if self.objective.takes_part(*targets[b])]
        if not report.active or not rows:
            report.active = False
            return latent, report
        size = self.config.attention_size(latent.shape[-2], latent.shape[-1])
        self.config.check_map_size(*size)  # a precise ConfigError before any work, instead of F.pad's
        z = latent.detach().clone()
        coefficient = self._coefficients(plan.step_sizes[step], gradient_scale, z)
        self.objective.start_step(plan, step, z.device, timestep)
        carries = self.objective.carries
        carry_shape = (max(self.objective.carry_width(*targets[b]) for b in rows) if carries else 0, size[0] * size[1])
        carried = self._carries.for_step(step, batch, *carry_shape, z) if carries else None
        context = _StepContext(targets, size, run_unet, coefficient, carried)

        first = self._evaluate(z, rows, context, keep_maps)
        maxima_from: list[tuple[list[int], Evaluation]] = [(rows, first)]
        skipped_from: list[tuple[list[int], Evaluation]] = [(rows, first)]
        skipped: set[int] = set()
        updates: list[tuple[list[int], Evaluation]] = [(rows, first)]

        threshold = plan.refinement_thresholds.get(step)
        refines = threshold is not None and self.config.max_refinement_iterations > 0
        if refines and self.objective.refines_in_official_order:
            assert threshold is not None
            target = self.objective.refinement_target(threshold)
            refined = self._refine_in_order(z, rows, first, target, context, report, should_stop, on_iteration)
            z, skipped = refined.latent, refined.skipped
            skipped_from = []
            updates = []
            plain_rows = [b for b in rows if b not in refined.rows and b not in skipped]
            if plain_rows:
                updates.append((plain_rows, rows_of(first, rows, plain_rows, self.evaluator.index)))
            if refined.final is not None:
                updates.append((refined.rows, refined.final))
                maxima_from.append((refined.rows, refined.final))
                skipped_from = [(refined.rows, refined.final)]
        elif refines:
            assert threshold is not None
            target = self.objective.refinement_target(threshold)
            refined = self._refine(z, rows, first, target, context, report, should_stop, on_iteration)
            z, skipped = refined.latent, refined.skipped
            skipped_from = []  # the first evaluation's finiteness was read: it is in `skipped`
            updates = []
            plain_rows = [b for b in rows if b not in refined.rows and b not in skipped]
            if plain_rows:
                updates.append((plain_rows, rows_of(first, rows, plain_rows, self.evaluator.index)))
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
        reported = exact_rows(maxima_from, self.evaluator.index)  # each row's final evaluation
        if carries and self.objective.chains_carry and context.carried is not None:
            self._carries.keep_all(step, *context.carried)
        elif carries:
            self._carries.keep(step, batch, *carry_shape, reported, self.evaluator.index)
        bound = frozenset(
            b for b in rows if self.objective.computes_binding_loss and bindings[b] is not None and bindings[b].groups  # type: ignore[union-attr]
        )
        report._pending = _DeviceValues(batch, rows, first, reported, skipped_from, skipped, binding_rows=bound)
        return z, report

    def optimise_initial_noise(
        self,
        latent: torch.Tensor,
        selections: Sequence[TokenSelection | None],
        run_unet: UNetRunner,
        latent_scale: torch.Tensor,
        fresh_noise: Callable[[int, int], torch.Tensor],
        should_stop: Callable[[], bool] | None = None,
    ) -> tuple[torch.Tensor, list[NoiseOptimisation | None]]:
        """Before the first step, for an objective that `optimises_initial_noise` (InitNO): each taking-part image's
        noise optimised on its own, as the official pipeline does for one image (`lib_ae.initno`). Returns the new
        latent (a new tensor) and per image what was done (None: left alone).

        `latent` is the sampler's first latent; `latent_scale` (B,) maps it to the UNet's input, the VP latent InitNO
        optimises (1 / sqrt(1 + sigma^2) in sigma space, 1 in VP space). `fresh_noise(b, r)`: image b's starting
        latent for round r >= 1 in the sampler's space (the host draws it as it drew the first)."""
        objective = self.objective
        if not isinstance(objective, Initno):
            raise TypeError(f"{type(objective).__name__} does not optimise the initial noise")
        batch = latent.shape[0]
        size = self.config.attention_size(latent.shape[-2], latent.shape[-1])
        self.config.check_map_size(*size)
        result = latent.detach().clone()
        reports: list[NoiseOptimisation | None] = [None] * batch
        scales = latent_scale.detach().to(device=latent.device, dtype=torch.float64).flatten().tolist()
        names = len(objective.aux_names)
        for b in range(batch):
            if not objective.takes_part(selections[b], None):
                continue
            index = self.evaluator.index([b], latent.device)
            loss_plan = self.evaluator.loss_plan([(selections[b], None)], latent.device)
            scale = scales[b]

            def loss(v: torch.Tensor, index: torch.Tensor = index, loss_plan: LossPlan = loss_plan,
                     scale: float = scale) -> tuple[torch.Tensor, float, float]:
                x = v / scale
                evaluation = self.evaluator.forward_backward(
                    x, lambda leaf: run_unet(leaf, index), loss_plan, size, purpose="initial"
                )
                _, finite, aux = _host_terms(evaluation, names)
                if not finite[0]:
                    return x.sum() * 0, math.nan, math.nan
                # A tensor whose gradient with respect to v is the loss's: the evaluation's gradient, chained.
                return (x * evaluation.grads.to(x.dtype)).sum(), aux[0][0], aux[0][3]

            v = result[b : b + 1] * scale

            def fresh(r: int, b: int = b) -> torch.Tensor:
                return fresh_noise(b, r) * scales[b]

            optimised, reports[b] = optimise_initial_noise(v, loss, fresh, objective.initno, should_stop)
            result[b : b + 1] = (optimised / scale).to(result.dtype)
            noise = reports[b]
            assert noise is not None
            logger.info(
                "InitNO, image %d: round %d of %d chosen (%s), %d optimisation steps, %.2f s", b,
                noise.chosen_round + 1, len(noise.rounds), "targets met" if noise.succeeded else "targets not met",
                noise.evaluations, noise.seconds,
            )
        return result, reports

    def _evaluate(
        self, z: torch.Tensor, rows: list[int], context: _StepContext, keep_maps: bool = False,
        purpose: Purpose = "update",
    ) -> Evaluation:
        """L and its gradient at the latent `z` for batch rows `rows` (the paper's forward pass with attention). For
        an objective that `chains_carry`, the rows' carry is then this evaluation's."""
        loss_plan = self.evaluator.loss_plan([context.targets[b] for b in rows], z.device)
        run_unet = context.run_unet
        carried = None
        index = self.evaluator.index(rows, z.device)
        if context.carried is not None:
            carried = (context.carried[0].index_select(0, index), context.carried[1].index_select(0, index))
        if (
            self._graphs is not None and isinstance(run_unet, GraphableRunner) and not keep_maps
            and self.objective.graph_unsafe is None and self._graphs.allowed()
        ):
            evaluation = self._graphs.evaluate(z, rows, loss_plan, context.size, run_unet, carried=carried)
        else:
            evaluation = self.evaluator.evaluate(z, rows, loss_plan, context.size, run_unet, keep_maps, carried,
                                                 purpose)
        if self.objective.chains_carry and context.carried is not None and evaluation.carry is not None:
            carry, has = context.carried
            width = carry.shape[1]
            values = evaluation.carry[:, :width]
            values = torch.nn.functional.pad(values, (0, 0, 0, width - values.shape[1]))
            context.carried = (carry.index_copy(0, index, values.to(carry.dtype)), has.index_fill(0, index, True))
        return evaluation

    def _refine_in_order(
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
        """Refinement as InitNO's `_perform_iterative_refinement_step` runs it: while a row's last evaluation leaves
        its target unmet, evaluate again (the first time at the step's latent), differentiate the `refine` loss and
        update, at most `max_refinement_iterations` times; then one `update` evaluation at the refined latent, whose
        gradient the step's update follows. Every evaluation reads the carry of the one before, so none is skipped
        or run ahead; the loop reads each iteration's terms on the host (the objective already does)."""
        stop = should_stop or (lambda: False)
        limit = self.config.max_refinement_iterations
        names = self.objective.aux_names
        losses, finite, aux = _host_terms(first, len(names))
        skipped = {b for b, ok in zip(rows, finite) if not ok}
        refining = [b for b, value, ok, terms in zip(rows, losses, finite, aux)
                    if ok and self.objective.refinement_unmet(value, terms, target)]
        active = list(refining)
        while active:
            if stop():
                report.interrupted = True
                break
            evaluation = self._evaluate(z, active, context, purpose="refine")
            for b in active:
                report.refinement_iterations[b] += 1
                if on_iteration is not None:
                    on_iteration(report.step, report.refinement_iterations[b])
            z = self._update(z, active, evaluation, context.coefficient)
            losses, finite, aux = _host_terms(evaluation, len(names))
            skipped.update(b for b, ok in zip(active, finite) if not ok)
            active = [
                b for b, value, ok, terms in zip(active, losses, finite, aux)
                if ok and report.refinement_iterations[b] < limit
                and self.objective.refinement_unmet(value, terms, target)
            ]
        refined_rows = [b for b in refining if b not in skipped]
        final = None
        if refined_rows and not report.interrupted:
            final = self._evaluate(z, refined_rows, context)
        return _Refinement(z, refined_rows, final, skipped)

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
        """Iterative latent refinement: z <- z - a_i grad L while L > target, at most `max_refinement_iterations` times.

        Deciding whether iteration k+1 runs needs iteration k's loss on the host. Iteration k+1's evaluation is
        launched before that loss is read (speculatively, for every image that has iterations left), so the GPU
        never waits for the CPU; when k's loss says an image is done, its speculative result is just not used (no
        latent is changed by an evaluation, so there is nothing to roll back). The iterations and their updates are
        the reference's, one for one.
        """
        stop = should_stop or (lambda: False)
        limit = self.config.max_refinement_iterations
        losses, finite = HostRead(first.losses, first.finite).values()
        skipped = {b for b, ok in zip(rows, finite) if not ok}
        refining = [b for b, value, ok in zip(rows, losses, finite) if ok and value > target]
        active = list(refining)
        evaluation = rows_of(first, rows, active, self.evaluator.index) if active else first
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
            read = HostRead(evaluation.losses, evaluation.finite)  # starts the copy, does not wait
            candidates = [b for b in active if report.refinement_iterations[b] < limit]
            speculative = self._evaluate(z, candidates, context) if candidates else None
            losses, finite = read.values()  # waits for iteration k only; k+1 is already queued behind it
            skipped.update(b for b, ok in zip(active, finite) if not ok)
            still = {b: value for b, value in zip(active, losses)}
            active = [b for b in candidates if b not in skipped and still[b] > target]
            last = (candidates, speculative) if speculative is not None else None
            if active:
                assert speculative is not None
                evaluation = rows_of(speculative, candidates, active, self.evaluator.index)
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
        index = self.evaluator.row_index(rows, z)
        current = z if index is None else z.index_select(0, index)
        factor = coefficient if index is None else coefficient.index_select(0, index)
        shape = (-1,) + (1,) * (z.dim() - 1)
        # Product in the coefficient's precision, rounded to the latent's dtype: what `z[b] -= python_float * g` does.
        delta = (factor.view(shape) * evaluation.grads).to(z.dtype)
        updated = torch.where(evaluation.moves.view(shape), current - delta, current)
        return updated if index is None else z.index_copy(0, index, updated)

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



def _host_terms(evaluation: Evaluation, width: int) -> tuple[list[float], list[bool], list[list[float]]]:
    """An evaluation's losses, finiteness and further terms, read on the host (waits for it)."""
    tensors = [evaluation.losses, evaluation.finite]
    if evaluation.aux is not None and width:
        tensors.append(evaluation.aux)
    values = HostRead(*tensors).values()
    rows = len(values[0])
    aux = [values[2][r * width:(r + 1) * width] for r in range(rows)] if len(values) > 2 else [[] for _ in range(rows)]
    return values[0], [bool(v) for v in values[1]], aux


@dataclass
class _StepContext:
    targets: Sequence[Target]
    size: tuple[int, int]
    run_unet: UNetRunner
    coefficient: torch.Tensor
    carried: tuple[torch.Tensor, torch.Tensor] | None = None  # the objective's carry from the previous step, all rows


@dataclass
class _Refinement:
    latent: torch.Tensor
    rows: list[int]  # the refined rows that stayed finite
    final: Evaluation | None  # an evaluation of exactly `rows` at `latent`, when one is already there
    skipped: set[int]  # rows found non-finite (read on the host)
