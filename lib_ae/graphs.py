"""CUDA-graph replay of the A&E evaluation, and the check that tells when a graph would be wrong.

At batch 1 the UNet's gradient forward and backward are thousands of small kernels whose launch cost on the CPU
exceeds their GPU time; a replayed graph launches them all at once (README, "Performance"). A graph freezes what
Python decided while it was captured, so it is only valid when nothing in the forward decides anew at every call:
`find_graph_hazards` lists what could (foreign hooks, patched `forward`s), and the engine then evaluates eagerly.
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import logging
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

if TYPE_CHECKING:
    from .evaluation import Evaluation, LossPlan
    from .evaluator import Evaluator

GraphGuard = Callable[[], "Sequence[str] | None"]
"""Called once per sampling pass, before the first graph evaluation: reasons why a graph would be wrong (empty or
None: safe). See `find_graph_hazards`."""


@dataclass(frozen=True)
class GraphConditions:
    """What a host tells the graph path beyond a `GraphGuard`, for a forward that decides something per call but
    whose decisions the host can name (e.g. a ControlNet whose units switch on and off with the step).

    `state()` is asked before every graph evaluation and becomes part of the graph's key: each distinct value is
    captured once and replayed only while the host's per-call decisions are those it names, so a change (a unit's
    guidance window ending inside A&E's steps) is a new capture, never a stale replay. `capture_scope()` is entered
    around the warm-up and the capture: the host may swap a call that cannot be captured (a sync, a copy from host
    memory) for a capturable equivalent there, valid only with the same `state()`."""

    guard: GraphGuard
    state: Callable[[], Hashable] = lambda: None
    capture_scope: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext

logger = logging.getLogger(__name__)


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
    """

    fn: Callable[..., object]
    inputs: tuple[torch.Tensor, ...]
    key: Hashable = None

    def __call__(self, latent_rows: torch.Tensor, rows: torch.Tensor) -> object:
        return self.fn(latent_rows, *(t.index_select(0, rows) for t in self.inputs))


# --------------------------------------------------------------------------------------------- hazard detection


def find_graph_hazards(
    unet: nn.Module,
    *,
    is_own: Callable[[Callable[..., Any]], bool],
    allowed_forward: Callable[[type, Callable[..., Any]], bool],
) -> list[str]:
    """What in `unet` a captured graph could not hold, as human-readable reasons (empty: a graph is safe).

    - forward hooks, forward pre-hooks and backward hooks on the UNet or any submodule, and the global ones of
      `torch.nn.modules.module`, unless `is_own(hook)`: a hook may decide per call (a ControlNet's guidance window,
      a step counter) and the graph would replay its first decision forever;
    - a `forward` set on a module instance (unless `is_own(fn)` or `allowed_forward(type(module), fn)`): same reason,
      and the graph would not see a later swap;
    - a class-level `forward` that is not the class's own definition (a monkey patch), unless
      `allowed_forward(cls, fn)` vouches for it (e.g. the host's own attention optimisations, stateless per call).
    """
    reasons: list[str] = []
    from torch.nn.modules import module as module_globals

    for kind, hooks in (
        ("global forward hook", module_globals._global_forward_hooks),
        ("global forward pre-hook", module_globals._global_forward_pre_hooks),
        ("global backward hook", module_globals._global_backward_hooks),
        ("global backward pre-hook", getattr(module_globals, "_global_backward_pre_hooks", {})),
    ):
        for hook in hooks.values():
            if not is_own(hook):
                reasons.append(f"{kind} {_describe(hook)} on every module")
    checked_classes: dict[type, str | None] = {}
    for name, module in unet.named_modules():
        where = name or "the UNet"
        for kind, hooks in (
            ("forward hook", module._forward_hooks),
            ("forward pre-hook", module._forward_pre_hooks),
            ("backward hook", module._backward_hooks),
            ("backward pre-hook", getattr(module, "_backward_pre_hooks", {})),
        ):
            for hook in hooks.values():
                if not is_own(hook):
                    reasons.append(f"{kind} {_describe(hook)} on {where}")
        override = module.__dict__.get("forward")
        if override is not None and not is_own(override) and not allowed_forward(type(module), override):
            reasons.append(f"instance-level forward {_describe(override)} on {where}")
        cls = type(module)
        if cls not in checked_classes:
            checked_classes[cls] = _class_forward_hazard(cls, allowed_forward)
            if checked_classes[cls] is not None:
                reasons.append(f"{checked_classes[cls]} (first seen on {where})")
    return reasons


