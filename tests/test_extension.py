"""The WebUI extension (scripts/attend_and_excite.py) driven through the stand-in A1111 host of tests/host.

The host stand-in loads the script file the way A1111 does, builds its UI, and runs txt2img: the script hooks in
A1111's order around a real k-diffusion sampler and CFG denoiser over a tiny random-weight CompVis UNet
(tests/support/models.py). Images are the final latents (no VAE), 16x16 for a 128x128 "image".
"""

from __future__ import annotations

import importlib

import re
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from lib_ae.in_sampler import seeded_noise
from lib_ae import AttendAndExcite, AttentionCapture, InSamplerExcitation, StepClock
from lib_ae.objectives import objective_for
from lib_ae.tokens import locate_bindings
from lib_ae.params import PARAMS, AEParams
from lib_ae.webui.wire import from_infotext, from_script_args, to_infotext
from lib_ae.tokens import locate_subjects
from support.webui_host import DEFAULT_FIELDS, FAST, PROMPT, ROOT, TITLE, WebUI, ae_keys, hooks_on

_baselines: dict[str, torch.Tensor] = {}


def baseline(host: SimpleNamespace, **fields: Any) -> torch.Tensor:
    """The same request on a WebUI that has no extension: no scripts at all (p.scripts is None). Deterministic, so
    computed once per request."""
    request = DEFAULT_FIELDS | fields
    key = repr(sorted(request.items()))
    if key not in _baselines:
        _, processed = host.standin.txt2img(None, None, **request)
        _baselines[key] = torch.stack(processed.images)
    return _baselines[key]



# ---------------------------------------------------------------------------------------------------------------------
# UI and settings


def test_ui_is_generated_from_the_params_spec(webui: WebUI) -> None:
    script = webui.script
    assert script is not None and script.alwayson
    controls = webui.runner.inputs[script.args_from : script.args_to]
    assert len(controls) == len(PARAMS)
    for control, spec in zip(controls, PARAMS):
        assert control.label == spec.label
        if spec.name == "enabled":
            # InputAccordion: the hidden checkbox has the "-checkbox" id, the accordion the plain one (L96-118)
            assert control.elem_id == "script_txt2img_attend_and_excite_enabled-checkbox"
            assert control.accordion.elem_id == "script_txt2img_attend_and_excite_enabled"
        else:
            assert control.elem_id == f"script_txt2img_attend_and_excite_{spec.name}"
        assert control.value == spec.default
        if spec.kind in ("int", "float"):
            assert (control.minimum, control.maximum, control.step) == (spec.minimum, spec.maximum, spec.step)
    assert len({c.label for c in controls}) == len(controls)  # ui-config.json keys are label-based
    # Infotext paste: text/number parameters by key (so "Send to img2img" copies them), booleans through readers.
    keys = [key for _, key in script.infotext_fields]
    assert [k for k in keys if isinstance(k, str)] == script.paste_field_names
    assert all(callable(k) for k, spec in zip(keys, PARAMS) if spec.kind == "bool" or spec.absent_means_default)
    # Settings: one default per advanced parameter, in the extension's own section.
    labels = webui.host.shared.opts.data_labels
    assert labels["ae_default_scale_factor"].section == ("attend_and_excite", TITLE)
    assert "ae_default_enabled" not in labels and "ae_default_subjects" not in labels


def test_settings_give_the_initial_values(host: SimpleNamespace) -> None:
    host.standin.reset_host(host.model)
    host.shared.opts.data["ae_default_scale_factor"] = 12.5
    host.shared.opts.data["ae_default_kernel_size"] = 4  # not odd: ignored with a warning
    runner = host.standin.load_extension(ROOT)
    script = runner.script(TITLE)
    values = dict(zip([s.name for s in PARAMS], runner.default_args()[script.args_from : script.args_to]))
    assert values["scale_factor"] == 12.5
    assert values["kernel_size"] == 3
    host.script_callbacks.script_unloaded_callback()


def test_infotext_paste_readers(webui: WebUI) -> None:
    host = webui.host
    params = from_script_args([{"enabled": True, "subjects": "cat, dog", "smooth_attentions": False, "sigma": 0.75}])
    line = ", ".join(f"{k}: {host.infotext_utils.quote(v)}" for k, v in to_infotext(params).items())
    fields = host.infotext_utils.parse_generation_parameters(f"{PROMPT}\nSteps: 4, Sampler: Euler, Seed: 1, {line}")
    pasted: dict[str, Any] = {}
    for (control, key), spec in zip(webui.script.infotext_fields, PARAMS):
        value = key(fields) if callable(key) else fields.get(key)
        # A1111 casts string values to the control's type (infotext_utils.connect_paste L504-515).
        valtype = type(control.value)
        pasted[spec.name] = value if callable(key) else float(value) if valtype is int else valtype(value)
    assert AEParams(**pasted) == params
    no_ae = host.infotext_utils.parse_generation_parameters(f"{PROMPT}\nSteps: 4, Sampler: Euler, Seed: 1")
    readers = {spec.name: key for (_, key), spec in zip(webui.script.infotext_fields, PARAMS) if callable(key)}
    assert readers["enabled"](no_ae) is False  # pasting parameters without A&E switches it off
    assert readers["smooth_attentions"](no_ae) is None  # other values stay as they are


