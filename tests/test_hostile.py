"""Hostile input and faults, end to end through the stand-in A1111 host (tests/host) with the real ldm UNet and
k-diffusion samplers (random weights): every case states what the user gets.

Each case of the tables below says
* the image: `SAME` (A&E never changed the latent, so the image is bit-identical to a WebUI without the extension),
  `CHANGED` (A&E ran: it differs from that baseline, and is finite) or `FINITE` (it exists and is finite);
* the message the user sees under the infotext key "AE error" (the API returns the same text in `info`), or that
  there is none;
* what the infotext records: the A&E settings ("AE: v1" and the rest), only the error, or nothing;
and after every case `assert_no_leaks` checks that nothing stays behind for the next run: the UNet carries at most
the one idle capture, the callbacks are those registered at load, the denoiser's `forward` is the class's again,
`shared.state.textinfo` is cleared, and a following disabled run is bit-identical to the baseline with an empty
`p.extra_generation_params`.

The soak (`test_soak_200_runs_leave_nothing_behind`) runs 200 consecutive generations with random valid and invalid
settings and samplers, and bounds the growth of hooks, callbacks, Python objects, tensors and RSS; it logs its figures
on the "tests.hostile" logger (shown with `-o log_cli=true --log-cli-level=INFO`). Figures of a run of this module on
the development machine (2 shared CPU cores, torch 2.13 CPU), measured after run 20 (first captures and caches made)
and after run 200: UNet hooks 16 -> 16, script callbacks 3 -> 3, gc-tracked objects 293970 -> 293964, tensors
1854 -> 1854, RSS 504.3 -> 505.3 MiB; about 33 s of the module's 90 s. The bounds asserted: hooks and callbacks
equal, at most 16 more tensors, 2000 more objects and 64 MiB more RSS.

Requests are tiny (64x64, i.e. an 8x8 latent with 2x2 attention maps, 2 steps, at most 2 refinement iterations) so that
the whole module stays within a few minutes on a CPU.
"""

from __future__ import annotations

import gc
import logging
import math
import random
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Callable

import pytest
import torch

import lib_ae.capture
from lib_ae import AttendAndExcite, cross_attention_modules
from lib_ae.params import PARAMS
from support.webui_host import FAST, ROOT, TITLE, WebUI, ae_keys, callback_counts, embedding, hooks_on

logger = logging.getLogger("tests.hostile")

TINY: dict[str, Any] = {"prompt": "a cat and a dog", "steps": 2, "seed": 7, "width": 64, "height": 64}
"""Every request's fields unless a case overrides them."""

SAME, CHANGED, FINITE = "same", "changed", "finite"
SETTINGS, ERROR_ONLY, NOTHING = "settings", "error only", "nothing"
"""What the infotext holds: the A&E settings (and maybe an error), only "AE error", or no AE key at all."""


# ---------------------------------------------------------------------------------------------------------------------
# Fixtures and helpers


_baselines: dict[str, tuple[Any, torch.Tensor]] = {}


def baseline(host: SimpleNamespace, **fields: Any) -> torch.Tensor:
    """The request on a WebUI without the extension (no scripts at all), computed once per request and model (the
    model is kept with its entry, so that its id cannot be reused by another)."""
    request = TINY | fields
    model = host.shared.sd_model
    key = repr((id(model), sorted(request.items(), key=lambda kv: kv[0])))
    if key not in _baselines:
        _, processed = host.standin.txt2img(None, None, **request)
        _baselines[key] = (model, images_of(processed))
    return _baselines[key][1]


def capture_hooks(host: SimpleNamespace) -> int:
    """Hooks one capture puts on the loaded UNet: one per cross-attention module."""
    return len(cross_attention_modules(host.shared.sd_model.model.diffusion_model))


def ui_args(webui: WebUI, **named: Any) -> tuple[Any, ...]:
    """The UI's positional args: its defaults, FAST, then `named`."""
    return webui.args(**named)


def api_args(webui: WebUI, slot: Any) -> tuple[Any, ...]:
    """What api.py `init_script_args` (L335-361) makes of `alwayson_scripts["Attend and Excite"]["args"] = slot`: the
    UI defaults, with slot[i] written over the script's i-th arg for i < min(len(slot), number of args)."""
    return webui.host.standin.script_args(webui.runner, {TITLE: slot})


def run(webui: WebUI, args: tuple[Any, ...], **fields: Any) -> tuple[Any, Any]:
    return webui.host.standin.txt2img(webui.runner, args, **(TINY | fields))


def images_of(processed: Any) -> torch.Tensor:
    """The generated images (the stand-in's final latents), without pictures appended after them (heatmaps)."""
    return torch.stack([image for image in processed.images if isinstance(image, torch.Tensor)])


def assert_no_leaks(webui: WebUI, p: Any, **fields: Any) -> None:
    """Nothing of the run just done reaches the next one."""
    host = webui.host
    unet = host.shared.sd_model.model.diffusion_model
    assert hooks_on(unet) in (0, capture_hooks(host)), "at most the one idle capture stays on the UNet"
    assert hooks_on(host.shared.sd_model.cond_stage_model) == 0
    assert callback_counts(host) == webui.callbacks_at_load
    if p.sampler is not None:
        assert "forward" not in vars(p.sampler.model_wrap_cfg), "the denoiser's forward is the class's again"
    assert host.shared.state.textinfo is None
    after, processed = run(webui, ui_args(webui, enabled=False), **fields)
    assert torch.equal(images_of(processed), baseline(host, **fields))
    assert after.extra_generation_params == {}
    assert ae_keys(processed.infotexts[0], host) == {}


