"""What one A&E step did, per image, and its deferred reads from the device.

A step's loss, maxima and skipped images stay on the device until first read (`StepReport`); `read_reports` fetches
many reports' values in one host transfer, once sampling is over, so the sampler never waits for the GPU to report.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .evaluation import Evaluation

logger = logging.getLogger(__name__)

__all__ = ["StepReport", "read_reports"]


class StepReport:
    """What one step did, per image of the batch (None / 0 for images without subjects).

    Attributes: `step`, `active`, `loss` (at the latent the step started from), `maxima` (max attention per subject
    at the latent the final update was computed from), `refinement_iterations`, `skipped_nonfinite`, `interrupted`,
    `maps` (with `step(keep_maps=True)`: per image, the (S, h, w) smoothed subject maps behind `maxima`, float32, CPU),
    `bind_loss` (with binding: SynGen's loss per image at the step's starting latent; None without binding groups),
    `bind_maps` (with keep_maps and binding: per image, the (K, h, w) spatial distributions of each binding group's
    noun then its modifiers, first word piece each, group after group, float32, CPU).

    Which accesses wait for the GPU: the first access to `loss`, `maxima`, `skipped_nonfinite` or `bind_loss` reads
    them all from the device at once (one host transfer; later accesses are free).
    `step`, `active`, `refinement_iterations`,
    `interrupted` and `maps` are host values and never wait. `read_reports(reports)` reads many reports in a single
    transfer: call it once after sampling, not during it.
    """

    def __init__(
        self,
        step: int,
        active: bool,
        loss: list[float | None] | None = None,
        maxima: list[list[float] | None] | None = None,
        refinement_iterations: list[int] | None = None,
        skipped_nonfinite: list[int] | None = None,
        interrupted: bool = False,
        maps: list[torch.Tensor | None] | None = None,
        bind_loss: list[float | None] | None = None,
        bind_maps: list[torch.Tensor | None] | None = None,
    ) -> None:
        self.step = step
        self.active = active
        self.refinement_iterations = refinement_iterations if refinement_iterations is not None else []
        self.interrupted = interrupted
        self.maps = maps if maps is not None else []
        self._loss = loss if loss is not None else []
        self._maxima = maxima if maxima is not None else []
        self._skipped = skipped_nonfinite if skipped_nonfinite is not None else []
        self._bind_loss = bind_loss if bind_loss is not None else []
        self.bind_maps = bind_maps if bind_maps is not None else []
        self._pending: _DeviceValues | None = None

    @property
    def loss(self) -> list[float | None]:
        self._read()
        return self._loss

    @property
    def maxima(self) -> list[list[float] | None]:
        self._read()
        return self._maxima

    @property
    def skipped_nonfinite(self) -> list[int]:
        self._read()
        return self._skipped

    @property
    def bind_loss(self) -> list[float | None]:
        self._read()
        return self._bind_loss

    @property
    def pending(self) -> bool:
        """Whether values still wait on the device (reading `loss`, `maxima` or `skipped_nonfinite` fetches them)."""
        return self._pending is not None

    def _read(self) -> None:
        if self._pending is not None:
            read_reports([self])

    def _fields(self) -> tuple[Any, ...]:
        """Every field, in `__init__`'s order (tests/test_engine_graphs.py holds `__eq__` to each of them)."""
        return (self.step, self.active, self.loss, self.maxima, self.refinement_iterations, self.skipped_nonfinite,
                self.interrupted, self.maps, self.bind_loss, self.bind_maps)

    def __eq__(self, other: object) -> bool:
        """Equal when every field is: floats exactly (NaN equal to NaN, as a report of a skipped image reads), maps
        tensor for tensor (`torch.equal`)."""
        if not isinstance(other, StepReport):
            return NotImplemented
        return all(_same(a, b) for a, b in zip(self._fields(), other._fields()))

    def __repr__(self) -> str:
        return (
            f"StepReport(step={self.step}, active={self.active}, loss={self.loss}, maxima={self.maxima}, "
            f"refinement_iterations={self.refinement_iterations}, skipped_nonfinite={self.skipped_nonfinite}, "
            f"interrupted={self.interrupted})"
        )


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        return (type(a) is type(b) and len(a) == len(b)  # type: ignore[arg-type]
                and all(_same(x, y) for x, y in zip(a, b)))  # type: ignore[call-overload]
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return bool(a == b)


def read_reports(reports: Sequence[StepReport]) -> None:
    """Fetch the device values of all `reports` in one host transfer (one wait for the GPU instead of one per
    report)."""
    pending = [r for r in reports if r._pending is not None]
    if not pending:
        return
    packs = [r._pending.pack() for r in pending]  # type: ignore[union-attr]
    flat = torch.cat([p.to(device=packs[0].device, dtype=torch.float64) for p in packs]).tolist()
    offset = 0
    for report, pack in zip(pending, packs):
        values = flat[offset : offset + pack.numel()]
        offset += pack.numel()
        device_values, report._pending = report._pending, None
        assert device_values is not None
        device_values.unpack(values, report)


@dataclass
class _DeviceValues:
    """A step's report values still on the device, and where they go."""

    batch: int
    rows: list[int]
    first: Evaluation  # the evaluation at the step's starting latent: the reported loss
    maxima_from: list[tuple[list[int], Evaluation]]  # (batch rows, evaluation of exactly those rows)
    skipped_from: list[tuple[list[int], Evaluation]]  # rows skipped when that evaluation is not finite
    skipped_known: set[int]  # rows already known (on the host) to be skipped
    binding_rows: frozenset[int] = frozenset()  # rows with binding groups: their bind loss is reported

    def pack(self) -> torch.Tensor:
        parts = [self.first.losses, self.first.finite, self.first.bind_losses]
        for _, evaluation in self.maxima_from:
            parts += [evaluation.maxima.flatten(), evaluation.values_finite]
        parts += [evaluation.finite for _, evaluation in self.skipped_from]
        return torch.cat([p.detach().to(torch.float64).flatten() for p in parts])

    def unpack(self, values: list[float], report: StepReport) -> None:
        count = len(self.rows)
        losses, finite, bind_losses = values[:count], values[count : 2 * count], values[2 * count : 3 * count]
        offset = 3 * count
        loss: list[float | None] = [None] * self.batch
        bind_loss: list[float | None] = [None] * self.batch
        for b, value, ok, bound in zip(self.rows, losses, finite, bind_losses):
            loss[b] = value if ok else math.nan
            if b in self.binding_rows:
                bind_loss[b] = bound
        maxima: list[list[float] | None] = [None] * self.batch
        for rows, evaluation in self.maxima_from:
            width = evaluation.maxima.shape[-1]
            table = values[offset : offset + len(rows) * width]
            offset += len(rows) * width
            values_finite = values[offset : offset + len(rows)]
            offset += len(rows)
            for j, b in enumerate(rows):
                row = table[j * width : (j + 1) * width]
                maxima[b] = [v for v in row if not math.isnan(v)] if values_finite[j] else None
        skipped = set(self.skipped_known)
        for rows, _ in self.skipped_from:
            flags = values[offset : offset + len(rows)]
            offset += len(rows)
            skipped.update(b for b, ok in zip(rows, flags) if not ok)
        report._loss, report._maxima, report._skipped = loss, maxima, sorted(skipped)
        report._bind_loss = bind_loss
        if skipped:
            logger.warning(
                "step %d: non-finite attention loss or gradient for image(s) %s; their update was skipped",
                report.step,
                report._skipped,
            )
