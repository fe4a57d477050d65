"""Stand-in for modules/ui_components.py: `InputAccordion` (L88-143)."""

from __future__ import annotations

from typing import Any

import gradio as gr


class InputAccordion(gr.Checkbox):
    """A hidden checkbox (the value scripts receive) driving an accordion with the same label (L96-118); the
    checkbox's elem_id is `<elem_id>-checkbox`, the accordion's `<elem_id>`. `with` enters the accordion (L136-141)."""

    global_index = 0

    def __init__(self, value: bool, **kwargs: Any) -> None:
        elem_id: str | None = kwargs.get("elem_id")
        if elem_id is None:
            elem_id = f"input-accordion-{InputAccordion.global_index}"
            InputAccordion.global_index += 1
        self.accordion_id: str = elem_id
        super().__init__(value, **{**kwargs, "elem_id": f"{self.accordion_id}-checkbox", "visible": False})
        self.accordion = gr.Accordion(
            **{
                **kwargs,
                "elem_id": self.accordion_id,
                "label": kwargs.get("label", "Accordion"),
                "elem_classes": ["input-accordion"],
                "open": value,
            }
        )

    def extra(self) -> gr.Column:
        return gr.Column(elem_id=self.accordion_id + "-extra", elem_classes="input-accordion-extra", min_width=0)

    def __enter__(self) -> "InputAccordion":
        self.accordion.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.accordion.__exit__(*exc)
