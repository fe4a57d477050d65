"""The A&E pass replayed as a graph beside sd-webui-controlnet (lib_ae/webui/controlnet.py, GraphConditions).

ControlNet's UNet forward decides per call which units apply. A CUDA graph replays the decisions taken while it was
captured, so the CPU stand-in here (`FreezingBackend`) replays with the units' on/off state pinned to what it was at
capture: a graph path that does not key its graphs by that state gives a different latent from eager evaluation
once a unit's guidance window ends inside A&E's steps, and the tests below see it. The stand-in `UnetHook` has the
shape of sd-webui-controlnet's (scripts/hook.py at 56cec5b2): `model.forward = forward_webui.__get__(model)`, whose
closure holds `forward`, whose closure holds the hook; `unmark_prompt_context` looked up in the module's globals and
reading the mark on the host. The real ControlNet runs in the GPU webui suite (tests/webui-gpu-h200.json,
"controlnet"): graphs on == off pixels with a window covering A&E's steps and with one ending inside them.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch as th
from ldm.modules.diffusionmodules.util import timestep_embedding
from support.models import SD1_LIKE, make_unet
from support.webui_host import WebUI
from test_engine_graphs import ReplayingCpuBackend

from lib_ae import AttendAndExcite, AttentionCapture, ExciteConfig, TokenSelection
from lib_ae.graphs import GraphableRunner, GraphConditions, find_graph_hazards, owned_by
from lib_ae.webui import controlnet

MARK = 1024.0
LDM_EMBEDDING = timestep_embedding
HOOK_GLOBALS = globals()
"""The stand-in hook's module namespace (ControlNet's hook.py), where `capture_scope` swaps `unmark_prompt_context`."""
SIDE = 16
host_reads = {"count": 0}


def unmark_prompt_context(x: torch.Tensor) -> tuple[torch.Tensor, list[int], list[int], torch.Tensor]:
    """As ControlNet's: a first row of +1024 marks the conditional prompt; the check reads the mark on the host (a
    sync, which a capture cannot hold: it raises while "capturing")."""
    if controlnet.stream_capturing():
        raise RuntimeError("operation not permitted when stream is capturing")
    host_reads["count"] += 1
    marked = bool((x[:, 0, :].abs() - MARK).abs().mean().cpu() < 1e-3)
    if not marked:
        return torch.ones(x.shape[0], 1, 1, 1, dtype=x.dtype), [], list(range(x.shape[0])), x
    positive = ((x[:, 0, :] + MARK).abs().mean(dim=1) > 1e-3).to(x.dtype)
    rows = positive.tolist()
    return (
        positive[:, None, None, None],
        [i for i, v in enumerate(rows) if v < 0.5],
        [i for i, v in enumerate(rows) if v >= 0.5],
        x[:, 1:, :],
    )


ORIGINAL_UNMARK = unmark_prompt_context


class UnitType:
    def __init__(self, name: str) -> None:
        self.name = name


class Unit:
    """A ControlParams-like unit: a 'network' (a conv over the latent and hint) with its window state."""

    def __init__(self, seed: int, kind: str = "ControlNet", preprocessor: str = "canny") -> None:
        g = torch.Generator().manual_seed(seed)
        self.control_model = torch.nn.Conv2d(8, 4, 3, padding=1, dtype=torch.float64)
        with torch.no_grad():
            self.control_model.weight.copy_(torch.randn(self.control_model.weight.shape, generator=g) * 0.1)
        self.hint_cond = torch.randn(1, 4, SIDE, SIDE, generator=g, dtype=torch.float64)
        self.hr_hint_cond = None
        self.control_model_type = UnitType(kind)
        self.preprocessor = {"name": preprocessor}
        self.guidance_stopped = False
        self.weight = 1.0
        self.soft_injection = False
        self.cfg_injection = False
        self.advanced_weighting = None
        self.hr_option = "BOTH"


class UnetHook:
    def __init__(self, units: list[Unit]) -> None:
        self.lowvram = False
        self.control_params = units
        self.attn_module_list: list[Any] = []
        self.gn_module_list: list[Any] = []

    def guidance_schedule_handler(self, x: Any) -> None:
        pass

    def hook(self, model: torch.nn.Module) -> None:
        outer = self
        original = model.forward

        def forward(self: torch.nn.Module, x: torch.Tensor, timesteps: Any = None, context: Any = None) -> Any:
            _, _, _, context = unmark_prompt_context(context)
            timestep_embedding(timesteps, 8)  # hook.py's own (ldm util's: its table built on the host)
            residual: Any = 0
            for param in outer.control_params:
                if param.guidance_stopped:
                    continue
                hint = param.hint_cond.expand(x.shape[0], -1, -1, -1)
                residual = residual + param.weight * param.control_model(torch.cat([x, hint], dim=1))
            with th.no_grad():  # as ControlNet computes the UNet's encoder
                base = x * 1.0
            return original(base + residual, timesteps, context=context)

        def forward_webui(*args: Any, **kwargs: Any) -> Any:
            return forward(*args, **kwargs)

        model.forward = forward_webui.__get__(model, type(model))  # type: ignore[method-assign]


@contextlib.contextmanager
def capturing() -> Iterator[None]:
    saved = controlnet.stream_capturing
    controlnet.stream_capturing = lambda: True  # type: ignore[assignment]
    try:
        yield
    finally:
        controlnet.stream_capturing = saved  # type: ignore[assignment]


class FreezingBackend(ReplayingCpuBackend):
    """CudaGraphBackend's order (a warm-up, then the capture, "capturing"), and a replay that, like a CUDA graph's,
    applies the units that were on at capture, whatever they are now."""

    def __init__(self, hook: UnetHook) -> None:
        super().__init__()
        self.hook = hook

    def capture(self, latent: torch.Tensor, inputs: tuple[torch.Tensor, ...], compute: Any, pool: Any) -> Any:
        frozen = [unit.guidance_stopped for unit in self.hook.control_params]

        def pinned(static_latent: torch.Tensor, static_inputs: tuple[torch.Tensor, ...]) -> Any:
            now = [unit.guidance_stopped for unit in self.hook.control_params]
            for unit, value in zip(self.hook.control_params, frozen):
                unit.guidance_stopped = value
            try:
                return compute(static_latent, static_inputs)
            finally:
                for unit, value in zip(self.hook.control_params, now):
                    unit.guidance_stopped = value

        compute(latent.detach().clone(), tuple(t.detach().clone() for t in inputs))  # the warm-up
        with capturing():
            return super().capture(latent, inputs, pinned, pool)


SELECTIONS = [TokenSelection.official(77, [[2], [5]])]


@pytest.fixture()
def unet() -> Iterator[torch.nn.Module]:
    model = make_unet(SD1_LIKE, seed=5, dtype=torch.float64)
    yield model


def marked_context() -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    context = torch.randn(1, 77, SD1_LIKE.context_dim, generator=g, dtype=torch.float64)
    return torch.cat([torch.full_like(context[:, :1], MARK), context], dim=1)


def steps_with_a_window_ending(
    unet: torch.nn.Module, hook: UnetHook, *, use_graphs: bool, conditions: Any, stop_after: int | None
) -> tuple[list[torch.Tensor], FreezingBackend, AttendAndExcite]:
    """Four A&E steps; unit 0's guidance window ends after step `stop_after` (as ControlNet's
    guidance_schedule_handler would set it between steps)."""
    capture = AttentionCapture(unet)
    backend = FreezingBackend(hook)
    engine = AttendAndExcite(
        capture, ExciteConfig(thresholds={}), cuda_graphs=use_graphs, graph_backend=backend, graph_guard=conditions
    )
    g = torch.Generator().manual_seed(9)
    latent = torch.randn(1, 4, SIDE, SIDE, generator=g, dtype=torch.float64)
    context = marked_context()
    latents = []
    try:
        for step, t in enumerate((700.0, 650.0, 600.0, 550.0)):
            hook.control_params[0].guidance_stopped = stop_after is not None and step > stop_after
            timestep = torch.tensor([t], dtype=torch.float64)
            runner: Any = GraphableRunner(lambda z, tt, c: run_with_scope(unet, z, tt, c), (timestep, context), key="cn")
            if not use_graphs:
                runner = runner.__call__
            latent, _ = engine.step(latent, step, engine.plan(10), SELECTIONS, runner, gradient_scale=[3.0])
            latents.append(latent)
    finally:
        capture.remove()
    return latents, backend, engine


def run_with_scope(unet: torch.nn.Module, z: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> Any:
    with controlnet.pass_scope(unet, sys.modules.get):  # as the webui's cond_forward calls the UNet
        return unet(z, t, context=c)


def conditions_for(unet: torch.nn.Module, *, with_state: bool = True, with_scope: bool = True) -> GraphConditions:
    def state() -> Any:
        hook = controlnet.hook_on(unet)
        return controlnet.step_state(hook) if with_state and hook is not None else None

    def scope() -> Any:
        hook = controlnet.hook_on(unet)
        return controlnet.capture_scope(hook, unet) if with_scope and hook is not None else contextlib.nullcontext()

    return GraphConditions(lambda: None, state, scope)


@pytest.mark.parametrize("stop_after", [None, 1], ids=["window-covers-the-steps", "window-ends-inside"])
def test_graphs_beside_controlnet_equal_eager(unet: torch.nn.Module, stop_after: int | None) -> None:
    hook = UnetHook([Unit(1), Unit(2)])
    hook.hook(unet)
    eager, _, _ = steps_with_a_window_ending(unet, hook, use_graphs=False, conditions=None, stop_after=stop_after)
    graph, backend, engine = steps_with_a_window_ending(
        unet, hook, use_graphs=True, conditions=conditions_for(unet), stop_after=stop_after
    )
    assert engine.graph_fallback_reason is None
    for a, b in zip(eager, graph):
        assert torch.equal(a, b)
    assert backend.replays == 4
    assert len(backend.graphs) == (1 if stop_after is None else 2), "one capture per ControlNet state"
    assert HOOK_GLOBALS["unmark_prompt_context"] is ORIGINAL_UNMARK  # restored


def test_without_the_state_in_the_key_the_replay_would_keep_a_stopped_unit(unet: torch.nn.Module) -> None:
    """What the state key prevents: the graph captured while unit 0 was on, replayed after its window ended."""
    hook = UnetHook([Unit(1), Unit(2)])
    hook.hook(unet)
    eager, _, _ = steps_with_a_window_ending(unet, hook, use_graphs=False, conditions=None, stop_after=1)
    graph, backend, _ = steps_with_a_window_ending(
        unet, hook, use_graphs=True, conditions=conditions_for(unet, with_state=False), stop_after=1
    )
    assert len(backend.graphs) == 1
    assert torch.equal(eager[1], graph[1]) and not torch.equal(eager[2], graph[2])


def test_the_capture_cannot_hold_controlnets_host_read_without_the_scope(unet: torch.nn.Module) -> None:
    hook = UnetHook([Unit(1)])
    hook.hook(unet)
    eager, _, _ = steps_with_a_window_ending(unet, hook, use_graphs=False, conditions=None, stop_after=None)
    graph, backend, engine = steps_with_a_window_ending(
        unet, hook, use_graphs=True, conditions=conditions_for(unet, with_scope=False), stop_after=None
    )
    assert "graph capture failed" in (engine.graph_fallback_reason or "")
    assert backend.replays == 0
    for a, b in zip(eager, graph):  # evaluated eagerly instead: the same latents
        assert torch.equal(a, b)


def test_the_substitute_answers_only_what_the_warm_up_found(unet: torch.nn.Module) -> None:
    hook = UnetHook([Unit(1)])
    hook.hook(unet)
    context = marked_context()
    with controlnet.capture_scope(hook, unet):
        substitute = HOOK_GLOBALS["unmark_prompt_context"]
        assert substitute is not ORIGINAL_UNMARK
        with capturing(), pytest.raises(controlnet.GraphUnsafe):
            substitute(context)  # no warm-up with these shapes
        reads = host_reads["count"]
        warm = substitute(context)
        assert host_reads["count"] == reads + 1
        with capturing():
            ones, uncond, cond, unmarked = substitute(context)
        assert host_reads["count"] == reads + 1, "no host read while capturing"
        assert torch.equal(ones, warm[0]) and uncond == warm[1] == [] and cond == warm[2] == [0]
        assert torch.equal(unmarked, warm[3]) and unmarked.shape[1] == 77
        negative = context.clone()
        negative[:, 0] = -MARK
        substitute(negative)  # an unconditional row: not answered while capturing
        with capturing(), pytest.raises(controlnet.GraphUnsafe):
            substitute(negative)
    assert HOOK_GLOBALS["unmark_prompt_context"] is ORIGINAL_UNMARK


def test_the_state_names_every_per_call_decision(unet: torch.nn.Module) -> None:
    unit = Unit(1)
    hook = UnetHook([unit, Unit(2)])
    hook.hook(unet)
    assert controlnet.hook_on(unet) is hook
    assert controlnet.is_hook_forward(hook, vars(unet)["forward"])
    assert not controlnet.is_hook_forward(UnetHook([]), vars(unet)["forward"])
    before = controlnet.step_state(hook)
    assert controlnet.step_state(hook) == before
    unit.used_hint_cond = unit.hint_cond  # set lazily by ControlNet at its first call: no new state
    assert controlnet.step_state(hook) == before
    for change in (
        lambda: setattr(unit, "guidance_stopped", True),
        lambda: setattr(unit, "weight", 0.5),
        lambda: setattr(unit, "soft_injection", True),
        lambda: setattr(unit, "cfg_injection", True),
        lambda: setattr(unit, "hint_cond", unit.hint_cond.clone()),
        lambda: setattr(unit, "hr_option", "LOW_RES_ONLY"),
        lambda: setattr(unit, "advanced_weighting", [0.5] * 13),
    ):
        saved = dict(vars(unit))
        change()
        assert controlnet.step_state(hook) != before
        vars(unit).update(saved)
        assert controlnet.step_state(hook) == before
    assert controlnet.hook_on(make_unet(SD1_LIKE, seed=1)) is None


@pytest.mark.parametrize(
    ("unit", "expected"),
    [
        (Unit(1, "AttentionInjection", "reference_only"), "keeps state"),
        (Unit(1, "IPAdapter", "ip-adapter_clip"), "keeps state"),
        (Unit(1, "ReVision", "revision_clipvision"), "keeps state"),
        (Unit(1, "ControlNet", "inpaint_only+lama"), "VAE"),
        (Unit(1, "ControlNet", "t2ia_color_grid"), None),
        (Unit(1, "T2I_Adapter", "t2ia_sketch_pidi"), None),
        (Unit(1, "ControlNetUnion", "canny"), None),
    ],
)
def test_units_whose_forward_keeps_state_are_not_replayed(
    unet: torch.nn.Module, unit: Unit, expected: str | None
) -> None:
    hook = UnetHook([Unit(2), unit])
    hook.hook(unet)
    reasons = controlnet.graph_blockers(hook, unet)
    if expected is None:
        assert reasons == []
    else:
        assert len(reasons) == 1 and expected in reasons[0] and "unit 1" in reasons[0]
    hook.lowvram = True
    assert any("low-VRAM" in r for r in controlnet.graph_blockers(hook, unet))


def test_the_webui_guard_allows_controlnets_forward_only_for_graph_safe_units(
    webui: WebUI, monkeypatch: pytest.MonkeyPatch
) -> None:
    safety = webui.adapter("graph_safety")
    monkeypatch.setattr(webui.adapter("controlnet"), "GRAPH_REPLAY", True)  # the module the loaded script uses
    unet = make_unet(SD1_LIKE, seed=5)  # float32: no dtype hooks of the float64 test UNet
    capture = AttentionCapture(unet)
    try:
        sd_model = SimpleNamespace(model=SimpleNamespace(diffusion_model=unet))
        conditions = safety.guard_for(capture, sd_model)
        assert conditions.guard() is None and conditions.state() is None
        hook = UnetHook([Unit(1)])
        hook.hook(unet)
        assert conditions.guard() is None
        assert conditions.state() == controlnet.step_state(hook)
        assert find_graph_hazards(unet, is_own=owned_by(capture), allowed_forward=safety.allowed_forward)
        hook.control_params.append(Unit(2, "AttentionInjection", "reference_only"))
        assert "keeps state" in " ".join(conditions.guard() or [])
        hook.control_params.pop()
        hook.control_params[0].control_model.register_forward_hook(lambda *args: None)
        assert "ControlNet unit 0's network" in " ".join(conditions.guard() or [])
    finally:
        capture.remove()


def test_with_replay_switched_off_the_guard_refuses_controlnets_forward(webui: WebUI,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    safety = webui.adapter("graph_safety")
    unet = make_unet(SD1_LIKE, seed=5)
    capture = AttentionCapture(unet)
    try:
        UnetHook([Unit(1)]).hook(unet)
        conditions = safety.guard_for(capture, SimpleNamespace(model=SimpleNamespace(diffusion_model=unet)))
        assert webui.adapter("controlnet").GRAPH_REPLAY  # on since the GPU run showed graph == eager
        assert conditions.guard() is None
        monkeypatch.setattr(webui.adapter("controlnet"), "GRAPH_REPLAY", False)
        assert "switched off" in " ".join(conditions.guard() or [])
    finally:
        capture.remove()


def test_the_pass_keeps_the_gradient_through_controlnets_no_grad_encoder(unet: torch.nn.Module) -> None:
    """With every unit outside its window ControlNet's forward leaves nothing of the latent with a gradient (its
    encoder runs under no_grad): the real webui stopped A&E there. Within `pass_scope` the step is the one the UNet
    gives without ControlNet."""
    g = torch.Generator().manual_seed(9)
    latent = torch.randn(1, 4, SIDE, SIDE, generator=g, dtype=torch.float64)
    timestep = torch.tensor([700.0], dtype=torch.float64)
    context = marked_context()

    def step(use_scope: bool) -> torch.Tensor:
        capture = AttentionCapture(unet)
        try:
            engine = AttendAndExcite(capture, ExciteConfig(thresholds={}))

            def run(z: torch.Tensor, rows: torch.Tensor) -> Any:
                if use_scope:
                    return run_with_scope(unet, z, timestep, context)
                return unet(z, timestep, context=context if "forward" in vars(unet) else context[:, 1:])

            moved, _ = engine.step(latent, 0, engine.plan(10), SELECTIONS, run, gradient_scale=[3.0])
            return moved
        finally:
            capture.remove()

    without_controlnet = step(False)
    hook = UnetHook([Unit(1)])
    hook.hook(unet)
    hook.control_params[0].guidance_stopped = True
    with pytest.raises(RuntimeError, match="does not require grad"):
        step(False)
    assert torch.equal(step(True), without_controlnet)
    assert not torch.equal(without_controlnet, latent)
    assert HOOK_GLOBALS["th"] is torch and HOOK_GLOBALS["timestep_embedding"] is timestep_embedding


def test_the_scope_gives_hook_py_the_device_side_embedding(unet: torch.nn.Module) -> None:
    hook = UnetHook([Unit(1)])
    hook.hook(unet)
    t = torch.tensor([3.0, 700.0], dtype=torch.float64)
    with controlnet.pass_scope(unet, sys.modules.get):
        inside = HOOK_GLOBALS["timestep_embedding"]
        assert inside is not LDM_EMBEDDING and HOOK_GLOBALS["th"] is not torch
        assert torch.equal(inside(t, 9), LDM_EMBEDDING(t, 9)) and inside(t, 9).dtype == torch.float32
        with HOOK_GLOBALS["th"].no_grad():
            assert torch.is_grad_enabled()
        assert HOOK_GLOBALS["th"].cat is torch.cat
    assert HOOK_GLOBALS["timestep_embedding"] is LDM_EMBEDDING and HOOK_GLOBALS["th"] is torch
