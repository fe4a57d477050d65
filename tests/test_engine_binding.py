"""The engine's `bind` and `excite+bind` methods (SynGen's loss, lib_ae.binding) inside the A&E engine.

* `bind` through the engine equals the official SynGen pipeline's trajectory (the figures recorded in
  tests/test_binding.py from `SynGenDiffusionPipeline.__call__`, float64, DDIM 8 steps, 4 updates of step 20), on the
  ldm twin of the same random UNet (tests/test_reference.py's construction), driven in VP space as the official
  pipeline, and in k-diffusion sigma space by the real `sample_euler` (the (1 + sigma^2) step of A&E's mapping).
* `excite+bind` takes one forward and one backward per evaluation, and its update is A&E's step plus SynGen's, each
  with its own step size, equal to the two gradients computed apart.
* No host read during a step, eager or through the graph path; the graph path gives the eager result bit for bit.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch

from lib_ae import AttendAndExcite, AttentionCapture, ExciteConfig, GraphableRunner, InSamplerExcitation, TokenSelection
from lib_ae.binding import BindingGroup, BindingSelection, binding_loss
from lib_ae.config import BindingConfig
from lib_ae.objectives import Bind, ExciteBind
from lib_ae.loss import excite_losses, smoothed_subject_maps, subject_maxima
from support.host_reads import HostReads
from support.models import SD1_LIKE, SD2_LIKE, make_unet
from support.official_loops import ddim_sigma_euler, ddim_vp
from support.threads import one_thread  # noqa: F401  (module-scoped, autouse)
from test_binding import (
    OFFICIAL_TRAJECTORY,
    TRAJECTORY_CFG,
    TRAJECTORY_GROUPS,
    TRAJECTORY_LATENT,
    TRAJECTORY_PIECES,
    TRAJECTORY_STEPS,
)

SMALL = {
    config.name + "-small": dataclasses.replace(config, name=config.name + "-small", num_res_blocks=1,
                                                channel_mult=(1, 1, 2, 2))
    for config in (SD1_LIKE, SD2_LIKE)
}
"""tests/test_binding.py's (and tests/test_reference.py's) tiny UNets: one block per level, widths 32, 32, 64, 64."""
BINDING = BindingSelection.official(TRAJECTORY_PIECES, TRAJECTORY_GROUPS)
BIND = BindingConfig(intervention_steps=4)


@pytest.fixture(scope="module", params=sorted(SMALL))
def setup(request: pytest.FixtureRequest) -> tuple[str, torch.nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The official run's UNet (seed 11) as ldm, and its inputs: tests/test_binding.py's `tiny_unets`."""
    config = SMALL[request.param]
    unet = make_unet(config, seed=11, dtype=torch.float64)
    g = torch.Generator().manual_seed(7)
    z = torch.randn(2, 4, TRAJECTORY_LATENT, TRAJECTORY_LATENT, generator=g, dtype=torch.float64)
    cond = torch.randn(2, 77, config.context_dim, generator=g, dtype=torch.float64)
    uncond = torch.randn(2, 77, config.context_dim, generator=g, dtype=torch.float64)
    return request.param, unet, z, cond, uncond


def bind_engine(unet: torch.nn.Module, binding: BindingConfig = BIND) -> tuple[AttentionCapture, AttendAndExcite]:
    capture = AttentionCapture(unet)
    return capture, AttendAndExcite(capture, Bind(ExciteConfig(), binding))


def run_vp(
    unet: torch.nn.Module, z: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor, binding: BindingConfig = BIND
) -> tuple[list[list[float]], list[list[float]], torch.Tensor]:
    """The official loop (update, then the step's CFG evaluation; DDIM) with the engine's `bind`, both images in one
    batch. Returns per image the bind losses of the active steps, the latent's norm after each step, the final z."""
    capture, engine = bind_engine(unet, binding)
    try:
        excitation, norms, z = ddim_vp(unet, engine, z, cond, uncond, TRAJECTORY_STEPS, TRAJECTORY_CFG, [None, None],
                                       [BINDING, BINDING])
    finally:
        capture.remove()
    losses = [[r.bind_loss[b] for r in excitation.reports if r.active] for b in range(2)]
    return losses, norms, z  # type: ignore[return-value]


