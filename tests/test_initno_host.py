"""InitNO and Self-Cross guidance (`method: initno`, `initno+selfcross`) in the stand-in A1111 host: the image is the
one lib_ae computes (the noise optimised from the seed's noise, its rounds drawn from the seed), the same request
gives the same bytes, the infotext says what ran and what it cost and round-trips, the API's two forms agree, the
heatmaps show the self-attention the conflict compares, and every hostile row keeps the image."""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator

import pytest
import torch

from support.webui_host import WebUI, ae_keys, emulated_hires_pass
from test_extension import baseline, direct_lib_ae_run

import lib_ae.objectives
from lib_ae.initno import InitnoConfig
from lib_ae.webui.wire import from_infotext, from_script_args

METHODS = ["initno", "initno+selfcross"]


@pytest.fixture(autouse=True)
def small_budget(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Two rounds of two steps and a run of three: the host's wiring is what these tests check, and the official
    budget (5 x 10 + 50 evaluations per image) is tests/test_initno.py's; the direct run gets the same budget."""
    monkeypatch.setattr(lib_ae.objectives, "InitnoConfig",
                        functools.partial(InitnoConfig, rounds=2, round_steps=2, final_steps=3))
    yield


@pytest.mark.parametrize("method", METHODS)
def test_lands_in_the_sampler_latent_exactly_as_lib_ae_computes_it(webui: WebUI, method: str) -> None:
    args = webui.args(enabled=True, subjects="cat, dog", method=method)
    _, processed = webui.run(args)
    webui.unload()  # the direct run attaches its own capture
    params = from_script_args([{"enabled": True, "subjects": "cat, dog", "method": method,
                                "max_refinement_steps": 2}])
    expected = direct_lib_ae_run(webui.host, params, "Euler", steps=4, seed=7)
    assert torch.equal(processed.images[0], expected[0])
    assert not torch.equal(processed.images[0], baseline(webui.host)[0])
    keys = ae_keys(processed.infotexts[0], webui.host)
    assert keys["AE method"] == method and "AE error" not in keys
    # What the noise optimisation did and cost, for the user; and why no CUDA graph would replay it.
    assert re.search(r"InitNO round \d of \d, targets (not )?met, \d+ noise steps( \+ \d+ from its noise)?, "
                     r"[\d.]+ s", keys["AE trace"]), keys["AE trace"]


@pytest.mark.parametrize("method", METHODS)
def test_the_same_request_gives_the_same_bytes(webui: WebUI, method: str) -> None:
    args = webui.args(enabled=True, subjects="cat, dog", method=method)
    first = webui.run(args)[1]
    second = webui.run(args)[1]
    assert torch.equal(torch.stack(first.images), torch.stack(second.images))


def test_each_image_of_a_batch_is_optimised_from_its_own_seed(webui: WebUI) -> None:
    """Batch of two: the second image is the second seed's alone (its noise, its rounds' noise, its cache), up to
    the float32 rounding of batched UNet calls, which plain sampling has too; its trace is the same."""
    args = webui.args(enabled=True, subjects="cat, dog", method="initno")
    _, batch = webui.run(args, batch_size=2)
    _, alone = webui.run(args, seed=8)
    assert torch.allclose(batch.images[1], alone.images[0], atol=1e-3)
    assert not torch.allclose(batch.images[0], alone.images[0], atol=1e-1)
    def noise_part(processed: object, i: int) -> str:  # "InitNO round r of n, targets ..., k noise steps ..."
        trace = ae_keys(processed.infotexts[i], webui.host)["AE trace"]  # type: ignore[attr-defined]
        found = re.search(r"InitNO round [^,]+, [^,]+, [^,]+", trace)
        assert found, trace
        return found.group(0)

    assert noise_part(batch, 1) == noise_part(alone, 0)


def test_infotext_round_trip_and_api_forms(webui: WebUI) -> None:
    _, positional = webui.run(webui.args(enabled=True, subjects="cat, dog", method="initno+selfcross"))
    api = {"enabled": True, "subjects": ["cat", "dog"], "method": "Initno + SelfCross", "max_refinement_steps": 2}
    _, from_dict = webui.run(webui.args(api))
    assert torch.equal(torch.stack(from_dict.images), torch.stack(positional.images))
    pasted = from_infotext(ae_keys(positional.infotexts[0], webui.host), strict=True)
    assert pasted["method"] == "initno+selfcross"


@pytest.mark.parametrize("method", METHODS)
def test_one_subject_is_optimised_alone(webui: WebUI, method: str) -> None:
    """One subject: no pair to conflict (the official conflict is 0), the response and clean terms still count."""
    _, processed = webui.run(webui.args(enabled=True, subjects="cat", method=method))
    assert not torch.equal(torch.stack(processed.images), baseline(webui.host))
    assert "AE error" not in ae_keys(processed.infotexts[0], webui.host)


def test_no_object_keeps_the_image(webui: WebUI) -> None:
    _, processed = webui.run(webui.args(enabled=True, subjects="", method="initno"), prompt="and , of the")
    assert torch.equal(torch.stack(processed.images), baseline(webui.host, prompt="and , of the"))
    assert "no noun found" in ae_keys(processed.infotexts[0], webui.host)["AE error"]


def test_a_word_not_in_the_prompt_is_reported_and_the_rest_optimised(webui: WebUI) -> None:
    _, processed = webui.run(webui.args(enabled=True, subjects="cat, dog, zebra", method="initno"))
    assert not torch.equal(torch.stack(processed.images), baseline(webui.host))
    assert "subject 'zebra' is not in the prompt" in ae_keys(processed.infotexts[0], webui.host)["AE error"]


def test_disabled_changes_nothing(webui: WebUI) -> None:
    _, processed = webui.run(webui.args(enabled=False, subjects="cat, dog", method="initno"))
    assert torch.equal(torch.stack(processed.images), baseline(webui.host))
    assert processed.infotexts[0] == webui.run(webui.args(enabled=False))[1].infotexts[0]


def test_heatmaps_show_each_subjects_self_attention_beside_its_map(webui: WebUI) -> None:
    p, processed = webui.run(webui.args(enabled=True, subjects="cat, dog", method="initno+selfcross", heatmaps=True))
    visual = webui.adapter("run_state").existing_state(p).visuals[0]
    assert [[m.label for m in row] for row in visual.rows] == [
        ["cat", "dog", "cat (self-attention)", "dog (self-attention)"]
    ]
    assert len(processed.images) == 3  # the image, its strip, its trace plot


def test_an_interrupt_during_the_noise_optimisation_keeps_the_image(webui: WebUI, monkeypatch: pytest.MonkeyPatch
                                                                     ) -> None:
    """Interrupted in the first round: the optimisation stops where it is, sampling goes on (A1111 then stops the
    sampler itself), and the trace says it was interrupted."""
    calls = {"n": 0}

    def stop_soon() -> bool:
        calls["n"] += 1
        return calls["n"] > 3

    monkeypatch.setattr(webui.adapter("host"), "stop_requested", stop_soon)
    _, processed = webui.run(webui.args(enabled=True, subjects="cat, dog", method="initno"))
    assert len(processed.images) == 1
    assert "interrupted" in ae_keys(processed.infotexts[0], webui.host)["AE trace"]


@pytest.mark.parametrize("sampler", ["Heun", "DPM++ 2M"])
def test_second_order_and_multistep_samplers_get_the_same_image_as_lib_ae(webui: WebUI, sampler: str) -> None:
    args = webui.args(enabled=True, subjects="cat, dog", method="initno")
    _, processed = webui.run(args, sampler_name=sampler)
    webui.unload()
    params = from_script_args([{"enabled": True, "subjects": "cat, dog", "method": "initno", "max_refinement_steps": 2}])
    expected = direct_lib_ae_run(webui.host, params, sampler, steps=4, seed=7)
    assert torch.equal(processed.images[0], expected[0])


def test_ddim_optimises_the_vp_latent(webui: WebUI) -> None:
    """DDIM's latent is the UNet's input itself: the noise optimisation works on it directly (noise scale 1)."""
    p, processed = webui.run(webui.args(enabled=True, subjects="cat, dog", method="initno"), sampler_name="DDIM")
    assert not torch.equal(torch.stack(processed.images), baseline(webui.host, sampler_name="DDIM"))
    keys = ae_keys(processed.infotexts[0], webui.host)
    assert "AE error" not in keys and "InitNO round" in keys["AE trace"]


def test_a_refused_sampler_is_refused(webui: WebUI) -> None:
    p, processed = webui.run(webui.args(enabled=True, subjects="cat, dog", method="initno"), sampler_name="DPM fast")
    assert torch.equal(torch.stack(processed.images), baseline(webui.host, sampler_name="DPM fast"))
    assert "sampler DPM fast is not supported" in p.extra_generation_params["AE error"]


def test_out_of_memory_in_the_noise_optimisation_keeps_the_image(webui: WebUI, monkeypatch: pytest.MonkeyPatch) -> None:
    from lib_ae import AttendAndExcite

    def out_of_memory(self: object, *args: object, **kwargs: object) -> None:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(AttendAndExcite, "optimise_initial_noise", out_of_memory)
    p, processed = webui.run(webui.args(enabled=True, subjects="cat, dog", method="initno"))
    assert torch.equal(torch.stack(processed.images), baseline(webui.host))
    assert "out of memory" in p.extra_generation_params["AE error"].lower()


def test_a_hires_pass_samples_with_initno_updates_but_keeps_its_latent_s_noise(webui: WebUI) -> None:
    """The hires pass starts from the upscaled image, not from noise: InitNO's noise optimisation is for txt2img's
    first pass only, and the hires pass gets the sampling updates alone."""
    p, _ = webui.run(webui.args(enabled=True, subjects="cat", method="initno", apply_to_hires=True))
    emulated_hires_pass(webui, p)
    hires = webui.adapter("run_state").existing_state(p).passes[-1]
    assert hires.is_hr and hires.run.excitation is not None
    assert hires.run.excitation.noise_reports == [] and any(r.active for r in hires.run.reports)
