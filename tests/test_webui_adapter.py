"""The host adapter lib_ae/webui through the stand-in A1111 host (tests/host): its layering, the token view, and the
rough edges of issue 12 item 6 (a refused sampler costs nothing, one kernel-size message, the trace of an interrupted
run and of the hires fix pass, a second dict in the API args) and the CUDA-graph guard's host side."""

from __future__ import annotations

import importlib

import ast
import json
import logging
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from lib_ae import AttendAndExcite, AttentionCapture
from lib_ae.params import PARAMS
from support.webui_host import ROOT, TITLE, WebUI, ae_keys, embedding, emulated_hires_pass, hooks_on

LIB = ROOT / "lib_ae"


# ---------------------------------------------------------------------------------------------------------------------
# Layering


DYNAMIC = "<dynamic module access>"
"""What `imported_modules` reports for a module reached at run time by a name it cannot read (sys.modules[x],
importlib.import_module(x), __import__(x) with x not a literal): it could be any host module."""


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def imported_modules(path: Path) -> set[str]:
    """The modules a file imports or reaches: import statements, and run-time access through `sys.modules`
    (subscript, .get), `importlib.import_module` and `__import__` (the literal name, else DYNAMIC)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            if node.module in ("sys", "importlib") and any(a.name in ("modules", "import_module") for a in node.names):
                names.add(DYNAMIC)  # `from sys import modules`: every use below is a run-time lookup
        elif isinstance(node, ast.Subscript) and _dotted(node.value) == "sys.modules":
            key = node.slice
            names.add(key.value if isinstance(key, ast.Constant) and isinstance(key.value, str) else DYNAMIC)
        elif isinstance(node, ast.Call):
            function = _dotted(node.func)
            if function in ("sys.modules.get", "sys.modules.pop", "sys.modules.setdefault", "importlib.import_module",
                            "import_module", "__import__", "importlib.__import__"):
                first = node.args[0] if node.args else None
                literal = isinstance(first, ast.Constant) and isinstance(first.value, str)
                names.add(first.value if literal else DYNAMIC)  # type: ignore[union-attr]
        elif isinstance(node, ast.Attribute) and _dotted(node) == "sys.modules":
            names.add(DYNAMIC)  # any other use (iteration, `in`) may reach any module
    return names


def test_the_import_reader_sees_run_time_access(tmp_path: Path) -> None:
    source = tmp_path / "sample.py"
    source.write_text(
        "import sys, importlib\n"
        "a = sys.modules.get('modules.sd_unet')\n"
        "b = sys.modules['modules.shared']\n"
        "c = importlib.import_module('modules.devices')\n"
        "d = __import__('modules.paths')\n"
        "e = sys.modules.get(name)\n"
    )
    assert imported_modules(source) == {
        "sys", "importlib", "modules.sd_unet", "modules.shared", "modules.devices", "modules.paths", DYNAMIC,
    }


def test_only_the_host_facade_imports_the_webui() -> None:
    importers = {
        path.relative_to(ROOT).as_posix()
        for path in LIB.rglob("*.py")
        if any(name == "modules" or name.startswith("modules.") for name in imported_modules(path))
    }
    assert importers == {"lib_ae/webui/host.py"}
    dynamic = {
        path.relative_to(ROOT).as_posix()
        for path in [*LIB.rglob("*.py"), *(ROOT / "scripts").glob("*.py")]
        if DYNAMIC in imported_modules(path)
    }
    # A module found by a run-time name could be a host module: only the facades look modules up like that, and the
    # ComfyUI-layout pass, which takes the UNet's module from the UNet's own class (lib_ae/comfy_unet.py).
    assert dynamic <= {"lib_ae/webui/host.py", "lib_ae/comfy_unet.py"}, dynamic
    core = [path for path in LIB.glob("*.py")]
    for path in core:  # the core imports neither the adapter nor gradio
        assert not any(n.startswith(("lib_ae.webui", "gradio")) for n in imported_modules(path)), path.name
    script = imported_modules(ROOT / "scripts" / "attend_and_excite.py")
    assert not any(name.startswith("modules") for name in script)  # the script goes through lib_ae.webui.host too
    assert len((ROOT / "scripts" / "attend_and_excite.py").read_text().splitlines()) <= 250


# ---------------------------------------------------------------------------------------------------------------------
# Token view


def token_view(webui: WebUI, prompt: str, subjects: str, steps: int = 20, method: str | None = None) -> str:
    """The view as the browser gets it: the hidden button's click handler called with the JSON the javascript
    writes and the subjects textbox's value."""
    accordion = webui.runner.inputs[webui.script.args_from].accordion
    refresh = next(c for c in accordion.children if (c.elem_id or "").endswith("attend_and_excite_tokens_refresh"))
    (listener,) = refresh.listeners
    view, request, subjects_box = listener["outputs"][0], *listener["inputs"]
    assert view.elem_id.endswith("_tokens") and not request.visible and subjects_box.label == PARAMS[1].label
    request_data: dict[str, Any] = {"prompt": prompt, "subjects": subjects, "steps": steps}
    if method is not None:
        request_data["method"] = method
    return str(listener["fn"](json.dumps(request_data), subjects))