def check_outcome(
    webui: WebUI,
    processed: Any,
    fields: dict[str, Any],
    image: str,
    error: str | tuple[str, ...] | None,
    infotext: str,
) -> dict[str, str]:
    host = webui.host
    images = images_of(processed)
    reference = baseline(host, **fields)
    assert images.shape == reference.shape
    if image == SAME:
        assert torch.equal(images, reference), "A&E never changed the latent: the image must be the baseline"
    else:
        assert torch.isfinite(images).all()
        if image == CHANGED:
            assert not torch.equal(images, reference), "A&E should have changed the image"
    keys = ae_keys(processed.infotexts[0], host)
    if error is None:
        assert "AE error" not in keys, keys.get("AE error")
    else:
        assert "AE error" in keys, f"expected an AE error containing {error!r}"
        for part in (error,) if isinstance(error, str) else error:
            assert part in keys["AE error"], f"{part!r} not in {keys['AE error']!r}"
        assert ae_keys(processed.info, host)["AE error"] == keys["AE error"]  # what the API returns in `info`
    if infotext == SETTINGS:
        assert keys.get("AE") == "v1" and "AE subjects" in keys
    elif infotext == ERROR_ONLY:
        assert set(keys) == {"AE error"}
    else:
        assert keys == {}
    return keys


# ---------------------------------------------------------------------------------------------------------------------
# API / UI input


@dataclass(frozen=True)
class InputCase:
    id: str
    args: Callable[[WebUI], tuple[Any, ...]]
    image: str
    error: str | tuple[str, ...] | None
    infotext: str
    fields: dict[str, Any] = field(default_factory=dict)


def ui(**named: Any) -> Callable[[WebUI], tuple[Any, ...]]:
    return lambda webui: ui_args(webui, **named)


def api(slot: Any) -> Callable[[WebUI], tuple[Any, ...]]:
    return lambda webui: api_args(webui, slot)


def api_dict(**named: Any) -> Callable[[WebUI], tuple[Any, ...]]:
    """The API's dict form; missing keys take the spec defaults, so the refinement cap is set for speed."""
    return api([{"max_refinement_steps": 2, **named}])


ON = {"enabled": True, "subjects": "cat, dog"}
WORDS_50 = ", ".join(["cat", "dog"] + [f"thing{i}" for i in range(48)])
LONG_FILLER = " ".join(["tree"] * 80)
PROMPT_400 = " ".join(["a stone"] * 199) + " and a cat"  # 400 tokens: 6 chunks, the cat in the last
STRADDLE = " ".join(["tree"] * 74) + " red car"  # "red" is token 75 of chunk 1, "car" token 1 of chunk 2
PAIR_STRADDLE = "a cat" + " and" * 72 + " red car"  # the pair (red, car): red is token 75 of chunk 1, car token 1 of 2

