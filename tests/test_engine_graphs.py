"""The CUDA-graph evaluation path (`AttendAndExcite(cuda_graphs=True)` with a `GraphableRunner`) computes exactly what
the eager path computes.

On the CPU the graph path runs through `lib_ae.graphs.GraphEvaluations` with a stand-in for `torch.cuda.CUDAGraph`
(`ReplayedGraph`) that does what a replay does differently from eager evaluation: the computation is captured once
over static buffers, each evaluation copies the latent and inputs into those buffers, the replay overwrites the same
static outputs (poisoned after the capture, since a captured graph has computed nothing yet), and the caller gets
copies of them. So a missed copy-in, a stale output or an output shared between evaluations fails here. The H200
benchmark (tests/benchmark-h200.json, `final_latent_max_abs_diff_vs_eager`) and the CUDA tests below check the real
replay."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import inspect
import math
from typing import Any, Callable

import pytest
import torch

from lib_ae import AttendAndExcite, AttentionCapture, ExciteConfig, StepReport, TokenSelection
from lib_ae import graphs
from lib_ae.evaluation import Evaluation
from lib_ae.graphs import GraphableRunner, GraphEvaluations, no_finalizers_during_capture
from support.models import SD1_LIKE, make_unet


class ReplayedGraph:
    """A stand-in `torch.cuda.CUDAGraph` on the CPU: `replay()` runs the captured computation again from the static
    buffers and writes its results into the static outputs in place, which is what a CUDA graph's replay amounts to."""

    def __init__(self, compute: Callable[[], Evaluation], outputs: Evaluation) -> None:
        self.compute: Callable[[], Evaluation] | None = compute
        self.outputs = outputs
        self.replays = 0

    def replay(self) -> None:
        assert self.compute is not None, "replayed after reset"
        fresh = self.compute()
        with torch.no_grad():
            for static, value in zip(_tensors(self.outputs), _tensors(fresh)):
                static.copy_(value)
        self.replays += 1

    def reset(self) -> None:
        self.compute = None


def _tensors(evaluation: Evaluation) -> list[torch.Tensor]:
    values = [getattr(evaluation, f.name) for f in dataclasses.fields(evaluation)]
    return [v for v in values if isinstance(v, torch.Tensor)]


class ReplayingCpuBackend:
    """`graphs.GraphBackend` on the CPU with `ReplayedGraph`s."""

    def __init__(self) -> None:
        self.graphs: list[ReplayedGraph] = []

    def usable(self, latent: torch.Tensor) -> bool:
        return True

    def capture(self, latent: torch.Tensor, inputs: tuple[torch.Tensor, ...], compute: Any, pool: Any) -> Any:
        static_latent = latent.detach().clone()
        static_inputs = tuple(t.detach().clone() for t in inputs)
        outputs = compute(static_latent, static_inputs)
        with torch.no_grad():  # until it is replayed, a captured graph has computed nothing
            for t in _tensors(outputs):
                t.copy_(~t if t.dtype == torch.bool else torch.full_like(t, math.nan))
        graph = ReplayedGraph(lambda: compute(static_latent, static_inputs), outputs)
        self.graphs.append(graph)
        return graphs._Graph(graph, static_latent, static_inputs, outputs), pool

    @property
    def replays(self) -> int:
        return sum(g.replays for g in self.graphs)


SIDE = 16  # latent side: 4x4 maps (1/4 of the latent)


@pytest.fixture(scope="module")
def unet() -> torch.nn.Module:
    return make_unet(SD1_LIKE, seed=3, dtype=torch.float64)


