"""An objective's value and gradient at a latent, on the device: one cond-only UNet forward with the maps captured,
the objective's terms per group of rows, one backward (docs/algorithm.md §1.4, "evaluate").

`Evaluator` owns what evaluations reuse (index tensors, loss plans, the UNet's parameter list), all built before any
CUDA-graph capture, so that `forward_backward` is a fixed sequence of device operations with no host read: the same
function runs eagerly and inside a captured graph (`lib_ae.graphs.GraphEvaluations` wraps an Evaluator).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from .binding import BindingIndex, BindingSelection
from .capture import AttentionCapture
from .evaluation import Evaluation, LossGroup, LossPlan, Target
from .loss import SelectionIndex, TokenSelection
from .objectives import Extras, Objective, Purpose, Terms
from .pass_memory import (
    LeanForward,
    PassMemory,
    choose_recompute,
    free_device_memory,
    keep_estimate,
    lean_backward,
)

logger = logging.getLogger(__name__)

__all__ = ["Evaluator", "Target", "frozen_parameters"]


class Evaluator:
    """`objective` evaluated through `capture`'s UNet, with `memory`'s means of bounding the pass's memory
    (`lib_ae.pass_memory`)."""

    def __init__(self, capture: AttentionCapture, objective: Objective, memory: PassMemory | None = None) -> None:
        self.capture = capture
        self.objective = objective
        self.memory = memory if memory is not None else PassMemory()
        # Per sampling pass and number of rows: whether the pass recomputes (decided at the first evaluation, which
        # is eager also where graphs follow, so that no memory query runs inside a capture).
        self._recompute: dict[int, bool] = {}
        self._indices: dict[tuple[tuple[int, ...], torch.device], torch.Tensor] = {}
        self._selections: dict[tuple[TokenSelection, torch.device], SelectionIndex] = {}
        self._binding_indices: dict[tuple[BindingSelection, torch.device], BindingIndex] = {}
        self._loss_plans: dict[tuple[tuple[Target, ...], torch.device], LossPlan] = {}
        self._parameter_list: list[nn.Parameter] | None = None
        self._lean_forward = LeanForward()

    def release(self) -> None:
        """The end of a sampling pass: the parameter list is read again next time (the weights may change), and the
        memory mode is chosen again."""
        self._parameter_list = None
        self._recompute.clear()
        self._lean_forward.release()

    @property
    def memory_modes_used(self) -> list[str]:
        """The memory modes this sampling pass's evaluations ran in ("keep", "recompute"), for the trace."""
        return sorted({"recompute" if r else "keep" for r in self._recompute.values()})

    def recomputes(self, latent: torch.Tensor) -> bool:
        """Whether evaluations of `latent`'s rows recompute the blocks' activations in the backward."""
        rows = int(latent.shape[0])
        decided = self._recompute.get(rows)
        if decided is None:
            if latent.is_cuda and torch.cuda.is_current_stream_capturing():
                return True  # never asked inside a capture (warm-ups decide first); the frugal mode if it were
            free = free_device_memory(latent.device) if self.memory.mode == "auto" else None
            decided = choose_recompute(self.memory.mode, free, keep_estimate(rows, *latent.shape[-2:]))
            self._recompute[rows] = decided
            logger.debug("A&E pass memory for %d row(s): %s (free: %s)", rows,
                         "recompute" if decided else "keep", free)
        return decided

    def parameters(self) -> list[nn.Parameter]:
        """The UNet's parameters, listed once per sampling pass (until `release()`): walking the module tree at every
        evaluation costs milliseconds of CPU (SD1.5: 686 parameters in ~400 modules), more than the toggling."""
        if self._parameter_list is None:
            self._parameter_list = list(self.capture.unet.parameters())
        return self._parameter_list

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

    def evaluate(
        self,
        z: torch.Tensor,
        rows: Sequence[int],
        loss_plan: LossPlan,
        size: tuple[int, int],
        run_unet: Callable[[torch.Tensor, torch.Tensor], object],
        keep_maps: bool = False,
        carried: tuple[torch.Tensor, torch.Tensor] | None = None,
        purpose: Purpose = "update",
    ) -> Evaluation:
        """The eager evaluation of batch rows `rows` of `z` (`carried`: those rows' carry, see `forward_backward`)."""
        index = self.index(rows, z.device)
        latent = z if self.row_index(rows, z) is None else z.index_select(0, index)
        return self.forward_backward(latent, lambda leaf: run_unet(leaf, index), loss_plan, size, keep_maps, carried,
                                     purpose)

    def forward_backward(
        self,
        latent: torch.Tensor,
        run: Callable[[torch.Tensor], object],
        loss_plan: LossPlan,
        size: tuple[int, int],
        keep_maps: bool = False,
        carried: tuple[torch.Tensor, torch.Tensor] | None = None,
        purpose: Purpose = "update",
    ) -> Evaluation:
        """The whole evaluation on the device, with no host synchronisation (also what a CUDA graph captures) unless
        the objective reads maps on the host (`Objective.graph_unsafe`). `carried`: for an objective that `carries`,
        each row's carry (R, W, D) and whether it has one (R,). `purpose`: what the objective differentiates.

        Where the mode is "auto" and keeping the activations runs out of memory, the evaluation is made again with
        recomputation, and so is the rest of the pass: the same result (`lib_ae.pass_memory`)."""
        recompute = self.recomputes(latent)
        try:
            return self._forward_backward(latent, run, loss_plan, size, keep_maps, carried, purpose, recompute)
        except torch.OutOfMemoryError:
            if recompute or self.memory.mode != "auto" or (latent.is_cuda and torch.cuda.is_current_stream_capturing()):
                raise
        logger.info("A&E pass out of memory keeping its activations; recomputing them from here on")
        self._recompute[int(latent.shape[0])] = True
        if latent.is_cuda:
            torch.cuda.empty_cache()
        return self._forward_backward(latent, run, loss_plan, size, keep_maps, carried, purpose, True)

    def _forward_backward(
        self,
        latent: torch.Tensor,
        run: Callable[[torch.Tensor], object],
        loss_plan: LossPlan,
        size: tuple[int, int],
        keep_maps: bool,
        carried: tuple[torch.Tensor, torch.Tensor] | None,
        purpose: Purpose,
        recompute: bool,
    ) -> Evaluation:
        self._probe_last_layer(size, lambda: run(latent.detach()))
        reads_self = self.objective.reads_self_attention
        # The pass's own attention and checkpointed blocks stay in place through the backward, which recomputes them.
        with torch.enable_grad(), frozen_parameters(self.parameters()), \
                self._lean_forward(self.capture.unet, self.capture, self.memory, recompute):
            leaf = latent.detach().requires_grad_(True)
            with self.capture.record(*size, self_attention=reads_self) as recording:
                run(leaf)
            attention = recording.maps()
            parts = []
            for group in loss_plan.groups:
                group_attention = attention if group.positions is None else attention.index_select(0, group.positions)
                group_carried = carried
                if carried is not None and group.positions is not None:
                    group_carried = (carried[0].index_select(0, group.positions),
                                     carried[1].index_select(0, group.positions))
                extras = Extras(purpose, _group_rows(recording.self_attention_rows, group.positions, leaf.shape[0])
                                if reads_self else None)
                parts.append(self.objective.terms(group, group_attention, size, keep_maps, group_carried, extras))
            losses, maxima, maxima_finite, bind_losses, objective = (
                torch.cat(t) if len(parts) > 1 else t[0]
                for t in zip(*((p.losses, _padded(p.maxima, loss_plan.width), p.maxima_finite, p.bind_losses,
                                p.objective) for p in parts))
            )
            kept = [m for p in parts for m in p.maps]
            kept_binding = [m for p in parts for m in p.bind_maps]
            carry = _carry_of(parts, loss_plan.carry_width)
            aux = None if any(p.aux is None for p in parts) else torch.cat([p.aux for p in parts])  # type: ignore[misc]
            if loss_plan.order is not None:
                losses, maxima, maxima_finite, bind_losses, objective = (
                    t.index_select(0, loss_plan.order) for t in (losses, maxima, maxima_finite, bind_losses, objective)
                )
                carry = None if carry is None else carry.index_select(0, loss_plan.order)
                aux = None if aux is None else aux.index_select(0, loss_plan.order)
                if keep_maps:
                    kept = [kept[j] for j in loss_plan.order_list]
                    kept_binding = [kept_binding[j] for j in loss_plan.order_list]
            objective_finite = torch.isfinite(objective)
            # A non-finite objective would spread NaN through the sum's gradient: that row contributes 0 instead and
            # is reported as skipped.
            safe_objective = torch.where(objective_finite, objective, torch.zeros_like(objective))
            with lean_backward(self.capture, size, reads_self, recompute):
                (grads,) = torch.autograd.grad(safe_objective.sum(), [leaf])
        finite = maxima_finite & objective_finite & torch.isfinite(grads.flatten(1)).all(dim=1)
        return Evaluation(losses.detach(), maxima.detach(), maxima_finite, finite, grads.detach(),
                          bind_losses.detach(), safe_objective.detach(), kept if keep_maps else None,
                          kept_binding if keep_maps else None, carry, None if aux is None else aux.detach())

    def _probe_last_layer(self, size: tuple[int, int], forward: Callable[[], object]) -> None:
        """Before the first gradient forward at this map size: one no-grad forward to learn where it may stop."""
        if self.capture.early_stop and not self.capture.knows_last_layer(*size):
            with torch.no_grad(), self.capture.probe(*size):
                forward()

    def loss_plan(self, targets: list[Target], device: torch.device) -> LossPlan:
        """Rows grouped by target; every index tensor built here, before any graph capture."""
        key = (tuple(targets), device)
        plan = self._loss_plans.get(key)
        if plan is None:
            plan = self._build_loss_plan(targets, device)
            self._loss_plans[key] = plan
        return plan

    def _build_loss_plan(self, targets: list[Target], device: torch.device) -> LossPlan:
        distinct = list(dict.fromkeys(targets))
        groups = []
        order_of_rows: list[int] = []
        for selection, binding in distinct:
            positions = [j for j, t in enumerate(targets) if t == (selection, binding)]
            order_of_rows += positions
            subjects = selection if selection is not None and selection.subjects else None
            groups_of_pairs = binding if self.objective.uses_modifier_pairs and binding and binding.groups else None
            groups.append(
                LossGroup(
                    self._selection_index(subjects, device) if subjects is not None else None,
                    subjects,
                    None if len(distinct) == 1 else torch.as_tensor(positions, device=device),
                    groups_of_pairs,
                    self._binding_index(groups_of_pairs, device) if groups_of_pairs is not None else None,
                    self.objective.index_for(subjects, groups_of_pairs, device),
                    self.objective.carry_width(subjects, groups_of_pairs) if self.objective.carries else 0,
                )
            )
        order, inverse = None, list(range(len(targets)))
        if order_of_rows != list(range(len(targets))):
            inverse = [0] * len(order_of_rows)
            for concatenated, row in enumerate(order_of_rows):
                inverse[row] = concatenated
            order = torch.as_tensor(inverse, device=device)
        width = max((len(g.selection.subjects) for g in groups if g.selection is not None), default=0)
        carry_width = max((g.carry_width for g in groups), default=0)
        return LossPlan(tuple(targets), tuple(groups), order, tuple(inverse), width, carry_width)

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