def run_sigma(
    unet: torch.nn.Module, z: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor
) -> tuple[list[list[float]], torch.Tensor]:
    """The same through k-diffusion's `sample_euler` over DDIM's sigmas (DDIM with eta 0 is Euler in sigma space)."""
    capture, engine = bind_engine(unet)
    try:
        excitation, final = ddim_sigma_euler(unet, engine, z, cond, uncond, TRAJECTORY_STEPS, TRAJECTORY_CFG,
                                             [None, None], [BINDING, BINDING])
    finally:
        capture.remove()
    losses = [[r.bind_loss[b] for r in excitation.reports if r.active] for b in range(2)]
    return losses, final  # type: ignore[return-value]


def assert_official(name: str, losses: list[list[float]], final: torch.Tensor, norms: list[list[float]] | None,
                    rel: float) -> None:
    for b in range(2):
        want_losses, want_norms, want_sum, want_entry = OFFICIAL_TRAJECTORY[f"{name}/{b}"]
        assert losses[b] == pytest.approx(want_losses, rel=rel, abs=rel * 1e-2), f"image {b} losses"
        if norms is not None:
            assert norms[b] == pytest.approx(want_norms, rel=rel), f"image {b} norms"
        assert float(final[b].sum()) == pytest.approx(want_sum, rel=rel), f"image {b} sum"
        assert float(final[b, 1, 5, 9]) == pytest.approx(want_entry, rel=rel), f"image {b} entry"


@pytest.mark.recorded
def test_bind_in_vp_space_equals_the_official_pipeline(setup: tuple[Any, ...]) -> None:
    name, unet, z, cond, uncond = setup
    losses, norms, final = run_vp(unet, z.clone(), cond, uncond)
    # ldm and diffusers compute the same UNet in a different order of float64 operations: rounding apart, measured
    # 4.8e-13 relative at most (ATEN_CPU_CAPABILITY avx512 and default).
    assert_official(name, losses, final, norms, rel=1e-11)


@pytest.mark.recorded
def test_bind_through_sigma_space_euler_equals_the_official_pipeline(setup: tuple[Any, ...]) -> None:
    name, unet, z, cond, uncond = setup
    losses, final = run_sigma(unet, z.clone(), cond, uncond)
    # k-diffusion's CompVisDenoiser turns each sigma back into a timestep by interpolating log-sigmas; with the
    # float64 schedule that lands on DDIM's integer timestep to rounding, and the run agrees with the official figures
    # to 2.2e-13 relative (measured; with diffusers' float32 schedule t was a few 1e-8 off and this needed 1e-6).
    # Without the (1 + sigma^2) factor the update is off by a factor up to 200.
    assert_official(name, losses, final, None, rel=1e-11)


@pytest.mark.recorded
def test_the_trajectory_check_can_fail(setup: tuple[Any, ...]) -> None:
    # A&E's decaying step size instead of SynGen's constant 20 moves the result off the official figures.
    name, unet, z, cond, uncond = setup
    losses, norms, final = run_vp(unet, z.clone(), cond, uncond, BindingConfig(intervention_steps=4, step_size=17.0))
    with pytest.raises(AssertionError):
        assert_official(name, losses, final, norms, rel=1e-11)


def test_bind_plan_is_synGens_schedule(setup: tuple[Any, ...]) -> None:
    _, unet, *_ = setup
    capture, engine = bind_engine(unet, BindingConfig())
    try:
        plan = engine.plan(50)
    finally:
        capture.remove()
    assert plan.step_sizes == (20.0,) * 25 + (0.0,) * 25
    assert plan.alter_steps == 25 and dict(plan.refinement_thresholds) == {}


# --- excite+bind: one evaluation, two step sizes ---------------------------------------------------------------------

SELECTIONS = [TokenSelection.official(77, [[3], [7]]), TokenSelection.official(77, [[3], [10]])]


def one_step(unet: torch.nn.Module, engine: AttendAndExcite, z: torch.Tensor, cond: torch.Tensor, step: int,
             bindings: list[BindingSelection | None]) -> tuple[torch.Tensor, Any, int]:
    """One engine step at VP timestep 500; returns the new latent, the report and the number of UNet forwards."""
    timestep = torch.full((z.shape[0],), 500.0, dtype=z.dtype)
    forwards = 0

    def run_unet(latent_rows: torch.Tensor, rows: torch.Tensor) -> None:
        nonlocal forwards
        forwards += 1
        unet(latent_rows, timestep[rows], context=cond[rows])

    latent, report = engine.step(z, step, engine.plan(TRAJECTORY_STEPS), SELECTIONS, run_unet, bindings=bindings)
    return latent, report, forwards


