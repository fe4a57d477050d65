"""The declarative parameter spec: positional/dict API args, validation messages, infotext round trip through a
faithful copy of A1111's infotext writer and parser, and the mapping to ExciteConfig."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import re
from typing import Any

import numpy as np
import pytest

from lib_ae.config import BindingConfig, ExciteConfig
from lib_ae.objectives import Excite, ExciteBind, binding_config, excite_config, objective_for
from lib_ae.params import (
    METHODS,
    PARAM_NAMES,
    PARAMS,
    PARAMS_BY_NAME,
    AEParams,
    ParamsError,
    ParamSpec,
    format_thresholds,
    parse_subjects,
    parse_thresholds,
    parse_value,
    validate,
    xyz_params,
)
from lib_ae.webui.wire import INFOTEXT_FORMAT, from_infotext, from_script_args, requested_params, to_infotext


def as_args(params: AEParams) -> list[Any]:
    """The API's positional form of `params`, in `PARAMS` order."""
    return [getattr(params, spec.name) for spec in PARAMS]

# ---------------------------------------------------------------------------------------------------------------------
# Faithful copy of A1111 v1.10.1's infotext quoting and parsing, to prove the round trip without the host:
#   modules/infotext_utils.py: re_param_code, re_imagesize, quote (L56), unquote, and the parameter loop of
#   parse_generation_parameters (L234); modules/processing.py:create_infotext (L705) joins the entries.

A1111_RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
A1111_RE_IMAGESIZE = re.compile(r"^(\d+)x(\d+)$")


def a1111_quote(text: Any) -> Any:
    if "," not in str(text) and "\n" not in str(text) and ":" not in str(text):
        return text
    return json.dumps(text, ensure_ascii=False)


def a1111_unquote(text: str) -> str:
    if len(text) == 0 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        return json.loads(text)
    except Exception:
        return text


def a1111_write(generation_params: dict[str, Any]) -> str:
    """create_infotext's last line: `k` alone when the value equals the key, None omitted."""
    return ", ".join(
        [k if k == v else f"{k}: {a1111_quote(v)}" for k, v in generation_params.items() if v is not None]
    )


def a1111_parse(x: str) -> dict[str, str]:
    """The parameter part of parse_generation_parameters (prompt handling and the host's defaults left out)."""
    res: dict[str, str] = {}
    *lines, lastline = x.strip().split("\n")
    if len(A1111_RE_PARAM.findall(lastline)) < 3:
        lines.append(lastline)
        lastline = ""
    for k, v in A1111_RE_PARAM.findall(lastline):
        try:
            if v[0] == '"' and v[-1] == '"':
                v = a1111_unquote(v)
            m = A1111_RE_IMAGESIZE.match(v)
            if m is not None:
                res[f"{k}-1"] = m.group(1)
                res[f"{k}-2"] = m.group(2)
            else:
                res[k] = v
        except Exception:
            pass  # A1111 prints "Error parsing" and drops the key (e.g. an empty value)
    return res


def through_a1111(params: AEParams) -> dict[str, str]:
    """Write `params` into a realistic infotext and parse it back as A1111 would."""
    generation = {"Steps": 20, "Sampler": "Euler a", "CFG scale": 7, "Seed": 1, "Size": "512x512"}
    generation.update(to_infotext(params))
    generation["Version"] = "v1.10.1"
    text = "a cat, a red car: photo\nNegative prompt: blurry, (bad:1.2)\n" + a1111_write(generation)
    return a1111_parse(text)


# ---------------------------------------------------------------------------------------------------------------------
# The spec itself


def test_positional_order_is_frozen() -> None:
    # The HTTP API's positional form and saved payloads depend on this order: only ever append new parameters.
    assert PARAM_NAMES == (
        "enabled",
        "subjects",
        "scale_factor",
        "alter_fraction",
        "thresholds",
        "max_refinement_steps",
        "smooth_attentions",
        "sigma",
        "kernel_size",
        "attention_res",
        "normalize_eot",
        "apply_to_hires",
        "heatmaps",
        "heatmaps_first_step",
        "method",
        "bind_step_size",
        "conform_temperature",
    )


def test_infotext_keys_and_labels_are_frozen() -> None:
    # Infotext keys live in saved images and labels in users' ui-config.json: renaming either breaks them.
    assert {s.name: (s.infotext_key, s.label) for s in PARAMS} == {
        "enabled": ("AE", "Enable Attend and Excite"),
        "subjects": ("AE subjects", "Subject words"),
        "scale_factor": ("AE scale factor", "Scale factor"),
        "alter_fraction": ("AE steps fraction", "Fraction of steps updated"),
        "thresholds": ("AE thresholds", "Refinement thresholds"),
        "max_refinement_steps": ("AE refinement iterations", "Max refinement iterations"),
        "smooth_attentions": ("AE smoothing", "Smooth attention maps"),
        "sigma": ("AE sigma", "Smoothing sigma"),
        "kernel_size": ("AE kernel size", "Smoothing kernel size"),
        "attention_res": ("AE attention size", "Attention map size (0 = auto)"),
        # Once the checkbox "Prompt-only softmax (SD2.1 mode)"; a radio now (auto/on/off), under a new label so that a
        # checkbox value kept in ui-config.json under the old one is not handed to it.
        "normalize_eot": ("AE prompt-only softmax", "Prompt-only softmax"),
        "apply_to_hires": ("AE hires", "Also on the hires fix pass"),
        "heatmaps": ("AE heatmaps", "Show attention heatmaps"),
        "heatmaps_first_step": ("AE heatmaps first step", "Heatmaps also at the first step"),
        "method": ("AE method", "Method"),
        "bind_step_size": ("AE bind step size", "Binding step size"),
        "conform_temperature": ("AE conform temperature", "CONFORM temperature"),
    }


