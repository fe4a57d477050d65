"""Attend-and-Excite for the AUTOMATIC1111 Stable Diffusion WebUI v1.10.1: the script A1111 loads from us.

The algorithm is `lib_ae` (plain torch, no WebUI imports; docs/algorithm.md); the host adapter is `lib_ae.webui`,
the only package that imports the WebUI (docs/host-notes.md). This file is the `Script` and its hooks, in the order
A1111 calls them for one generation:

    process                         the parameters of this generation, parsed once (or an "AE error"), its infotext
    process_before_every_sampling   A&E installed for the sampler run about to start (also the hires fix pass)
    post_sample                     the passes read once, traced into the infotext, released
    postprocess_image / postprocess the heatmaps, when asked for

A1111 imports this file with the extension directory on sys.path (scripts.load_scripts, docs/host-notes.md §1),
which is what makes the `lib_ae` imports below work. When A&E is disabled the hooks return at once: nothing is
attached or wrapped and no infotext key is written, so the output is bit-identical to a WebUI without the extension.
Any failure inside A&E is logged, reported in the image's infotext under "AE error", and sampling continues
without A&E: the image is never lost.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lib_ae.params import PARAM_NAMES, PARAMS, PARAMS_BY_NAME, AEParams, ParamsError
from lib_ae.webui import controls, host, sampling_pass, visuals
from lib_ae.webui.host import Processing, gr
from lib_ae.webui.report import (
    AE_BINDINGS_KEY,
    AE_ERROR_KEY,
    AE_HIRES_TRACE_KEY,
    AE_SUBJECTS_USED_KEY,
    AE_TRACE_KEY,
    TITLE,
    clear_infotext,
    report_problem,
)
from lib_ae.webui.run_state import existing_state, state_of, xyz_overrides
from lib_ae.webui.token_view import token_view_ui
from lib_ae.webui.wire import requested_params, to_infotext

INFOTEXT_KEYS: tuple[str, ...] = tuple(spec.infotext_key for spec in PARAMS) + (
    AE_ERROR_KEY,
    AE_TRACE_KEY,
    AE_HIRES_TRACE_KEY,
    AE_SUBJECTS_USED_KEY,
    AE_BINDINGS_KEY,
)


class AttendAndExciteScript(host.Script):  # type: ignore[misc,valid-type]  # the WebUI's class, untyped
    def title(self) -> str:
        return TITLE

    def show(self, is_img2img: bool) -> Any:
        return host.ALWAYS_VISIBLE

    def ui(self, is_img2img: bool) -> list[Any]:
        built: dict[str, Any] = {}
        enabled = PARAMS_BY_NAME["enabled"]
        with host.InputAccordion(False, label=enabled.label, elem_id=self.elem_id(enabled.name)) as accordion:
            built[enabled.name] = accordion
            for spec in PARAMS:
                if spec.name in controls.MAIN_PARAMS and spec.name != enabled.name:
                    value = controls.initial_value(spec)
                    built[spec.name] = controls.make_control(spec, value, self.elem_id(spec.name))
            token_view_ui(self.elem_id, built["subjects"])  # adds no script argument
            with gr.Accordion("Advanced", open=False, elem_id=self.elem_id("advanced")):
                for spec in PARAMS:
                    if spec.name not in controls.MAIN_PARAMS:
                        built[spec.name] = controls.make_control(
                            spec, controls.initial_value(spec), self.elem_id(spec.name)
                        )
        self.infotext_fields = controls.infotext_fields(built)
        self.paste_field_names = controls.paste_field_names()
        return [built[name] for name in PARAM_NAMES]  # positional API order = PARAMS order

    def process(self, p: Processing, *args: Any) -> None:
        params = self._params(p, args)
        if params is not None:
            params = sampling_pass.for_model(params, p.sd_model)
            state_of(p).params = params  # parsed once: every later hook of this generation reads it from here
            p.extra_generation_params.update(to_infotext(params))
        elif (state := existing_state(p)) is not None:
            state.params = None  # an X/Y/Z cell that turns A&E off, sharing an earlier cell's state

    def process_before_every_sampling(self, p: Processing, *args: Any, **kwargs: Any) -> None:
        state = existing_state(p)
        if state is None or state.params is None:
            return
        if getattr(p, "is_hr_pass", False) and not state.params.apply_to_hires:
            return
        installed = sampling_pass.install(p, state.params)
        if installed is not None:
            state.passes.append(installed)

    def post_sample(self, p: Processing, *args: Any) -> None:
        state = existing_state(p)
        if state is None or not state.passes:
            return
        try:
            for sp in state.passes:
                sp.finish()  # the reports are read here, once; the graphs' memory pool is freed
            visuals.record_batch_traces(p)
        finally:
            for sp in state.passes:
                sp.finish()  # idempotent: after a failure above, whatever is left is still released
            state.passes = []

    def postprocess_image(self, p: Processing, pp: Any, *args: Any) -> None:
        state = existing_state(p)
        if state is not None and state.visuals:
            visuals.draw_heatmaps(p, pp.image)

    def postprocess(self, p: Processing, processed: Any, *args: Any) -> None:
        visuals.add_heatmaps_to_results(p, processed)

    @staticmethod
    def _params(p: Processing, args: Sequence[Any]) -> AEParams | None:
        """This generation's parameters, None when A&E is off or the args are invalid (reported)."""
        clear_infotext(p, INFOTEXT_KEYS)  # pops nothing unless an earlier X/Y/Z cell left keys in the shared dict
        try:
            return requested_params(args, xyz_overrides(p))
        except ParamsError as error:
            report_problem(p, "invalid settings, A&E not applied: " + "; ".join(error.messages))
            return None


host.register_callbacks(
    ui_settings=controls.on_ui_settings,
    before_ui=controls.register_xyz_axes,
    script_unloaded=sampling_pass.remove_captures,
)