def legend(html: str) -> list[str]:
    return re.findall(r"<span class='ae-legend[^']*'[^>]*>([^<]*)</span>", html)


def test_token_view_adds_no_script_argument(webui: WebUI) -> None:
    assert webui.script.args_to - webui.script.args_from == len(PARAMS)


def test_token_view_shows_the_subject_columns_and_what_is_missing(webui: WebUI) -> None:
    html = token_view(webui, "a cat and a (red car:1.3) <lora:thing:0.8>", "cat, red car, zebra")
    assert legend(html) == ["cat: column 2", "red car: columns 5-6", "zebra: not found"]
    assert "data-ae-col='2'" in html and "ae-subject ae-subject-0" in html
    assert "ae-token-weighted" in html  # the emphasis is shown on the subject's tokens
    assert "lora" not in html  # extra-network tags are not conditioning


def test_token_view_finds_a_textual_inversion_embedding_like_generation(webui: WebUI) -> None:
    """The view used to locate subjects without the prompt's embeddings: an embedding named as the subject showed
    "not found" while generation excited it."""
    embedding(webui.host, "kittystyle", 2)
    html = token_view(webui, "a kittystyle and a dog", "kittystyle, dog")
    assert legend(html) == ["kittystyle: columns 2-3", "dog: column 6"]
    assert "ae-token-embedding" in html


def test_token_view_reports_invalid_input_without_raising(webui: WebUI, monkeypatch: pytest.MonkeyPatch) -> None:
    html = token_view(webui, "a cat", '"cat"')
    assert "ae-tokens-problem" in html and "double quotes" in html
    handler = webui.adapter("token_view").token_view_request
    assert "ae-tokens" in handler("not json", "cat") and "ae-tokens" in handler("[1, 2]", "cat")
    monkeypatch.setattr(webui.host.shared, "sd_model", None)
    assert "No model is loaded" in handler(json.dumps({"prompt": "a cat"}), "cat")


@pytest.mark.parametrize("subjects", ["", "auto"])
def test_token_view_marks_suggested_subjects(webui: WebUI, subjects: str) -> None:
    html = token_view(webui, "a photo of a cat and a (dog:1.2)", subjects)
    assert legend(html) == ["cat: column 5, suggested", "dog: column 8, suggested"]
    assert html.count("data-ae-suggested='1'") == 4  # two legend entries, two tokens
    assert "ae-subject ae-subject-0 ae-suggested" in html and "click to fix it" in html
    # The note says what the box holds: a pasted "AE subjects: auto" writes "auto" into it.
    assert ("the subject box says auto" if subjects else "the subject box is empty") in html
    typed = token_view(webui, "a photo of a cat and a (dog:1.2)", "cat")
    assert legend(typed) == ["cat: column 5"] and "ae-suggested" not in typed


def test_token_view_shows_each_bound_modifier_with_its_noun(webui: WebUI) -> None:
    prompt = "a red car and a blue bench"
    html = token_view(webui, prompt, "", method="bind")
    # red (column 2) -> car (3), blue (6) -> bench (7); each modifier in its noun's colour, with the noun's name.
    assert "data-ae-col='2' data-ae-word='red' data-ae-noun='car'" in html
    assert "data-ae-col='6' data-ae-word='blue' data-ae-noun='bench'" in html
    assert "ae-modifier ae-subject-0" in html and "ae-modifier ae-subject-1" in html
    assert "&#8594;car</sup>" in html and "&#8594;bench</sup>" in html
    assert "data-ae-noun" not in token_view(webui, prompt, "", method="excite")  # binding is off: no modifier shown
    only_car = token_view(webui, prompt, "car", method="excite+bind")
    assert "data-ae-noun='car'" in only_car and "data-ae-noun='bench'" not in only_car  # the subjects' modifiers
    nothing = token_view(webui, "a cat and a dog", "", method="bind")
    assert "bind: the prompt has no modifier to bind" in nothing
    bad = token_view(webui, prompt, "", method="syngen")
    assert "ae-tokens-problem" in bad and "AE method: expected one of excite, bind, excite+bind" in bad
    assert legend(bad) == ["car: column 3, suggested", "bench: column 7, suggested"]  # the subjects are still shown


