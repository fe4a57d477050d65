"""CONFORM (`method: conform`) in the stand-in A1111 host: the image is the one lib_ae computes, the infotext says
what was contrasted and round-trips, the API's two forms agree, and every hostile row keeps the image (no object, one
object, a group without an attribute, a word not in the prompt)."""

from __future__ import annotations

import re

import torch

from support.webui_host import WebUI, ae_keys
from test_extension import baseline, direct_lib_ae_run

from lib_ae.webui.wire import from_infotext, from_script_args

PROMPT = "a red car and a blue bench"


def test_conform_lands_in_the_sampler_latent_exactly_as_lib_ae_computes_it(webui: WebUI) -> None:
    args = webui.args(enabled=True, subjects="", method="conform")
    _, processed = webui.run(args, prompt=PROMPT)
    webui.unload()  # the direct run attaches its own capture
    params = from_script_args([{"enabled": True, "subjects": "car, bench", "method": "conform",
                                "max_refinement_steps": 2}])
    expected = direct_lib_ae_run(
        webui.host, params, "Euler", steps=4, seed=7, prompt=PROMPT, pairs=[("red", "car"), ("blue", "bench")]
    )
    assert torch.equal(processed.images[0], expected[0])
    assert not torch.equal(processed.images[0], baseline(webui.host, prompt=PROMPT)[0])
    keys = ae_keys(processed.infotexts[0], webui.host)
    assert keys["AE bindings"] == "red->car, blue->bench" and "AE error" not in keys
    assert keys["AE method"] == "conform" and keys["AE conform temperature"] == "0.5"
    assert re.search(r", conform loss [\d.e-]+ -> [\d.e-]+", keys["AE trace"]), keys["AE trace"]
    assert "bind loss" not in keys["AE trace"]  # CONFORM computes no SynGen loss


def test_conform_infotext_round_trip_and_api_forms(webui: WebUI) -> None:
    _, positional = webui.run(webui.args(enabled=True, subjects="car, bench", method="conform",
                                         conform_temperature=0.25), prompt=PROMPT)
    api = {"enabled": True, "subjects": ["car", "bench"], "method": "conform", "conform_temperature": 0.25,
           "max_refinement_steps": 2}
    _, from_dict = webui.run(webui.args(api), prompt=PROMPT)
    assert torch.equal(torch.stack(from_dict.images), torch.stack(positional.images))
    keys = ae_keys(positional.infotexts[0], webui.host)
    pasted = from_infotext(keys, strict=True)
    assert pasted["method"] == "conform" and pasted["conform_temperature"] == 0.25


def test_one_object_keeps_the_image_and_says_why(webui: WebUI) -> None:
    _, processed = webui.run(webui.args(enabled=True, subjects="", method="conform"), prompt="a red car")
    assert torch.equal(torch.stack(processed.images), baseline(webui.host, prompt="a red car"))
    assert "CONFORM contrasts two subjects or more" in ae_keys(processed.infotexts[0], webui.host)["AE error"]


def test_no_object_keeps_the_image(webui: WebUI) -> None:
    _, processed = webui.run(webui.args(enabled=True, subjects="", method="conform"), prompt="and , of the")
    assert torch.equal(torch.stack(processed.images), baseline(webui.host, prompt="and , of the"))
    assert "no noun found" in ae_keys(processed.infotexts[0], webui.host)["AE error"]


def test_groups_without_attributes_are_contrasted(webui: WebUI) -> None:
    """"a cat and a dog": two groups of one token each; from the second step the previous step's maps are their
    positives, so the image moves (at the first step there is no positive pair: the official loss is 0)."""
    _, processed = webui.run(webui.args(enabled=True, subjects="cat, dog", method="conform"))
    assert not torch.equal(torch.stack(processed.images), baseline(webui.host))
    keys = ae_keys(processed.infotexts[0], webui.host)
    assert "AE error" not in keys  # a subject without a modifier is its own group: nothing to tell
    assert keys["AE bindings"] == "none"