def test_excite_and_bind_is_one_evaluation_with_each_losss_own_step(setup: tuple[Any, ...]) -> None:
    _, unet, z, cond, _ = setup
    config = ExciteConfig(thresholds={}, max_iter_to_alter=4, scale_thresholds_with_steps=False)
    capture = AttentionCapture(unet)
    try:
        excite = AttendAndExcite(capture, config)
        both = AttendAndExcite(capture, ExciteBind(config, BIND))
        step = 1
        one_step(unet, excite, z, cond, step, [None, None])  # the capture's one probe forward (early stop) is behind
        excited, _, excite_forwards = one_step(unet, excite, z, cond, step, [BINDING, BINDING])
        combined, report, combined_forwards = one_step(unet, both, z, cond, step, [BINDING, None])
        # No extra UNet evaluation: the binding loss reads the maps of the same forward.
        assert combined_forwards == excite_forwards == 1
        # The update apart: alpha_i grad L_excite + beta_i grad L_bind, each gradient from its own backward.
        alpha = excite.plan(TRAJECTORY_STEPS).step_sizes[step]
        beta = BIND.plan(TRAJECTORY_STEPS).step_size(step)
        size = config.attention_size(z.shape[-2], z.shape[-1])
        timestep = torch.full((2,), 500.0, dtype=z.dtype)
        expected = z.clone()
        for b in range(2):
            with torch.enable_grad():
                leaf = z[b : b + 1].detach().clone().requires_grad_(True)
                with capture.record(*size) as recording:
                    unet(leaf, timestep[:1], context=cond[b : b + 1])
                attention = recording.maps()
                maps = smoothed_subject_maps(attention, SELECTIONS[b], smooth_attentions=True, kernel_size=3,
                                             sigma=0.5, temperature=100.0)
                excite_loss = excite_losses(subject_maxima(maps)).sum()
                (excite_grad,) = torch.autograd.grad(excite_loss, [leaf], retain_graph=True)
                update = alpha * excite_grad
                if b == 0:
                    bind = binding_loss(attention, BINDING).sum()
                    (bind_grad,) = torch.autograd.grad(bind, [leaf])
                    update = update + beta * bind_grad
                    assert report.bind_loss[0] == pytest.approx(float(bind.detach()), rel=1e-12)
            expected[b] = z[b] - update[0]
        assert report.bind_loss[1] is None  # no binding groups for image 1: excited only
        assert torch.allclose(combined, expected, rtol=0, atol=1e-12 * float(z.abs().max()))
        assert torch.equal(combined[1], excited[1])  # without groups, exactly A&E's update
        assert not torch.allclose(combined[0], excited[0])
    finally:
        capture.remove()


def test_bind_without_groups_leaves_the_latent(setup: tuple[Any, ...]) -> None:
    _, unet, z, cond, _ = setup
    capture, engine = bind_engine(unet)
    empty = BindingSelection.official(TRAJECTORY_PIECES, [])
    try:
        one_step(unet, engine, z, cond, 0, [BINDING, empty])  # the capture's one probe forward (early stop)
        latent, report, forwards = one_step(unet, engine, z, cond, 0, [BINDING, empty])
        assert forwards == 1  # image 0 is evaluated (its groups), image 1 takes no part
        assert torch.equal(latent[1], z[1]) and not torch.equal(latent[0], z[0])
        assert report.bind_loss[1] is None and isinstance(report.bind_loss[0], float)
        latent, report, forwards = one_step(unet, engine, z, cond, 0, [None, None])
        assert forwards == 0 and torch.equal(latent, z) and not report.active
    finally:
        capture.remove()