# ---------------------------------------------------------------------------------------------------------------------
# Generation


def test_enabled_run_changes_the_latent_and_writes_infotext(webui: WebUI) -> None:
    reference = baseline(webui.host)
    p, processed = webui.run(webui.args(enabled=True, subjects="cat, dog"))
    assert not torch.equal(torch.stack(processed.images), reference)
    keys = ae_keys(processed.infotexts[0], webui.host)
    assert "AE error" not in keys
    requested = from_script_args(webui.args(enabled=True, subjects="cat, dog")[1:]).as_dict()
    assert from_infotext(keys) == requested | {"normalize_eot": "off"}  # auto, as resolved for this SD1 model
    assert hooks_on(webui.host.model.model.diffusion_model) > 0  # the capture stays on the UNet, idle


def test_disabled_run_is_bit_identical_and_leaves_no_trace(webui: WebUI) -> None:
    reference = baseline(webui.host)
    # Invalid values next to a disabled flag are not even looked at.
    p, processed = webui.run(webui.args(enabled=False, subjects="zebra", scale_factor="abc"))
    assert torch.equal(torch.stack(processed.images), reference)
    assert ae_keys(processed.infotexts[0], webui.host) == {}
    assert p.extra_generation_params == {}
    assert "forward" not in vars(p.sampler.model_wrap_cfg)  # the denoiser's class forward, unwrapped
    assert hooks_on(webui.host.model) == 0
    assert not hasattr(p, webui.adapter("run_state").RUN_STATE_ATTRIBUTE)  # no state at all


def test_enabled_then_disabled_is_still_bit_identical(webui: WebUI) -> None:
    reference = baseline(webui.host)
    webui.run(webui.args(enabled=True, subjects="cat"))
    assert hooks_on(webui.host.model) > 0  # idle hooks left on the UNet by the enabled run
    p, processed = webui.run(webui.args(enabled=False))
    assert torch.equal(torch.stack(processed.images), reference)


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"scale_factor": "abc"}, "AE scale factor: expected a number"),
        # ({"subjects": ""}, "no subject words") was here: empty subjects now mean automatic subjects (issue 13),
        # see test_empty_subjects_are_found_in_the_prompt; an automatic search that finds nothing is this case:
        ({"subjects": "", "prompt": "masterpiece, 8k"}, "automatic subjects: no noun found in the prompt"),
        ({"subjects": "zebra"}, "subject 'zebra' is not in the prompt"),
    ],
)
def test_invalid_args_still_produce_the_image(webui: WebUI, values: dict[str, Any], expected: str) -> None:
    fields = {"prompt": values.pop("prompt")} if "prompt" in values else {}
    reference = baseline(webui.host, **fields)
    p, processed = webui.run(webui.args(enabled=True, **values), **fields)
    assert torch.equal(torch.stack(processed.images), reference)  # A&E did nothing, the image is there
    error = ae_keys(processed.infotexts[0], webui.host)["AE error"]
    assert expected in error


@pytest.mark.parametrize("subjects", ["", "auto", " Auto "])
def test_empty_subjects_are_found_in_the_prompt(webui: WebUI, subjects: str) -> None:
    # The same update as typing the subjects the suggestion finds: the same columns, the same loss.
    _, typed = webui.run(webui.args(enabled=True, subjects="cat, dog"))
    p, automatic = webui.run(webui.args(enabled=True, subjects=subjects))
    assert torch.equal(torch.stack(automatic.images), torch.stack(typed.images))
    assert not torch.equal(torch.stack(automatic.images), baseline(webui.host))
    keys = ae_keys(automatic.infotexts[0], webui.host)
    assert keys["AE subjects"] == "auto" and keys["AE subjects used"] == "cat, dog"
    assert "AE error" not in keys and "AE bindings" not in keys
    assert "AE subjects used" not in ae_keys(typed.infotexts[0], webui.host)  # only beside "auto"
    text = automatic.infotexts[0]
    assert text.index("AE subjects: auto") < text.index("AE subjects used") < text.index("AE scale factor")
    assert from_infotext(keys) == from_script_args([True, ""]).as_dict() | {"max_refinement_steps": 2,
                                                                            "normalize_eot": "off"}


def test_automatic_subjects_per_image_of_a_batch(webui: WebUI) -> None:
    prompts = ["a cat and a dog", "a photo of a red car on a (bench:1.2)"]
    p, processed = webui.run(webui.args(enabled=True, subjects=""), prompt=prompts, batch_size=2)
    used = [ae_keys(text, webui.host)["AE subjects used"] for text in processed.infotexts]
    assert used == ["cat, dog", "car, bench"]


