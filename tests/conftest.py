"""Shared fixtures: the stand-in A1111 host of tests/host (module-scoped: on sys.path for one test module, then
removed with everything imported from it) and a freshly loaded extension per test. Helpers: tests/support/webui_host.py.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from types import SimpleNamespace
from typing import Iterator

# The suite runs torch as the extension's preload.py makes a webui run it: MKL in its reproducible mode, set before
# torch computes anything (lib_ae/cpu_determinism.py). Without it, tests that compare two runs bit for bit on
# several threads could differ in the last bit on a machine whose MKL splits the work differently.
# tests/test_cpu_reproducible.py runs its worker without this, to check the preload itself.
os.environ.setdefault("MKL_CBWR", "AUTO")

import pytest  # noqa: E402
import torch  # noqa: E402

from support.webui_host import HOST, WebUI

HOST_MODULES = ("modules", "standin", "gradio")
"""Top-level names of the stand-in host, dropped from sys.modules when a module's host fixture ends."""
ADAPTER_PACKAGE = "lib_ae.webui"
"""Our host adapter binds the stand-in's modules at import, so it goes with them."""


@pytest.fixture(scope="module")
def host() -> Iterator[SimpleNamespace]:
    added = [str(HOST)]
    if importlib.util.find_spec("gradio") is None:  # the real gradio 3.41.2 is not installable in the test venv
        added.insert(0, str(HOST / "gradio_stub"))
    sys.path[:0] = added
    preexisting = set(sys.modules)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny UNet gains little from threads; keeps the module's CPU time low
    try:
        import standin
        from modules import infotext_utils, processing, prompt_parser, script_callbacks, scripts, shared

        yield SimpleNamespace(
            standin=standin,
            shared=shared,
            scripts=scripts,
            script_callbacks=script_callbacks,
            processing=processing,
            prompt_parser=prompt_parser,
            infotext_utils=infotext_utils,
            model=standin.StandInSdModel(seed=0),
        )
    finally:
        torch.set_num_threads(threads)
        for path in added:
            sys.path.remove(path)
        for name in list(sys.modules):
            if name.split(".")[0] in HOST_MODULES and name not in preexisting:
                del sys.modules[name]
            elif name == ADAPTER_PACKAGE or name.startswith(ADAPTER_PACKAGE + "."):
                # Even when imported before (a host-free submodule at collection): the package object keeps its
                # submodules as attributes, and `from lib_ae.webui import host` would find the stale one.
                del sys.modules[name]


@pytest.fixture()
def webui(host: SimpleNamespace) -> Iterator[WebUI]:
    ui = WebUI(host)
    try:
        yield ui
    finally:
        ui.unload()