def test_a_word_not_in_the_prompt_is_reported_and_the_rest_contrasted(webui: WebUI) -> None:
    _, processed = webui.run(webui.args(enabled=True, subjects="car, bench, zebra", method="conform"), prompt=PROMPT)
    assert not torch.equal(torch.stack(processed.images), baseline(webui.host, prompt=PROMPT))
    assert "subject 'zebra' is not in the prompt" in ae_keys(processed.infotexts[0], webui.host)["AE error"]


def test_disabled_conform_changes_nothing(webui: WebUI) -> None:
    _, processed = webui.run(webui.args(enabled=False, subjects="car, bench", method="conform"), prompt=PROMPT)
    assert torch.equal(torch.stack(processed.images), baseline(webui.host, prompt=PROMPT))
    assert processed.infotexts[0] == webui.run(webui.args(enabled=False), prompt=PROMPT)[1].infotexts[0]


def test_heatmaps_show_each_modifier_beside_its_subject(webui: WebUI) -> None:
    """The strip shows each subject's map and, per group, the maps CONFORM contrasted: the noun, then "red→car"."""
    p, processed = webui.run(webui.args(enabled=True, subjects="", method="conform", heatmaps=True), prompt=PROMPT)
    visual = webui.adapter("run_state").existing_state(p).visuals[0]
    assert [[m.label for m in row] for row in visual.rows] == [
        ["car", "bench", "car", "red\u2192car", "bench", "blue\u2192bench"]
    ]
    assert len(processed.images) == 3  # the image, its strip, its trace plot


# --- Self-Cross guidance on CONFORM -------------------------------------------------------------------------------


def test_self_cross_conform_lands_in_the_sampler_latent_exactly_as_lib_ae_computes_it(webui: WebUI) -> None:
    """The step's DDPM timestep comes from the host's denoiser (`sigma_to_t`), as the official loss reads it."""
    _, processed = webui.run(webui.args(enabled=True, subjects="", method="conform+selfcross"), prompt=PROMPT)
    webui.unload()
    params = from_script_args([{"enabled": True, "subjects": "car, bench", "method": "conform+selfcross",
                                "max_refinement_steps": 2}])
    expected = direct_lib_ae_run(
        webui.host, params, "Euler", steps=4, seed=7, prompt=PROMPT, pairs=[("red", "car"), ("blue", "bench")]
    )
    assert torch.equal(processed.images[0], expected[0])
    assert not torch.equal(processed.images[0], baseline(webui.host, prompt=PROMPT)[0])
    keys = ae_keys(processed.infotexts[0], webui.host)
    assert keys["AE method"] == "conform+selfcross" and "AE error" not in keys
    assert keys["AE bindings"] == "red->car, blue->bench"
    assert re.search(r", self-cross conform loss [\d.e-]+ -> [\d.e-]+", keys["AE trace"]), keys["AE trace"]
    pasted = from_infotext(keys, strict=True)
    assert pasted["method"] == "conform+selfcross"


def test_self_cross_conform_on_ddim_reads_the_timestep_it_is_given(webui: WebUI) -> None:
    _, processed = webui.run(webui.args(enabled=True, subjects="car, bench", method="conform+selfcross"),
                             prompt=PROMPT, sampler_name="DDIM")
    assert not torch.equal(torch.stack(processed.images), baseline(webui.host, prompt=PROMPT, sampler_name="DDIM"))
    assert "AE error" not in ae_keys(processed.infotexts[0], webui.host)


def test_self_cross_conform_with_one_object_keeps_the_image(webui: WebUI) -> None:
    _, processed = webui.run(webui.args(enabled=True, subjects="", method="conform+selfcross"), prompt="a red car")
    assert torch.equal(torch.stack(processed.images), baseline(webui.host, prompt="a red car"))
    assert "CONFORM contrasts two subjects or more" in ae_keys(processed.infotexts[0], webui.host)["AE error"]
