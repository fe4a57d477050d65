"""Run by the WebUI at every launch, as `python install.py` in a subprocess (modules/launch_utils.py
`run_extension_installer` L228-241, skipped with --skip-install); whatever it prints is shown in the console.

Nothing to install: the extension uses only what AUTOMATIC1111 v1.10.1 already ships (torch 2.1.2, numpy, gradio
3.41.2). `lib_ae` needs torch >= 2.0 (forward hooks with keyword arguments, `register_forward_hook(...,
with_kwargs=True)`) and Python >= 3.10. This script only checks those without importing torch (which would slow every
launch by seconds) and prints a line when they are not met; it never runs pip.
"""

from __future__ import annotations

import sys
from importlib import metadata


def _major(version: str) -> int:
    head = version.split(".", 1)[0]
    return int(head) if head.isdigit() else 0


def main() -> None:
    problems = []
    if sys.version_info < (3, 10):
        problems.append(f"Python >= 3.10 is required (this is {sys.version.split()[0]})")
    try:
        torch_version = metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch_version = None
    if torch_version is not None and _major(torch_version) < 2:
        problems.append(f"torch >= 2.0 is required (installed: {torch_version})")
    for problem in problems:
        print(f"[Attend and Excite] {problem}; the extension will not work.")


if __name__ == "__main__":
    main()