def inputs(batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    x = torch.randn(batch, 4, SIDE, SIDE, generator=g, dtype=torch.float64)
    t = torch.tensor([700.0, 420.0][:batch], dtype=torch.float64)
    context = torch.randn(batch, 77, SD1_LIKE.context_dim, generator=g, dtype=torch.float64)
    return x, t, context


def engine_with_backend(
    capture: AttentionCapture, config: ExciteConfig, use_graphs: bool
) -> tuple[AttendAndExcite, ReplayingCpuBackend]:
    """An engine that evaluates eagerly, or through the stand-in graphs of the returned backend."""
    backend = ReplayingCpuBackend()
    engine = AttendAndExcite(capture, config, cuda_graphs=use_graphs, graph_backend=backend)
    return engine, backend


def run(unet: torch.nn.Module, graphs: bool, config: ExciteConfig, selections: list[TokenSelection | None], step: int,
        poison: int | None = None) -> tuple[torch.Tensor, StepReport]:
    """One engine step, eager or through replayed stand-in graphs (then asserted to have replayed)."""
    x, t, context = inputs(len(selections))
    capture = AttentionCapture(unet)
    try:
        engine, backend = engine_with_backend(capture, config, graphs)

        def forward(latent_rows: torch.Tensor, t_rows: torch.Tensor, context_rows: torch.Tensor) -> None:
            if poison is not None:  # a non-finite latent for one image (its row is first when it is in the subset)
                latent_rows = latent_rows * torch.where(t_rows == t[poison], math.nan, 1.0)[:, None, None, None]
            unet(latent_rows, t_rows, context=context_rows)

        runner = GraphableRunner(forward, (t, context), key="test")
        if not graphs:
            eager = runner

            def runner(latent_rows: torch.Tensor, rows: torch.Tensor) -> object:  # type: ignore[no-redef]
                return eager(latent_rows, rows)  # a plain callable: the engine evaluates it eagerly

        result = engine.step(x, step, engine.plan(10), selections, runner, gradient_scale=[3.0, 1.5][: len(selections)])
        if graphs:
            assert engine.graph_fallback_reason is None, engine.graph_fallback_reason
            assert backend.replays > 0 and backend.replays >= len(backend.graphs), "evaluated without replaying"
        return result
    finally:
        capture.remove()


SELECTIONS = [TokenSelection.official(77, [[2], [5]]), TokenSelection.official(77, [[3, 4], [7]])]


@pytest.mark.parametrize("step", [0, 1], ids=["refinement-step", "plain-step"])
def test_graph_path_equals_eager_bit_for_bit(unet: torch.nn.Module, step: int) -> None:
    config = ExciteConfig(max_refinement_iterations=3)
    eager_latent, eager_report = run(unet, False, config, SELECTIONS, step)
    graph_latent, graph_report = run(unet, True, config, SELECTIONS, step)
    assert torch.equal(eager_latent, graph_latent)
    assert graph_report == eager_report
    assert not torch.equal(eager_latent, inputs(2)[0])  # the step did move the latent
    if step == 0:
        assert eager_report.refinement_iterations == [3, 3]


def test_graphs_replayed_at_later_steps_read_the_new_inputs(unet: torch.nn.Module) -> None:
    """One engine over three steps, as in a sampling pass: the graphs captured at the first step are replayed at the
    next ones with another timestep and latent copied in."""
    config = ExciteConfig(thresholds={})
    x, _, context = inputs(2)

    def three_steps(use_graphs: bool) -> tuple[list[torch.Tensor], list[StepReport], ReplayingCpuBackend]:
        capture = AttentionCapture(unet)
        try:
            engine, backend = engine_with_backend(capture, config, use_graphs)
            latent, latents, reports = x, [], []
            for step, t in enumerate(([700.0, 420.0], [650.0, 380.0], [600.0, 340.0])):
                timestep = torch.tensor(t, dtype=torch.float64)
                runner: Any = GraphableRunner(lambda z, tt, c: unet(z, tt, context=c), (timestep, context), key="test")
                if not use_graphs:
                    runner = runner.__call__  # a plain callable: evaluated eagerly
                latent, report = engine.step(latent, step, engine.plan(10), SELECTIONS, runner, gradient_scale=[3.0, 1.5])
                latents.append(latent)
                reports.append(report)
            return latents, reports, backend
        finally:
            capture.remove()

    eager_latents, eager_reports, _ = three_steps(False)
    graph_latents, graph_reports, backend = three_steps(True)
    assert len(backend.graphs) == 1 and backend.replays == 3, "one graph, captured once and replayed at each step"
    for eager, graph in zip(eager_latents, graph_latents):
        assert torch.equal(eager, graph)
    assert graph_reports == eager_reports


def test_graph_path_skips_a_non_finite_image_like_the_eager_path(unet: torch.nn.Module) -> None:
    config = ExciteConfig(thresholds={})
    eager_latent, eager_report = run(unet, False, config, SELECTIONS, 1, poison=1)
    graph_latent, graph_report = run(unet, True, config, SELECTIONS, 1, poison=1)
    assert eager_report.skipped_nonfinite == graph_report.skipped_nonfinite == [1]
    assert torch.equal(eager_latent, graph_latent)
    assert torch.equal(graph_latent[1], inputs(2)[0][1])  # untouched
    assert torch.isfinite(graph_latent).all()


def test_images_without_subjects_are_left_alone(unet: torch.nn.Module) -> None:
    selections: list[TokenSelection | None] = [None, SELECTIONS[1]]
    eager_latent, eager_report = run(unet, False, ExciteConfig(thresholds={}), selections, 1)
    graph_latent, graph_report = run(unet, True, ExciteConfig(thresholds={}), selections, 1)
    assert torch.equal(eager_latent, graph_latent) and graph_report == eager_report
    assert torch.equal(graph_latent[0], inputs(2)[0][0])


def test_one_capture_stream_per_device_for_the_whole_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every generation's graphs are captured on the same side stream: PyTorch keeps a cuBLAS(Lt) workspace for each
    stream it has seen, so a new stream per capture kept ~65 MiB more per generation (tests/webui-gpu-h200.json)."""
    from lib_ae import graphs

    monkeypatch.setattr(graphs, "_capture_streams", {})
    made: list[torch.device] = []

    def make(device: torch.device) -> object:
        made.append(device)
        return object()

    first = graphs.capture_stream(torch.device("cuda:0"), make)
    assert graphs.capture_stream(torch.device("cuda:0"), make) is first
    assert graphs.capture_stream(torch.device("cuda", 0), make) is first
    other = graphs.capture_stream(torch.device("cuda:1"), make)
    assert other is not first
    assert made == [torch.device("cuda:0"), torch.device("cuda:1")]


class _Finalized:
    """Cyclic garbage that records when the collector finalizes it."""

    log: list[str] = []

    def __init__(self) -> None:
        self.cycle = self

    def __del__(self) -> None:
        _Finalized.log.append("finalized")


def test_no_garbage_is_finalized_inside_a_capture() -> None:
    _Finalized.log = []
    assert gc.isenabled()
    with no_finalizers_during_capture():
        _Finalized()
        assert not gc.isenabled()
        for _ in range(20_000):  # far past the collector's thresholds: it would have run many times
            [[]]
        assert _Finalized.log == []
    assert gc.isenabled()
    gc.collect()
    assert _Finalized.log == ["finalized"]


def test_the_collector_stays_as_the_host_left_it() -> None:
    gc.disable()
    try:
        with no_finalizers_during_capture():
            pass
        assert not gc.isenabled(), "a host that runs without the cyclic collector keeps it off"
    finally:
        gc.enable()
    with pytest.raises(KeyError):
        with no_finalizers_during_capture():
            raise KeyError("a failed capture")
    assert gc.isenabled()


def test_a_captured_graph_that_is_not_replayed_is_caught(unet: torch.nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
    # The stand-in makes the comparison above able to fail: a replay that computes nothing leaves poisoned outputs.
    monkeypatch.setattr(ReplayedGraph, "replay", lambda self: None)
    config = ExciteConfig(max_refinement_iterations=3)
    eager_latent, _ = run(unet, False, config, SELECTIONS, 1)
    with pytest.raises(AssertionError):
        graph_latent, _ = run(unet, True, config, SELECTIONS, 1)
        assert torch.equal(eager_latent, graph_latent)


def test_report_equality_covers_every_field() -> None:
    values: dict[str, Any] = {
        "step": 3, "active": True, "loss": [0.5, None], "maxima": [[0.25, 0.75], None], "refinement_iterations": [2, 0],
        "skipped_nonfinite": [1], "interrupted": False, "maps": [torch.ones(2, 4, 4), None],
        "bind_loss": [-0.1, None], "bind_maps": [torch.ones(3, 4, 4), None],
    }
    changed: dict[str, Any] = {
        "step": 4, "active": False, "loss": [0.5, 0.1], "maxima": [[0.25, 0.5], None], "refinement_iterations": [1, 0],
        "skipped_nonfinite": [], "interrupted": True, "maps": [torch.zeros(2, 4, 4), None],
        "bind_loss": [-0.2, None], "bind_maps": [torch.ones(3, 4, 4) * 2, None],
    }
    assert list(values) == list(inspect.signature(StepReport).parameters), "a field the comparison does not know"
    assert StepReport(**values) == StepReport(**values)
    for name in values:
        assert StepReport(**values) != StepReport(**{**values, name: changed[name]}), name
    skipped = {**values, "loss": [math.nan, None]}
    assert StepReport(**skipped) == StepReport(**skipped)  # a skipped image's NaN loss reads the same in both


def test_capture_breaks_only_on_this_threads_unsafe_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA backend captures in "thread_local" mode (other webui threads' CUDA calls cannot break our capture),
    on the process's one capture stream, with the cyclic collector paused: checked on its calls into torch.cuda."""
    assert "capture_error_mode" in inspect.signature(torch.cuda.graph).parameters

    class Stream:
        def wait_stream(self, other: object) -> None:
            pass

    class Graph:
        def pool(self) -> str:
            return "pool"

    side, calls = Stream(), []

    class RecordingCapture:
        def __init__(self, graph: object, **kwargs: Any) -> None:
            calls.append(kwargs)

        def __enter__(self) -> None:
            assert not gc.isenabled(), "the collector runs during the capture"

        def __exit__(self, *exc: object) -> None:
            pass

    monkeypatch.setattr(graphs, "_capture_streams", {torch.device("cpu"): side})
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "graph", RecordingCapture)
    computed: list[torch.Tensor] = []
    entry, pool = graphs.CudaGraphBackend().capture(
        torch.zeros(1, 4), (torch.ones(1),), lambda latent, inputs: computed.append(latent) or "outputs", "old pool"
    )
    assert calls == [{"pool": "old pool", "stream": side, "capture_error_mode": "thread_local"}]
    assert pool == "pool" and entry.outputs == "outputs"
    assert len(computed) == graphs.CudaGraphBackend.WARMUP + 1 and all(c is entry.latent for c in computed)