INPUT_CASES: list[InputCase] = [
    # -- wrong types, through the API (JSON values) and the positional UI form
    InputCase("enabled-string-yes", api_dict(enabled="yes", subjects="cat"), SAME,
              "AE: expected true or false, got 'yes' (str)", ERROR_ONLY),
    InputCase("enabled-none", api([None, "cat"]), SAME, "AE: expected true or false, got None (NoneType)", ERROR_ONLY),
    InputCase("enabled-int", api([1, "cat"]), SAME, "AE: expected true or false, got 1 (int)", ERROR_ONLY),
    InputCase("enabled-string-true", api(["true", "cat, dog"]), CHANGED, None, SETTINGS),
    InputCase("enabled-nested-list", api([[True, "cat"]]), SAME, "got [True, 'cat'] (list)", ERROR_ONLY),
    InputCase("args-as-one-string", api("True, cat"), SAME,
              ("AE: expected true or false, got 'T' (str)", "AE scale factor: expected a number"), ERROR_ONLY),
    InputCase("subjects-number", api_dict(enabled=True, subjects=5), SAME,
              "AE subjects: expected text or a list of texts, got 5 (int)", ERROR_ONLY),
    InputCase("subjects-none", api_dict(enabled=True, subjects=None), SAME,
              "AE subjects: expected text or a list of texts, got None (NoneType)", ERROR_ONLY),
    InputCase("subjects-nested-list", api_dict(enabled=True, subjects=[["cat"]]), SAME,
              "AE subjects: item 0 of the list must be text, got ['cat'] (list)", ERROR_ONLY),
    InputCase("subjects-list", api_dict(enabled=True, subjects=["cat", "dog"]), CHANGED, None, SETTINGS),
    InputCase("scale-string-number", api_dict(**ON, scale_factor="10"), CHANGED, None, SETTINGS),
    InputCase("scale-string-text", ui(**ON, scale_factor="abc"), SAME,
              "AE scale factor: expected a number between 0 and 100, got 'abc' (str)", ERROR_ONLY),
    InputCase("iterations-fraction-string", api_dict(**ON, max_refinement_steps="2.5"), SAME,
              "AE refinement iterations: expected a whole number between 0 and 100, got '2.5' (str)", ERROR_ONLY),
    InputCase("iterations-none", ui(**ON, max_refinement_steps=None), SAME,
              "AE refinement iterations: expected a whole number between 0 and 100, got None", ERROR_ONLY),
    InputCase("kernel-list", api_dict(**ON, kernel_size=[3]), SAME, "AE kernel size: expected one of 1, 3, 5",
              ERROR_ONLY),
    InputCase("sigma-dict", api_dict(**ON, sigma={}), SAME, "AE sigma: expected a number between 0.05 and 5, got {}",
              ERROR_ONLY),
    InputCase("thresholds-number", api_dict(**ON, thresholds=0.5), SAME, "AE thresholds: expected text, got 0.5",
              ERROR_ONLY),
    InputCase("attention-size-bool", api_dict(**ON, attention_res=True), SAME,
              "AE attention size: expected a whole number between 0 and 128, got True (bool)", ERROR_ONLY),
    InputCase("smoothing-number", api_dict(**ON, smooth_attentions=0), SAME,
              "AE smoothing: expected true or false, got 0 (int)", ERROR_ONLY),
    InputCase("all-wrong-at-once", api([None, 5, "x", "y", 1, "z", 1, "s", "k", "r", 1, 1]), SAME,
              ("AE: expected true or false, got None", "AE subjects: expected text"), ERROR_ONLY),
    # -- out of range and non-finite numbers
    InputCase("iterations-negative", ui(**ON, max_refinement_steps=-1), SAME,
              "AE refinement iterations: expected a whole number between 0 and 100, got -1 (int)", ERROR_ONLY),
    InputCase("threshold-step-negative", ui(**ON, thresholds="-5:0.5"), SAME,
              "AE thresholds: in '-5:0.5' the step must be a whole number from 0 to 49", ERROR_ONLY),
    InputCase("threshold-above-one", ui(**ON, thresholds="0:1.5"), SAME,
              "AE thresholds: in '0:1.5' the threshold must be a number between 0 and 1", ERROR_ONLY),
    InputCase("threshold-nan", ui(**ON, thresholds="0:nan"), SAME,
              "AE thresholds: in '0:nan' the threshold must be a number between 0 and 1", ERROR_ONLY),
    InputCase("scale-1e9", api_dict(**ON, scale_factor=1e9), SAME,
              "AE scale factor: expected a number between 0 and 100, got 1000000000.0 (float)", ERROR_ONLY),
    InputCase("scale-nan", api_dict(**ON, scale_factor=math.nan), SAME,
              "AE scale factor: expected a number between 0 and 100, got nan (float)", ERROR_ONLY),
    InputCase("scale-inf-string", api_dict(**ON, scale_factor="inf"), SAME,
              "AE scale factor: expected a number between 0 and 100, got 'inf' (str)", ERROR_ONLY),
    InputCase("scale-negative", ui(**ON, scale_factor=-1), SAME, "AE scale factor: expected a number", ERROR_ONLY),
    InputCase("fraction-above-one", ui(**ON, alter_fraction=2), SAME,
              "AE steps fraction: expected a number between 0 and 1, got 2 (int)", ERROR_ONLY),
    InputCase("sigma-zero", ui(**ON, sigma=0), SAME, "AE sigma: expected a number between 0.05 and 5, got 0 (int)",
              ERROR_ONLY),
    InputCase("kernel-even", ui(**ON, kernel_size=4), SAME, "AE kernel size: expected one of 1, 3, 5, 7, 9, 11",
              ERROR_ONLY),
    InputCase("attention-size-too-big", ui(**ON, attention_res=129), SAME,
              "AE attention size: expected a whole number between 0 and 128, got 129 (int)", ERROR_ONLY),
    InputCase("scale-at-maximum", ui(**ON, scale_factor=100, alter_fraction=1.0), CHANGED, None, SETTINGS),
    # -- valid values the model or image cannot honour
    InputCase("attention-size-the-model-lacks", ui(**ON, attention_res=3), SAME,
              ("no cross-attention layer with 3x3 maps", "8x8, 4x4, 2x2"), SETTINGS),
    InputCase("kernel-larger-than-the-maps", ui(**ON, kernel_size=5), SAME,
              ("smoothing kernel size 5 is too large for the 2x2 attention maps", "at most 3"), SETTINGS),
    InputCase("kernel-larger-than-the-maps-no-smoothing", ui(**ON, kernel_size=5, smooth_attentions=False),
              CHANGED, None, SETTINGS),
    # -- unknown keys, too many / too few args
    InputCase("unknown-key", api_dict(**ON, scale=5), SAME,
              "AE: unknown parameter 'scale'; valid names are enabled, subjects", ERROR_ONLY),
    InputCase("non-text-key", api([{"enabled": True, "subjects": "cat", 3: 1}]), SAME,
              "AE: dict keys must be parameter names (text), got 3 (int)", ERROR_ONLY),
    InputCase("unknown-key-while-disabled", api_dict(enabled=False, bogus=1), SAME, None, NOTHING),
    InputCase("too-many-positional", api([*(({spec.name: spec.default for spec in PARAMS} | FAST | ON)[spec.name]
                                            for spec in PARAMS), "extra", 99]),
              CHANGED, None, SETTINGS),  # api.py L356-360 drops what does not fit the script's slice
    # Until issue 13 this was SAME with "AE is enabled but no subject words are given": no subjects now means
    # automatic subjects, found in the prompt (cat, dog).
    InputCase("too-few-positional", api([True]), CHANGED, None, SETTINGS),
    InputCase("empty-args", api([]), SAME, None, NOTHING),
    # -- subject words
    InputCase("empty-subjects", ui(enabled=True, subjects=" , ,, "), CHANGED, None, SETTINGS),  # automatic (issue 13)
    InputCase("auto-subjects-api", api_dict(enabled=True, subjects="auto"), CHANGED, None, SETTINGS),
    InputCase("auto-subjects-none-found", ui(enabled=True, subjects=""), SAME,
              "automatic subjects: no noun found in the prompt; type the subject words", SETTINGS,
              {"prompt": "masterpiece, best quality, 8k"}),
    InputCase("auto-subjects-empty-prompt", ui(enabled=True, subjects="auto"), SAME,
              "automatic subjects: no noun found in the prompt", SETTINGS, {"prompt": ""}),
    InputCase("duplicated-subjects", ui(enabled=True, subjects="cat, Cat, CAT , dog, cat"), CHANGED, None, SETTINGS),
    InputCase("fifty-subjects", ui(enabled=True, subjects=WORDS_50), CHANGED,
              "48 subjects are not in the prompt: 'thing0', 'thing1'", SETTINGS),
    InputCase("quoted-subject", ui(enabled=True, subjects='"cat"'), SAME, "is wrapped in double quotes", ERROR_ONLY),
    InputCase("unicode-subject", ui(enabled=True, subjects="café"), CHANGED, None, SETTINGS,
              {"prompt": "a café and a dog"}),
    InputCase("emoji-subject", ui(enabled=True, subjects="🐱, dog"), CHANGED, None, SETTINGS,
              {"prompt": "a 🐱 and a dog"}),
    InputCase("emoji-not-in-prompt", ui(enabled=True, subjects="🐶"), SAME, "subject '🐶' is not in the prompt",
              SETTINGS),
    InputCase("subject-only-inside-emphasis", ui(enabled=True, subjects="cat"), CHANGED, None, SETTINGS,
              {"prompt": "a ((cat:1.4)) and a dog"}),
    InputCase("subject-only-inside-square-emphasis", ui(enabled=True, subjects="cat, dog"), CHANGED, None, SETTINGS,
              {"prompt": "a [cat] and a (dog)"}),
    InputCase("subject-after-break", ui(enabled=True, subjects="cat"), CHANGED, None, SETTINGS,
              {"prompt": "a dog BREAK a cat"}),
    InputCase("subject-beyond-75-tokens", ui(enabled=True, subjects="cat"), CHANGED, None, SETTINGS,
              {"prompt": f"{LONG_FILLER} and a cat"}),
    InputCase("subject-split-between-chunks", ui(enabled=True, subjects="red car"), SAME,
              "subject 'red car' is split between two chunks", SETTINGS, {"prompt": STRADDLE}),
    InputCase("subject-in-a-prompt-editing-branch", ui(enabled=True, subjects="cat", alter_fraction=1.0), CHANGED,
              "subject 'cat' is not in the prompt during step 3 (prompt editing: the prompt then reads 'a  and a dog')",
              SETTINGS, {"prompt": "a [cat::0.34] and a dog", "steps": 3}),
    InputCase("subject-in-the-later-editing-branch", ui(enabled=True, subjects="dog", alter_fraction=1.0), FINITE,
              "subject 'dog' is not in the prompt during steps 1-2 (prompt editing: the prompt then reads 'a cat')",
              SETTINGS, {"prompt": "a [cat:dog:0.34]", "steps": 3}),
    InputCase("subject-in-alternation", ui(enabled=True, subjects="cat", alter_fraction=1.0), FINITE,
              "subject 'cat' is not in the prompt during step 3 (prompt editing: the prompt then reads 'a dog')",
              SETTINGS, {"prompt": "a [cat|dog]", "steps": 3}),
    InputCase("subject-in-the-second-and-subprompt", ui(enabled=True, subjects="dog"), SAME,
              "subject 'dog' is only in AND sub-prompt 2; A&E reads the first sub-prompt", SETTINGS,
              {"prompt": "a cat AND a dog"}),
    InputCase("subject-in-the-first-and-subprompt", ui(enabled=True, subjects="cat"), CHANGED, None, SETTINGS,
              {"prompt": "a cat AND a dog:0.5"}),
    InputCase("empty-prompt", ui(enabled=True, subjects="cat"), SAME, "subject 'cat' is not in the prompt", SETTINGS,
              {"prompt": ""}),
    InputCase("prompt-of-400-tokens", ui(enabled=True, subjects="cat, stone"), CHANGED, None, SETTINGS,
              {"prompt": PROMPT_400}),
    InputCase("substring-of-a-word", ui(enabled=True, subjects="ca"), SAME, "subject 'ca' is not in the prompt",
              SETTINGS),
    # -- binding (AE method bind / excite+bind): what cannot be bound is said, the image is always produced
    InputCase("bind-without-any-modifier", ui(enabled=True, subjects="", method="bind"), SAME,
              "bind: the prompt has no modifier to bind", SETTINGS),
    InputCase("bind-without-a-modifier-of-the-subjects", ui(enabled=True, subjects="dog", method="bind"), SAME,
              "bind: no modifier of the subjects ('dog') to bind; the prompt's modifiers belong to 'car'", SETTINGS,
              {"prompt": "a red car and a dog"}),
    InputCase("bind-modifier-not-in-the-prompt", ui(enabled=True, subjects="", method="excite+bind",
                                                     alter_fraction=1.0), CHANGED,
              "bind: modifier 'red' is not in the prompt; the pair ('red', 'car') is not bound during step 3 "
              "(prompt editing: the prompt then reads 'a blue car and a dog')", SETTINGS,
              {"prompt": "a [red:blue:0.5] car and a dog", "steps": 3}),
    InputCase("bind-pair-straddles-chunks", ui(enabled=True, subjects="", method="excite+bind"), CHANGED,
              "bind: modifier 'red' and its noun 'car' are in different chunks of the prompt (75-token limit or "
              "BREAK); they are bound, but the text encoder read them apart", SETTINGS, {"prompt": PAIR_STRADDLE}),
    InputCase("bind-alone-modifier-not-in-the-prompt", ui(enabled=True, subjects="", method="bind",
                                                          alter_fraction=1.0), CHANGED,
              "bind: modifier 'red' is not in the prompt; the pair ('red', 'car') is not bound during step 3", SETTINGS,
              {"prompt": "a [red:blue:0.5] car and a dog", "steps": 3}),
    InputCase("bind-alone-pair-straddles-chunks", ui(enabled=True, subjects="", method="bind"), CHANGED,
              "bind: modifier 'red' and its noun 'car' are in different chunks of the prompt", SETTINGS,
              {"prompt": PAIR_STRADDLE}),
    InputCase("bind-method-unknown", api_dict(**ON, method="syngen"), SAME,
              "AE method: expected one of excite, bind, excite+bind, conform, initno, initno+selfcross, conform+selfcross, got 'syngen' (str)", ERROR_ONLY),
    InputCase("bind-step-size-negative", api_dict(**ON, method="bind", bind_step_size=-1), SAME,
              "AE bind step size: expected a number between 0 and 100, got -1 (int)", ERROR_ONLY),
]


