"""A step without refinement never waits for the GPU; a refinement step waits only for what it must decide on.

Counted on the CPU with `support.host_reads.HostReads` (every read of a tensor value on the host, the calls that wait
for a GPU); the H200 benchmark counts the real synchronisations with CUDA's sync-debug mode (`host_syncs_per_step`).
"""

from __future__ import annotations

import pytest
import torch

from lib_ae import (
    AttendAndExcite,
    AttentionCapture,
    ExciteConfig,
    GraphableRunner,
    InSamplerExcitation,
    StepReport,
    TokenSelection,
    read_reports,
)
from support.host_reads import HostReads
from support.models import SD1_LIKE, make_unet

SIDE = 16
SELECTIONS = [TokenSelection.official(77, [[2], [5]]), TokenSelection.official(77, [[3, 4], [7]])]


@pytest.fixture(scope="module")
def unet() -> torch.nn.Module:
    return make_unet(SD1_LIKE, seed=3)


def inputs(batch: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    x = torch.randn(batch, 4, SIDE, SIDE, generator=g)
    sigma = torch.tensor([7.0, 3.5][:batch])
    context = torch.randn(batch, 77, SD1_LIKE.context_dim, generator=g)
    return x, sigma, context


def sampling_run(unet: torch.nn.Module, graphs: bool, config: ExciteConfig, steps: list[int]) -> tuple[list[int], list[StepReport], torch.Tensor]:
    """Host reads during each `before_model_call` (sigma space, as A1111's k-diffusion samplers), the reports, x."""
    x, sigma, context = inputs()
    capture = AttentionCapture(unet)
    try:
        engine = AttendAndExcite(capture, config, cuda_graphs=graphs)
        excitation = InSamplerExcitation(engine, engine.plan(10), "sigma")

        def forward(latent_rows: torch.Tensor, sigma_rows: torch.Tensor, context_rows: torch.Tensor) -> None:
            unet(latent_rows / (1 + sigma_rows[:, None, None, None] ** 2) ** 0.5, sigma_rows * 50, context=context_rows)

        runner = GraphableRunner(forward, (sigma, context), key="syncs")
        reads = []
        for step in steps:
            with HostReads() as counter:
                excitation.before_model_call(step, x, sigma, SELECTIONS, runner if graphs else runner.__call__)
            reads.append(counter.total)
        return reads, excitation.reports, x
    finally:
        capture.remove()


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graph"])
def test_a_step_without_refinement_reads_nothing_on_the_host(unet: torch.nn.Module, graphs: bool) -> None:
    reads, reports, _ = sampling_run(unet, graphs, ExciteConfig(), [1, 3])
    assert reads == [0, 0]
    assert all(r.active and r.pending for r in reports)
    with HostReads() as counter:
        losses = [r.loss for r in reports]  # the first access reads each report's values: one transfer each
    assert counter.total == 2
    assert all(isinstance(v, float) for row in losses for v in row)
    with HostReads() as counter:
        assert all(r.maxima and r.skipped_nonfinite == [] for r in reports)  # already read: free
    assert counter.total == 0


def test_read_reports_reads_all_reports_in_one_transfer(unet: torch.nn.Module) -> None:
    _, reports, _ = sampling_run(unet, False, ExciteConfig(), [1, 3])
    _, again, _ = sampling_run(unet, False, ExciteConfig(), [1, 3])
    with HostReads() as counter:
        read_reports(reports)
    assert counter.total == 1 and not any(r.pending for r in reports)
    assert reports == again  # and the values are those of reading them one by one


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graph"])
def test_a_refinement_step_reads_once_per_iteration(unet: torch.nn.Module, graphs: bool) -> None:
    """The stop decision needs each iteration's loss on the host: one read per iteration (plus the entry check), each
    while the next iteration's evaluation is already queued."""
    reads, reports, _ = sampling_run(unet, graphs, ExciteConfig(max_refinement_iterations=4), [0])
    iterations = reports[0].refinement_iterations
    assert iterations == [4, 4]  # random weights never reach the first threshold
    assert 1 <= reads[0] <= 1 + max(iterations)


def test_zero_refinement_steps_means_no_refinement(unet: torch.nn.Module) -> None:
    """`max_refinement_iterations: 0` is what a user types to say "none": no iteration runs, none is reported, and the step
    is exactly a step without a refinement threshold."""
    _, reports, x = sampling_run(unet, False, ExciteConfig(max_refinement_iterations=0), [0])
    _, plain_reports, plain_x = sampling_run(unet, False, ExciteConfig(thresholds={10: 0.5}), [0])
    assert reports[0].refinement_iterations == [0, 0]
    assert torch.equal(x, plain_x)
    assert reports[0].loss == plain_reports[0].loss and reports[0].maxima == plain_reports[0].maxima