def test_token_view_and_generation_share_one_subject_pipeline(webui: WebUI, monkeypatch: pytest.MonkeyPatch) -> None:
    subjects = importlib.import_module("lib_ae.targeting")
    calls: list[tuple[str, ...]] = []
    real = subjects.SubjectFinder.locate

    def spy(self: Any, tokens: Any, entry: int, names: Any = None) -> Any:
        calls.append(tuple(self.subjects if names is None else names))
        return real(self, tokens, entry, names)

    monkeypatch.setattr(subjects.SubjectFinder, "locate", spy)
    token_view(webui, "a cat and a dog", " cat ,, Cat , dog")
    webui.run(webui.args(enabled=True, subjects=" cat ,, Cat , dog"))
    assert calls == [("cat", "dog"), ("cat", "dog")]  # parsed once, the same typed subjects on both sides


# ---------------------------------------------------------------------------------------------------------------------
# Issue 12 item 6


def test_refused_sampler_installs_nothing(webui: WebUI, monkeypatch: pytest.MonkeyPatch) -> None:
    unet = webui.host.model.model.diffusion_model
    webui.run(webui.args(enabled=True, subjects="cat"))
    assert hooks_on(unet) > 0  # an idle capture from the run before
    made: list[str] = []
    for cls in (AttendAndExcite, AttentionCapture):
        original = cls.__init__

        def counting(self: Any, *a: Any, _original: Any = original, _name: str = cls.__name__, **kw: Any) -> None:
            made.append(_name)
            _original(self, *a, **kw)

        monkeypatch.setattr(cls, "__init__", counting)
    monkeypatch.setattr(importlib.import_module("lib_ae.targeting"), "encode_schedule", lambda *a: made.append("tokens"))
    for sampler in ("DPM fast", "DPM adaptive"):  # UniPC and Restart are not in the stand-in
        p, _ = webui.run(webui.args(enabled=True, subjects="cat"), sampler_name=sampler)
        assert f"sampler {sampler} is not supported" in p.extra_generation_params["AE error"]
        assert made == []  # no capture, no engine, no tokenizing
        assert hooks_on(unet) == 0  # no hook of ours meets the refused run's model calls
        assert "forward" not in vars(p.sampler.model_wrap_cfg)
        state = webui.adapter("run_state").existing_state(p)  # holds the parameters, parsed once by process
        assert state.passes == [] and state.visuals == {} and state.pictures == []  # no pass recorded


def test_kernel_too_large_is_said_once(webui: WebUI, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO):
        p, _ = webui.run(webui.args(enabled=True, subjects="cat", kernel_size=15))  # 4x4 maps at 128x128
    lines = [r.getMessage() for r in caplog.records if "too large" in r.getMessage()]
    assert len(lines) == 1
    assert lines[0].endswith(p.extra_generation_params["AE error"])


def test_interrupted_run_says_so_in_the_trace(webui: WebUI, monkeypatch: pytest.MonkeyPatch) -> None:
    real = AttendAndExcite.step
    state = webui.host.shared.state

    def step(self: AttendAndExcite, *args: Any, **kwargs: Any) -> Any:
        result = real(self, *args, **kwargs)
        state.interrupted = True  # Interrupt pressed during the first step
        return result

    monkeypatch.setattr(AttendAndExcite, "step", step)
    p, processed = webui.run(webui.args(enabled=True, subjects="cat", thresholds="none"))
    trace = ae_keys(processed.infotexts[0], webui.host)["AE trace"]
    assert trace.startswith("interrupted after 1 step,")


def test_hires_pass_has_its_own_trace(webui: WebUI) -> None:
    """With "Also on the hires fix pass", the infotext says what A&E did there (emulated hires pass, as in
    test_extension.test_hires_pass_is_excited_only_when_asked)."""
    from modules.scripts import PostSampleArgs

    p, _ = webui.run(webui.args(enabled=True, subjects="cat", apply_to_hires=True))
    assert "AE hires trace" not in p.extra_generation_params
    sampled = emulated_hires_pass(webui, p)
    p.scripts.post_sample(p, PostSampleArgs(sampled))
    hires = p.extra_generation_params["AE hires trace"](index=0)
    assert re.fullmatch(r"3 steps, refinement \d/\d/\d, final min attention [01]\.\d\d", hires)
    assert "forward" not in vars(p.sampler.model_wrap_cfg)