@pytest.mark.parametrize("case", INPUT_CASES, ids=[c.id for c in INPUT_CASES])
def test_input(webui: WebUI, case: InputCase) -> None:
    p, processed = run(webui, case.args(webui), **case.fields)
    check_outcome(webui, processed, case.fields, case.image, case.error, case.infotext)
    assert_no_leaks(webui, p, **case.fields)


def test_api_request_is_setup_without_ui(webui: WebUI) -> None:
    """p.is_api: setup runs with is_ui=False (api.py L468-487); the outcome is the same as from the UI."""
    p, processed = run(webui, api_args(webui, [{"enabled": True, "subjects": "zebra"}]), is_api=True)
    check_outcome(webui, processed, {}, SAME, "subject 'zebra' is not in the prompt", SETTINGS)
    assert_no_leaks(webui, p)


@pytest.mark.parametrize(
    ("subjects", "image", "error"),
    [
        ("kittystyle", CHANGED, None),  # the embedding's name: its vectors' columns are the subject
        ("kittystyle, dog", CHANGED, None),
        ("kitty", SAME, "subject 'kitty' is part of the textual-inversion embedding 'kittystyle'"),
    ],
)
def test_subject_and_textual_inversion(webui: WebUI, subjects: str, image: str, error: str | None) -> None:
    embedding(webui.host, "kittystyle", 2)
    fields = {"prompt": "a kittystyle and a dog"}
    p, processed = run(webui, ui_args(webui, enabled=True, subjects=subjects), **fields)
    check_outcome(webui, processed, fields, image, error, SETTINGS)
    assert_no_leaks(webui, p, **fields)