def cuda_generation(device: torch.device) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A float32 SD1-like UNet on the GPU and one image's latent, timestep and text context."""
    unet = make_unet(SD1_LIKE, seed=3, dtype=torch.float32).to(device)
    g = torch.Generator(device="cpu").manual_seed(5)
    x = torch.randn(1, 4, SIDE, SIDE, generator=g).to(device)
    t = torch.tensor([700.0], device=device)
    context = torch.randn(1, 77, SD1_LIKE.context_dim, generator=g).to(device)
    return unet, x, t, context


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the graph is only captured there)")
def test_a_dead_graph_collected_during_capture_does_not_break_it_on_cuda() -> None:
    """What broke a capture in the GPU webui: a CUDA graph left in a reference cycle is freed by a collection that
    happens to run inside our capture, and its reset is an unsafe CUDA call there. Here the hook drops such a cycle
    into the garbage while the capture runs, and the collector is set to run at every allocation."""
    from benchmark import host_patches

    device = torch.device("cuda")
    unet, x, t, context = cuda_generation(device)
    counter = torch.zeros(4, device=device)
    dead = torch.cuda.CUDAGraph()
    with torch.cuda.graph(dead):
        counter.add_(1)
    parked = [dead]
    del dead

    def drop_into_garbage(module: torch.nn.Module, args: Any, output: Any) -> None:
        if parked and torch.cuda.is_current_stream_capturing():
            cycle: dict[str, Any] = {"graph": parked.pop()}
            cycle["self"] = cycle  # only the cyclic collector can free it now

    capture = AttentionCapture(unet)
    handle = unet.input_blocks[1].register_forward_hook(drop_into_garbage)
    thresholds = gc.get_threshold()
    try:
        with host_patches():
            engine = AttendAndExcite(capture, ExciteConfig(thresholds={}), cuda_graphs=True)
            runner = GraphableRunner(lambda z, tt, c: unet(z, tt, context=c), (t, context), key="gc")
            gc.set_threshold(1)
            for step in range(2):
                engine.step(x, step, engine.plan(10), [SELECTIONS[0]], runner, gradient_scale=[3.0])
            gc.set_threshold(*thresholds)
            assert parked == [], "the hook ran inside the capture"
            assert engine.graph_fallback_reason is None, engine.graph_fallback_reason
            assert engine._graphs is not None and engine._graphs.graphs
            engine.release_graphs()
    finally:
        gc.set_threshold(*thresholds)
        handle.remove()
        capture.remove()
    gc.collect()


