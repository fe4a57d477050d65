"""The user's controls, all generated from `lib_ae.params.PARAMS`: the accordion's components, the Settings section
with the defaults of the advanced ones, the infotext paste readers, and the X/Y/Z plot axes."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from lib_ae.params import PARAMS, ParamsError, ParamSpec, parse_value, xyz_params
from lib_ae.pass_memory import MEMORY_MODES

from . import host
from .host import gr
from .report import TITLE
from .run_state import with_xyz_override
from .sampling_pass import CUDA_GRAPHS_SETTING, PASS_MEMORY_SETTING
from .wire import from_infotext

logger = logging.getLogger("lib_ae.webui")

MAIN_PARAMS = frozenset({"enabled", "subjects", "method"})
"""Shown in the accordion itself; every other parameter is in its "Advanced" section."""
SETTINGS_SECTION = ("attend_and_excite", TITLE)
XYZ_PREFIX = "[AE] "


def setting_key(spec: ParamSpec) -> str:
    return f"ae_default_{spec.name}"


def initial_value(spec: ParamSpec) -> Any:
    """A control's initial value: the user's default from Settings if valid, else the spec's default. A1111 also
    takes the API's default args from these values (api.py `Api.init_default_script_args` calls ui())."""
    if spec.name in MAIN_PARAMS:
        return spec.default
    raw = host.option(setting_key(spec), spec.default)
    try:
        return parse_value(spec.name, raw)
    except ParamsError as error:
        logger.warning("%s: ignoring the setting %s (%s)", TITLE, setting_key(spec), "; ".join(error.messages))
        return spec.default


def make_control(spec: ParamSpec, value: Any, elem_id: str) -> Any:
    """The gradio control of one parameter: Checkbox (bool), Slider (number, with the spec's range), Radio (text with
    choices), Textbox (text)."""
    if spec.choices:
        return gr.Radio(choices=list(spec.choices), value=value, label=spec.label, info=spec.help, elem_id=elem_id)
    if spec.kind == "bool":
        return gr.Checkbox(value=value, label=spec.label, info=spec.help, elem_id=elem_id)
    if spec.kind in ("int", "float"):
        assert spec.minimum is not None and spec.maximum is not None  # ParamSpec requires a range for numbers
        return gr.Slider(
            minimum=spec.minimum,
            maximum=spec.maximum,
            step=spec.step,
            value=value,
            label=spec.label,
            info=spec.help,
            elem_id=elem_id,
        )
    return gr.Textbox(value=value, label=spec.label, info=spec.help, lines=1, elem_id=elem_id)


def pasted_value(name: str) -> Callable[[dict[str, Any]], Any]:
    """Infotext paste reader for one parameter: its typed value, None (no change) when absent. For `enabled`: whether
    the infotext has any A&E key, so pasting parameters without A&E switches it off."""

    def read(fields: dict[str, Any]) -> Any:
        return from_infotext(fields).get(name)

    return read


def infotext_fields(controls: dict[str, Any]) -> list[tuple[Any, Any]]:
    """Pasting infotext (infotext_utils.connect_paste, api.py `Api.apply_infotext`): text and number
    parameters by key (A1111 casts to the control's type); through a reader the enable flag and the booleans, because
    the API casts with bool(), which would read "False" as True, and the parameters whose absence from an infotext
    with A&E means their default (a key-only field would leave the current value: an old image made with `excite`
    must not paste as `bind`), and a parameter that was a bool once (its older images say True/False)."""
    return [
        (controls[spec.name], pasted_value(spec.name) if _read_by_reader(spec) else spec.infotext_key)
        for spec in PARAMS
    ]


def _read_by_reader(spec: ParamSpec) -> bool:
    # A text parameter that was a bool once: an older image's "True"/"False" must become its word, not the radio's.
    return spec.kind == "bool" or spec.absent_means_default or spec.accepts_bool


def paste_field_names() -> list[str]:
    """"Send to img2img/inpaint" copies the controls whose infotext field is one of these keys
    (infotext_utils.connect_paste_params_buttons)."""
    return [spec.infotext_key for spec in PARAMS if not _read_by_reader(spec)]


def on_ui_settings() -> None:
    """Settings > Attend and Excite: the initial values of the "Advanced" controls (and of the positional API args)."""
    for spec in PARAMS:
        if spec.name in MAIN_PARAMS:
            continue
        component: Any
        component_args: dict[str, Any] | None = None
        if spec.choices:
            component = gr.Radio
            component_args = {"choices": list(spec.choices)}
        elif spec.kind == "bool":
            component = gr.Checkbox
        elif spec.kind in ("int", "float"):
            component = gr.Slider
            component_args = {"minimum": spec.minimum, "maximum": spec.maximum, "step": spec.step}
        else:
            component = gr.Textbox
        host.add_setting(
            setting_key(spec), spec.default, f"Default: {spec.label}", component, component_args, SETTINGS_SECTION,
            spec.help,
        )
    host.add_setting(
        CUDA_GRAPHS_SETTING, True, "Replay the A&E gradient pass as a CUDA graph", gr.Checkbox, None, SETTINGS_SECTION,
        "same result, about 3x less time per pass at batch 1 on fast GPUs; falls back to eager evaluation by itself "
        "when another extension's hooks on the UNet could not be replayed",
    )
    host.add_setting(
        PASS_MEMORY_SETTING, "auto", "Memory of the A&E gradient pass", gr.Radio, {"choices": list(MEMORY_MODES)},
        SETTINGS_SECTION,
        "auto: recompute the pass's activations in its backward only where keeping them would not fit in the free GPU "
        "memory; keep: always keep them (fastest); recompute: always recompute them (least memory, about one more "
        "UNet forward per pass on the GPU). The image is the same in every mode",
    )


def xyz_apply(name: str) -> Callable[[Any, Any, Sequence[Any]], None]:
    def apply(p: Any, x: Any, xs: Sequence[Any]) -> None:
        with_xyz_override(p, name, x)  # a new state per cell: the cell's p is a shallow copy of the original

    return apply


def xyz_confirm(name: str) -> Callable[[Any, Sequence[Any]], None]:
    def confirm(p: Any, xs: Sequence[Any]) -> None:
        for x in xs:
            try:
                parse_value(name, x)
            except ParamsError as error:
                raise RuntimeError("; ".join(error.messages)) from None

    return confirm


def register_xyz_axes() -> None:
    """Append our axes to the X/Y/Z plot script before the UI is built (its options are frozen by its ui()). A bool
    axis has choices, so the API takes its values as `x_values_dropdown` (README, "API")."""
    xyz = host.xyz_grid_module()
    if xyz is None:
        logger.debug("%s: X/Y/Z plot script not found; no axes added", TITLE)
        return
    if any(getattr(option, "label", "").startswith(XYZ_PREFIX) for option in xyz.axis_options):
        return
    types: dict[str, Callable[[Any], Any]] = {"bool": str, "int": int, "float": float, "str": str}
    for spec in xyz_params():
        choices: Callable[[], list[str]] | None = None
        if spec.kind == "bool":
            choices = lambda: ["True", "False"]  # noqa: E731
        elif spec.choices:
            choices = lambda values=list(spec.choices): values  # noqa: E731
        xyz.axis_options.append(
            xyz.AxisOption(
                XYZ_PREFIX + spec.label,
                types[spec.kind],
                xyz_apply(spec.name),
                confirm=xyz_confirm(spec.name),
                choices=choices,
            )
        )