# ---------------------------------------------------------------------------------------------------------------------
# Faults


class NanGradient(torch.autograd.Function):
    """Identity forward, NaN backward: a finite loss whose gradient is not."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return torch.full_like(grad, math.nan)


def in_ae_pass() -> bool:
    """Whether the UNet is being run by A&E's gradient pass (the sampler's own calls run under no_grad)."""
    return torch.is_grad_enabled()


@dataclass
class FaultLog:
    """What an injected fault saw: how often it fired, the refinement iterations it watched, its hook's handle."""

    calls: int = 0
    iterations: list[int] = field(default_factory=list)
    handle: Any = None


def fault_nan_maps(webui: WebUI, monkeypatch: pytest.MonkeyPatch, log: FaultLog) -> None:
    real = lib_ae.capture.attention_probabilities

    def nan_maps(*args: Any) -> torch.Tensor:
        log.calls += 1
        return real(*args) * math.nan

    monkeypatch.setattr(lib_ae.capture, "attention_probabilities", nan_maps)


def fault_nan_gradient(webui: WebUI, monkeypatch: pytest.MonkeyPatch, log: FaultLog) -> None:
    block = webui.host.shared.sd_model.model.diffusion_model.input_blocks[0]

    def hook(module: Any, args: Any, output: torch.Tensor) -> torch.Tensor | None:
        if in_ae_pass():
            log.calls += 1
            return NanGradient.apply(output)
        return None

    log.handle = block.register_forward_hook(hook)


def raising_in_ae_pass(error: BaseException) -> Callable[[WebUI, pytest.MonkeyPatch, FaultLog], None]:
    def install(webui: WebUI, monkeypatch: pytest.MonkeyPatch, log: FaultLog) -> None:
        block = webui.host.shared.sd_model.model.diffusion_model.middle_block

        def hook(module: Any, args: Any) -> None:
            if in_ae_pass():
                log.calls += 1
                raise error

        log.handle = block.register_forward_pre_hook(hook)

    return install