@pytest.mark.parametrize(
    "name, kind, default, minimum, maximum, step",
    [
        ("enabled", "bool", False, None, None, None),
        ("subjects", "str", "", None, None, None),
        ("scale_factor", "float", 20.0, 0, 100, 0.5),
        ("alter_fraction", "float", 0.5, 0, 1, 0.01),
        ("thresholds", "str", "0:0.05, 10:0.5, 20:0.8", None, None, None),
        ("max_refinement_steps", "int", 20, 0, 100, 1),
        ("smooth_attentions", "bool", True, None, None, None),
        ("sigma", "float", 0.5, 0.05, 5, 0.05),
        ("kernel_size", "int", 3, 1, 15, 2),
        ("attention_res", "int", 0, 0, 128, 1),
        ("normalize_eot", "str", "auto", None, None, None),
        ("apply_to_hires", "bool", False, None, None, None),
        ("heatmaps", "bool", False, None, None, None),
        ("heatmaps_first_step", "bool", False, None, None, None),
        ("method", "str", "excite", None, None, None),
        ("bind_step_size", "float", 20.0, 0, 100, 0.5),
        ("conform_temperature", "float", 0.5, 0.05, 2, 0.05),
    ],
)
def test_spec_table(name: str, kind: str, default: Any, minimum: Any, maximum: Any, step: Any) -> None:
    spec = PARAMS_BY_NAME[name]
    assert (spec.kind, spec.default, spec.minimum, spec.maximum, spec.step) == (kind, default, minimum, maximum, step)
    assert type(spec.default).__name__ == kind
    assert getattr(AEParams(), name) == default
    assert spec.help and spec.label


def test_spec_is_consistent() -> None:
    for attribute in ("name", "label", "infotext_key"):
        values = [getattr(s, attribute) for s in PARAMS]
        assert len(set(values)) == len(values), attribute
    for spec in PARAMS:
        assert re.fullmatch(r"\w[\w \-/]+", spec.infotext_key), spec.infotext_key
        assert spec.infotext_key == "AE" or spec.infotext_key.startswith("AE ")
        assert spec.infotext_key != INFOTEXT_FORMAT
    assert [f for f in AEParams.__dataclass_fields__] == list(PARAM_NAMES)


def test_spec_rejects_an_unparseable_infotext_key() -> None:
    with pytest.raises(ValueError, match="infotext key"):
        ParamSpec(name="x", label="X", kind="bool", default=False, infotext_key="AE: x", help="h")
    with pytest.raises(ValueError, match="minimum, maximum and step"):
        ParamSpec(name="x", label="X", kind="int", default=1, infotext_key="AE x", help="h")


def test_defaults_are_the_official_config() -> None:
    assert excite_config(AEParams()) == ExciteConfig()
    assert as_args(AEParams()) == [s.default for s in PARAMS]


def test_xyz_params() -> None:
    assert [s.name for s in xyz_params()] == [n for n in PARAM_NAMES if n not in ("apply_to_hires", "heatmaps", "heatmaps_first_step")]


def test_spec_ranges_and_what_they_accept() -> None:
    by_name = {spec.name: spec for spec in PARAMS}
    scale = by_name["scale_factor"]
    assert (scale.minimum, scale.maximum, scale.step) == (0, 100, 0.5)
    assert by_name["kernel_size"].expected() == "one of 1, 3, 5, 7, 9, 11, 13, 15"
    assert by_name["subjects"].minimum is None


def test_each_field_is_its_parameters_declaration() -> None:
    import dataclasses

    fields = dataclasses.fields(AEParams)
    assert [f.name for f in fields] == list(PARAM_NAMES)
    assert [f.default for f in fields] == [s.default for s in PARAMS]
    assert [f.type for f in fields] == [s.kind for s in PARAMS]  # the annotation is the spec's kind
    assert json.dumps([s.default for s in PARAMS])  # plain JSON values: the API's defaults


# ---------------------------------------------------------------------------------------------------------------------
# Script args: good values

GOOD = {"enabled": True, "subjects": "cat"}


def args_with(name: str, value: Any) -> list[Any]:
    values = {**AEParams(**GOOD).as_dict(), name: value}
    return [values[n] for n in PARAM_NAMES]


def test_empty_args_are_the_defaults() -> None:
    assert from_script_args([]) == AEParams()
    assert from_script_args(()) == AEParams()


def test_too_few_positional_args_keep_the_remaining_defaults() -> None:
    assert from_script_args([True, "cat, dog", 30]) == AEParams(enabled=True, subjects="cat, dog", scale_factor=30.0)