def test_releasing_resets_every_graph_at_once() -> None:
    """Graph objects are reset (CUDA graph and pool freed) when the pass ends, even if something still references them."""

    class RecordedGraph:
        def __init__(self) -> None:
            self.resets = 0

        def reset(self) -> None:
            self.resets += 1

    capture = AttentionCapture(make_unet(SD1_LIKE, seed=3, dtype=torch.float32))
    try:
        engine = AttendAndExcite(capture, ExciteConfig(thresholds={}), cuda_graphs=True)
        assert engine._graphs is not None
        held = [RecordedGraph(), RecordedGraph()]
        for key, graph in enumerate(held):
            engine._graphs.graphs[key] = graphs._Graph(graph, torch.zeros(1), (), None)  # type: ignore[arg-type]
        engine.release_graphs()
        assert [g.resets for g in held] == [1, 1]
        assert engine._graphs.graphs == {}
    finally:
        capture.remove()


CUBLAS_WORKSPACE_BYTES = 32 * 2**20
"""What cuBLAS (and again cuBLASLt) keeps per (handle, stream) on sm90: the size of one leaked capture stream's cost."""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the graph is only captured there)")
def test_generations_with_graphs_do_not_keep_memory_on_cuda() -> None:
    """One engine per generation, as the webui makes them: after the first generation (workspaces, the capture stream's
    cached blocks), further generations leave the allocated memory where it was. A new capture stream per generation
    kept two cuBLAS workspaces (2 x 32 MiB) each; the allocator's own jitter between generations is under 1 MiB."""
    from benchmark import host_patches  # ldm's own timestep embedding copies from the host: no capture without A1111's fix

    device = torch.device("cuda")
    unet, x, t, context = cuda_generation(device)
    capture = AttentionCapture(unet)
    allocated, captured = [], []
    try:
        with host_patches():
            for _ in range(4):
                engine = AttendAndExcite(capture, ExciteConfig(thresholds={}), cuda_graphs=True)
                runner = GraphableRunner(lambda z, tt, c: unet(z, tt, context=c), (t, context), key="leak")
                for step in range(3):
                    engine.step(x, step, engine.plan(10), [SELECTIONS[0]], runner, gradient_scale=[3.0])
                assert engine.graph_fallback_reason is None, engine.graph_fallback_reason
                captured.append(len(engine._graphs.graphs) if engine._graphs is not None else 0)
                engine.release_graphs()
                del engine, runner
                torch.cuda.synchronize()
                allocated.append(torch.cuda.memory_allocated())
    finally:
        capture.remove()
    assert all(captured), f"graphs captured per generation: {captured}"
    growth = allocated[-1] - allocated[1]
    assert growth < CUBLAS_WORKSPACE_BYTES // 2, f"allocated bytes after each generation: {allocated}"
