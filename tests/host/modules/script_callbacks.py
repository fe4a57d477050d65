"""Stand-in for modules/script_callbacks.py: the callback lists the extension and the stand-in host use.

Registration appends to a per-category list (L127-147, `add_callback`); running a category calls every callback and
reports, never propagates, an `Exception` (e.g. L298-303, `report_exception` L14-15). No ordering by metadata.ini.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

logger = logging.getLogger("host.script_callbacks")


@dataclass
class ScriptCallback:
    """L121-124."""

    script: str
    callback: Callable[..., Any]
    name: str = "unnamed"


callback_map: dict[str, list[ScriptCallback]] = {
    "callbacks_ui_settings": [],
    "callbacks_cfg_denoiser": [],
    "callbacks_infotext_pasted": [],
    "callbacks_script_unloaded": [],
    "callbacks_before_ui": [],
}
"""L219-241, the categories used here."""


class CFGDenoiserParams:
    """L45-69."""

    def __init__(
        self,
        x: Any,
        image_cond: Any,
        sigma: Any,
        sampling_step: int,
        total_sampling_steps: int,
        text_cond: Any,
        text_uncond: Any,
        denoiser: Any = None,
    ) -> None:
        self.x = x
        self.image_cond = image_cond
        self.sigma = sigma
        self.sampling_step = sampling_step
        self.total_sampling_steps = total_sampling_steps
        self.text_cond = text_cond
        self.text_uncond = text_uncond
        self.denoiser = denoiser


def clear_callbacks() -> None:
    """L246-250 (called by scripts.load_scripts before the scripts are imported, scripts.py L491)."""
    for callbacks in callback_map.values():
        callbacks.clear()


def _add(category: str, callback: Callable[..., Any], name: str | None) -> None:
    script = getattr(callback, "__module__", "unknown")
    callback_map[f"callbacks_{category}"].append(ScriptCallback(script, callback, name or category))


def _run(category: str, *args: Any, reverse: bool = False) -> None:
    callbacks = list(callback_map[f"callbacks_{category}"])
    for c in reversed(callbacks) if reverse else callbacks:
        try:
            c.callback(*args)
        except Exception:
            logger.exception("Error executing callback %s for %s", category, c.script)  # report_exception, L14-15


def on_ui_settings(callback: Callable[[], None], *, name: str | None = None) -> None:
    _add("ui_settings", callback, name)  # L493-496


def on_cfg_denoiser(callback: Callable[[CFGDenoiserParams], None], *, name: str | None = None) -> None:
    _add("cfg_denoiser", callback, name)  # L523-528


def on_infotext_pasted(callback: Callable[[str, dict[str, Any]], None], *, name: str | None = None) -> None:
    _add("infotext_pasted", callback, name)  # L572-578


def on_script_unloaded(callback: Callable[[], None], *, name: str | None = None) -> None:
    _add("script_unloaded", callback, name)  # L581-585


def on_before_ui(callback: Callable[[], None], *, name: str | None = None) -> None:
    _add("before_ui", callback, name)  # L588-591


def ui_settings_callback() -> None:
    _run("ui_settings")  # L298-303; called by ui.create_ui via UiSettings.register_settings (ui.py L262)


def cfg_denoiser_callback(params: CFGDenoiserParams) -> None:
    _run("cfg_denoiser", params)  # L330-335


def infotext_pasted_callback(infotext: str, params: dict[str, Any]) -> None:
    _run("infotext_pasted", infotext, params)  # L378-383


def script_unloaded_callback() -> None:
    _run("script_unloaded", reverse=True)  # L386-391 (reversed order); webui.py L151 before re-import


def before_ui_callback() -> None:
    _run("before_ui", reverse=True)  # L394-399 (reversed order); webui.py L61 before ui.create_ui()


def remove_callbacks_for_function(callback_func: Callable[..., Any]) -> None:
    """L447-453."""
    for callbacks in callback_map.values():
        for c in [c for c in callbacks if c.callback == callback_func]:
            callbacks.remove(c)