def test_full_positional_args() -> None:
    args = [True, "cat, red car", 25.5, 0.4, "0:0.1, 5:0.9", 10, False, 1.0, 5, 16, "on", True, True, True,
            "excite+bind", 12.5, 0.25]
    params = from_script_args(args)
    assert as_args(params) == args
    assert from_script_args([*args[:10], True, *args[11:]]) == params  # the bool it was before reads as on
    assert from_script_args(as_args(params)) == params
    assert from_script_args(tuple(args)) == params


@pytest.mark.parametrize(
    "name, raw, expected",
    [
        ("enabled", True, True),
        ("enabled", "true", True),
        ("enabled", " FALSE ", False),
        ("enabled", "True", True),
        ("enabled", np.bool_(True), True),
        ("smooth_attentions", "False", False),
        ("subjects", "cat,dog", "cat, dog"),
        ("subjects", "  red   car ,, cat,", "red car, cat"),
        ("subjects", ["cat", "Red car"], "cat, Red car"),
        ("subjects", ("cat", "", "  dog "), "cat, dog"),
        ("subjects", "cat, Cat, CAT", "cat"),
        ("scale_factor", 0, 0.0),
        ("scale_factor", 100, 100.0),
        ("scale_factor", "7.5", 7.5),
        ("scale_factor", " 1e1 ", 10.0),
        ("scale_factor", np.float32(2.5), 2.5),
        ("scale_factor", np.int64(3), 3.0),
        ("alter_fraction", 1, 1.0),
        ("alter_fraction", 0.0, 0.0),
        ("sigma", 0.05, 0.05),
        ("sigma", "5", 5.0),
        ("max_refinement_steps", 20.0, 20),
        ("max_refinement_steps", "7", 7),
        ("max_refinement_steps", "7.0", 7),
        ("max_refinement_steps", 0, 0),
        ("max_refinement_steps", np.int32(100), 100),
        ("kernel_size", 1, 1),
        ("kernel_size", 15.0, 15),
        ("kernel_size", "5", 5),
        ("attention_res", 0, 0),
        ("attention_res", 128, 128),
        ("thresholds", "0:0.05,10:0.5,20:0.8", "0:0.05, 10:0.5, 20:0.8"),
        ("thresholds", "20:0.8, 0:0.05", "0:0.05, 20:0.8"),
        ("thresholds", "", "none"),
        ("thresholds", "None", "none"),
        ("thresholds", "49:1, ", "49:1.0"),
        ("subjects", "auto", ""),
        ("subjects", " AUTO ", ""),
        ("subjects", ["auto"], ""),
        ("subjects", "auto, cat", "auto, cat"),  # "auto" among other subjects is the word
        ("subjects", "", ""),
        ("method", "excite", "excite"),
        ("method", "bind", "bind"),
        ("method", " Excite + Bind ", "excite+bind"),
        ("method", "BIND", "bind"),
        ("bind_step_size", 0, 0.0),
        ("bind_step_size", "100", 100.0),
    ],
)
def test_good_values(name: str, raw: Any, expected: Any) -> None:
    for params in (from_script_args(args_with(name, raw)), from_script_args([{**GOOD, name: raw}])):
        value = getattr(params, name)
        assert value == expected and type(value) is type(expected)
    assert parse_value(name, raw) == expected


def test_disabled_with_empty_subjects_is_fine() -> None:
    assert from_script_args([False, ""]) == AEParams()


@pytest.mark.parametrize(
    "args",
    [
        [True],
        [True, ""],
        [True, " , ,  "],
        [True, []],
        [True, ["", " "]],
        [True, "auto"],
        [True, "Auto"],
        [{"enabled": True}],
        [{"enabled": "true", "subjects": ""}],
        [{"enabled": True, "subjects": "auto"}],
    ],
)
def test_enabled_without_subjects_means_automatic_subjects(args: list[Any]) -> None:
    # Issue 13 changed this deliberately: it used to be the error "AE is enabled but no subject words are given";
    # now the host finds the subjects in the prompt (tests/test_hostile.py checks the images).
    params = from_script_args(args)
    assert params.enabled and params.subjects == "" and params.subject_names == () and params.auto_subjects
    assert to_infotext(params)["AE subjects"] == "auto"
    assert not AEParams(enabled=True, subjects="cat").auto_subjects


# ---------------------------------------------------------------------------------------------------------------------
# Script args: every bad value of every field

BAD_BOOL = [None, 0, 1, 1.0, np.int64(1), "yes", "1", "", "truee", [], [True], {}, {"value": True}]
BAD_NUMBER = [None, True, False, np.bool_(False), "abc", "", "  ", "nan", "inf", "-inf", math.nan, math.inf, -math.inf, 1e9, 10**400,
              -1, "-1", "1,5", "20%", [20], [[20]], {}, (1,), b"20", complex(1, 0)]
