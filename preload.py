"""Run by A1111 at start-up, before any model is loaded (`script_loading.preload_extensions`, called while
`shared_cmd_options` builds the command line): the only moment early enough to choose MKL's reproducible mode, which
MKL reads once, when it first computes. Why: lib_ae/cpu_determinism.py. It adds no command-line flag."""

from __future__ import annotations

import argparse
import os


def preload(parser: argparse.ArgumentParser) -> None:
    # Self-contained (A1111 loads this file by path, before the extension's folder is on sys.path); the same rule as
    # lib_ae.cpu_determinism.request_reproducible_mkl, which tests/test_cpu_reproducible.py holds this to.
    if not os.environ.get("MKL_CBWR"):
        os.environ["MKL_CBWR"] = "AUTO"