def owned_by(*owners: object) -> Callable[[Callable[..., Any]], bool]:
    """An `is_own` for `find_graph_hazards`: hooks and forwards that are bound methods of one of `owners` (e.g. the
    engine's `AttentionCapture`, whose hooks only record while the engine evaluates)."""
    ids = {id(owner) for owner in owners}
    return lambda fn: id(getattr(fn, "__self__", None)) in ids


def _class_forward_hazard(cls: type, allowed_forward: Callable[[type, Callable[..., Any]], bool]) -> str | None:
    forward = getattr(cls, "forward", None)
    if forward is None:
        return None
    owner = next((c for c in cls.__mro__ if "forward" in c.__dict__), None)
    if owner is None or owner is nn.Module or _is_own_definition(owner, forward):
        return None
    if allowed_forward(cls, forward):
        return None
    return f"class-level forward {_describe(forward)} patched onto {cls.__module__}.{cls.__qualname__}"


def _is_own_definition(owner: type, fn: Any) -> bool:
    """Whether `fn` is the `forward` written in `owner`'s class body (not assigned later, not a wrapper of it)."""
    if getattr(fn, "__wrapped__", None) is not None or not inspect.isfunction(fn):
        return False
    if fn.__qualname__ != f"{owner.__qualname__}.forward" or fn.__module__ != owner.__module__:
        return False
    try:
        return inspect.getsourcefile(fn) == inspect.getsourcefile(owner)
    except (TypeError, OSError):
        return True  # no source to compare (frozen or generated module): the names already match


def _describe(fn: Any) -> str:
    target = getattr(fn, "__func__", fn)
    name = getattr(target, "__qualname__", None) or type(target).__qualname__
    module = getattr(target, "__module__", None)
    return f"{module}.{name}" if module else str(name)


# --------------------------------------------------------------------------------------------- graph evaluation


@dataclass
class _Graph:
    graph: Any
    latent: torch.Tensor  # static leaf (requires grad), rows of z
    inputs: tuple[torch.Tensor, ...]
    outputs: Evaluation  # static outputs, overwritten by each replay


Compute = Callable[[torch.Tensor, tuple[torch.Tensor, ...]], "Evaluation"]
"""The evaluation to capture, as a function of the static latent and inputs it reads."""


class GraphBackend(Protocol):
    """Where graphs are captured and replayed. `CudaGraphBackend` on CUDA; the CPU tests use a stand-in whose replay
    re-runs the captured computation into the same static outputs (tests/test_engine_graphs.py)."""

    def usable(self, latent: torch.Tensor) -> bool:
        """Whether an evaluation of `latent` can be captured here (else it is evaluated eagerly)."""
        ...

    def capture(
        self, latent: torch.Tensor, inputs: tuple[torch.Tensor, ...], compute: Compute, pool: Any
    ) -> tuple[_Graph, Any]:
        """Capture `compute` over static copies of `latent` and `inputs`: the graph (`replay()`, `reset()`) with its
        static buffers and the outputs each replay overwrites, and the memory pool the next capture may share."""
        ...