def test_keep_maps_gives_each_nouns_and_modifiers_map(setup: tuple[Any, ...]) -> None:
    _, unet, z, cond, _ = setup
    capture, engine = bind_engine(unet)
    try:
        timestep = torch.full((2,), 500.0, dtype=z.dtype)
        _, report = engine.step(
            z, 0, engine.plan(TRAJECTORY_STEPS), [SELECTIONS[0], None],
            lambda latent, rows: unet(latent, timestep[rows], context=cond[rows]), keep_maps=True,
            bindings=[BINDING, BINDING],
        )
    finally:
        capture.remove()
    # Three groups of one noun and one modifier: noun, modifier, noun, modifier, noun, modifier; 4x4 maps, each a
    # distribution over the pixels.
    for b in range(2):
        assert report.bind_maps[b].shape == (6, 4, 4)
        assert torch.allclose(report.bind_maps[b].sum((-2, -1)), torch.ones(6, dtype=report.bind_maps[b].dtype))
    assert report.maps[0].shape == (2, 4, 4) and report.maps[1] is None


# --- no host read; the graph path -------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["bind", "excite+bind"])
def test_a_binding_step_reads_nothing_on_the_host_and_graphs_agree(method: str) -> None:
    unet = make_unet(SD1_LIKE, seed=3)
    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, 4, 16, 16, generator=g)
    sigma = torch.tensor([7.0, 3.5])
    context = torch.randn(2, 77, SD1_LIKE.context_dim, generator=g)
    bindings = [BINDING, BindingSelection.official(6, [BindingGroup(3, (2,)), BindingGroup(5, (4,))])]
    results = []
    for graphs in (False, True):
        capture = AttentionCapture(unet)
        try:
            engine = AttendAndExcite(
                capture, (Bind if method == "bind" else ExciteBind)(ExciteConfig(), BindingConfig()), cuda_graphs=graphs
            )
            excitation = InSamplerExcitation(engine, engine.plan(10), "sigma")

            def forward(latent_rows: torch.Tensor, sigma_rows: torch.Tensor, context_rows: torch.Tensor) -> None:
                unet(latent_rows / (1 + sigma_rows[:, None, None, None] ** 2) ** 0.5, sigma_rows * 50,
                     context=context_rows)

            runner = GraphableRunner(forward, (sigma, context), key="binding-syncs")
            latent = x.clone()
            reads = []
            for step in (1, 3, 5):  # A&E's refinement steps at 10 steps are 0, 2, 4: they read the loss (and must)
                with HostReads() as counter:
                    excitation.before_model_call(step, latent, sigma, [None, None], runner, bindings=bindings)
                reads.append(counter.total)
            assert reads == [0, 0, 0]  # the binding index and the step's ratio are set up without a host read
            assert all(r.active and r.pending for r in excitation.reports)
            results.append((latent, [r.bind_loss for r in excitation.reports]))
        finally:
            capture.remove()
    (eager, eager_losses), (graph, graph_losses) = results
    assert torch.equal(eager, graph) and eager_losses == graph_losses
    assert not torch.equal(eager, x)


# --- the benchmark's binding rows -------------------------------------------------------------------------------------


def test_benchmark_binding_rows_add_no_unet_work(tmp_path: Any) -> None:
    """The tiny CPU benchmark with the binding rows: `excite+bind` makes exactly the UNet calls, gradient calls and
    backward passes of `excite` at the same settings (the binding loss reads the same maps), and `bind` one
    evaluation per updated step."""
    import benchmark

    steps = 4
    rows = "ae_norefine,bind,excite_bind_norefine,excite_bind_norefine_graph"
    report = benchmark.main(["--tiny", "--steps", str(steps), "--only", "sd15", "--no-reference", "--no-profile-numbers",
                             "--rows", rows, "--out", str(tmp_path / "bench.json")])
    (scenario,) = report["scenarios"]
    results = scenario["results"]
    assert set(results) == {"plain", "ae_norefine", "bind", "excite_bind_norefine", "excite_bind_norefine_graph"}

    def work(name: str) -> tuple[int, ...]:
        r = results[name]
        return r["unet_calls"], r["unet_grad_calls"], r["unet_calls_cut_short"], r["backward_passes"], r["unet_rows"]

    assert work("excite_bind_norefine") == work("ae_norefine") == work("excite_bind_norefine_graph")
    assert work("bind") == work("ae_norefine")  # both update at round(0.5 * steps) steps, one evaluation each
    assert results["bind"]["ae_evaluations"] == steps // 2
    assert "ours_excite_bind_norefine_over_ae_norefine" in scenario["ratios"]
    assert results["excite_bind_norefine_graph"]["final_latent_max_abs_diff_vs_eager"] == 0.0
