"""Stand-in for modules/scripts.py: the `Script` base class, script loading, and the `ScriptRunner` that builds the
script UI (args slicing) and calls the hooks."""

from __future__ import annotations

import importlib.util
import inspect
import logging
import os
import re
import sys
from collections import namedtuple
from pathlib import Path
from types import ModuleType
from typing import Any

import gradio as gr

from modules import script_callbacks

logger = logging.getLogger("host.scripts")

AlwaysVisible = object()
"""L14."""


class PostSampleArgs:
    """L28-30."""

    def __init__(self, samples: Any) -> None:
        self.samples = samples


class PostprocessImageArgs:
    """L32-34."""

    def __init__(self, image: Any) -> None:
        self.image = image


class Script:
    """L52-348: class attributes, the hooks as no-ops, and `elem_id`."""

    name: str | None = None
    section: str | None = None
    filename: str | None = None
    args_from: int | None = None
    args_to: int | None = None
    alwayson = False
    is_txt2img = False
    is_img2img = False
    tabname: str | None = None
    group: Any = None
    create_group = True
    infotext_fields: list[Any] | None = None
    paste_field_names: list[str] | None = None
    setup_for_ui_only = False
    controls: list[Any] | None = None

    def title(self) -> str:
        raise NotImplementedError()

    def ui(self, is_img2img: bool) -> list[Any] | None:
        return None

    def show(self, is_img2img: bool) -> Any:
        return True

    def run(self, p: Any, *args: Any) -> Any:
        return None

    def setup(self, p: Any, *args: Any) -> None: ...

    def before_process(self, p: Any, *args: Any) -> None: ...

    def process(self, p: Any, *args: Any) -> None: ...

    def before_process_batch(self, p: Any, *args: Any, **kwargs: Any) -> None: ...

    def process_batch(self, p: Any, *args: Any, **kwargs: Any) -> None: ...

    def process_before_every_sampling(self, p: Any, *args: Any, **kwargs: Any) -> None: ...

    def post_sample(self, p: Any, ps: PostSampleArgs, *args: Any) -> None: ...

    def postprocess_image(self, p: Any, pp: PostprocessImageArgs, *args: Any) -> None: ...

    def postprocess_batch(self, p: Any, *args: Any, **kwargs: Any) -> None: ...

    def postprocess(self, p: Any, processed: Any, *args: Any) -> None: ...

    def elem_id(self, item_id: str) -> str:
        """L334-342: `script_{tab}_{title}_{item_id}`, the tab only when the script shows in both tabs alike."""
        need_tabname = self.show(True) == self.show(False)
        tabkind = "img2img" if self.is_img2img else "txt2img"
        tabname = f"{tabkind}_" if need_tabname else ""
        title = re.sub(r"[^a-z_0-9]", "", re.sub(r"\s", "_", self.title().lower()))
        return f"script_{tabname}{title}_{item_id}"


ScriptClassData = namedtuple("ScriptClassData", ["script_class", "path", "basedir", "module"])
"""L381."""

scripts_data: list[ScriptClassData] = []
"""L379."""