class CudaGraphBackend:
    """`torch.cuda.CUDAGraph`s, captured on one side stream per device, with the cyclic collector paused."""

    WARMUP = 2  # eager runs on the capture stream before capturing (lazy library initialisation, autotuning)

    def usable(self, latent: torch.Tensor) -> bool:
        return latent.is_cuda and not torch.cuda.is_current_stream_capturing()

    def capture(
        self, latent: torch.Tensor, inputs: tuple[torch.Tensor, ...], compute: Compute, pool: Any
    ) -> tuple[_Graph, Any]:
        stream = capture_stream(latent.device)
        stream.wait_stream(torch.cuda.current_stream(latent.device))
        with no_finalizers_during_capture(), torch.cuda.stream(stream):
            static_latent = latent.detach().clone()
            static_inputs = tuple(t.detach().clone() for t in inputs)
            for _ in range(self.WARMUP):
                compute(static_latent, static_inputs)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=stream, capture_error_mode=CAPTURE_ERROR_MODE):
                outputs = compute(static_latent, static_inputs)
        torch.cuda.current_stream(latent.device).wait_stream(stream)
        # Every graph of an engine shares one pool: they are replayed one at a time.
        return _Graph(graph, static_latent, static_inputs, outputs), graph.pool()


class GraphEvaluations:
    """An `Evaluator`'s evaluations for `GraphableRunner`s: one captured graph per (rows, map size, shapes,
    selections, runner key), replayed with the new latent and inputs copied into its static buffers. Latents the
    backend cannot capture (CPU tensors, for `CudaGraphBackend`) are evaluated eagerly.

    `guard` is asked once per sampling pass (`allowed()` after construction or `release()`); when it gives reasons,
    or a capture fails, the rest of the pass is evaluated eagerly and `fallback_reason` says why."""

    def __init__(
        self,
        evaluator: Evaluator,
        backend: GraphBackend | None = None,
        guard: GraphGuard | GraphConditions | None = None,
    ) -> None:
        self.evaluator = evaluator
        self.backend: GraphBackend = backend if backend is not None else CudaGraphBackend()
        conditions = guard if isinstance(guard, GraphConditions) else None
        self.guard: GraphGuard | None = conditions.guard if conditions is not None else guard  # type: ignore[assignment]
        self.conditions = conditions
        self.fallback_reason: str | None = None
        self._guard_pending = True
        self.graphs: dict[Hashable, _Graph] = {}
        self.failed: set[Hashable] = set()
        self.pool: Any = None
        self.weights: tuple[int, ...] | None = None

    def allowed(self) -> bool:
        """Whether this pass may replay graphs (the guard is asked at the pass's first call)."""
        if self._guard_pending:
            self._guard_pending = False
            self.fallback_reason = None
            if self.guard is not None:
                try:
                    reasons = list(self.guard() or [])
                except Exception as error:  # noqa: BLE001 - a broken check must not break sampling: be safe instead
                    reasons = [f"the graph safety check failed ({error})"]
                if reasons:
                    self.fallback_reason = "; ".join(reasons)
                    logger.warning("A&E evaluates without CUDA graphs in this pass: %s", self.fallback_reason)
        return self.fallback_reason is None

    def release(self) -> None:
        """Free every graph's CUDA graph and memory pool now. Reset, not only dropped: a host may keep dead graphs in
        a reference cycle (the GPU webui does), so they would hold their pool until the cyclic collector ran, and be
        destroyed whenever it ran, possibly inside our next capture. A reset graph's later finalization makes no CUDA
        call (tests/webui-gpu-h200.json "capture_failure_found")."""
        self._drop_graphs()
        self._guard_pending = True  # a new sampling pass follows

    def _drop_graphs(self) -> None:
        for entry in self.graphs.values():
            entry.graph.reset()
        self.graphs.clear()
        self.pool = None
        self.weights = None

    def evaluate(
        self,
        z: torch.Tensor,
        rows: Sequence[int],
        plan: LossPlan,
        size: tuple[int, int],
        runner: GraphableRunner,
        carried: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> Evaluation:
        """`Evaluator.forward_backward` of batch rows `rows`, replayed; `carried` (the rows' carry from the previous
        step) is an input like the runner's, copied into the graph's static buffers."""
        index = self.evaluator.row_index(rows, z)
        latent = z if index is None else z.index_select(0, index)
        inputs = runner.inputs if index is None else tuple(t.index_select(0, index) for t in runner.inputs)
        count = len(inputs)
        inputs = inputs + (carried or ())

        def compute(static_latent: torch.Tensor, static_inputs: tuple[torch.Tensor, ...]) -> Evaluation:
            own, carry = static_inputs[:count], static_inputs[count:]
            return self.evaluator.forward_backward(
                static_latent, lambda leaf: runner.fn(leaf, *own), plan, size,
                carried=(carry[0], carry[1]) if carry else None,
            )

        if not self.backend.usable(z):
            return compute(latent, inputs)
        key = (
            tuple(rows), size, runner.key, plan.key, _signature(latent), tuple(_signature(t) for t in inputs),
            torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"),
            self.conditions.state() if self.conditions is not None else None,
        )
        weights = tuple(p.data_ptr() for p in self.evaluator.parameters())
        if weights != self.weights:  # new or moved weights: graphs would read the old addresses
            self._drop_graphs()  # within the pass: the guard's answer and a capture failure's reason still hold
            self.weights = weights
        entry = self.graphs.get(key)
        if entry is None and key not in self.failed:
            scope = self.conditions.capture_scope() if self.conditions is not None else contextlib.nullcontext()
            try:
                with scope:
                    entry, self.pool = self.backend.capture(latent, inputs, compute, self.pool)
                logger.info("captured the A&E evaluation of %d image(s) as a graph", latent.shape[0])
                self.graphs[key] = entry
            except Exception as error:  # noqa: BLE001 - any capture failure falls back to the eager computation
                self.failed.add(key)
                logger.warning("CUDA graph capture of the A&E evaluation failed (%s); evaluating eagerly", error)
                if self.fallback_reason is None:  # the host says it once, in the console and the trace
                    self.fallback_reason = f"graph capture failed: {error}"
        if entry is None:
            return compute(latent, inputs)
        with torch.no_grad():
            entry.latent.copy_(latent)
            for static, value in zip(entry.inputs, inputs):
                static.copy_(value)
        entry.graph.replay()
        # Copies: another graph sharing the pool, or the next replay, must not change what the caller holds.
        return entry.outputs.clone()


CAPTURE_ERROR_MODE = "thread_local"
"""Only this thread's unsafe CUDA calls break the capture. The webui serves other requests meanwhile (progress,
`/sdapi/v1/memory`'s `mem_get_info`, other extensions' routes); in PyTorch's default "global" mode any of them, on any
thread, would invalidate our capture. Our capture only ever records our own stream's work either way."""


@contextlib.contextmanager
def no_finalizers_during_capture() -> Iterator[None]:
    """Python's cyclic garbage collector paused while a graph is warmed up and captured.

    A collection that runs inside the capture finalizes whatever cyclic garbage the process holds, on this thread; a
    finalizer that calls CUDA (a dead `torch.cuda.CUDAGraph`'s reset, an event's destroy) is an unsafe call during
    capture and invalidates it ("operation not permitted when stream is capturing (function reset)":
    tests/webui-gpu-h200.json "capture_failure_found"). The pause lasts one capture (a fraction of a second); the
    garbage is collected afterwards as usual."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


_capture_streams: dict[torch.device, Any] = {}
"""Device -> the one side stream every A&E graph on it is captured on, for the life of the process."""


def capture_stream(device: torch.device, make_stream: Callable[[torch.device], Any] | None = None) -> Any:
    """The side stream A&E captures its graphs on (the legacy default stream cannot be captured): one per device for
    the whole process. PyTorch keeps a cuBLAS and a cuBLASLt workspace (32 MiB each on Hopper) for every (handle,
    stream) pair it has seen, for good, and hands out new streams round-robin from a pool of 32: a fresh stream per
    capture, i.e. per generation, would keep ~65 MiB more of every request until all 32 were seen (about 2 GiB on the
    H200, tests/webui-gpu-h200.json "memory_growth_found"). The caching allocator also keeps freed blocks per stream,
    so on one stream the warm-up runs before each capture reuse the previous generation's blocks."""
    key = torch.device(device)
    stream = _capture_streams.get(key)
    if stream is None:
        stream = (make_stream or (lambda d: torch.cuda.Stream(device=d)))(key)
        _capture_streams[key] = stream
    return stream


def _signature(t: torch.Tensor) -> tuple[Any, ...]:
    return (tuple(t.shape), t.dtype, t.device, tuple(t.stride()))
