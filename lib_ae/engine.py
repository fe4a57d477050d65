"""One Attend-and-Excite step on a batch of latents, as the reference pipeline does it per image (algorithm.md §1.4).

The engine updates whatever latent the caller's UNet runner differentiates against:
    latent <- latent - a_i * gradient_scale_b * grad_latent L
With the VP latent z (diffusers, DDIM, PLMS) gradient_scale is 1. With k-diffusion's sigma-space x, whose UNet input
is x / sqrt(1 + sigma^2), it is 1 + sigma^2 (`lib_ae.sampling.sigma_space_gradient_scale`), which makes the update the
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
from typing import Any, Callable, Hashable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .capture import AttentionCapture
from .config import ExciteConfig, StepPlan
from .loss import TokenSelection, excite_loss, official_gaussian_kernel, smoothed_subject_maps

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
    maps: list[torch.Tensor | None] = field(default_factory=list)
    """With `step(keep_maps=True)`: per image, the (S, h, w) smoothed subject maps behind `maxima` (float32, CPU)."""


@dataclass
class _Evaluation:
    losses: list[float]
    maxima: list[list[float] | None]
    grads: torch.Tensor | None
    finite: list[bool]
    maps: list[torch.Tensor | None] | None = None


class AttendAndExcite:
    """The A&E latent update, bound to a UNet through its `AttentionCapture`."""

    def __init__(self, capture: AttentionCapture, config: ExciteConfig | None = None, *, cuda_graphs: bool = False) -> None:
        """`cuda_graphs`: evaluate through `GraphableRunner`s as replayed CUDA graphs (see `GraphableRunner`); other
        runners, and CPU tensors, are evaluated eagerly as always. Graphs live until `release_graphs()`."""
        self.capture = capture
        self.config = config or ExciteConfig()
        self.capture.early_stop = self.config.early_stop
        self._graphs: _GraphEvaluations | None = _GraphEvaluations(self) if cuda_graphs else None

    def release_graphs(self) -> None:
        """Free the captured CUDA graphs and their memory pool (they are captured again when next needed)."""
        if self._graphs is not None:
            self._graphs.release()

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
        keep_maps: bool = False,
    ) -> tuple[torch.Tensor, StepReport]:
        """Return the updated latent (a new tensor; `latent` is not modified) and a report.

        `keep_maps`: also report the subject maps behind the reported maxima (for heatmaps). Those evaluations run
        eagerly, never from a CUDA graph, so asking at a step or two of a run costs a few milliseconds.

        `gradient_scale[b]` multiplies image b's gradient step (see the module docstring); default 1.
        `should_stop()` is polled between refinement iterations (interrupt / skip); when it answers True the step
        returns at once with what it has done so far and `report.interrupted` set.
        """
        batch = latent.shape[0]
        if len(selections) != batch:
            raise ValueError(f"{len(selections)} token selections for a batch of {batch}")
        report = StepReport(step, plan.is_active(step), [None] * batch, [None] * batch, [0] * batch, maps=[None] * batch)
        rows = [b for b in range(batch) if selections[b] is not None and selections[b].subjects]
        if not report.active or not rows:
            report.active = False
            return latent, report
        stop = should_stop or (lambda: False)
        size = self.config.attention_size(latent.shape[-2], latent.shape[-1])
        self.config.check_map_size(*size)  # a precise ConfigError before any work, instead of F.pad's
        z = latent.detach().clone()
        step_size = plan.step_sizes[step]
        scales = [1.0] * batch if gradient_scale is None else [float(v) for v in gradient_scale]

        def evaluate(subset: list[int], with_maps: bool = False) -> _Evaluation:
            return self._evaluate(z, subset, selections, size, run_unet, keep_maps=with_maps)

        current = evaluate(rows, keep_maps)
        loss = dict(zip(rows, current.losses))
        maps = dict(zip(rows, current.maps or [None] * len(rows)))
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
                final = evaluate(refined, keep_maps)
                for j, b in enumerate(refined):
                    loss[b] = final.losses[j]
                    maxima[b] = final.maxima[j]
                    maps[b] = final.maps[j] if final.maps else None
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
            report.maps[b] = maps[b]
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
        keep_maps: bool = False,
    ) -> _Evaluation:
        if self._graphs is not None and isinstance(run_unet, GraphableRunner) and not keep_maps:
            return self._graphs.evaluate(z, rows, selections, size, run_unet)
        cfg = self.config
        index = torch.as_tensor(rows, device=z.device)
        self._probe_last_layer(size, lambda: run_unet(z.index_select(0, index), index))
        with torch.enable_grad(), frozen_parameters(self.capture.unet):
            leaf = z.index_select(0, index).detach().requires_grad_(True)
            with self.capture.record(*size) as recording:
                run_unet(leaf, index)
            maps = recording.maps()
            losses: list[torch.Tensor] = []
            maxima: list[list[float] | None] = []
            finite: list[bool] = []
            kept: list[torch.Tensor | None] = []
            for j, b in enumerate(rows):
                selection = selections[b]
                assert selection is not None
                subject_maps = smoothed_subject_maps(
                    maps[j],
                    selection,
                    smooth_attentions=cfg.smooth_attentions,
                    kernel_size=cfg.kernel_size,
                    sigma=cfg.sigma,
                    temperature=cfg.softmax_temperature,
                )
                # amax over pixels back-propagates like the reference's per-map `image.max()`.
                values = subject_maps.amax(dim=(-2, -1))
                if keep_maps:
                    kept.append(subject_maps.detach().float().cpu())
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
        return _Evaluation(
            loss_values, maxima, grads.detach() if grads is not None else None, finite, kept if keep_maps else None
        )


    def _probe_last_layer(self, size: tuple[int, int], forward: Callable[[], object]) -> None:
        """Before the first gradient forward at this map size: one no-grad forward to learn where it may stop."""
        if self.capture.early_stop and not self.capture.knows_last_layer(*size):
            with torch.no_grad(), self.capture.probe(*size):
                forward()


def _row(evaluation: _Evaluation, rows: list[int], b: int) -> torch.Tensor | None:
    """Gradient of batch image b, or None when its loss was exactly 0 (the reference skips the update then)."""
    j = rows.index(b)
    if evaluation.grads is None or not evaluation.finite[j] or evaluation.losses[j] == 0:
        return None
    return evaluation.grads[j]


@dataclass(frozen=True, eq=False)
class GraphableRunner:
    """A UNet runner whose evaluations can be captured once and replayed as a CUDA graph.

    Eager use (a plain `UNetRunner`): `runner(latent_rows, rows)` calls `fn(latent_rows, *(t[rows] for t in inputs))`.
    The contract that makes capture valid: every tensor `fn` reads that changes between calls (the step's sigma or
    timestep, the conditioning) is one of `inputs` (batch-first, indexed by row), and everything else it reads (the
    UNet's weights, schedules) stays the same tensor at the same address for as long as the graphs live. Nothing in
    `fn` may synchronize with the host or copy from host memory (ldm's `timestep_embedding` builds its frequencies on
    the CPU: a host must swap in a device-side version to use graphs). `key` names the function: runners with equal
    keys, input shapes and dtypes share a graph.

    Why: at batch 1 the UNet's gradient forward and backward are thousands of small kernels whose launch cost on the
    CPU exceeds their GPU time; a replayed graph launches them all at once (README, "Performance").
    """

    fn: Callable[..., object]
    inputs: tuple[torch.Tensor, ...]
    key: Hashable = None

    def __call__(self, latent_rows: torch.Tensor, rows: torch.Tensor) -> object:
        return self.fn(latent_rows, *(t.index_select(0, rows) for t in self.inputs))


class _DeviceLoss:
    """`subject_maxima` + `excite_loss` for one selection, op for op (so bit for bit), with no host synchronization and
    no host-to-device copy: index tensors and the smoothing kernel are prepared outside the captured region, and the
    loss of a non-finite or fully excited image is selected on the device instead of in Python."""

    def __init__(self, selection: TokenSelection, config: ExciteConfig, device: torch.device) -> None:
        self.config = config
        self.device = device
        self.columns = torch.as_tensor(selection.text_columns, device=device)
        position = {column: i for i, column in enumerate(selection.text_columns)}
        relative = [[position[c] for c in subject] for subject in selection.subjects]
        self.subjects: list[int | torch.Tensor] = [
            rel[0] if len(rel) == 1 else torch.as_tensor(rel, device=device) for rel in relative
        ]
        self._kernels: dict[torch.dtype, torch.Tensor] = {}

    def kernel(self, dtype: torch.dtype) -> torch.Tensor:
        if dtype not in self._kernels:  # filled by the eager warm-up, before any capture
            kernel = official_gaussian_kernel(self.config.kernel_size, self.config.sigma)
            self._kernels[dtype] = kernel.to(device=self.device, dtype=dtype)
        return self._kernels[dtype]

    def maxima(self, attention: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        text = torch.softmax(attention.index_select(-1, self.columns) * cfg.softmax_temperature, dim=-1)
        maps = torch.stack(
            [text[..., rel] if isinstance(rel, int) else text.index_select(-1, rel).sum(-1) for rel in self.subjects]
        )
        if cfg.smooth_attentions:
            pad = cfg.kernel_size // 2
            flat = maps.reshape(-1, 1, *maps.shape[-2:])
            padded = F.pad(flat, (pad, pad, pad, pad), mode="reflect")
            maps = F.conv2d(padded, self.kernel(maps.dtype)[None, None]).reshape(maps.shape)
        return maps.amax(dim=(-2, -1))

    @staticmethod
    def loss(values: torch.Tensor) -> torch.Tensor:
        deficits = 1.0 - values
        worst = deficits.gather(0, torch.argmax(deficits).reshape(1))[0]
        return torch.where(worst > 0, worst, torch.zeros_like(worst))


@dataclass
class _Graph:
    graph: Any
    latent: torch.Tensor  # static leaf (requires grad), rows of z
    inputs: tuple[torch.Tensor, ...]
    stats: torch.Tensor  # (B, 3 + S): loss, values finite, gradient finite, maxima per subject (NaN-padded)
    grads: torch.Tensor


class _GraphEvaluations:
    """`AttendAndExcite._evaluate` for `GraphableRunner`s: on CUDA one captured graph per (rows, map size, shapes,
    selections, runner key), replayed with the new latent and inputs copied into its static buffers; on the CPU the
    same computation eagerly (which is how the CPU tests check it against the eager path, bit for bit)."""

    WARMUP = 2  # eager runs on the capture stream before capturing (lazy library initialisation, autotuning)

    def __init__(self, engine: AttendAndExcite) -> None:
        self.engine = engine
        self.graphs: dict[Hashable, _Graph] = {}
        self.failed: set[Hashable] = set()
        self.losses: dict[tuple[TokenSelection, torch.device], _DeviceLoss] = {}
        self.pool: Any = None
        self.weights: tuple[int, ...] | None = None

    def release(self) -> None:
        self.graphs.clear()
        self.pool = None
        self.weights = None

    def evaluate(
        self,
        z: torch.Tensor,
        rows: list[int],
        selections: Sequence[TokenSelection | None],
        size: tuple[int, int],
        runner: GraphableRunner,
    ) -> _Evaluation:
        index = torch.as_tensor(rows, device=z.device)
        latent = z.index_select(0, index)
        inputs = tuple(t.index_select(0, index) for t in runner.inputs)
        chosen = [selections[b] for b in rows]
        assert all(s is not None for s in chosen)
        losses = [self._loss(s, z.device) for s in chosen]  # type: ignore[arg-type]
        if not z.is_cuda or torch.cuda.is_current_stream_capturing():
            leaf = latent.detach().requires_grad_(True)
            stats, grads = self._compute(leaf, inputs, runner, losses, size)
            return self._unpack(stats, grads.detach(), len(rows))
        key = (
            tuple(rows), size, runner.key, tuple(chosen), _signature(latent), tuple(_signature(t) for t in inputs),
            torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"),
        )
        weights = tuple(p.data_ptr() for p in self.engine.capture.unet.parameters())
        if weights != self.weights:  # new or moved weights: graphs would read the old addresses
            self.release()
            self.weights = weights
        entry = self.graphs.get(key)
        if entry is None and key not in self.failed:
            try:
                entry = self._capture(latent, inputs, runner, losses, size)
                self.graphs[key] = entry
            except Exception as error:  # noqa: BLE001 - any capture failure falls back to the eager computation
                self.failed.add(key)
                logger.warning("CUDA graph capture of the A&E evaluation failed (%s); evaluating eagerly", error)
        if entry is None:
            leaf = latent.detach().requires_grad_(True)
            stats, grads = self._compute(leaf, inputs, runner, losses, size)
            return self._unpack(stats, grads.detach(), len(rows))
        with torch.no_grad():
            entry.latent.copy_(latent)
            for static, value in zip(entry.inputs, inputs):
                static.copy_(value)
        entry.graph.replay()
        # Copies: another graph sharing the pool, or the next replay, must not change what the caller holds.
        return self._unpack(entry.stats.clone(), entry.grads.clone(), len(rows))

    def _loss(self, selection: TokenSelection, device: torch.device) -> _DeviceLoss:
        key = (selection, device)
        if key not in self.losses:
            self.losses[key] = _DeviceLoss(selection, self.engine.config, device)
        return self.losses[key]

    def _capture(
        self,
        latent: torch.Tensor,
        inputs: tuple[torch.Tensor, ...],
        runner: GraphableRunner,
        losses: list[_DeviceLoss],
        size: tuple[int, int],
    ) -> _Graph:
        stream = torch.cuda.Stream(device=latent.device)
        stream.wait_stream(torch.cuda.current_stream(latent.device))
        with torch.cuda.stream(stream):
            static_latent = latent.detach().clone().requires_grad_(True)
            static_inputs = tuple(t.detach().clone() for t in inputs)
            for _ in range(self.WARMUP):
                self._compute(static_latent, static_inputs, runner, losses, size)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool, stream=stream):
                stats, grads = self._compute(static_latent, static_inputs, runner, losses, size)
        torch.cuda.current_stream(latent.device).wait_stream(stream)
        self.pool = graph.pool()  # every graph of this engine shares one pool: they are replayed one at a time
        logger.info("captured the A&E evaluation of %d image(s) as a CUDA graph", latent.shape[0])
        return _Graph(graph, static_latent, static_inputs, stats, grads)

    def _compute(
        self,
        leaf: torch.Tensor,
        inputs: tuple[torch.Tensor, ...],
        runner: GraphableRunner,
        losses: list[_DeviceLoss],
        size: tuple[int, int],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole evaluation on the device: (stats, gradient), no host synchronization."""
        self.engine._probe_last_layer(size, lambda: runner.fn(leaf.detach(), *inputs))  # eager warm-up only
        with torch.enable_grad(), frozen_parameters(self.engine.capture.unet):
            with self.engine.capture.record(*size) as recording:
                runner.fn(leaf, *inputs)
            maps = recording.maps()
            values = [device_loss.maxima(maps[j]) for j, device_loss in enumerate(losses)]
            finite = [torch.isfinite(v).all() for v in values]
            # A non-finite image contributes a zero loss (the eager path's constant zero), which is all it can change.
            row_losses = [torch.where(ok, _DeviceLoss.loss(v), torch.zeros_like(v[0])) for v, ok in zip(values, finite)]
            total = torch.stack(row_losses).sum()
            grads = torch.autograd.grad(total, [leaf])[0]
        width = max(v.shape[0] for v in values)
        stats = torch.full((len(values), 3 + width), math.nan, dtype=values[0].dtype, device=leaf.device)
        stats[:, 0] = torch.stack(row_losses).detach()
        stats[:, 1] = torch.stack(finite).to(stats.dtype)
        stats[:, 2] = torch.isfinite(grads.flatten(1)).all(dim=1).to(stats.dtype)
        for j, v in enumerate(values):
            stats[j, 3 : 3 + v.shape[0]] = v.detach()
        return stats, grads

    @staticmethod
    def _unpack(stats: torch.Tensor, grads: torch.Tensor, count: int) -> _Evaluation:
        table = stats.tolist()  # the evaluation's single host synchronization
        losses: list[float] = []
        maxima: list[list[float] | None] = []
        finite: list[bool] = []
        for loss, values_finite, grads_finite, *values in table:
            ok = bool(values_finite) and bool(grads_finite)
            finite.append(ok)
            losses.append(loss if ok else math.nan)
            maxima.append([v for v in values if not math.isnan(v)] if values_finite else None)
        assert len(finite) == count
        return _Evaluation(losses, maxima, grads, finite)


def _signature(t: torch.Tensor) -> tuple[Any, ...]:
    return (tuple(t.shape), t.dtype, t.device, tuple(t.stride()))


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