def test_second_dict_in_the_api_args_is_an_ae_error(webui: WebUI) -> None:
    slot = [{"enabled": True, "subjects": "cat"}, {"scale_factor": 30}]
    p, processed = webui.run(webui.host.standin.script_args(webui.runner, {TITLE: slot}))
    error = ae_keys(processed.infotexts[0], webui.host)["AE error"]
    assert "arg 2 is a dict too" in error and "scale_factor" in error


# ---------------------------------------------------------------------------------------------------------------------
# CUDA graphs: the host's part of the guard


def test_allowed_forward_patches_are_a1111s_own(webui: WebUI) -> None:
    safety = webui.adapter("graph_safety")

    def made_in(module: str) -> Any:
        def forward(self: Any, x: Any) -> Any:
            return x

        forward.__module__ = module
        return forward

    for module in safety.ALLOWED_FORWARD_MODULES:
        assert safety.allowed_forward(torch.nn.Linear, made_in(module)), module
    for module in ("scripts.controlnet", "freeu", "__main__", "modules.sd_hijack_checkpoint"):
        assert not safety.allowed_forward(torch.nn.Linear, made_in(module)), module


def _condfunc_lambda(substitute_module: str) -> Any:
    """What A1111's CondFunc (modules/sd_hijack_utils.py) leaves in place of a patched forward: a lambda of that module
    whose closure holds the CondFunc, which holds the substitute."""

    def substitute(orig_func: Any, self: Any, x: Any) -> Any:
        return orig_func(self, x)

    substitute.__module__ = substitute_module

    class CondFunc:
        def __init__(self) -> None:
            self.__sub_func = substitute

    held = CondFunc()
    patched = lambda *args, **kwargs: held(*args, **kwargs)  # noqa: E731
    patched.__module__ = "modules.sd_hijack_utils"
    return patched


def test_a1111s_condfunc_upcasts_are_allowed_and_foreign_condfuncs_are_not(webui: WebUI) -> None:
    safety = webui.adapter("graph_safety")
    assert safety.allowed_forward(torch.nn.GroupNorm, _condfunc_lambda("modules.sd_hijack_unet"))
    assert not safety.allowed_forward(torch.nn.GroupNorm, _condfunc_lambda("scripts.some_extension"))
    not_a_condfunc = lambda *args: None  # noqa: E731
    not_a_condfunc.__module__ = "modules.sd_hijack_utils"
    assert not safety.allowed_forward(torch.nn.GroupNorm, not_a_condfunc)


def test_a1111s_instance_level_unet_forward_is_not_a_hazard(webui: WebUI) -> None:
    """sd_hijack.py sets `diffusion_model.forward = sd_unet.create_unet_forward(...)` on the instance; with no sd_unet
    replacement selected it calls the original forward, and the guard must stay quiet (seen on the H200 webui)."""
    from lib_ae.graphs import find_graph_hazards

    safety = webui.adapter("graph_safety")
    unet = torch.nn.Sequential(torch.nn.Linear(2, 2))
    original = unet.forward

    def UNetModel_forward(*args: Any, **kwargs: Any) -> Any:
        return original(*args, **kwargs)

    UNetModel_forward.__module__ = "modules.sd_unet"
    unet.forward = UNetModel_forward
    assert find_graph_hazards(unet, is_own=lambda fn: False, allowed_forward=safety.allowed_forward) == []
    UNetModel_forward.__module__ = "scripts.hook"  # ControlNet's forward_webui
    assert find_graph_hazards(unet, is_own=lambda fn: False, allowed_forward=safety.allowed_forward)


