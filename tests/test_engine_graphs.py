"""The CUDA-graph evaluation path (`AttendAndExcite(cuda_graphs=True)` with a `GraphableRunner`) computes exactly what
the eager path computes. On the CPU `lib_ae.graphs.GraphEvaluations` runs the very computation it would capture on a GPU (device-side
loss, no host synchronization inside), so comparing it with the eager engine here checks the arithmetic of what is
replayed; the H200 benchmark (tests/benchmark-h200.json, `final_latent_max_abs_diff_vs_eager`) checks the replay."""

from __future__ import annotations

import gc
import math
from typing import Any

import pytest
import torch

from lib_ae import AttendAndExcite, AttentionCapture, ExciteConfig, StepReport, TokenSelection
from lib_ae import graphs
from lib_ae.graphs import GraphableRunner, no_finalizers_during_capture
from support.models import SD1_LIKE, make_unet

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


def run(unet: torch.nn.Module, graphs: bool, config: ExciteConfig, selections: list[TokenSelection | None], step: int,
        poison: int | None = None) -> tuple[torch.Tensor, StepReport]:
    x, t, context = inputs(len(selections))
    capture = AttentionCapture(unet)
    try:
        engine = AttendAndExcite(capture, config, cuda_graphs=graphs)

        def forward(latent_rows: torch.Tensor, t_rows: torch.Tensor, context_rows: torch.Tensor) -> None:
            if poison is not None:  # a non-finite latent for one image (its row is first when it is in the subset)
                latent_rows = latent_rows * torch.where(t_rows == t[poison], math.nan, 1.0)[:, None, None, None]
            unet(latent_rows, t_rows, context=context_rows)

        runner = GraphableRunner(forward, (t, context), key="test")
        if not graphs:
            eager = runner

            def runner(latent_rows: torch.Tensor, rows: torch.Tensor) -> object:  # type: ignore[no-redef]
                return eager(latent_rows, rows)  # a plain callable: the engine evaluates it eagerly

        return engine.step(x, step, engine.plan(10), selections, runner, gradient_scale=[3.0, 1.5][: len(selections)])
    finally:
        capture.remove()


SELECTIONS = [TokenSelection.official(77, [[2], [5]]), TokenSelection.official(77, [[3, 4], [7]])]


@pytest.mark.parametrize("step", [0, 1], ids=["refinement-step", "plain-step"])
def test_graph_path_equals_eager_bit_for_bit(unet: torch.nn.Module, step: int) -> None:
    config = ExciteConfig(max_refinement_steps=3)
    eager_latent, eager_report = run(unet, False, config, SELECTIONS, step)
    graph_latent, graph_report = run(unet, True, config, SELECTIONS, step)
    assert torch.equal(eager_latent, graph_latent)
    assert graph_report == eager_report
    assert not torch.equal(eager_latent, inputs(2)[0])  # the step did move the latent
    if step == 0:
        assert eager_report.refinement_iterations == [3, 3]


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


def test_capture_breaks_only_on_this_threads_unsafe_calls() -> None:
    assert graphs.CAPTURE_ERROR_MODE == "thread_local"


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