BAD_TEXT = [None, 0, 1.5, True, {}, {"cat": 1}, b"cat", object()]
BAD = {
    "enabled": BAD_BOOL,
    "subjects": BAD_TEXT + [[["cat"]], ["cat", 3], ["cat", None], ["red, car"], [["a", "b"], "c"], '"cat"',
                            '"red car", dog', ["dog", '"cat"'], '"', '"a" "b"'],
    "scale_factor": BAD_NUMBER + [100.5, -0.001, "1e3"],
    "alter_fraction": BAD_NUMBER + [1.01, -0.1, 2],
    "thresholds": BAD_TEXT + [["0:0.05"], {0: 0.05}, "0.05", "0:abc", "50:0.5", "-1:0.5", "0:1.5", "0:-0.1", "0:nan",
                              "0:inf", "0:0.1, 0:0.2", "a:0.5", "1.5:0.5", "0:0.05:1", "0 0.05", ":0.5", "0:"],
    "max_refinement_steps": BAD_NUMBER + [1.5, "1.5", 101, "1e9"],
    "smooth_attentions": BAD_BOOL,
    "sigma": BAD_NUMBER + [0, 0.049, 5.01],
    "kernel_size": BAD_NUMBER + [0, 2, 4, 14, 16, 17, 3.5, "2", 2.0],
    "attention_res": BAD_NUMBER + [129, 16.5, "16.5"],
    "normalize_eot": BAD_BOOL,
    "apply_to_hires": BAD_BOOL,
    "heatmaps": BAD_BOOL,
    "heatmaps_first_step": BAD_BOOL,
    "method": BAD_TEXT + ["", "syngen", "excite bind", "excite,bind", ["bind"], "auto"],
    "bind_step_size": BAD_NUMBER + [100.5, -0.5],
    "conform_temperature": BAD_NUMBER + [0, 0.04, 2.01],
}
BAD_CASES = [(name, value) for name, values in BAD.items() for value in values]


def test_every_field_has_bad_cases() -> None:
    assert set(BAD) == set(PARAM_NAMES)


@pytest.mark.parametrize("name, raw", BAD_CASES, ids=[f"{n}-{i}" for n, v in BAD.items() for i in range(len(v))])
def test_bad_values_are_errors_naming_the_field(name: str, raw: Any) -> None:
    key = PARAMS_BY_NAME[name].infotext_key
    forms = [args_with(name, raw), [{**GOOD, name: raw}]]
    if name == "enabled" and isinstance(raw, dict):
        forms = forms[1:]  # a dict in the first position *is* the dict form (test_dict_form*)
    for args in forms:
        with pytest.raises(ParamsError) as error:
            from_script_args(args)
        messages = error.value.messages
        assert messages, raw
        assert all(m.startswith(f"{key}: ") for m in messages), messages
    with pytest.raises(ParamsError):
        parse_value(name, raw)
    with pytest.raises(ParamsError):
        AEParams(**{**GOOD, name: raw})


@pytest.mark.parametrize(
    "name, raw, message",
    [
        ("scale_factor", "abc", "AE scale factor: expected a number between 0 and 100, got 'abc' (str)"),
        ("scale_factor", True, "AE scale factor: expected a number between 0 and 100, got True (bool)"),
        ("scale_factor", np.True_, "AE scale factor: expected a number between 0 and 100, got np.True_ (numpy.bool)"),
        ("scale_factor", None, "AE scale factor: expected a number between 0 and 100, got None (NoneType)"),
        ("scale_factor", math.nan, "AE scale factor: expected a number between 0 and 100, got nan (float)"),
        ("scale_factor", 1e9, "AE scale factor: expected a number between 0 and 100, got 1000000000.0 (float)"),
        ("sigma", 0, "AE sigma: expected a number between 0.05 and 5, got 0 (int)"),
        (
            "max_refinement_steps",
            1.5,
            "AE refinement iterations: expected a whole number between 0 and 100, got 1.5 (float)",
        ),
        ("kernel_size", 4, "AE kernel size: expected one of 1, 3, 5, 7, 9, 11, 13, 15, got 4 (int)"),
        ("enabled", 1, "AE: expected true or false, got 1 (int)"),
        ("smooth_attentions", "yes", "AE smoothing: expected true or false, got 'yes' (str)"),
        ("subjects", 5, "AE subjects: expected text or a list of texts, got 5 (int)"),
        ("subjects", ["cat", 3], "AE subjects: item 1 of the list must be text, got 3 (int)"),
        ("subjects", [["cat"]], "AE subjects: item 0 of the list must be text, got ['cat'] (list)"),
        (
            "subjects",
            ["red, car"],
            "AE subjects: item 0 of the list contains a comma ('red, car'); give one subject per item",
        ),
        ("thresholds", ["0:0.05"], "AE thresholds: expected text, got ['0:0.05'] (list)"),
        ("thresholds", "0:0.1, 0:0.2", "AE thresholds: step 0 is given more than once"),
        ("thresholds", "0:1.5", "AE thresholds: in '0:1.5' the threshold must be a number between 0 and 1"),
        ("method", "syngen", "AE method: expected one of excite, bind, excite+bind, conform, initno, initno+selfcross, conform+selfcross, got 'syngen' (str)"),
        ("method", 1, "AE method: expected one of excite, bind, excite+bind, conform, initno, initno+selfcross, conform+selfcross, got 1 (int)"),
        ("bind_step_size", -1, "AE bind step size: expected a number between 0 and 100, got -1 (int)"),
    ],
)
def test_messages_are_precise(name: str, raw: Any, message: str) -> None:
    with pytest.raises(ParamsError) as error:
        from_script_args([{**GOOD, name: raw}])
    assert error.value.messages == [message]


def test_quoted_subject_message() -> None:
    with pytest.raises(ParamsError) as error:
        from_script_args([True, '"red car", dog'])
    assert error.value.messages == [
        "AE subjects: '\"red car\"' is wrapped in double quotes; write subjects without them "
        "(commas separate subjects, a subject may be a phrase)"
    ]


