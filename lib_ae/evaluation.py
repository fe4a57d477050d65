"""What one evaluation of an objective yields, how an evaluation's rows are grouped for the loss, and how its
rows are picked and read.

`Evaluation` holds, for some batch rows at one latent, the loss terms and the gradient, all on the device; the engine
(`lib_ae.engine`) computes it, eagerly or through a replayed graph (`lib_ae.graphs`), which both import it from here.
`LossPlan` says how those rows split into groups sharing a token selection, with every index prepared in advance.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .binding import BindingIndex, BindingSelection
from .loss import SelectionIndex, TokenSelection

__all__ = ["Evaluation", "HostRead", "LossGroup", "LossPlan", "Target", "exact_rows", "rows_of"]

Target = tuple[TokenSelection | None, BindingSelection | None]
"""What one image's loss reads: its subjects' columns and its modifier-noun groups (None: nothing of that kind)."""


@dataclass
class Evaluation:
    """Loss terms and gradient of some batch rows at one latent, all on the device (nothing read on the host)."""

    losses: torch.Tensor  # (R,) L per row; 0 where the maxima are not finite
    maxima: torch.Tensor  # (R, S) a_s per row and subject, NaN-padded when rows have fewer subjects
    values_finite: torch.Tensor  # (R,) bool: the maxima are finite
    finite: torch.Tensor  # (R,) bool: the maxima and the gradient are finite
    grads: torch.Tensor  # (R, ...) gradient of the objective with respect to the row's latent
    bind_losses: torch.Tensor  # (R,) SynGen's loss per row; 0 for rows without binding groups (or no binding)
    objective: torch.Tensor  # (R,) the loss differentiated: L_excite, L_bind, or L_excite + ratio * L_bind
    maps: list[torch.Tensor] | None = None  # with keep_maps: per row, (S, h, w) smoothed maps, float32, CPU
    bind_maps: list[torch.Tensor | None] | None = None  # with keep_maps: per row, (K, h, w) binding maps, CPU
    carry: torch.Tensor | None = None  # (R, W, D): what the objective carries to the next step (`Objective.carries`)
    aux: torch.Tensor | None = None  # (R, A): the objective's further terms (`Objective.aux_names`)

    @property
    def moves(self) -> torch.Tensor:
        """(R,) bool: rows whose update applies (finite, and the objective != 0: A&E's reference and SynGen's both
        skip the update at a zero loss)."""
        return self.finite & (self.objective != 0)

    def clone(self) -> Evaluation:
        return Evaluation(
            self.losses.clone(), self.maxima.clone(), self.values_finite.clone(), self.finite.clone(),
            self.grads.clone(), self.bind_losses.clone(), self.objective.clone(),
            carry=None if self.carry is None else self.carry.clone(),
            aux=None if self.aux is None else self.aux.clone(),
        )

    def select(self, positions: list[int], index: torch.Tensor) -> Evaluation:
        """The rows at `positions` (indices into this evaluation's rows; `index`: the same on the device)."""
        pick = lambda t: t.index_select(0, index)  # noqa: E731
        maps = None if self.maps is None else [self.maps[j] for j in positions]
        bind_maps = None if self.bind_maps is None else [self.bind_maps[j] for j in positions]
        return Evaluation(pick(self.losses), pick(self.maxima), pick(self.values_finite), pick(self.finite),
                          pick(self.grads), pick(self.bind_losses), pick(self.objective), maps, bind_maps,
                          None if self.carry is None else pick(self.carry),
                          None if self.aux is None else pick(self.aux))


@dataclass(frozen=True, eq=False)
class LossGroup:
    index: SelectionIndex | None  # None: no subjects in this group (binding only)
    selection: TokenSelection | None
    positions: torch.Tensor | None  # rows of the evaluation in this group; None: all of them, in order
    binding: BindingSelection | None = None
    binding_index: BindingIndex | None = None  # built outside any CUDA-graph capture, with the plan
    objective_index: Any = None  # what the objective prepared for this group's targets (`Objective.index_for`)
    carry_width: int = 0  # rows of the objective's carry for this group's targets


@dataclass(frozen=True, eq=False)
class LossPlan:
    """How the rows of one evaluation split into groups that share a token selection (computed together), all index
    tensors prepared on the device in advance."""

    key: tuple[Target, ...]
    groups: tuple[LossGroup, ...]
    order: torch.Tensor | None  # positions that restore row order after concatenating the groups; None: identity
    order_list: tuple[int, ...]
    width: int  # most subjects of any row
    carry_width: int = 0  # widest carry of any group


RowIndex = Callable[[list[int], torch.device], torch.Tensor]
"""index(positions, device): `positions` as a cached LongTensor on `device` (`Evaluator.index`)."""


def rows_of(evaluation: Evaluation, rows: list[int], wanted: list[int], index: RowIndex) -> Evaluation:
    """The part of `evaluation` (of batch rows `rows`) for batch rows `wanted` (a subsequence of `rows`)."""
    if wanted == rows:
        return evaluation
    positions = [rows.index(b) for b in wanted]
    return evaluation.select(positions, index(positions, evaluation.losses.device))


def exact_rows(
    sources: list[tuple[list[int], Evaluation]], index: RowIndex
) -> list[tuple[list[int], Evaluation]]:
    """Later sources override earlier ones row by row: keep each earlier source only for the rows no later one has."""
    result: list[tuple[list[int], Evaluation]] = []
    taken: set[int] = set()
    for rows, evaluation in reversed(sources):
        kept = [b for b in rows if b not in taken]
        if kept:
            result.append((kept, rows_of(evaluation, rows, kept, index)))
            taken.update(kept)
    return list(reversed(result))


class HostRead:
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


class CarryStore:
    """What an objective that `carries` hands from one step to the next: per batch row, the carry of the evaluation
    behind the row's last update of step i (the official CONFORM's `attention_maps_t_plus_one`), read at step i + 1
    only. Everything stays on the device."""

    def __init__(self) -> None:
        self._kept: tuple[int, torch.Tensor, torch.Tensor] | None = None  # (step, (B, W, D), (B,) has one)

    def for_step(
        self, step: int, batch: int, width: int, depth: int, like: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(carry (B, width, depth), has one (B,)) for `step`: the previous step's, or none (zeros, all False)."""
        kept = self._kept
        if kept is not None and kept[0] == step - 1 and kept[1].shape == (batch, width, depth):
            return kept[1], kept[2]
        carry = like.new_zeros(batch, width, depth)
        return carry, torch.zeros(batch, dtype=torch.bool, device=like.device)

    def keep_all(self, step: int, carry: torch.Tensor, has: torch.Tensor) -> None:
        """Keep every row's carry as it stands after `step` (an objective that `chains_carry`)."""
        self._kept = (step, carry, has)

    def keep(self, step: int, batch: int, width: int, depth: int, sources: list[tuple[list[int], Evaluation]],
             index: RowIndex) -> None:
        """Keep the carry of each row's final evaluation of `step` (rows without one have none)."""
        carry: torch.Tensor | None = None
        has = None
        for rows, evaluation in sources:
            if evaluation.carry is None:
                continue
            if carry is None:
                carry = evaluation.carry.new_zeros(batch, width, depth)
                has = torch.zeros(batch, dtype=torch.bool, device=carry.device)
            rows_index = index(rows, carry.device)
            values = evaluation.carry[..., :width, :]
            values = torch.nn.functional.pad(values, (0, 0, 0, width - values.shape[-2]))
            carry = carry.index_copy(0, rows_index, values.to(carry.dtype))
            has = has.index_fill(0, rows_index, True)  # type: ignore[union-attr]
        self._kept = None if carry is None else (step, carry, has)  # type: ignore[assignment]
