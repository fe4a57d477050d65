"""The same A&E request gives the same bytes on the CPU, with the threads A1111 runs (never one forced thread).

MKL's matrix products in a backward are not run-to-run reproducible on several threads unless MKL runs in its
reproducible mode, which the extension's preload.py asks for (why and how: lib_ae/cpu_determinism.py). The worker
(tests/support/cpu_repro_worker.py) is a fresh process that does what A1111 does before a generation: imports torch,
loads preload.py, then runs one A&E evaluation with a gradient step on a full-width SD1.5 UNet (small latent) four
times, on the main thread and on fresh threads, with the heap moved in between. Without the preload, 2 to 4 of the
4 latents differ on a 2-thread Xeon; with it, all are equal. tests/test_reproducible.py covers the same claim
through the stand-in webui with a model too small to reach MKL's threaded code paths.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lib_ae import cpu_determinism

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "support" / "cpu_repro_worker.py"


def run_worker(*args: str, **env: str) -> dict[str, object]:
    environ = {k: v for k, v in os.environ.items() if k != cpu_determinism.MKL_CBWR_VARIABLE}
    environ.update(env)
    done = subprocess.run(
        [sys.executable, str(WORKER), *args], cwd=ROOT, env=environ, capture_output=True, text=True, timeout=900,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_same_evaluation_gives_the_same_latent_after_the_preload() -> None:
    result = run_worker("--preload", "--repeats", "4")
    assert result["threads"] >= 2  # type: ignore[operator]
    if result["mkl_mode"] is None:
        pytest.skip("this torch has no readable MKL (not x86-64 Linux): nothing to make reproducible")
    assert result["mkl_mode"] == cpu_determinism.REPRODUCIBLE_MODE
    hashes = result["hashes"]
    assert isinstance(hashes, list) and len(hashes) == 4
    assert len(set(hashes)) == 1, f"{len(set(hashes))} different latents in 4 runs"


def load_preload() -> object:
    spec = importlib.util.spec_from_file_location("ae_preload", ROOT / "preload.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_preload_sets_the_mode_unless_the_user_chose_one(monkeypatch: pytest.MonkeyPatch) -> None:
    preload = load_preload()
    monkeypatch.delenv("MKL_CBWR", raising=False)
    preload.preload(argparse.ArgumentParser())  # type: ignore[attr-defined]
    assert os.environ["MKL_CBWR"] == cpu_determinism.REPRODUCIBLE_MODE
    monkeypatch.setenv("MKL_CBWR", "COMPATIBLE")
    preload.preload(argparse.ArgumentParser())  # type: ignore[attr-defined]
    assert os.environ["MKL_CBWR"] == "COMPATIBLE"
    # The library's rule is the same one (preload.py cannot import it: A1111 loads it before lib_ae is importable).
    environ: dict[str, str] = {}
    assert cpu_determinism.request_reproducible_mkl(environ) and environ == {"MKL_CBWR": "AUTO"}
    environ = {"MKL_CBWR": "AVX2"}
    assert not cpu_determinism.request_reproducible_mkl(environ) and environ == {"MKL_CBWR": "AVX2"}


def test_the_preload_adds_no_command_line_flag() -> None:
    parser = argparse.ArgumentParser()
    before = len(parser._actions)
    load_preload().preload(parser)  # type: ignore[attr-defined]
    assert len(parser._actions) == before


def test_a_run_without_the_mode_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_determinism, "mkl_reproducibility_mode", lambda: "OFF")
    message = cpu_determinism.check_cpu_reproducibility()
    assert message is not None and "MKL_CBWR=AUTO" in message
    for mode in ("AUTO", None):
        monkeypatch.setattr(cpu_determinism, "mkl_reproducibility_mode", lambda mode=mode: mode)
        assert cpu_determinism.check_cpu_reproducibility() is None