def test_thresholds_step_message_explains_the_reference_steps() -> None:
    with pytest.raises(ParamsError) as error:
        parse_thresholds("50:0.5")
    assert error.value.messages == [
        "AE thresholds: in '50:0.5' the step must be a whole number from 0 to 49 "
        "(steps are given for 50 sampling steps and scaled to the actual count)"
    ]


def test_all_problems_are_reported_at_once() -> None:
    args = [1, 5, "abc", None, 7, 1.5, "maybe", math.inf, 4, -1, [], {}, "no", 0, "both", "x", -3]
    with pytest.raises(ParamsError) as error:
        from_script_args(args)
    keys = [m.split(":")[0] for m in error.value.messages]
    assert keys == [s.infotext_key for s in PARAMS]
    assert str(error.value) == "\n".join(error.value.messages)
    assert isinstance(error.value, ValueError)


def test_thresholds_report_every_bad_entry() -> None:
    with pytest.raises(ParamsError) as error:
        from_script_args([{**GOOD, "thresholds": "0:abc, 60:0.5, 10:0.5, x"}])
    assert len(error.value.messages) == 3


def test_too_many_positional_args() -> None:
    args = as_args(AEParams(**GOOD)) + ["extra"]
    with pytest.raises(ParamsError) as error:
        from_script_args(args)
    assert error.value.messages == [
        f"AE: got {len(PARAMS) + 1} positional args but there are only {len(PARAMS)} parameters (" + ", ".join(PARAM_NAMES) + ")"
    ]


def test_too_many_positional_args_and_bad_values_are_all_reported() -> None:
    args = args_with("sigma", "x") + [1, 2]
    with pytest.raises(ParamsError) as error:
        from_script_args(args)
    assert len(error.value.messages) == 2
    assert error.value.messages[0].startswith(f"AE: got {len(PARAMS) + 2} positional args")
    assert error.value.messages[1].startswith("AE sigma: ")


@pytest.mark.parametrize("args", [None, "True, cat", b"x", 5, {"enabled": True}])
def test_args_must_be_a_sequence(args: Any) -> None:
    with pytest.raises(ParamsError, match="script args must be a list"):
        from_script_args(args)


# ---------------------------------------------------------------------------------------------------------------------
# Script args: the dict form


def test_dict_form() -> None:
    params = from_script_args([{"enabled": True, "subjects": ["cat", "dog"], "scale_factor": 20, "kernel_size": 5}])
    assert params == AEParams(enabled=True, subjects="cat, dog", kernel_size=5)
    assert from_script_args([params.as_dict()]) == params
    assert from_script_args([{}]) == AEParams()


def test_dict_form_ignores_the_padding_a1111_adds() -> None:
    # A1111's API fills the rest of the script's arg slice with the UI defaults after `{"args": [{...}]}`.
    defaults = as_args(AEParams())
    assert from_script_args([{"enabled": True, "subjects": "cat"}] + defaults[1:]) == AEParams(**GOOD)


def test_dict_form_unknown_keys() -> None:
    with pytest.raises(ParamsError) as error:
        from_script_args([{"enabled": True, "subjects": "cat", "scale": 3, "AE sigma": 1}])
    valid = ", ".join(PARAM_NAMES)
    assert error.value.messages == [
        f"AE: unknown parameter 'scale'; valid names are {valid}",
        f"AE: unknown parameter 'AE sigma'; valid names are {valid}",
    ]


def test_dict_form_non_text_keys_and_bad_values_together() -> None:
    with pytest.raises(ParamsError) as error:
        from_script_args([{1: True, "enabled": "on", "subjects": "cat"}])
    assert error.value.messages == [
        "AE: dict keys must be parameter names (text), got 1 (int)",
        "AE: expected true or false, got 'on' (str)",
    ]


def test_validate_fills_defaults_and_checks_names() -> None:
    assert validate({"subjects": "cat,dog"}) == {**AEParams().as_dict(), "subjects": "cat, dog"}
    with pytest.raises(ParamsError, match="unknown parameter 'nope'"):
        validate({"nope": 1})
    with pytest.raises(ParamsError, match="unknown parameter 'nope'"):
        parse_value("nope", 1)


# ---------------------------------------------------------------------------------------------------------------------
# AEParams


def test_params_are_canonical_and_frozen() -> None:
    params = AEParams(enabled=True, subjects=" cat,cat ,  red  car", scale_factor=20, thresholds="20:0.8,0:0.05")
    assert params.subjects == "cat, red car"
    assert list(params.subject_names) == ["cat", "red car"]
    assert params.thresholds == "0:0.05, 20:0.8"
    assert dict(params.threshold_steps) == {0: 0.05, 20: 0.8}
    assert type(params.scale_factor) is float
    assert params == AEParams(enabled=True, subjects="cat, red car", thresholds="0:0.05, 20:0.8")
    with pytest.raises(AttributeError):
        params.sigma = 1.0  # type: ignore[misc]
    assert dataclasses.replace(params, sigma=1) == AEParams(
        enabled=True, subjects="cat, red car", thresholds="0:0.05, 20:0.8", sigma=1.0
    )
    with pytest.raises(ParamsError):
        dataclasses.replace(params, sigma=-1)


