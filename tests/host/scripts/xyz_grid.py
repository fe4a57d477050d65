"""Stand-in for scripts/xyz_grid.py (A1111 v1.10.1): the axis registry other extensions append to, and a one-axis
plot whose cells run `process_images` on shallow copies of `p`. Loaded by file path like every A1111 script, so its
module name is "xyz_grid.py" (script_loading.py L10-16), which is how extensions find it."""

from __future__ import annotations

import csv
from copy import copy
from io import StringIO
from typing import Any, Callable

import gradio as gr

from modules import processing, scripts


class AxisOption:
    """L214-223."""

    def __init__(
        self,
        label: str,
        type: Callable[[Any], Any],
        apply: Callable[[Any, Any, list[Any]], None],
        format_value: Callable[..., Any] | None = None,
        confirm: Callable[[Any, list[Any]], None] | None = None,
        cost: float = 0.0,
        choices: Callable[[], list[str]] | None = None,
        prepare: Any = None,
    ) -> None:
        self.label = label
        self.type = type
        self.apply = apply
        self.format_value = format_value
        self.confirm = confirm
        self.cost = cost
        self.prepare = prepare
        self.choices = choices


def do_nothing(p: Any, x: Any, xs: list[Any]) -> None:
    pass


axis_options: list[AxisOption] = [AxisOption("Nothing", str, do_nothing)]
"""L238-: the module-level list extensions append their axes to before the UI is built."""


class Script(scripts.Script):
    def title(self) -> str:
        return "X/Y/Z plot"

    def ui(self, is_img2img: bool) -> list[Any]:
        # L419-420: the options are frozen when the UI is built.
        self.current_axis_options = list(axis_options)
        x_type = gr.Dropdown(
            label="X type", choices=[o.label for o in self.current_axis_options], value="Nothing", type="index"
        )
        x_values = gr.Textbox(label="X values", lines=1)
        return [x_type, x_values]

    def run(self, p: Any, x_type: int, x_values: str) -> processing.Processed:
        opt = self.current_axis_options[x_type]
        # L547-614: values are comma-separated CSV (quote a value that contains commas), converted by opt.type and
        # checked up front by opt.confirm; ranges like "1-5" are not supported here.
        values = [opt.type(v.strip()) for v in next(csv.reader(StringIO(x_values), skipinitialspace=True))]
        if opt.confirm is not None:
            opt.confirm(p, values)
        images: list[Any] = []
        infotexts: list[str] = []
        for x in values:
            pc = copy(p)  # L707-728: a shallow copy per cell (extra_generation_params is shared)
            opt.apply(pc, x, values)
            res = processing.process_images(pc)
            images += res.images
            infotexts += res.infotexts
        processed = processing.Processed(p, images, infotexts)
        return processed