def _group_rows(
    self_rows: Callable[[torch.Tensor], torch.Tensor], positions: torch.Tensor | None, batch: int
) -> Callable[[torch.Tensor], torch.Tensor]:
    """`self_rows` for one group's rows: its weights (R_g, K, N) placed at the group's positions of the batch."""
    if positions is None:
        return self_rows

    def rows_of_group(weights: torch.Tensor) -> torch.Tensor:
        full = weights.new_zeros(batch, *weights.shape[1:]).index_copy(0, positions, weights)
        return self_rows(full).index_select(0, positions)

    return rows_of_group


def _carry_of(parts: Sequence[Terms], width: int) -> torch.Tensor | None:
    """The groups' carries, padded with zeros to `width` rows each and concatenated (None: nothing carried)."""
    carries = [p.carry for p in parts]
    if width == 0 or any(c is None for c in carries):
        return None
    padded = [torch.nn.functional.pad(c, (0, 0, 0, width - c.shape[-2])) for c in carries if c is not None]
    return torch.cat(padded) if len(padded) > 1 else padded[0]


def _padded(maxima: torch.Tensor, width: int) -> torch.Tensor:
    """(R, width): rows with fewer subjects than the widest group padded with NaN (read back as "no subject")."""
    if maxima.shape[-1] < width:
        return torch.nn.functional.pad(maxima, (0, width - maxima.shape[-1]), value=math.nan)
    return maxima


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