def test_constructor_validates_everything() -> None:
    with pytest.raises(ParamsError) as error:
        AEParams(enabled=True, subjects="", sigma=0, method="both")  # type: ignore[arg-type]
    assert error.value.messages == [
        "AE sigma: expected a number between 0.05 and 5, got 0 (int)",
        "AE method: expected one of excite, bind, excite+bind, conform, initno, initno+selfcross, conform+selfcross, got 'both' (str)",
    ]


@pytest.mark.parametrize(
    "changes, expected",
    [
        ({}, ExciteConfig()),
        ({"attention_res": 16}, ExciteConfig(attention_res=(16, 16))),
        ({"thresholds": "none"}, ExciteConfig(thresholds={})),
        ({"thresholds": "5:0.3"}, ExciteConfig(thresholds={5: 0.3})),
        (
            {"scale_factor": 30, "alter_fraction": 0.25, "max_refinement_steps": 0, "smooth_attentions": False,
             "sigma": 1.5, "kernel_size": 7, "normalize_eot": True},
            ExciteConfig(step_size=30.0, alter_fraction=0.25, max_refinement_iterations=0, smooth_attentions=False,
                         sigma=1.5, kernel_size=7, normalize_eot=True),
        ),
        # enabled / subjects / apply_to_hires are for the host, not the engine; method and bind_step_size are read
        # through binding_config
        ({"enabled": True, "subjects": "cat", "apply_to_hires": True}, ExciteConfig()),
        ({"method": "excite+bind", "bind_step_size": 5}, ExciteConfig()),
    ],
)
def test_to_config(changes: dict[str, Any], expected: ExciteConfig) -> None:
    assert excite_config(AEParams(**changes)) == expected


def test_to_binding_config_and_the_method_flags() -> None:
    assert binding_config(AEParams()) == BindingConfig()  # SynGen's official step size and 25 of 50 steps
    assert binding_config(AEParams(bind_step_size=7.5, alter_fraction=0.25)) == BindingConfig(
        step_size=7.5, intervention_fraction=0.25
    )
    objectives = [objective_for(AEParams(method=m)) for m in METHODS]
    assert [(isinstance(o, (Excite, ExciteBind)), o.uses_modifier_pairs) for o in objectives] == [
        (True, False), (False, True), (True, True), (False, True), (False, False), (False, False), (False, True)
    ]
    assert [o.method for o in objectives] == list(METHODS)


# ---------------------------------------------------------------------------------------------------------------------
# Subjects and thresholds text


@pytest.mark.parametrize(
    "text, expected",
    [
        ("", []),
        (" , ,, ", []),
        ("cat", ["cat"]),
        ("cat, dog", ["cat", "dog"]),
        ("cat,dog,", ["cat", "dog"]),
        ("  red   car , cat", ["red car", "cat"]),
        ("red\ncar,\tcat", ["red car", "cat"]),
        ("Cat, cat, CAT, dog, DOG", ["Cat", "dog"]),
        ("cat, red car, car", ["cat", "red car", "car"]),
        ("über-cat, naïve dog, 猫, 🐱", ["über-cat", "naïve dog", "猫", "🐱"]),
        ("o'neill, 5'11\"", ["o'neill", "5'11\""]),
    ],
)
def test_parse_subjects(text: str, expected: list[str]) -> None:
    assert parse_subjects(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("0:0.05, 10:0.5, 20:0.8", {0: 0.05, 10: 0.5, 20: 0.8}),
        ("0:0.05,10:0.5,20:0.8", {0: 0.05, 10: 0.5, 20: 0.8}),
        (" 20 : 0.8 , 0:0.05 ", {20: 0.8, 0: 0.05}),
        ("49:1", {49: 1.0}),
        ("0:0", {0: 0.0}),
        ("0:1e-1", {0: 0.1}),
        ("", {}),
        ("none", {}),
        (" NONE ", {}),
        ("0:0.05,", {0: 0.05}),
    ],
)
def test_parse_thresholds(text: str, expected: dict[int, float]) -> None:
    assert parse_thresholds(text) == expected


@pytest.mark.parametrize(
    "mapping, text",
    [
        ({0: 0.05, 10: 0.5, 20: 0.8}, "0:0.05, 10:0.5, 20:0.8"),
        ({20: 0.8, 0: 0.05}, "0:0.05, 20:0.8"),
        ({}, "none"),
        ({3: 1}, "3:1.0"),
        ({7: 0.1 + 0.2}, "7:0.30000000000000004"),
    ],
)
def test_format_thresholds_round_trips(mapping: dict[int, float], text: str) -> None:
    assert format_thresholds(mapping) == text
    assert parse_thresholds(text) == {k: float(v) for k, v in mapping.items()}


@pytest.mark.parametrize("text", ["abc", "0:abc", "50:0", "-1:0.5", "0:2", "0:0.1,0:0.2", "1.0:0.5", "0:nan", "٣:0.5"])
def test_parse_thresholds_errors(text: str) -> None:
    with pytest.raises(ParamsError) as error:
        parse_thresholds(text)
    assert all(m.startswith("AE thresholds: ") for m in error.value.messages)


# ---------------------------------------------------------------------------------------------------------------------
# Infotext