def load_module(path: Path) -> ModuleType:
    """script_loading.py L10-16: module name = the file's basename (e.g. "xyz_grid.py"), not put in sys.modules."""
    spec = importlib.util.spec_from_file_location(os.path.basename(path), path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_scripts(script_files: list[tuple[Path, Path]]) -> None:
    """L487-530 for an explicit list of (basedir, script path): callbacks cleared first (L491), the basedir put in
    front of sys.path only while its script is imported (L510-523), every Script subclass in the module registered
    (L497-505). Errors while loading a script are reported and the next one is loaded (L518-519)."""
    scripts_data.clear()
    script_callbacks.clear_callbacks()
    syspath = sys.path
    for basedir, path in script_files:
        try:
            sys.path = [str(basedir)] + sys.path
            module = load_module(path)
            for script_class in module.__dict__.values():
                if inspect.isclass(script_class) and issubclass(script_class, Script):
                    scripts_data.append(ScriptClassData(script_class, str(path), str(basedir), module))
        except Exception:
            logger.exception("Error loading script: %s", path.name)
        finally:
            sys.path = syspath


class ScriptRunner:
    """L542-1010, the parts that build the script inputs and call the hooks."""

    def __init__(self) -> None:
        self.scripts: list[Script] = []
        self.selectable_scripts: list[Script] = []
        self.alwayson_scripts: list[Script] = []
        self.infotext_fields: list[Any] = []
        self.paste_field_names: list[str] = []
        self.inputs: list[Any] = [None]

    def initialize_scripts(self, is_img2img: bool) -> None:
        """L578-612: one new instance per tab; AlwaysVisible ones are alwayson."""
        self.scripts.clear()
        self.alwayson_scripts.clear()
        self.selectable_scripts.clear()
        for script_data in scripts_data:
            script = script_data.script_class()
            script.filename = script_data.path
            script.is_txt2img = not is_img2img
            script.is_img2img = is_img2img
            script.tabname = "img2img" if is_img2img else "txt2img"
            visibility = script.show(script.is_img2img)
            if visibility == AlwaysVisible:
                self.scripts.append(script)
                self.alwayson_scripts.append(script)
                script.alwayson = True
            elif visibility:
                self.scripts.append(script)
                self.selectable_scripts.append(script)

    def create_script_ui(self, script: Script) -> None:
        """L634-687: `args_from`/`args_to` delimit the script's controls in `inputs`; `infotext_fields` and
        `paste_field_names` are read after `ui()` returns."""
        script.args_from = script.args_to = len(self.inputs)
        controls = script.ui(script.is_img2img)
        script.controls = controls
        if controls is None:
            return
        script.name = script.title().lower()
        for control in controls:
            control.custom_script_source = os.path.basename(str(script.filename))
        if script.infotext_fields is not None:
            self.infotext_fields += script.infotext_fields
        if script.paste_field_names is not None:
            self.paste_field_names += script.paste_field_names
        self.inputs += controls
        script.args_to = len(self.inputs)

    def setup_ui(self) -> list[Any]:
        """L708-718 (+ the section loop of ui.py L341-358): alwayson scripts' UI, the "Script" dropdown at
        `inputs[0]` (type="index"), then the selectable scripts' UI."""
        with gr.Blocks():
            for script in self.alwayson_scripts:
                with gr.Group(visible=True):
                    self.create_script_ui(script)
            titles = [script.title() for script in self.selectable_scripts]
            self.inputs[0] = gr.Dropdown(
                label="Script", elem_id="script_list", choices=["None"] + titles, value="None", type="index"
            )
            for script in self.selectable_scripts:
                with gr.Group(visible=False):
                    self.create_script_ui(script)
        return self.inputs

    def default_args(self) -> list[Any]:
        """api.py L315-333 `init_default_script_args`: every control's `.value`, `[0] = 0` (no selectable script)."""
        return [0] + [control.value for control in self.inputs[1:]]

    def script(self, title: str) -> Script | None:
        """L958-959."""
        return next((s for s in self.scripts if s.title().lower() == title.lower()), None)

    def run(self, p: Any, *args: Any) -> Any:
        """L768-784: the selectable script at index args[0] (0 = none) runs with its slice of the args."""
        script_index = args[0]
        if not script_index:
            return None
        script = self.selectable_scripts[script_index - 1]
        return script.run(p, *args[script.args_from : script.args_to])

    def _ordered(self, method_name: str) -> list[Script]:
        # L792-803: only alwayson scripts, and only those overriding the method.
        return [s for s in self.alwayson_scripts if getattr(type(s), method_name) is not getattr(Script, method_name)]

    def _call(self, method_name: str, p: Any, *before: Any, **kwargs: Any) -> None:
        # L820-906: each script gets `p.script_args[args_from:args_to]`; an Exception is reported and swallowed.
        for script in self._ordered(method_name):
            try:
                script_args = p.script_args[script.args_from : script.args_to]
                getattr(script, method_name)(p, *before, *script_args, **kwargs)
            except Exception:
                logger.exception("Error running %s: %s", method_name, script.filename)

    def setup_scrips(self, p: Any, *, is_ui: bool = True) -> None:
        for script in self._ordered("setup"):  # L987-996
            if is_ui or not script.setup_for_ui_only:
                try:
                    script.setup(p, *p.script_args[script.args_from : script.args_to])
                except Exception:
                    logger.exception("Error running setup: %s", script.filename)

    def before_process(self, p: Any) -> None:
        self._call("before_process", p)  # L820-826

    def process(self, p: Any) -> None:
        self._call("process", p)  # L828-834

    def before_process_batch(self, p: Any, **kwargs: Any) -> None:
        self._call("before_process_batch", p, **kwargs)  # L844-850

    def process_batch(self, p: Any, **kwargs: Any) -> None:
        self._call("process_batch", p, **kwargs)  # L860-866

    def process_before_every_sampling(self, p: Any, **kwargs: Any) -> None:
        self._call("process_before_every_sampling", p, **kwargs)  # L836-842

    def post_sample(self, p: Any, ps: PostSampleArgs) -> None:
        self._call("post_sample", p, ps)  # L892-898: (p, ps, *args)

    def postprocess_batch(self, p: Any, images: Any, **kwargs: Any) -> None:
        self._call("postprocess_batch", p, images=images, **kwargs)  # L876-882

    def postprocess_image(self, p: Any, pp: PostprocessImageArgs) -> None:
        self._call("postprocess_image", p, pp)  # L908-914: (p, pp, *args)

    def postprocess(self, p: Any, processed: Any) -> None:
        self._call("postprocess", p, processed)  # L868-874: (p, processed, *args)