def raising_from_step(step: int) -> Callable[[WebUI, pytest.MonkeyPatch, FaultLog], None]:
    """A RuntimeError in the A&E pass from sampler step `step` (0-based) on."""

    def install(webui: WebUI, monkeypatch: pytest.MonkeyPatch, log: FaultLog) -> None:
        real = AttendAndExcite.step

        def step_then_fail(self: AttendAndExcite, latent: torch.Tensor, i: int, *args: Any, **kwargs: Any) -> Any:
            log.calls += 1
            if i >= step:
                raise RuntimeError("injected failure")
            return real(self, latent, i, *args, **kwargs)

        monkeypatch.setattr(AttendAndExcite, "step", step_then_fail)

    return install


def state_flag_during_refinement(flag: str) -> Callable[[WebUI, pytest.MonkeyPatch, FaultLog], None]:
    """Interrupt / Skip pressed while the first refinement loop runs (set from its on_iteration callback)."""

    def install(webui: WebUI, monkeypatch: pytest.MonkeyPatch, log: FaultLog) -> None:
        real = AttendAndExcite.step
        state_holder = webui.host.shared

        def step(self: AttendAndExcite, *args: Any, on_iteration: Any = None, **kwargs: Any) -> Any:
            def pressed(step_index: int, iteration: int) -> None:
                log.iterations.append(iteration)
                if on_iteration is not None:
                    on_iteration(step_index, iteration)
                setattr(state_holder.state, flag, True)

            return real(self, *args, on_iteration=pressed, **kwargs)

        monkeypatch.setattr(AttendAndExcite, "step", step)

    return install


@dataclass(frozen=True)
class FaultCase:
    id: str
    install: Callable[[WebUI, pytest.MonkeyPatch, FaultLog], None]
    image: str
    error: str | tuple[str, ...] | None
    settings: dict[str, Any] = field(default_factory=dict)
    fields: dict[str, Any] = field(default_factory=dict)
    check: Callable[[FaultLog, Any], None] | None = None


def stopped_after_first_iteration(log: FaultLog, p: Any) -> None:
    assert log.iterations == [1], "the refinement loop stops at the first check after the button"


def off_after_the_failure(log: FaultLog, p: Any) -> None:
    assert log.calls == 1, "A&E is off for the rest of the pass after a failure"


def recomputed_then_off(log: FaultLog, p: Any) -> None:
    """Out of memory while keeping the activations ("auto"): the evaluation is made once more with recomputation
    (lib_ae.pass_memory), and after that second failure A&E is off for the rest of the pass."""
    assert log.calls == 2, "one retry with recomputation, then off"


FAULT_CASES: list[FaultCase] = [
    FaultCase("nan-attention-maps", fault_nan_maps, SAME,
              "non-finite attention loss or gradient at step 1; that update was skipped"),
    FaultCase("nan-gradient", fault_nan_gradient, SAME,
              "non-finite attention loss or gradient at step 1; that update was skipped"),
    FaultCase("cuda-oom-in-the-grad-pass", raising_in_ae_pass(torch.cuda.OutOfMemoryError("CUDA out of memory. "
              "Tried to allocate 20.00 GiB\nmore lines")), SAME,
              ("ran out of memory at step 1", "sampling went on without A&E", "lower the batch size or image size",
               "already recomputed"),
              check=recomputed_then_off),
    FaultCase("exception-in-the-extra-unet-pass", raising_in_ae_pass(RuntimeError("boom in the UNet")), SAME,
              "A&E stopped at step 1 (RuntimeError: boom in the UNet); sampling went on without it",
              check=off_after_the_failure),
    FaultCase("exception-at-a-later-step", raising_from_step(1), CHANGED,
              "A&E stopped at step 2 (RuntimeError: injected failure)", {"alter_fraction": 1.0}),
    FaultCase("interrupt-during-refinement", state_flag_during_refinement("interrupted"), FINITE, None,
              {"thresholds": "0:0.99", "max_refinement_steps": 5}, check=stopped_after_first_iteration),
    FaultCase("skip-during-refinement", state_flag_during_refinement("skipped"), FINITE, None,
              {"thresholds": "0:0.99", "max_refinement_steps": 5}, check=stopped_after_first_iteration),
]


@pytest.mark.parametrize("case", FAULT_CASES, ids=[c.id for c in FAULT_CASES])
def test_fault(webui: WebUI, monkeypatch: pytest.MonkeyPatch, case: FaultCase) -> None:
    log = FaultLog()
    case.install(webui, monkeypatch, log)
    try:
        p, processed = run(webui, ui_args(webui, enabled=True, subjects="cat, dog", **case.settings), **case.fields)
    finally:
        if log.handle is not None:
            log.handle.remove()
    assert log.calls or log.iterations, "the fault was injected"
    check_outcome(webui, processed, case.fields, case.image, case.error, SETTINGS)
    if case.check is not None:
        case.check(log, p)
    monkeypatch.undo()
    assert_no_leaks(webui, p, **case.fields)