ROUND_TRIP_SUBJECTS = [
    "cat",
    "cat, red car",
    "cat: the animal, dog",
    "a: b",
    "über-cat, naïve dog, 猫, 日本語",
    "🐱, 🐶 dog, 👩‍🚀",
    "o'neill",
    "say \"hi\" now",
    "5'11\"",
    "\"a\" b",
    "a\\b, c\\\\d",
    "\\u00e9",
    "3x4",
    "512x512",
    "512x512, 3x4",
    "True",
    "none",
    "AE",
    "AE scale factor: 99, Steps: 1",
    "key=value; other",
    "long " * 40 + "end",
]


@pytest.mark.parametrize("subjects", ROUND_TRIP_SUBJECTS)
def test_infotext_round_trip_through_a1111(subjects: str) -> None:
    params = AEParams(enabled=True, subjects=subjects)
    fields = through_a1111(params)
    assert fields["Steps"] == "20" and fields["Size-1"] == "512"  # the host's own keys are unharmed
    assert from_infotext(fields) == params.as_dict()
    assert AEParams(**from_infotext(fields, strict=True)) == params


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"scale_factor": 0.1 + 0.2, "alter_fraction": 1 / 3, "sigma": 0.05},
        {"scale_factor": 100, "alter_fraction": 0, "max_refinement_steps": 0, "kernel_size": 15, "attention_res": 128},
        {"thresholds": "none", "smooth_attentions": False, "normalize_eot": True, "apply_to_hires": True},
        {"thresholds": "0:0.123456789012345, 49:1"},
        {"attention_res": 16, "kernel_size": 1, "sigma": 5},
    ],
)
def test_infotext_round_trip_all_fields(changes: dict[str, Any]) -> None:
    params = AEParams(enabled=True, subjects="cat, red car", **changes)
    assert AEParams(**from_infotext(through_a1111(params), strict=True)) == params


def test_infotext_round_trip_random_subjects() -> None:
    rng = random.Random(1234)
    alphabet = list("abcXYZ 0123456789,:;\"'\\/-_()[]{}<>|!?.\n\t")
    alphabet += ["é", "ß", "猫", "🐱", "👩‍🚀", "\u200b", "x"]
    checked = 0
    for _ in range(400):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 30)))
        try:
            params = AEParams(enabled=True, subjects=text)
        except ParamsError as error:
            # only quoted subjects are refused (subject-less text means automatic subjects)
            assert all("double quotes" in m for m in error.messages), text
            continue
        assert AEParams(**from_infotext(through_a1111(params), strict=True)) == params, text
        checked += 1
    assert checked > 300


@pytest.mark.parametrize("subjects", ["", "auto", "AUTO"])
def test_automatic_subjects_round_trip_as_auto(subjects: str) -> None:
    params = AEParams(enabled=True, subjects=subjects)
    fields = through_a1111(params)
    assert fields["AE subjects"] == "auto"
    assert AEParams(**from_infotext(fields, strict=True)) == params == AEParams(enabled=True)


@pytest.mark.parametrize("method", METHODS)
def test_method_round_trips(method: str) -> None:
    params = AEParams(enabled=True, subjects="car", method=method, bind_step_size=12.5)
    fields = through_a1111(params)
    assert fields["AE method"] == method
    assert AEParams(**from_infotext(fields, strict=True)) == params


def test_an_image_from_before_the_method_existed_reads_as_excite() -> None:
    # Its infotext has A&E keys but no "AE method": it was made by Attend-and-Excite alone, whatever the UI shows now.
    fields = {"AE": "v1", "AE subjects": "cat", "AE sigma": "1.5"}
    assert from_infotext(fields) == {
        "enabled": True, "subjects": "cat", "sigma": 1.5, "method": "excite", "bind_step_size": 20.0,
        "conform_temperature": 0.5,
    }


def test_infotext_content() -> None:
    params = AEParams(enabled=True, subjects="cat, red car", attention_res=16)
    entries = to_infotext(params)
    assert list(entries) == [s.infotext_key for s in PARAMS]
    assert entries["AE"] == INFOTEXT_FORMAT == "v1"
    assert entries["AE subjects"] == "cat, red car"
    assert entries["AE attention size"] == 16
    assert entries["AE smoothing"] is True
    for value in entries.values():
        assert isinstance(value, (str, int, float, bool))
        assert not re.match(r"^(\d+)x(\d+)$", str(value))
        assert str(value) != ""


def test_disabled_writes_nothing_and_reads_back_disabled() -> None:
    assert to_infotext(AEParams()) == {}
    assert to_infotext(AEParams(subjects="cat", sigma=2)) == {}
    assert from_infotext(through_a1111(AEParams(sigma=2))) == {"enabled": False}


def test_infotext_without_ae_switches_it_off() -> None:
    fields = a1111_parse("a cat\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1")
    assert from_infotext(fields) == {"enabled": False}
    assert from_infotext({}) == {"enabled": False}


def test_infotext_partial_keys() -> None:
    # The parameters appended for issues 13 and 20 (method, bind_step_size, conform_temperature) take their defaults
    # when absent: see test_an_image_from_before_the_method_existed_reads_as_excite.
    appended = {"method": "excite", "bind_step_size": 20.0, "conform_temperature": 0.5}
    assert from_infotext({"AE": "v1"}) == {"enabled": True, **appended}
    assert from_infotext({"AE sigma": "2"}) == {"enabled": True, "sigma": 2.0, **appended}
    assert from_infotext({"AE subjects-1": "3", "AE subjects-2": "4"}) == {
        "enabled": True, "subjects": "3x4", **appended
    }


