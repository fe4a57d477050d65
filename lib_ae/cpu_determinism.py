"""The same A&E request gives the same bytes on the CPU: MKL's conditional numerical reproducibility (CNR).

On the CPU, torch runs its matrix products through the MKL linked into it. By default MKL may split a product's
work differently from run to run on several threads (it depends on the data's alignment and the threads' timing), so
the last bit of a result changes. Plain sampling never notices: its forward products happen to be stable. A&E's
gradient runs a backward (`convolution_backward` first among the operations seen to differ, by 1e-12), and a gradient
step carries such a bit into the image: the same request gave 4 different PNGs in 11 runs of a CPU webui.

MKL's CNR mode "AUTO" fixes the code path for the processor and makes results independent of alignment and timing,
at no measurable cost (docs/host-notes.md, "CPU reproducibility"). MKL reads it once, when it first runs, from the
environment variable MKL_CBWR; so the extension's preload.py, which A1111 runs before any model is loaded or any
product computed, sets it (`request_reproducible_mkl`). A value the user set is kept. Threads are never limited.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import MutableMapping
from pathlib import Path

MKL_CBWR_VARIABLE = "MKL_CBWR"
REPRODUCIBLE_MODE = "AUTO"
"""Run-to-run reproducible on one processor with the same threads, with the processor's fastest code path (unlike
"COMPATIBLE", which falls back to SSE2 kernels: a UNet forward took 2.5x as long here)."""

_MKL_CBWR_BRANCH = 1
_MODE_NAMES = {1: "OFF", 2: "AUTO", 3: "COMPATIBLE"}
_STRICT = 0x10000


def request_reproducible_mkl(environ: MutableMapping[str, str] | None = None) -> bool:
    """Ask MKL for its reproducible mode, unless the user chose a mode. Returns whether the variable was set here.

    Takes effect only if MKL has not run yet in this process (A1111 loads preload.py after importing torch but
    before any computation); `mkl_reproducibility_mode` tells afterwards whether it did."""
    environ = os.environ if environ is None else environ
    if environ.get(MKL_CBWR_VARIABLE):
        return False
    environ[MKL_CBWR_VARIABLE] = REPRODUCIBLE_MODE
    return True


def mkl_reproducibility_mode() -> str | None:
    """The CNR mode the MKL inside torch runs with ("OFF", "AUTO", ...), or None where that cannot be read (no MKL:
    ARM builds, macOS; or the symbol is not exported). Reads MKL's own state: read-only, it changes nothing."""
    get_mode = _mkl_cbwr_get()
    if get_mode is None:
        return None
    value = int(get_mode(_MKL_CBWR_BRANCH))
    if value < 0:
        return None
    name = _MODE_NAMES.get(value & ~_STRICT, f"branch {value & ~_STRICT}")
    return f"{name},STRICT" if value & _STRICT else name


def _mkl_cbwr_get() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    """MKL's `mkl_cbwr_get` as torch's CPU library exports it (`mkl_serv_cbwr_get`: MKL is linked statically)."""
    if not sys.platform.startswith("linux"):
        return None
    import torch

    if torch.__file__ is None:
        return None
    library = Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"
    try:
        function = ctypes.CDLL(str(library)).mkl_serv_cbwr_get
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int]
    function.restype = ctypes.c_int
    return function


def check_cpu_reproducibility() -> str | None:
    """A warning for the console when A&E runs on the CPU while MKL's reproducible mode is off, else None."""
    mode = mkl_reproducibility_mode()
    if mode != "OFF":
        return None
    return (
        "MKL's reproducible mode is off (MKL ran before this extension's preload.py could set MKL_CBWR): the same "
        "A&E request on the CPU may give slightly different images. Start the webui with MKL_CBWR=AUTO set."
    )