def test_bindings_are_written_into_the_infotext(webui: WebUI) -> None:
    prompts = ["a red car and a blue bench", "a cat and a dog"]
    args = webui.args(enabled=True, subjects="", method="excite+bind")
    p, processed = webui.run(args, prompt=prompts, batch_size=2)
    keys = [ae_keys(text, webui.host) for text in processed.infotexts]
    assert [k["AE bindings"] for k in keys] == ["red->car, blue->bench", "none"]
    assert [k["AE subjects used"] for k in keys] == ["car, bench", "cat, dog"]
    assert keys[0]["AE method"] == "excite+bind"
    nothing = "bind: the prompt has no modifier to bind (no adjective or other modifier before a noun) (image 2)"
    assert nothing in keys[1]["AE error"]


def test_missing_subject_is_reported_and_the_others_are_excited(webui: WebUI) -> None:
    reference = baseline(webui.host)
    p, processed = webui.run(webui.args(enabled=True, subjects="cat, zebra"))
    assert not torch.equal(torch.stack(processed.images), reference)
    assert "subject 'zebra' is not in the prompt" in p.extra_generation_params["AE error"]


def test_api_dict_form_equals_the_positional_form(webui: WebUI) -> None:
    _, positional = webui.run(webui.args(enabled=True, subjects="cat, dog", scale_factor=10.0))
    # The API writes the dict into the script's first slot and keeps the UI defaults after it (api.py L356-360).
    api = {"enabled": True, "subjects": ["cat", "dog"], "scale_factor": 10, **FAST}
    _, from_dict = webui.run(webui.args(api))
    assert torch.equal(torch.stack(from_dict.images), torch.stack(positional.images))
    assert from_dict.infotexts == positional.infotexts


def test_batch_of_two_prompts_locates_subjects_per_image(webui: WebUI, monkeypatch: pytest.MonkeyPatch) -> None:
    located: list[tuple[str, tuple[tuple[int, ...], ...]]] = []
    real = importlib.import_module("lib_ae.targeting").locate_subjects

    def spy(chunks: Any, subjects: Any, encode: Any, **kwargs: Any) -> Any:
        location = real(chunks, subjects, encode, **kwargs)
        located.append((",".join(location.found), location.selection.subjects if location.selection else ()))
        return location

    monkeypatch.setattr(importlib.import_module("lib_ae.targeting"), "locate_subjects", spy)
    prompts = ["a cat and a dog", "a dog on a red car"]
    reference = baseline(webui.host, prompt=prompts, batch_size=2)
    p, processed = webui.run(webui.args(enabled=True, subjects="cat, red car"), prompt=prompts, batch_size=2)
    images = torch.stack(processed.images)
    assert not torch.equal(images[0], reference[0]) and not torch.equal(images[1], reference[1])
    # cat = token 2 of prompt 1; "red car" = tokens 5, 6 of prompt 2 (after BOS: a dog on a red car).
    assert located == [("cat", ((2,),)), ("red car", ((5, 6),))]
    error = p.extra_generation_params["AE error"]
    assert "subject 'red car' is not in the prompt (image 1)" in error
    assert "subject 'cat' is not in the prompt (image 2)" in error
    assert len(processed.infotexts) == 2 and all("AE subjects" in text for text in processed.infotexts)


def test_only_images_with_subjects_are_updated(webui: WebUI) -> None:
    prompts = ["a cat and a dog", "a house"]
    reference = baseline(webui.host, prompt=prompts, batch_size=2)
    _, processed = webui.run(webui.args(enabled=True, subjects="cat"), prompt=prompts, batch_size=2)
    images = torch.stack(processed.images)
    assert not torch.equal(images[0], reference[0])
    assert torch.equal(images[1], reference[1])  # no subject there: its latent is never touched


# ---------------------------------------------------------------------------------------------------------------------
# The update is lib_ae's, applied to the sampler's own latent at the right model calls