def test_infotext_bad_values_are_skipped_or_strict(caplog: pytest.LogCaptureFixture) -> None:
    fields = {"AE": "v1", "AE subjects": "cat", "AE sigma": "abc", "AE kernel size": "4", "AE smoothing": "False"}
    with caplog.at_level(logging.WARNING, logger="lib_ae.webui.wire"):
        result = from_infotext(fields)
    appended = {"method": "excite", "bind_step_size": 20.0, "conform_temperature": 0.5}  # absent: the defaults
    assert result == {"enabled": True, "subjects": "cat", "smooth_attentions": False, **appended}
    assert "AE sigma: expected a number between 0.05 and 5, got 'abc' (str)" in caplog.text
    with pytest.raises(ParamsError) as error:
        from_infotext(fields, strict=True)
    assert len(error.value.messages) == 2


def test_infotext_unknown_format_version_is_read_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="lib_ae.webui.wire"):
        result = from_infotext({"AE": "v9", "AE sigma": "1.5"})
    assert result == {"enabled": True, "sigma": 1.5, "method": "excite", "bind_step_size": 20.0,
                      "conform_temperature": 0.5}
    assert "v9" in caplog.text


def test_infotext_values_as_a1111_api_casts_them() -> None:
    # Typed values (e.g. from Api.apply_infotext after a cast) are accepted too.
    assert from_infotext({"AE": "v1", "AE kernel size": 5, "AE smoothing": False, "AE sigma": 1, "AE method": "bind",
                          "AE bind step size": 10}) == {
        "enabled": True, "kernel_size": 5, "smooth_attentions": False, "sigma": 1.0, "method": "bind",
        "bind_step_size": 10.0, "conform_temperature": 0.5,
    }


# ---------------------------------------------------------------------------------------------------------------------
# One reading of the args: dict or list, enabled or not, X/Y/Z overrides; typed values parsed once


def test_a_second_dict_in_the_args_is_an_error_naming_it() -> None:
    defaults = as_args(AEParams())
    with pytest.raises(ParamsError) as caught:
        from_script_args([{"enabled": True, "subjects": "cat"}, {"scale_factor": 30}] + defaults[2:])
    assert any("arg 2 is a dict too" in m and "scale_factor" in m for m in caught.value.messages)
    with pytest.raises(ParamsError, match="arg 2 is a dict too"):
        requested_params([{"enabled": True, "subjects": "cat"}, {"scale_factor": 30}])


def test_requested_params_is_none_when_disabled_and_applies_overrides() -> None:
    assert requested_params([False, "", "not a number"]) is None  # a disabled script is not validated further
    assert requested_params([{"enabled": False, "scale_factor": "abc"}]) is None
    assert requested_params([False, "cat"], {"enabled": "True"}) == AEParams(**GOOD)
    assert requested_params([True, "cat"], {"scale_factor": 5}) == AEParams(**GOOD, scale_factor=5.0)
    assert requested_params([{"enabled": True, "subjects": "cat"}], {"enabled": False}) is None
    with pytest.raises(ParamsError) as caught:  # an invalid flag is reported with the other problems
        requested_params([{"enabled": "yes", "subject": "cat"}])
    assert len(caught.value.messages) == 2


def test_typed_subjects_and_thresholds_are_parsed_once() -> None:
    params = AEParams(enabled=True, subjects=" cat ,red  car, Cat", thresholds="20:0.8, 0:0.05")
    assert params.subject_names == ("cat", "red car")
    assert dict(params.threshold_steps) == {0: 0.05, 20: 0.8}
    assert params.subject_names is params.subject_names  # stored, not parsed again per access
    with pytest.raises(TypeError):
        params.threshold_steps[5] = 0.5  # type: ignore[index]  # read-only
    assert [f.name for f in dataclasses.fields(AEParams)] == list(PARAM_NAMES)  # generated from PARAMS


@pytest.mark.parametrize(
    "raw, expected",
    [("auto", "auto"), ("ON", "on"), (" off ", "off"), (True, "on"), (False, "off"), ("True", "on"), ("false", "off"),
     (np.bool_(True), "on")],
)
def test_prompt_only_softmax_reads_its_words_and_the_bools_it_was(raw: Any, expected: str) -> None:
    assert parse_value("normalize_eot", raw) == expected


def test_prompt_only_softmax_infotext_of_an_older_image_reads_as_it_was_made() -> None:
    # Images written while the parameter was a checkbox carry "AE prompt-only softmax: False" (or True).
    assert from_infotext({"AE": "v1", "AE prompt-only softmax": "False"})["normalize_eot"] == "off"
    assert from_infotext({"AE": "v1", "AE prompt-only softmax": "True"})["normalize_eot"] == "on"
    with pytest.raises(ParamsError, match="expected one of auto, on, off"):
        parse_value("normalize_eot", "sometimes")


def test_excite_config_turns_on_the_sd21_mode_only_when_resolved_on() -> None:
    assert excite_config(AEParams(normalize_eot="on")).normalize_eot is True
    assert excite_config(AEParams(normalize_eot="off")).normalize_eot is False
    assert excite_config(AEParams()).normalize_eot is False  # unresolved auto: the host resolves it per model
