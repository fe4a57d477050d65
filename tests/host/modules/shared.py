"""Stand-in for modules/shared.py with the parts of options.py and shared_state.py the extension touches."""

from __future__ import annotations

from typing import Any

sd_model: Any = None
"""shared.py L47: the loaded model (here a tests/host/standin.StandInSdModel, set by the test fixture)."""


class OptionInfo:
    """options.py L13-34 (fields) and L44-58 (chainable `info` / `needs_reload_ui`)."""

    def __init__(
        self,
        default: Any = None,
        label: str = "",
        component: Any = None,
        component_args: Any = None,
        onchange: Any = None,
        section: tuple[str, str] | None = None,
        refresh: Any = None,
        comment_before: str = "",
        comment_after: str = "",
        infotext: str | None = None,
        restrict_api: bool = False,
        category_id: str | None = None,
    ) -> None:
        self.default = default
        self.label = label
        self.component = component
        self.component_args = component_args
        self.onchange = onchange
        self.section = section
        self.category_id = category_id
        self.refresh = refresh
        self.do_not_save = False
        self.comment_before = comment_before
        self.comment_after = comment_after
        self.infotext = infotext
        self.restrict_api = restrict_api

    def info(self, info: str) -> "OptionInfo":
        self.comment_after += f"<span class='info'>({info})</span>"
        return self

    def needs_reload_ui(self) -> "OptionInfo":
        self.comment_after += " <span class='info'>(requires Reload UI)</span>"
        return self


class Options:
    """options.py L82-142, L256-259: saved values in `data`, registered options in `data_labels`.

    Attribute reads return the saved value, else the registered default, else raise AttributeError (L131-142).
    """

    def __init__(self, defaults: dict[str, Any]) -> None:
        object.__setattr__(self, "data", dict(defaults))
        object.__setattr__(self, "data_labels", {})

    def __getattr__(self, item: str) -> Any:
        if item in self.data:
            return self.data[item]
        if item in self.data_labels:
            return self.data_labels[item].default
        raise AttributeError(item)

    def __setattr__(self, key: str, value: Any) -> None:
        self.data[key] = value  # options.py L89-127 without the freeze/restriction checks

    def add_option(self, key: str, info: OptionInfo) -> None:
        self.data_labels[key] = info  # L256-259: a saved value wins over the default
        if key not in self.data and not info.do_not_save:
            self.data[key] = info.default


def _builtin_defaults() -> dict[str, Any]:
    """The defaults (modules/shared_options.py, 82a973c0) of the built-in options this stand-in host reads."""
    return {
        "samples_save": True,  # L35
        "samples_format": "png",  # L36
        "enable_quantization": False,  # L176
        "emphasis": "Original",  # L177
        "comma_padding_backtrack": 20,  # L179
        "s_min_uncond_all": False,  # L235
        "pad_cond_uncond": False,  # L239
        "pad_cond_uncond_v0": False,  # L240
        "batch_cond_uncond": True,  # L242
        "use_old_scheduling": False,  # L254
        "sgm_noise_multiplier": False,  # L401
        "skip_early_cond": 0.0,  # L407
    }


opts = Options(_builtin_defaults())
"""shared.py L44."""


class State:
    """shared_state.py L12-27 (fields) and L75-80 (`skip`, `interrupt`)."""

    def __init__(self) -> None:
        self.skipped = False
        self.interrupted = False
        self.stopping_generation = False
        self.job = ""
        self.job_count = 0
        self.sampling_step = 0
        self.sampling_steps = 0
        self.textinfo: str | None = None

    def skip(self) -> None:
        self.skipped = True

    def interrupt(self) -> None:
        self.interrupted = True

    def begin(self, job: str = "(unknown)") -> None:
        """shared_state.py L110-127: a new job starts with no pending skip/interrupt and no progress text
        (called by call_queue.wrap_gradio_gpu_call L33 for the UI and api.py text2imgapi L475 for the API)."""
        self.sampling_step = 0
        self.job_count = -1
        self.skipped = False
        self.interrupted = False
        self.stopping_generation = False
        self.textinfo = None
        self.job = job


state = State()
"""shared.py L35."""


class _TotalTqdm:
    """shared_total_tqdm.TotalTQDM: the console progress bar; the stand-in draws nothing."""

    def update(self) -> None: ...

    def updateTotal(self, new_total: int) -> None: ...

    def clear(self) -> None: ...


total_tqdm = _TotalTqdm()
"""shared.py L72."""


def reset() -> None:
    """Fresh options and state for a test (a new WebUI process, in effect)."""
    global opts, state, sd_model
    opts = Options(_builtin_defaults())
    state = State()
    sd_model = None
