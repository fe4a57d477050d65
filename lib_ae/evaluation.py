"""What one evaluation of the A&E objective yields, and how an evaluation's rows are grouped for the loss.

`Evaluation` holds, for some batch rows at one latent, the loss terms and the gradient, all on the device; the engine
(`lib_ae.engine`) computes it, eagerly or through a replayed graph (`lib_ae.graphs`), which both import it from here.
`LossPlan` says how those rows split into groups sharing a token selection, with every index prepared in advance.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .binding import BindingIndex, BindingSelection
from .loss import SelectionIndex, TokenSelection

__all__ = ["Evaluation", "LossGroup", "LossPlan"]


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

    @property
    def moves(self) -> torch.Tensor:
        """(R,) bool: rows whose update applies (finite, and the objective != 0: A&E's reference and SynGen's both
        skip the update at a zero loss)."""
        return self.finite & (self.objective != 0)

    def clone(self) -> Evaluation:
        return Evaluation(
            self.losses.clone(), self.maxima.clone(), self.values_finite.clone(), self.finite.clone(),
            self.grads.clone(), self.bind_losses.clone(), self.objective.clone(),
        )

    def select(self, positions: list[int], index: torch.Tensor) -> Evaluation:
        """The rows at `positions` (indices into this evaluation's rows; `index`: the same on the device)."""
        pick = lambda t: t.index_select(0, index)  # noqa: E731
        maps = None if self.maps is None else [self.maps[j] for j in positions]
        bind_maps = None if self.bind_maps is None else [self.bind_maps[j] for j in positions]
        return Evaluation(pick(self.losses), pick(self.maxima), pick(self.values_finite), pick(self.finite),
                          pick(self.grads), pick(self.bind_losses), pick(self.objective), maps, bind_maps)


@dataclass(frozen=True, eq=False)
class LossGroup:
    index: SelectionIndex | None  # None: no subjects in this group (binding only)
    selection: TokenSelection | None
    positions: torch.Tensor | None  # rows of the evaluation in this group; None: all of them, in order
    binding: BindingSelection | None = None
    binding_index: BindingIndex | None = None  # built outside any CUDA-graph capture, with the plan


@dataclass(frozen=True, eq=False)
class LossPlan:
    """How the rows of one evaluation split into groups that share a token selection (computed together), all index
    tensors prepared on the device in advance."""

    key: tuple[tuple[TokenSelection | None, BindingSelection | None], ...]
    groups: tuple[LossGroup, ...]
    order: torch.Tensor | None  # positions that restore row order after concatenating the groups; None: identity
    order_list: tuple[int, ...]
    width: int  # most subjects of any row