def direct_lib_ae_run(
    host: SimpleNamespace, params: AEParams, sampler: str, steps: int, seed: int, prompt: str = PROMPT,
    pairs: list[tuple[str, str]] | None = None,
) -> torch.Tensor:
    """The same generation written directly against lib_ae and k-diffusion, without the WebUI glue: CFG as A1111's
    CFGDenoiser computes it for one prompt, and InSamplerExcitation fed with the model-call index. `pairs`: the
    (modifier, noun) pairs to bind, for a `bind` method."""
    from support.thirdparty import A1111_KDIFFUSION_SAMPLERS, import_k_diffusion

    _, external = import_k_diffusion()
    model = host.model
    entry = A1111_KDIFFUSION_SAMPLERS[sampler]
    denoiser = external.CompVisDenoiser(model)
    encoder = model.cond_stage_model
    cond, uncond = model.get_learned_conditioning([prompt]), model.get_learned_conditioning([""])
    chunks = [c.tokens for c in encoder.process_texts([prompt])[0][0]]
    selection = locate_subjects(
        chunks,
        list(params.subject_names),
        lambda s: encoder.tokenize([s])[0],
        bos_id=encoder.id_start,
        eos_id=encoder.id_end,
        pad_id=encoder.id_pad,
    ).selection
    binding = None
    if pairs is not None:
        binding = locate_bindings(
            chunks, pairs, lambda s: encoder.tokenize([s])[0], bos_id=encoder.id_start, eos_id=encoder.id_end,
            pad_id=encoder.id_pad,
        ).selection
    capture = AttentionCapture(model.model.diffusion_model)
    engine = AttendAndExcite(capture, objective_for(params))
    calls_per_step = 2 if entry.second_order else 1
    # InitNO's rounds draw from the image's seed, as the host's pass does (`SamplingPass._initial_noise`).
    excitation = InSamplerExcitation(engine, engine.plan(steps), "sigma", StepClock(calls_per_step),
                                     fresh_noise=seeded_noise((4, 16, 16), [seed]), timestep_of=denoiser.sigma_to_t)
    image_cond = torch.zeros(1, 5, 1, 1)
    calls = 0

    def model_fn(x: torch.Tensor, sigma: torch.Tensor, **_: Any) -> torch.Tensor:
        nonlocal calls

        def run_unet(latent_rows: torch.Tensor, rows: torch.Tensor) -> object:
            return denoiser(
                latent_rows, sigma[rows], cond={"c_crossattn": [cond[rows]], "c_concat": [image_cond[rows]]}
            )

        excitation.before_model_call(calls, x, sigma, [selection], run_unet, bindings=[binding])
        out = denoiser(
            torch.cat([x, x]),
            torch.cat([sigma, sigma]),
            cond={"c_crossattn": [torch.cat([cond, uncond])], "c_concat": [torch.cat([image_cond, image_cond])]},
        )
        denoised = out[1:].clone()
        denoised[0] += (out[0] - out[1]) * (1.0 * 7.0)
        calls += 1
        return denoised

    noise = torch.randn((4, 16, 16), generator=torch.Generator().manual_seed(seed))[None]
    sigmas = entry.sigmas(denoiser, steps)
    try:
        with torch.no_grad():
            return entry.function()(model_fn, noise * sigmas[0], sigmas, disable=True)
    finally:
        capture.remove()


@pytest.mark.parametrize("method", ["bind", "excite+bind"])
def test_binding_lands_in_the_sampler_latent_exactly_as_lib_ae_computes_it(webui: WebUI, method: str) -> None:
    prompt = "a red car and a blue bench"
    args = webui.args(enabled=True, subjects="", method=method)
    _, processed = webui.run(args, prompt=prompt)
    webui.unload()  # the direct run attaches its own capture
    params = from_script_args([{"enabled": True, "subjects": "car, bench", "method": method, **FAST}])
    expected = direct_lib_ae_run(
        webui.host, params, "Euler", steps=4, seed=7, prompt=prompt, pairs=[("red", "car"), ("blue", "bench")]
    )
    assert torch.equal(processed.images[0], expected[0])
    assert not torch.equal(processed.images[0], baseline(webui.host, prompt=prompt)[0])
    keys = ae_keys(processed.infotexts[0], webui.host)
    assert keys["AE bindings"] == "red->car, blue->bench" and "AE error" not in keys
    assert re.search(r", bind loss -?[\d.e-]+ -> -?[\d.e-]+", keys["AE trace"]), keys["AE trace"]


def test_bind_without_a_modifier_leaves_the_image(webui: WebUI) -> None:
    _, processed = webui.run(webui.args(enabled=True, subjects="", method="bind"))
    assert torch.equal(torch.stack(processed.images), baseline(webui.host))
    assert "no modifier to bind" in ae_keys(processed.infotexts[0], webui.host)["AE error"]


def test_heatmaps_show_each_modifier_beside_its_noun(webui: WebUI) -> None:
    args = webui.args(enabled=True, subjects="", method="excite+bind", heatmaps=True)
    p, processed = webui.run(args, prompt="a red car and a blue bench")
    visual = webui.adapter("run_state").existing_state(p).visuals[0]
    assert [[m.label for m in row] for row in visual.rows] == [
        ["car", "bench", "car", "red\u2192car", "bench", "blue\u2192bench"]
    ]
    strip = processed.images[1]
    assert strip.size == (6 * 256, 256 + 28)


@pytest.mark.parametrize("sampler", ["Euler", "Heun"])
def test_update_lands_in_the_sampler_latent_exactly_as_lib_ae_computes_it(webui: WebUI, sampler: str) -> None:
    params = from_script_args([{"enabled": True, "subjects": "cat, dog", **FAST}])
    _, processed = webui.run(webui.args(enabled=True, subjects="cat, dog"), sampler_name=sampler)
    webui.unload()  # the direct run attaches its own capture
    expected = direct_lib_ae_run(webui.host, params, sampler, steps=4, seed=7)
    assert torch.equal(processed.images[0], expected[0])
    assert not torch.equal(expected[0], baseline(webui.host, sampler_name=sampler)[0])


