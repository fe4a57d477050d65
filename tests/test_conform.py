"""CONFORM (lib_ae.conform, the `conform` objective) equals the official code: its loss on recorded maps, and its
update schedule through the engine on the official pipeline's random-UNet trajectory, in VP space and through
k-diffusion's real `sample_euler` in sigma space.

The official figures were recorded once by running gemlab-vt/CONFORM at 4ad0e37 unmodified (pipeline_conform.py,
with pytorch-metric-learning 2.5.0 as its environment.yaml pins; diffusers 0.42.1 with `diffusers.pipeline_utils`
aliased to its current path), float64, from /tmp (nothing of it is committed):
* `ConformPipeline._compute_contrastive_loss(attention_maps, attention_maps_t_plus_one, token_groups, "ntxent",
  temperature)` on `maps()` below (the previous step's maps: `maps(phase=0.9)`), fresh copies per call;
* `ConformPipeline.__call__` on tests/test_reference.py's tiny random UNets (SD1_SMALL and SD2_SMALL, seed 11, its
  `make_inputs` with seed 7), DDIM 8 steps, CFG 7.5, attn_res 4x4, scale factor 20, max_iter_to_alter 4, temperature
  0.5, 20 refinement iterations at step 0, previous maps on (the defaults), one image per run (the official loop
  shares one `attention_map_t_plus_one` across a batch: the last image's), groups [[2, 3], [6, 7]] and [[3], [7, 9]].

Refinement only at step 0 in the trajectory: the official loss multiplies the previous step's maps by 100 in place
at every call (`attention_for_text_t_plus_one *= 100` on a view of them), so at a refinement step after the first,
where one step makes 22 calls, they are scaled by 100**k and the loss drifts from the first call's, and in float32
it turns NaN at the 20th call (docs/conform.md §3). lib_ae scales them once, as the first call does; these tests
check every call the official code makes correctly.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from lib_ae import AttendAndExcite, AttentionCapture, ExciteConfig, InSamplerExcitation, TokenSelection
from lib_ae.binding import BindingGroup, BindingSelection
from lib_ae.conform import ConformGroups, ConformIndex, conform_embeddings, ntxent_loss
from lib_ae.objectives import Conform
from support.models import make_unet
from support.official_loops import ddim_sigma_euler, ddim_vp
from test_reference import SD1_SMALL, SD2_SMALL, make_inputs
from support.threads import one_thread  # noqa: F401  (module-scoped, autouse)


def maps(h: int = 16, w: int = 16, tokens: int = 77, phase: float = 0.0) -> torch.Tensor:
    """tests/test_binding.py's `_maps` (libm's sine, softmax over the tokens, float64), shifted by `phase`."""
    y = torch.arange(h, dtype=torch.float64)[:, None, None]
    x = torch.arange(w, dtype=torch.float64)[None, :, None]
    k = torch.arange(tokens, dtype=torch.float64)[None, None, :]
    angles = 0.7 * y * (k % 5 + 1) + 1.3 * x * (k % 3 + 1) + 0.5 * k + phase
    sines = torch.tensor([math.sin(a) for a in angles.flatten().tolist()], dtype=torch.float64)
    return torch.softmax(3 * sines.reshape(angles.shape), dim=-1)


GROUPS = {"two_pairs": [[2, 3], [6, 7]], "single_tokens": [[2], [5]], "three_groups": [[2, 3, 4], [6], [8, 9]]}
# (groups, with previous maps, temperature): (official loss, its gradient's L2 norm w.r.t. the maps, gradient[3, 5, 6])
OFFICIAL_LOSS = {
    ("two_pairs", False, 0.5): (1.0805525224278676, 6.842108156878837, 0.013986064679111149),
    ("two_pairs", False, 0.07): (1.1631581030500124, 49.25025827858722, -1.0336672034320038),
    ("two_pairs", True, 0.5): (1.6796835668935568, 1.9436874395028847, -0.01053213235070518),
    ("two_pairs", True, 0.07): (2.436122753615225, 15.77861595638652, -0.40794977436626),
    ("single_tokens", False, 0.5): (0.0, 0.0, 0.0),
    ("single_tokens", False, 0.07): (0.0, 0.0, 0.0),
    ("single_tokens", True, 0.5): (1.3512954122045975, 2.6270932254173918, -0.003868051464479425),
    ("single_tokens", True, 0.07): (3.376781308472558, 21.720720886170124, -0.03873927878542841),
    ("three_groups", False, 0.5): (1.4372531185455013, 5.691423656599848, 0.1289219871995769),
    ("three_groups", False, 0.07): (1.6941491467128307, 46.2461581004831, 0.23251067424399308),
    ("three_groups", True, 0.5): (2.0942383814266354, 1.522407602497661, 0.06399428022427874),
    ("three_groups", True, 0.07): (2.7325395779010626, 13.505625326176887, 0.13430626340398272),
}


def index_of(groups: list[list[int]]) -> ConformIndex:
    columns = tuple(c for group in groups for c in group)
    classes = tuple(g for g, group in enumerate(groups) for _ in group)
    return ConformIndex.build(TokenSelection.official(77, [[c] for c in columns]), ConformGroups(columns, classes), "cpu")


@pytest.mark.recorded
@pytest.mark.parametrize("case", sorted(OFFICIAL_LOSS))
def test_loss_equals_the_official_code(case: tuple[str, bool, float]) -> None:
    name, previous, temperature = case
    want_loss, want_norm, want_entry = OFFICIAL_LOSS[case]
    index = index_of(GROUPS[name])
    attention = maps().requires_grad_(True)
    embeddings, classes = conform_embeddings(attention, index), index.classes
    if previous:  # each token then its previous map, as the official code orders them
        embeddings = torch.stack([embeddings, conform_embeddings(maps(phase=0.9), index)], 1).flatten(0, 1)
        classes = classes.repeat_interleave(2)
    loss = ntxent_loss(embeddings, classes, temperature=temperature)
    (grad,) = torch.autograd.grad(loss, [attention], allow_unused=True, materialize_grads=True)
    loss = loss.detach()
    assert float(loss) == pytest.approx(want_loss, rel=1e-12, abs=1e-15)
    assert float(grad.norm()) == pytest.approx(want_norm, rel=1e-11, abs=1e-15)
    assert float(grad[3, 5, 6]) == pytest.approx(want_entry, rel=1e-10, abs=1e-15)


def test_the_loss_masks_missing_previous_maps_exactly() -> None:
    """A previous map marked absent counts as if it were not there (the first step, or an image new to the step)."""
    index = index_of(GROUPS["two_pairs"])
    now, before = conform_embeddings(maps(), index), conform_embeddings(maps(phase=0.9), index)
    interleaved = torch.stack([now, before], 1).flatten(0, 1)[None].repeat(2, 1, 1)
    classes = index.classes.repeat_interleave(2)
    valid = torch.tensor([[True, False] * 4, [True] * 8])
    loss = ntxent_loss(interleaved, classes, valid)
    assert float(loss[0]) == pytest.approx(OFFICIAL_LOSS[("two_pairs", False, 0.5)][0], rel=1e-13)
    assert float(loss[1]) == pytest.approx(OFFICIAL_LOSS[("two_pairs", True, 0.5)][0], rel=1e-13)


def test_groups_follow_the_subjects_and_their_modifiers() -> None:
    selection = TokenSelection.official(77, [[3], [7, 8], [10]])
    binding = BindingSelection.official(10, [BindingGroup(3, (2,)), BindingGroup(8, (5, 6))])
    groups = ConformGroups.build(selection, binding)
    assert groups.columns == (2, 3, 5, 6, 7, 8, 10) and groups.classes == (0, 0, 1, 1, 1, 1, 2)
    assert ConformGroups.build(selection, None).columns == (3, 7, 8, 10)
    assert ConformGroups.build(None, binding).groups == 0
    objective = Conform()
    assert not objective.takes_part(TokenSelection.official(77, [[3]]), binding)  # one group: nothing to contrast
    assert objective.takes_part(selection, None)


# --- the official pipeline's trajectory -----------------------------------------------------------------------------

STEPS, CFG, ALTER = 8, 7.5, 4
OFFICIAL_GROUPS = [[[2, 3], [6, 7]], [[3], [7, 9]]]
TARGETS = [
    (TokenSelection.official(77, [[3], [7]]), BindingSelection.official(10, [BindingGroup(3, (2,)), BindingGroup(7, (6,))])),
    (TokenSelection.official(77, [[3], [9]]), BindingSelection.official(10, [BindingGroup(9, (7,))])),
]
# name/image: (loss at the start of each altered step, the latent's norm after each step, final sum, final[1, 5, 9])
OFFICIAL_TRAJECTORY = {
    "sd1-like-small/0": (
        (1.0769089880946319, 1.0918440672379723, 1.4370878161218517, 1.5180790724462618),
        (69.43695706851584, 114.12777619168422, 164.57427125991336, 215.5523503122157, 261.1258488024725,
         296.85801759249995, 321.546954986184, 321.74758437940125),
        702.8109805751894, -3.851596060369079,
    ),
    "sd1-like-small/1": (
        (0.655248658569767, 0.7478273082114267, 0.8781985742571871, 0.8119631794252159),
        (66.58114289105443, 111.00942019776811, 161.68167894056194, 212.69298020961213, 258.24128078484813,
         293.99119970812274, 318.91864102258836, 319.13254784850284),
        1071.9941687606133, -1.5503133873520154,
    ),
    "sd2-like-small/0": (
        (1.1166275125865655, 1.0284601257016075, 1.3336812085989418, 1.425067388914651),
        (70.10243846336267, 118.18889004577221, 173.56598510271203, 229.73857748677634, 280.1166720756724,
         319.921777526051, 348.3385513986389, 348.6143691728949),
        338.0683735183035, -2.499606822861938,
    ),
    "sd2-like-small/1": (
        (0.7602118465896817, 0.6750775621495425, 0.730894737530538, 0.7627608907445919),
        (71.12901865156346, 118.62835826716874, 172.73227721813402, 227.52461013051766, 276.64184937181074,
         315.34767295992106, 342.6447935704444, 342.8938386055426),
        620.1148470995313, -17.05211448459428,
    ),
}




@pytest.fixture(scope="module", params=[SD1_SMALL, SD2_SMALL], ids=lambda c: c.name)
def setup(request: pytest.FixtureRequest) -> tuple[str, torch.nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]:
    config = request.param
    unet = make_unet(config, seed=11, dtype=torch.float64)
    z, cond, uncond = make_inputs(config, batch=2)
    return config.name, unet, z, cond, uncond


def conform_engine(unet: torch.nn.Module) -> tuple[AttentionCapture, AttendAndExcite]:
    config = ExciteConfig(thresholds={0: 1.0}, scale_thresholds_with_steps=False, max_iter_to_alter=ALTER)
    capture = AttentionCapture(unet)
    return capture, AttendAndExcite(capture, Conform(config))


def run_vp(unet: torch.nn.Module, z: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor
           ) -> tuple[list[list[float]], list[list[float]], torch.Tensor]:
    capture, engine = conform_engine(unet)
    try:
        excitation, norms, z = ddim_vp(unet, engine, z, cond, uncond, STEPS, CFG, *zip(*TARGETS))
    finally:
        capture.remove()
    losses = [[r.loss[b] for r in excitation.reports if r.active] for b in range(2)]
    assert [r.refinement_iterations for r in excitation.reports if r.active][0] == [20, 20]  # every iteration runs
    return losses, norms, z  # type: ignore[return-value]


def run_sigma(unet: torch.nn.Module, z: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor
              ) -> tuple[list[list[float]], torch.Tensor]:
    capture, engine = conform_engine(unet)
    try:
        excitation, final = ddim_sigma_euler(unet, engine, z, cond, uncond, STEPS, CFG, *zip(*TARGETS))
    finally:
        capture.remove()
    losses = [[r.loss[b] for r in excitation.reports if r.active] for b in range(2)]
    return losses, final  # type: ignore[return-value]


def assert_official(name: str, losses: list[list[float]], final: torch.Tensor, norms: list[list[float]] | None,
                    rel: float) -> None:
    for b in range(2):
        want_losses, want_norms, want_sum, want_entry = OFFICIAL_TRAJECTORY[f"{name}/{b}"]
        assert losses[b] == pytest.approx(want_losses, rel=rel), f"image {b} losses"
        if norms is not None:
            assert norms[b] == pytest.approx(want_norms, rel=rel), f"image {b} norms"
        assert float(final[b].sum()) == pytest.approx(want_sum, rel=rel), f"image {b} sum"
        assert float(final[b, 1, 5, 9]) == pytest.approx(want_entry, rel=rel), f"image {b} entry"


@pytest.mark.recorded
def test_conform_in_vp_space_equals_the_official_pipeline(setup: tuple[Any, ...]) -> None:
    name, unet, z, cond, uncond = setup
    losses, norms, final = run_vp(unet, z.clone(), cond, uncond)
    assert_official(name, losses, final, norms, rel=1e-11)  # measured: 5.4e-13 at most


def test_the_previous_steps_maps_are_what_the_trajectory_needs(setup: tuple[Any, ...], monkeypatch: pytest.MonkeyPatch
                                                               ) -> None:
    """Without the carried maps (or with those of the step's first evaluation instead of its last) the engine leaves
    the official trajectory: the figures above can fail."""
    name, unet, z, cond, uncond = setup
    monkeypatch.setattr(Conform, "carries", False)
    losses, norms, final = run_vp(unet, z.clone(), cond, uncond)
    with pytest.raises(AssertionError):
        assert_official(name, losses, final, norms, rel=1e-6)


@pytest.mark.recorded
def test_conform_through_sigma_space_euler_equals_the_official_pipeline(setup: tuple[Any, ...]) -> None:
    name, unet, z, cond, uncond = setup
    losses, final = run_sigma(unet, z.clone(), cond, uncond)
    assert_official(name, losses, final, None, rel=1e-11)  # measured: 2.4e-13 at most


# --- the graph path and host reads ----------------------------------------------------------------------------------


def test_conform_replays_as_a_graph_with_the_carried_maps_and_reads_nothing_on_the_host() -> None:
    """The previous step's maps are an input of the captured evaluation (copied into its static buffers like the
    conditioning): replayed graphs give the eager latents and reports bit for bit, steps without refinement read
    nothing on the host, and the graphs are really replayed."""
    from support.host_reads import HostReads
    from support.models import SD1_LIKE
    from test_engine_graphs import ReplayingCpuBackend

    from lib_ae import GraphableRunner

    unet = make_unet(SD1_LIKE, seed=3, dtype=torch.float64)
    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, 4, 16, 16, generator=g, dtype=torch.float64)
    sigma = torch.tensor([7.0, 3.5], dtype=torch.float64)
    context = torch.randn(2, 77, SD1_LIKE.context_dim, generator=g, dtype=torch.float64)
    results = []
    for graphs in (False, True):
        backend = ReplayingCpuBackend()
        capture = AttentionCapture(unet)
        try:
            config = ExciteConfig(thresholds={}, max_refinement_iterations=2)
            engine = AttendAndExcite(capture, Conform(config), cuda_graphs=graphs, graph_backend=backend)
            excitation = InSamplerExcitation(engine, engine.plan(10), "sigma")

            def forward(latent_rows: torch.Tensor, sigma_rows: torch.Tensor, context_rows: torch.Tensor) -> None:
                unet(latent_rows / (1 + sigma_rows[:, None, None, None] ** 2) ** 0.5, sigma_rows * 50,
                     context=context_rows)

            runner = GraphableRunner(forward, (sigma, context), key="conform")
            latent = x.clone()
            reads = []
            for step in range(4):  # step 0 without previous maps, then with them
                with HostReads() as counter:
                    excitation.before_model_call(step, latent, sigma, [s for s, _ in TARGETS], runner,
                                                 bindings=[b for _, b in TARGETS])
                reads.append(counter.total)
            assert reads == [0, 0, 0, 0]
            results.append((latent, [r.loss for r in excitation.reports], backend.replays))
        finally:
            capture.remove()
    (eager, eager_losses, _), (graph, graph_losses, replays) = results
    assert replays >= 3
    assert torch.equal(eager, graph) and eager_losses == graph_losses
    assert not torch.equal(eager, x)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the graph is only captured there)")
def test_conform_cuda_graphs_equal_eager_on_cuda() -> None:
    """With real CUDA graphs (fp32 weights, fp16 autocast as the host runs them): the carried maps are read from the
    graph's static inputs, and graph == eager bit for bit over steps with and without previous maps."""
    from support.models import SD1_LIKE

    from lib_ae import GraphableRunner

    device = torch.device("cuda")
    unet = make_unet(SD1_LIKE, seed=3).to(device)
    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, 4, 64, 64, generator=g).to(device)
    sigma = torch.tensor([7.0, 3.5], device=device)
    context = torch.randn(2, 77, SD1_LIKE.context_dim, generator=g).to(device)
    results = []
    for graphs in (False, True):
        capture = AttentionCapture(unet)
        try:
            engine = AttendAndExcite(capture, Conform(ExciteConfig(thresholds={})), cuda_graphs=graphs)
            excitation = InSamplerExcitation(engine, engine.plan(10), "sigma")

            def forward(latent_rows: torch.Tensor, sigma_rows: torch.Tensor, context_rows: torch.Tensor) -> None:
                unet(latent_rows / (1 + sigma_rows[:, None, None, None] ** 2) ** 0.5, sigma_rows * 50,
                     context=context_rows)

            runner = GraphableRunner(forward, (sigma, context), key="conform-cuda")
            latent = x.clone()
            with torch.autocast("cuda", dtype=torch.float16):
                for step in range(4):
                    excitation.before_model_call(step, latent, sigma, [s for s, _ in TARGETS], runner,
                                                 bindings=[b for _, b in TARGETS])
            if graphs:
                assert engine._graphs is not None and engine._graphs.graphs and engine.graph_fallback_reason is None
            results.append((latent, [r.loss for r in excitation.reports]))
            engine.release_graphs()
        finally:
            capture.remove()
    (eager, eager_losses), (graph, graph_losses) = results
    assert torch.equal(eager, graph) and eager_losses == graph_losses
    assert not torch.equal(eager, x)