def test_skip_ends_only_the_current_image(webui: WebUI, monkeypatch: pytest.MonkeyPatch) -> None:
    """Skip in batch 1 of 2: the second batch (seed 8) still gets the full A&E, bit for bit as when run alone."""
    settings = {"enabled": True, "subjects": "cat, dog", "thresholds": "0:0.99", "max_refinement_steps": 2}
    _, alone = run(webui, ui_args(webui, **settings), seed=8)
    log = FaultLog()
    real = AttendAndExcite.step
    shared = webui.host.shared

    def step(self: AttendAndExcite, *args: Any, on_iteration: Any = None, **kwargs: Any) -> Any:
        def pressed(step_index: int, iteration: int) -> None:
            log.iterations.append(iteration)
            if len(log.iterations) == 1:
                shared.state.skipped = True

        return real(self, *args, on_iteration=pressed, **kwargs)

    monkeypatch.setattr(AttendAndExcite, "step", step)
    p, processed = run(webui, ui_args(webui, **settings), n_iter=2)
    assert len(processed.images) == 2 and torch.isfinite(images_of(processed)).all()
    assert torch.equal(processed.images[1], alone.images[0])
    monkeypatch.undo()
    assert_no_leaks(webui, p)


def test_failure_in_one_image_of_a_batch_of_4(webui: WebUI) -> None:
    """Image 3's A&E pass goes non-finite: its update is skipped and named; images 1, 2 and 4 still get A&E."""
    prompts = ["a cat and a dog", "a cat and a dog", "a dog and a cat", "a cat and a dog"]
    fields = {"prompt": prompts, "batch_size": 4}
    model = webui.host.shared.sd_model
    context_of_image_3 = model.get_learned_conditioning([prompts[2]])[0]

    def poison(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        context = kwargs.get("context")
        if not in_ae_pass() or context is None:
            return None
        rows = [r for r in range(context.shape[0]) if torch.equal(context[r], context_of_image_3)]
        x = args[0].clone()
        x[rows] = math.nan  # the UNet's batch rows are independent: only image 3's loss and gradient are NaN
        return (x, *args[1:]), kwargs

    handle = model.model.diffusion_model.register_forward_pre_hook(poison, with_kwargs=True)
    try:
        p, processed = run(webui, ui_args(webui, enabled=True, subjects="cat, dog"), **fields)
    finally:
        handle.remove()
    images, reference = images_of(processed), baseline(webui.host, **fields)
    assert [torch.equal(images[b], reference[b]) for b in range(4)] == [False, False, True, False]
    error = ae_keys(processed.infotexts[0], webui.host)["AE error"]
    assert "non-finite attention loss or gradient at step 1; that update was skipped (image 3)" in error
    assert "(image 1)" not in error and "(image 2)" not in error and "(image 4)" not in error
    assert_no_leaks(webui, p, **fields)


def test_model_switched_between_runs(webui: WebUI) -> None:
    """A new checkpoint is a new UNet object: the old UNet loses our hooks, the new one gets them, once."""
    host = webui.host
    old = host.shared.sd_model
    args = ui_args(webui, enabled=True, subjects="cat, dog")
    run(webui, args)
    assert hooks_on(old.model.diffusion_model) == capture_hooks(host)
    new = host.standin.StandInSdModel(seed=1)
    host.shared.sd_model = new
    try:
        p, processed = run(webui, args)
        check_outcome(webui, processed, {}, CHANGED, None, SETTINGS)
        assert hooks_on(old) == 0
        assert hooks_on(new.model.diffusion_model) == capture_hooks(host)
        assert_no_leaks(webui, p)
    finally:
        host.shared.sd_model = old
    p, processed = run(webui, args)  # and back
    check_outcome(webui, processed, {}, CHANGED, None, SETTINGS)
    assert hooks_on(new) == 0 and hooks_on(old.model.diffusion_model) == capture_hooks(host)


@pytest.mark.parametrize("unload_callback", [True, False], ids=["as-a1111-does", "old-module-never-cleaned-up"])
def test_reload_ui_twice(webui: WebUI, unload_callback: bool) -> None:
    """Reload UI (webui.py L151: script_unloaded callbacks, then scripts re-imported and the UI rebuilt) twice: the
    callbacks are registered once and the UNet carries one capture, also when an old module never cleaned up."""
    host = webui.host
    args = ui_args(webui, enabled=True, subjects="cat, dog")
    _, first = run(webui, args)
    at_load = dict(webui.callbacks_at_load)
    for _ in range(2):
        if unload_callback:
            host.script_callbacks.script_unloaded_callback()
        webui.runner = host.standin.load_extension(ROOT)
        webui.script = webui.runner.script(TITLE)
        assert callback_counts(host) == at_load
        p, processed = run(webui, ui_args(webui, enabled=True, subjects="cat, dog"))
        assert torch.equal(images_of(processed), images_of(first))
        assert hooks_on(host.shared.sd_model.model.diffusion_model) == capture_hooks(host)
    assert_no_leaks(webui, p)


def test_ui_built_twice_for_the_api_defaults(webui: WebUI) -> None:
    """api.py L315-333 calls every script's ui() twice more for its default args: nothing is registered again."""
    before = callback_counts(webui.host)
    for _ in range(2):
        controls = webui.script.ui(False)
        assert [c.value for c in controls] == [spec.default for spec in PARAMS]
    assert callback_counts(webui.host) == before


# ---------------------------------------------------------------------------------------------------------------------
# Soak


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


def census() -> tuple[int, int]:
    gc.collect()
    objects = gc.get_objects()
    return len(objects), sum(1 for o in objects if isinstance(o, torch.Tensor))


SOAK_RUNS = 200
SOAK_WARMUP = 20
SOAK_VALID = [
    {"enabled": True, "subjects": "cat, dog"},
    {"enabled": True, "subjects": "cat", "thresholds": "none"},
    {"enabled": True, "subjects": "dog, zebra", "max_refinement_steps": 1},
    {"enabled": True, "subjects": "cat", "smooth_attentions": False, "attention_res": 4},
    {"enabled": False, "subjects": "cat"},
    {"enabled": False},
]
SOAK_INVALID = [
    {"enabled": True, "subjects": ""},
    {"enabled": True, "subjects": "cat", "scale_factor": "abc"},
    {"enabled": "yes", "subjects": "cat"},
    {"enabled": True, "subjects": "cat", "kernel_size": 5},
    {"enabled": True, "subjects": "cat", "attention_res": 3},
    {"enabled": True, "subjects": 5, "sigma": math.nan},
]
SOAK_SAMPLERS = ["Euler", "Euler a", "DPM++ 2M", "DDIM", "DPM fast"]


def test_soak_200_runs_leave_nothing_behind(webui: WebUI) -> None:
    host = webui.host
    rng = random.Random(0)
    unet = host.shared.sd_model.model.diffusion_model
    ae_loggers = [logging.getLogger(name) for name in ("lib_ae", "lib_ae.webui")]
    levels = [lg.level for lg in ae_loggers]
    for lg in ae_loggers:
        lg.setLevel(logging.CRITICAL)  # pytest keeps every captured record: not what is measured here
    counts: list[tuple[int, int, int, int, int]] = []
    try:
        for i in range(SOAK_RUNS):
            pool = SOAK_VALID if rng.random() < 0.6 else SOAK_INVALID
            settings = dict(rng.choice(pool))
            fields = {"steps": 1, "sampler_name": rng.choice(SOAK_SAMPLERS), "seed": rng.randrange(1000)}
            if rng.random() < 0.5:
                p, processed = run(webui, api_args(webui, [{"max_refinement_steps": 1} | settings]), **fields)
            else:
                p, processed = run(webui, ui_args(webui, **({"max_refinement_steps": 1} | settings)), **fields)
            assert torch.isfinite(images_of(processed)).all()
            assert hooks_on(unet) in (0, capture_hooks(host))
            assert "forward" not in vars(p.sampler.model_wrap_cfg)
            del p, processed
            if i in (SOAK_WARMUP - 1, SOAK_RUNS - 1):  # after a warm-up (first captures, caches), and at the end
                objects, tensors = census()
                counts.append((hooks_on(unet), sum(callback_counts(host).values()), objects, tensors, rss_bytes()))
    finally:
        for lg, level in zip(ae_loggers, levels):
            lg.setLevel(level)
    (hooks0, callbacks0, objects0, tensors0, rss0), (hooks1, callbacks1, objects1, tensors1, rss1) = counts
    logger.info(
        "soak: %d runs (figures after run %d and after run %d): UNet hooks %d -> %d, callbacks %d -> %d, "
        "gc objects %d -> %d, tensors %d -> %d, RSS %.1f -> %.1f MiB",
        SOAK_RUNS, SOAK_WARMUP, SOAK_RUNS, hooks0, hooks1, callbacks0, callbacks1, objects0, objects1, tensors0,
        tensors1, rss0 / 2**20, rss1 / 2**20,
    )
    assert hooks1 == hooks0 and callbacks1 == callbacks0
    assert tensors1 - tensors0 <= 16
    assert objects1 - objects0 <= 2000
    assert rss1 - rss0 <= 64 * 2**20
    assert_no_leaks(webui, SimpleNamespace(sampler=None))



def test_unwrap_leaves_another_extensions_wrapper_alone(webui: WebUI) -> None:
    """post_sample removes only our wrapper: one set before ours comes back, one set on top of ours stays (and ours,
    still in its chain, is inert once its pass is released)."""

    class Denoiser(torch.nn.Module):
        def forward(self, x: torch.Tensor, sigma: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            return x + 1

    calls: list[str] = []
    sampling_pass = SimpleNamespace(before_model_call=lambda x, sigma, kwargs: calls.append("ae"))
    den = Denoiser()
    webui.adapter("sampling_pass").wrap_forward(den, sampling_pass)
    webui.adapter("sampling_pass").unwrap_forward(den)
    assert "forward" not in vars(den)

    def theirs_before(x: torch.Tensor, sigma: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return Denoiser.forward(den, x, sigma, **kwargs)

    den.forward = theirs_before
    webui.adapter("sampling_pass").wrap_forward(den, sampling_pass)
    webui.adapter("sampling_pass").unwrap_forward(den)
    assert vars(den)["forward"] is theirs_before

    del den.forward
    webui.adapter("sampling_pass").wrap_forward(den, sampling_pass)
    ours = den.forward

    def theirs_after(x: torch.Tensor, sigma: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return ours(x, sigma, **kwargs)

    den.forward = theirs_after
    webui.adapter("sampling_pass").unwrap_forward(den)
    assert vars(den)["forward"] is theirs_after
    assert torch.equal(den(torch.zeros(1), torch.zeros(1)), torch.ones(1))