def test_graphs_are_off_under_medvram_and_it_is_said_once(
    webui: WebUI, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    sampling_pass, host_facade = webui.adapter("sampling_pass"), webui.adapter("host")
    monkeypatch.setattr(host_facade, "on_cuda", lambda: True)
    p = SimpleNamespace(sd_model=webui.host.model)
    assert sampling_pass.use_cuda_graphs(p)
    monkeypatch.setattr(webui.host.shared, "cmd_opts", SimpleNamespace(medvram=True), raising=False)
    with caplog.at_level(logging.WARNING):
        assert not sampling_pass.use_cuda_graphs(p)
        assert not sampling_pass.use_cuda_graphs(p)
    assert [r.getMessage() for r in caplog.records if "--medvram" in r.getMessage()] != []
    assert len([r for r in caplog.records if "--medvram" in r.getMessage()]) == 1


def test_eager_evaluation_under_medvram_is_in_the_trace(webui: WebUI, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(webui.adapter("host"), "on_cuda", lambda: True)
    monkeypatch.setattr(webui.host.shared, "cmd_opts", SimpleNamespace(lowvram=True), raising=False)
    p, processed = webui.run(webui.args(enabled=True, subjects="cat"))
    trace = ae_keys(processed.infotexts[0], webui.host)["AE trace"]
    assert trace.endswith("no CUDA graph (--lowvram moves UNet blocks between devices)")


def test_engine_fallback_reason_is_in_the_trace(webui: WebUI, monkeypatch: pytest.MonkeyPatch) -> None:
    """Once the engine reports why it fell back to eager evaluation (`graph_fallback_reason`), the trace says it."""
    reason = property(lambda self: "a forward hook on input_blocks.4 that is not ours")
    monkeypatch.setattr(AttendAndExcite, "graph_fallback_reason", reason)
    p, processed = webui.run(webui.args(enabled=True, subjects="cat"))
    assert ae_keys(processed.infotexts[0], webui.host)["AE trace"].endswith(
        "no CUDA graph (a forward hook on input_blocks.4 that is not ours)"
    )


# ---------------------------------------------------------------------------------------------------------------------
# The pass's memory (lib_ae.pass_memory) from A1111's settings


def test_pass_memory_follows_the_settings(webui: WebUI, monkeypatch: pytest.MonkeyPatch) -> None:
    """The mode from our setting (an unknown value is `auto`), never recomputation under --lowvram, and the pass's own
    attention with A1111's upcast setting and, when hypernetworks are loaded, their transform of the context."""
    import sys
    import types

    from lib_ae.pass_memory import PassAttention, PassMemory
    from lib_ae.webui import sampling_pass

    shared = webui.host.shared
    assert sampling_pass.pass_memory() == PassMemory("auto", PassAttention(False, None))
    monkeypatch.setitem(shared.opts.data, "ae_pass_memory", "recompute")
    monkeypatch.setitem(shared.opts.data, "upcast_attn", True)
    assert sampling_pass.pass_memory() == PassMemory("recompute", PassAttention(True, None))
    monkeypatch.setitem(shared.opts.data, "ae_pass_memory", "fastest")
    assert sampling_pass.pass_memory().mode == "auto"
    monkeypatch.setattr(shared, "cmd_opts", SimpleNamespace(lowvram=True), raising=False)
    assert sampling_pass.pass_memory().mode == "keep"

    applied: list[Any] = []
    hypernetwork = types.ModuleType("modules.hypernetworks.hypernetwork")

    def apply_hypernetworks(loaded: Any, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        applied.append(loaded)
        return context * 2, context * 3

    hypernetwork.apply_hypernetworks = apply_hypernetworks  # type: ignore[attr-defined]
    package = types.ModuleType("modules.hypernetworks")
    package.hypernetwork = hypernetwork  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "modules.hypernetworks", package)
    monkeypatch.setitem(sys.modules, "modules.hypernetworks.hypernetwork", hypernetwork)
    monkeypatch.setattr(shared, "loaded_hypernetworks", ["a hypernetwork"], raising=False)
    transform = sampling_pass.pass_memory().attention.context_for_kv  # type: ignore[union-attr]
    assert transform is not None
    k, v = transform(torch.ones(1))
    assert (float(k), float(v)) == (2.0, 3.0) and applied == [["a hypernetwork"]]


def test_the_trace_says_when_activations_were_recomputed(webui: WebUI, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(webui.host.shared.opts.data, "ae_pass_memory", "recompute")
    _, processed = webui.run(webui.args(enabled=True, subjects="cat"))
    assert "activations recomputed to save memory" in ae_keys(processed.infotexts[0], webui.host)["AE trace"]
    monkeypatch.setitem(webui.host.shared.opts.data, "ae_pass_memory", "keep")
    _, processed = webui.run(webui.args(enabled=True, subjects="cat"))
    assert "recomputed" not in ae_keys(processed.infotexts[0], webui.host)["AE trace"]