def test_second_order_sampler_maps_calls_to_steps(webui: WebUI, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[int, int, int | None]] = []

    class Recording(InSamplerExcitation):
        def before_model_call(self, call_index: int, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            report = super().before_model_call(call_index, x, *args, **kwargs)
            seen.append((call_index, self.clock.calls_per_step, None if report is None else report.step))
            return report

    monkeypatch.setattr(importlib.import_module("lib_ae.sampling_run"), "InSamplerExcitation", Recording)
    webui.run(webui.args(enabled=True, subjects="cat", alter_fraction=1.0, thresholds="none"), sampler_name="Heun")
    # Heun, 4 steps: 7 model calls; A&E runs at the first call of each step (0, 2, 4, 6), once per step.
    assert [(c, k) for c, k, _ in seen] == [(0, 2), (2, 2), (4, 2), (6, 2)]
    assert [step for _, _, step in seen] == [0, 1, 2, 3]


def test_ddim_updates_the_vp_latent(webui: WebUI, monkeypatch: pytest.MonkeyPatch) -> None:
    spaces: list[str] = []

    class Recording(InSamplerExcitation):
        def before_model_call(self, *args: Any, **kwargs: Any) -> Any:
            spaces.append(self.space)
            return super().before_model_call(*args, **kwargs)

    monkeypatch.setattr(importlib.import_module("lib_ae.sampling_run"), "InSamplerExcitation", Recording)
    reference = baseline(webui.host, sampler_name="DDIM")
    p, processed = webui.run(webui.args(enabled=True, subjects="cat"), sampler_name="DDIM")
    assert not torch.equal(torch.stack(processed.images), reference)
    assert spaces and set(spaces) == {"vp"}
    assert "AE error" not in p.extra_generation_params


@pytest.mark.parametrize("apply_to_hires", [False, True])
def test_hires_pass_is_excited_only_when_asked(webui: WebUI, apply_to_hires: bool) -> None:
    """The hook also runs before the hires pass (processing.py L1445-1453, p.is_hr_pass set at L1368): emulated here
    on a finished first pass with a fresh sampler, the hires prompts and the first pass's conds."""
    host = webui.host
    p, _ = webui.run(webui.args(enabled=True, subjects="cat", apply_to_hires=apply_to_hires))
    p.is_hr_pass = True
    p.hr_prompts = list(p.prompts)
    p.sampler = host.processing.sd_samplers.create_sampler("Euler", p.sd_model)
    noise = p.rng_next()
    p.scripts.process_before_every_sampling(p=p, x=noise, noise=noise, c=p.c, uc=p.uc)
    assert ("forward" in vars(p.sampler.model_wrap_cfg)) is apply_to_hires
    with torch.no_grad():
        sampled = p.sampler.sample(p, noise, p.c, p.uc, image_conditioning=noise.new_zeros(1, 5, 1, 1))
    plain_sampler = host.processing.sd_samplers.create_sampler("Euler", p.sd_model)
    with torch.no_grad():
        plain = plain_sampler.sample(p, noise, p.c, p.uc, image_conditioning=noise.new_zeros(1, 5, 1, 1))
    assert torch.equal(sampled, plain) is not apply_to_hires
    assert "AE error" not in p.extra_generation_params


# ---------------------------------------------------------------------------------------------------------------------
# Failure handling


def test_unsupported_sampler_is_reported_and_left_alone(webui: WebUI) -> None:
    reference = baseline(webui.host, sampler_name="DPM fast")
    p, processed = webui.run(webui.args(enabled=True, subjects="cat"), sampler_name="DPM fast")
    assert torch.equal(torch.stack(processed.images), reference)
    assert "sampler DPM fast is not supported" in p.extra_generation_params["AE error"]
    assert "forward" not in vars(p.sampler.model_wrap_cfg)


def test_failure_inside_ae_keeps_the_image(webui: WebUI, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def out_of_memory(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(AttendAndExcite, "step", out_of_memory)
    reference = baseline(webui.host)
    p, processed = webui.run(webui.args(enabled=True, subjects="cat"))
    assert torch.equal(torch.stack(processed.images), reference)
    assert len(calls) == 1  # A&E is off for the rest of the pass after the failure
    assert "OutOfMemoryError" in p.extra_generation_params["AE error"]
    assert webui.host.shared.state.textinfo is None


@pytest.mark.parametrize(("setting", "advised"), [("auto", True), ("keep", True), ("recompute", False)])
def test_out_of_memory_names_the_low_memory_mode_unless_it_ran(
    webui: WebUI, monkeypatch: pytest.MonkeyPatch, setting: str, advised: bool
) -> None:
    def out_of_memory(self: Any, *args: Any, **kwargs: Any) -> Any:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(AttendAndExcite, "step", out_of_memory)
    monkeypatch.setitem(webui.host.shared.opts.data, "ae_pass_memory", setting)
    p, _ = webui.run(webui.args(enabled=True, subjects="cat"))
    message = p.extra_generation_params["AE error"]
    assert message.startswith("A&E ran out of memory at step 1 (OutOfMemoryError); sampling went on without A&E: ")
    assert ("Memory of the A&E gradient pass to 'recompute'" in message) is advised
    assert "lower the batch size or image size" in message


def test_sd3_model_is_refused_with_a_message(webui: WebUI, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(webui.host.model, "is_sd3", True, raising=False)
    reference = baseline(webui.host)
    p, processed = webui.run(webui.args(enabled=True, subjects="cat"))
    assert torch.equal(torch.stack(processed.images), reference)
    assert "SD3 models are not supported" in p.extra_generation_params["AE error"]


def test_unet_without_cross_attention_is_refused_with_a_message(webui: WebUI) -> None:
    unet = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3, padding=1))
    p = SimpleNamespace(
        sd_model=SimpleNamespace(
            model=SimpleNamespace(diffusion_model=unet),
            is_sd3=False,
            cond_stage_model=webui.host.model.cond_stage_model,
        ),
        sampler=SimpleNamespace(config=SimpleNamespace(name="Euler"), model_wrap_cfg=SimpleNamespace()),
        extra_generation_params={},
    )
    webui.adapter("sampling_pass").install(p, from_script_args([{"enabled": True, "subjects": "cat"}]))
    assert "no attention modules" in p.extra_generation_params["AE error"]
    assert "forward" not in vars(p.sampler.model_wrap_cfg)


def test_refinement_progress_is_shown_and_cleared(webui: WebUI, monkeypatch: pytest.MonkeyPatch) -> None:
    shown: list[str] = []
    state = webui.host.shared.state

    class RecordingState(type(state)):  # type: ignore[misc]
        def __setattr__(self, name: str, value: Any) -> None:
            if name == "textinfo" and value:
                shown.append(value)
            super().__setattr__(name, value)

    recording = RecordingState()
    monkeypatch.setattr(webui.host.shared, "state", recording)
    webui.run(webui.args(enabled=True, subjects="cat, dog", thresholds="0:0.9"))  # refines at step 0 for sure
    assert "Attend and Excite: step 1, refinement 1/2" in shown
    assert recording.textinfo is None


# ---------------------------------------------------------------------------------------------------------------------
# Glue units the stand-in host cannot exercise end to end (SDXL conds, PLMS, img2img's reused sampler)


def test_sdxl_conditioning_and_text_encoder(webui: WebUI) -> None:
    clip_l = webui.host.model.cond_stage_model
    # SDXL: cond_stage_model is the conditioner (sd_hijack.py L226-230); its first embedder with process_texts is
    # CLIP-L, whose BOS/EOS/pad the columns are counted with.
    conditioner = SimpleNamespace(embedders=[SimpleNamespace(), clip_l, SimpleNamespace(process_texts=None)])
    assert webui.adapter("subjects").text_encoder(SimpleNamespace(cond_stage_model=conditioner)) is clip_l
    cond = {"crossattn": torch.randn(3, 77, 8), "vector": torch.randn(3, 16)}
    rows = webui.adapter("sampling_pass").select_rows(cond, torch.tensor([2, 0]))
    assert torch.equal(rows["crossattn"], cond["crossattn"][[2, 0]]) and torch.equal(
        rows["vector"], cond["vector"][[2, 0]]
    )
    sdxl = SimpleNamespace(model=SimpleNamespace(conditioning_key="crossattn"))
    image_cond = torch.zeros(2, 5, 1, 1)
    made = webui.adapter("sampling_pass").make_condition_dict(sdxl, rows, image_cond)
    assert set(made) == {"crossattn", "vector", "c_concat"} and made["c_concat"][0] is image_cond
    unclip = SimpleNamespace(model=SimpleNamespace(conditioning_key="crossattn-adm"))
    assert set(webui.adapter("sampling_pass").make_condition_dict(unclip, rows["crossattn"], image_cond)) == {"c_crossattn", "c_adm"}


def test_plms_first_step_makes_two_calls(webui: WebUI) -> None:
    clock_index = webui.adapter("sampling_pass").clock_index
    # PLMS: calls 0 and 1 are step 0 (the second on a temporary latent), then one call per step.
    assert [clock_index(call, plms=True) for call in range(5)] == [0, None, 1, 2, 3]
    assert [clock_index(call, plms=False) for call in range(3)] == [0, 1, 2]


def test_wrapping_a_reused_sampler_replaces_the_wrapper(webui: WebUI) -> None:
    """img2img keeps one sampler for every batch (processing.py L1607) and calls the hook before each batch."""

    class Denoiser(torch.nn.Module):
        def forward(self, x: torch.Tensor, sigma: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            return x + 1

    calls: list[str] = []
    den = Denoiser()
    webui.adapter("sampling_pass").wrap_forward(den, SimpleNamespace(before_model_call=lambda x, sigma, kwargs: calls.append("first")))
    webui.adapter("sampling_pass").wrap_forward(den, SimpleNamespace(before_model_call=lambda x, sigma, kwargs: calls.append("second")))
    wrapped = getattr(den.forward, "_ae_original")
    assert wrapped.__func__ is Denoiser.forward  # the class forward, not the first wrapper
    out = den(torch.zeros(1), torch.zeros(1), cond=None)  # nn.Module.__call__ goes through the instance attribute
    assert calls == ["second"] and torch.equal(out, torch.ones(1))


# ---------------------------------------------------------------------------------------------------------------------
# Lifetime, prompt editing, X/Y/Z


def test_hooks_are_removed_on_script_unload(webui: WebUI) -> None:
    unet = webui.host.model.model.diffusion_model
    webui.run(webui.args(enabled=True, subjects="cat"))
    before = hooks_on(unet)
    webui.run(webui.args(enabled=True, subjects="dog"))
    assert hooks_on(unet) == before > 0  # attached once per UNet, not once per run
    webui.unload()
    assert hooks_on(webui.host.model) == 0


def test_prompt_editing_uses_the_tokens_of_the_entry_in_effect(webui: WebUI, monkeypatch: pytest.MonkeyPatch) -> None:
    """A prompt whose text changes after model call 1 ("[a cat:a dog:1]" in A1111 syntax): the stand-in parser does
    not parse editing, so the schedule is injected; conditioning and A&E both read it from prompt_parser."""
    parser = webui.host.prompt_parser
    real = parser.get_learned_conditioning_prompt_schedules

    def schedules(prompts: list[str], base_steps: int, *args: Any) -> list[list[list[Any]]]:
        return [
            [[1, "a cat"], [base_steps, "a dog"]] if text == "EDIT" else real([text], base_steps, *args)[0]
            for text in prompts
        ]

    monkeypatch.setattr(parser, "get_learned_conditioning_prompt_schedules", schedules)
    found: list[tuple[int, list[str]]] = []
    real_locate = importlib.import_module("lib_ae.targeting").locate_subjects

    def spy(chunks: Any, subjects: Any, encode: Any, **kwargs: Any) -> Any:
        location = real_locate(chunks, subjects, encode, **kwargs)
        found.append((len(found), sorted(location.found)))
        return location

    monkeypatch.setattr(importlib.import_module("lib_ae.targeting"), "locate_subjects", spy)
    p, _ = webui.run(webui.args(enabled=True, subjects="cat, dog", alter_fraction=1.0), prompt="EDIT")
    assert [names for _, names in found] == [["cat"], ["dog"]]  # entry 0 for calls 0-1, entry 1 from call 2 on
    assert "subject 'dog' is not in the prompt" in p.extra_generation_params["AE error"]


def test_xyz_axes_override_the_ui_values(host: SimpleNamespace) -> None:
    ui = WebUI(host, with_xyz=True)
    try:
        xyz = next(d.module for d in host.scripts.scripts_data if d.script_class.__module__ == "xyz_grid.py")
        labels = [o.label for o in xyz.axis_options]
        assert "[AE] Scale factor" in labels and "[AE] Enable Attend and Excite" in labels
        assert not any("hires" in label for label in labels)  # apply_to_hires is not an axis
        reference = baseline(host)

        def plot(axis: str, values: str, **ae: Any) -> Any:
            ae_values = {spec.name: spec.default for spec in PARAMS} | FAST | ae
            args = host.standin.script_args(
                ui.runner,
                {TITLE: [ae_values[s.name] for s in PARAMS]},
                selectable=("X/Y/Z plot", [labels.index(axis), values]),
            )
            return ui.run(args)[1]

        # Enable axis over a disabled UI: the "False" cell is the plain image and carries no A&E keys, although the
        # cells share one extra_generation_params dict.
        processed = plot("[AE] Enable Attend and Excite", "True, False", enabled=False, subjects="cat")
        assert not torch.equal(processed.images[0], reference[0])
        assert torch.equal(processed.images[1], reference[0])
        assert ae_keys(processed.infotexts[0], host)["AE subjects"] == "cat"
        assert ae_keys(processed.infotexts[1], host) == {}
        # Scale factor axis: 0 leaves the latent as it is; the infotext records each cell's value.
        processed = plot("[AE] Scale factor", "0, 20", enabled=True, subjects="cat")
        assert torch.equal(processed.images[0], reference[0])
        assert not torch.equal(processed.images[1], reference[0])
        assert [ae_keys(t, host)["AE scale factor"] for t in processed.infotexts] == ["0.0", "20.0"]
        # Values are checked before the first cell (xyz_grid.py L611-613).
        with pytest.raises(RuntimeError, match="AE scale factor"):
            plot("[AE] Scale factor", "20, 1000", enabled=True, subjects="cat")
        # Method axis: a dropdown of the three methods; each cell records its own.
        method = xyz.axis_options[labels.index("[AE] Method")]
        assert method.choices is not None and method.choices() == ["excite", "bind", "excite+bind", "conform", "initno", "initno+selfcross", "conform+selfcross"]
        processed = plot("[AE] Method", "excite, excite+bind", enabled=True, subjects="")
        assert [ae_keys(t, host)["AE method"] for t in processed.infotexts] == ["excite", "excite+bind"]
        assert "[AE] Binding step size" in labels
        with pytest.raises(RuntimeError, match="AE method: expected one of excite, bind, excite\\+bind"):
            plot("[AE] Method", "excite, syngen", enabled=True, subjects="cat")
    finally:
        ui.unload()


def test_cuda_graph_runner_gives_the_same_images(webui: WebUI, monkeypatch: pytest.MonkeyPatch) -> None:
    """The runner the script hands to the engine is a `GraphableRunner` whose explicit inputs (sigma, image
    conditioning, conditioning rows) are all it reads: forcing the graph path (on the CPU: the same device-side
    computation it would capture) gives the eager path's images bit for bit, and `post_sample` frees the engines."""
    args = webui.args(enabled=True, subjects="cat, dog")
    _, eager = webui.run(args)
    monkeypatch.setattr(webui.adapter("sampling_pass"), "use_cuda_graphs", lambda p: True)
    evaluations: list[Any] = []
    original = AttendAndExcite.__init__

    def spy(self: AttendAndExcite, *a: Any, **kw: Any) -> None:
        original(self, *a, **kw)
        assert self._graphs is not None
        evaluate = self._graphs.evaluate
        self._graphs.evaluate = (  # type: ignore[method-assign]
            lambda *e, **k: evaluations.append(e[4]) or evaluate(*e, **k)  # e[4]: the runner
        )

    monkeypatch.setattr(AttendAndExcite, "__init__", spy)
    p, graphed = webui.run(args)
    assert evaluations and all(type(r).__name__ == "GraphableRunner" for r in evaluations)
    assert torch.equal(torch.stack(graphed.images), torch.stack(eager.images))
    assert webui.adapter("run_state").existing_state(p).passes == []


def test_heatmaps_and_trace_for_a_batch_of_two_with_different_subjects(webui: WebUI) -> None:
    """Per image: a strip with one tile per subject found in its own prompt (last step A&E ran, then the first step),
    and a trace plot, appended after the generated images with that image's infotext and saved through A1111's
    save_image; the infotext carries the one-line trace. Off: none of it, and no maps are kept."""
    from modules import images as host_images
    from PIL import Image

    prompts = ["a cat and a dog", "a red car near a tree"]
    host_images.saved.clear()
    args = webui.args(enabled=True, subjects="cat, dog, car, tree", heatmaps=True, heatmaps_first_step=True)
    p, processed = webui.run(args, prompt=prompts, batch_size=2)
    generated, pictures = processed.images[:2], processed.images[2:]
    assert all(isinstance(image, torch.Tensor) for image in generated)  # the images themselves are untouched
    assert len(pictures) == 4 and all(isinstance(picture, Image.Image) for picture in pictures)
    strip_a, plot_a, strip_b, plot_b = pictures
    # Tiles 256 high (width from the square image), a 28-pixel caption, two subjects found in each prompt, two rows.
    assert strip_a.size == strip_b.size == (2 * 256, 2 * (256 + 28))
    visuals = {b: (v.rows, v.trace) for b, v in webui.adapter("run_state").existing_state(p).visuals.items()}
    assert [[[m.label for m in row] for row in visuals[b][0]] for b in (0, 1)] == [
        [["cat", "dog"], ["cat", "dog"]], [["car", "tree"], ["car", "tree"]]
    ]
    assert [[m.step for m in row][0] for row in visuals[0][0]] == [2, 0]  # the last step A&E ran, then the first
    assert plot_a.size == plot_b.size == (512, 320)
    assert processed.infotexts[2:] == [processed.infotexts[0]] * 2 + [processed.infotexts[1]] * 2
    keys = [ae_keys(text, webui.host) for text in processed.infotexts[:2]]
    for fields in keys:
        # 4 steps: the update at steps 0-1, refinement (capped at 2 iterations) at steps 0, 1 and 2
        assert re.fullmatch(r"3 steps, refinement [0-2]/[0-2]/[0-2], final min attention [01]\.\d\d", fields["AE trace"])
        assert "final min attention" in fields["AE trace"]
    assert [(s["suffix"], s["seed"], s["prompt"]) for s in host_images.saved] == [
        ("-ae-heatmaps", 7, prompts[0]), ("-ae-trace", 7, prompts[0]),
        ("-ae-heatmaps", 8, prompts[1]), ("-ae-trace", 8, prompts[1]),
    ]
    assert "AE error" in keys[0]  # "car" and "tree" are not in the first prompt, "cat"/"dog" not in the second

    host_images.saved.clear()
    p, processed = webui.run(webui.args(enabled=True, subjects="cat, dog"))
    assert len(processed.images) == 1 and host_images.saved == []
    assert "AE trace" in ae_keys(processed.infotexts[0], webui.host)
