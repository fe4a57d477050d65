"""A minimal stand-in for gradio 3.41.2 (the version A1111 v1.10.1 pins), used only when gradio is not importable.

The test venv cannot import the real gradio 3.41.2: its package imports fastapi, aiofiles, gradio_client, pandas and
more at import time (gradio/components/base.py L17-26), which `pip install --no-deps` does not bring. The extension
only *constructs* components, so this stub records the constructor arguments and checks their names: every
signature below lists the keyword names of gradio 3.41.2's own constructor (read from the wheel:
components/checkbox.py L36-52, components/slider.py L41-61, components/radio.py (Radio), components/textbox.py L52-76, layouts.py Column L104,
Group L254, Accordion L360, Row L31, components/html.py HTML L26-36, components/button.py Button L24-40), so a
misspelt keyword fails here as it would (as a warning) in gradio. No rendering and no queue; a button's `click`
listeners are recorded (`Button.listeners`), so that a test can call the handler as gradio would.
"""

from __future__ import annotations

from typing import Any, Callable

__version__ = "3.41.2-stub"


class Block:
    """Base of components and layouts: keeps `elem_id`, `visible` and the keyword arguments it was built with."""

    def __init__(self, *, visible: bool = True, elem_id: str | None = None, elem_classes: Any = None) -> None:
        self.visible = visible
        self.elem_id = elem_id
        self.elem_classes = elem_classes
        parent = _current_context()
        self.parent = parent
        if parent is not None:
            parent.children.append(self)


class BlockContext(Block):
    """A layout usable as `with ...:`; components created inside become its children."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.children: list[Block] = []

    def __enter__(self) -> "BlockContext":
        _CONTEXT_STACK.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        _CONTEXT_STACK.pop()


_CONTEXT_STACK: list[BlockContext] = []


def _current_context() -> BlockContext | None:
    return _CONTEXT_STACK[-1] if _CONTEXT_STACK else None


class Component(Block):
    """An input component: `label`, `value`, `info`; events are accepted and ignored."""

    def __init__(
        self,
        value: Any,
        *,
        label: str | None = None,
        info: str | None = None,
        visible: bool = True,
        elem_id: str | None = None,
        elem_classes: Any = None,
        interactive: bool | None = None,
        show_label: bool | None = None,
        container: bool = True,
        scale: int | None = None,
        min_width: int = 160,
        every: float | None = None,
    ) -> None:
        super().__init__(visible=visible, elem_id=elem_id, elem_classes=elem_classes)
        self.value = value
        self.label = label
        self.info = info
        self.interactive = interactive

    def change(
        self, fn: Callable[..., Any] | None = None, inputs: Any = None, outputs: Any = None, **kwargs: Any
    ) -> None:
        """Events do nothing in the stub."""


class Checkbox(Component):
    def __init__(self, value: bool = False, **kwargs: Any) -> None:
        super().__init__(value, **kwargs)


class Slider(Component):
    def __init__(
        self,
        minimum: float = 0,
        maximum: float = 100,
        value: float | None = None,
        *,
        step: float | None = None,
        randomize: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(minimum if value is None else value, **kwargs)
        self.minimum = minimum
        self.maximum = maximum
        self.step = step


class Textbox(Component):
    def __init__(
        self,
        value: str | None = "",
        *,
        lines: int = 1,
        max_lines: int = 20,
        placeholder: str | None = None,
        autofocus: bool = False,
        type: str = "text",
        text_align: str | None = None,
        rtl: bool = False,
        show_copy_button: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(value, **kwargs)
        self.lines = lines
        self.placeholder = placeholder


class Dropdown(Component):
    def __init__(
        self,
        choices: list[Any] | None = None,
        value: Any = None,
        *,
        type: str = "value",
        multiselect: bool | None = None,
        allow_custom_value: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(value, **kwargs)
        self.choices = choices or []
        self.type = type


class Radio(Component):
    """gradio 3.41.2 Radio: `choices` positional, the rest keyword-only."""

    def __init__(
        self, choices: list[Any] | None = None, *, value: Any = None, type: str = "value", **kwargs: Any
    ) -> None:
        super().__init__(value, **kwargs)
        self.choices = choices or []
        self.type = type


class HTML(Component):
    def __init__(self, value: str = "", **kwargs: Any) -> None:
        super().__init__(value, **kwargs)


class Button(Component):
    def __init__(
        self,
        value: str = "Run",
        *,
        variant: str = "secondary",
        size: str | None = None,
        icon: str | None = None,
        link: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(value, **kwargs)
        self.variant = variant
        self.listeners: list[dict[str, Any]] = []

    def click(
        self,
        fn: Callable[..., Any] | None = None,
        inputs: Any = None,
        outputs: Any = None,
        *,
        api_name: str | None = None,
        scroll_to_output: bool = False,
        show_progress: Any = "full",
        queue: bool | None = None,
        batch: bool = False,
        max_batch_size: int = 4,
        preprocess: bool = True,
        postprocess: bool = True,
        cancels: Any = None,
        every: float | None = None,
        _js: str | None = None,
    ) -> None:
        """gradio 3.41.2 EventListener for `click` (events.py): recorded, never run by the stub itself."""
        self.listeners.append({"fn": fn, "inputs": inputs, "outputs": outputs})


class Blocks(BlockContext):
    def __init__(
        self,
        *,
        analytics_enabled: bool | None = None,
        mode: str = "blocks",
        title: str = "Gradio",
        css: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)


class Group(BlockContext):
    def __init__(self, *, visible: bool = True, elem_id: str | None = None, **kwargs: Any) -> None:
        super().__init__(visible=visible, elem_id=elem_id, **kwargs)


class Row(BlockContext):
    def __init__(
        self,
        *,
        variant: str = "default",
        visible: bool = True,
        elem_id: str | None = None,
        equal_height: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(visible=visible, elem_id=elem_id, **kwargs)


class Column(BlockContext):
    def __init__(
        self,
        *,
        scale: int = 1,
        min_width: int = 320,
        variant: str = "default",
        visible: bool = True,
        elem_id: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(visible=visible, elem_id=elem_id, **kwargs)


class Accordion(BlockContext):
    def __init__(
        self,
        label: str | None = None,
        *,
        open: bool = True,
        visible: bool = True,
        elem_id: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(visible=visible, elem_id=elem_id, **kwargs)
        self.label = label
        self.open = open


def update(**kwargs: Any) -> dict[str, Any]:
    """gradio 3.x `gr.update`: a dict marked as an update (blocks.py L319)."""
    return {"__type__": "generic_update", **kwargs}
