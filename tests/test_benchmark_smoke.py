"""Smoke test of tests/benchmark.py on the CPU (tiny models, fewer steps): it runs end to end, writes its JSON, and every
row did exactly the UNet work the algorithm prescribes. The timings are only checked for sanity; the counts are exact."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import benchmark
from lib_ae import ExciteConfig

STEPS = 10  # the plan scales the official 50-step schedule: alter 5 steps, refinement at steps 0, 2 and 4


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from ldm.modules.attention import CrossAttention

    forward, grad = CrossAttention.forward, torch.autograd.grad
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    returned = benchmark.main(["--tiny", "--steps", str(STEPS), "--out", str(out)])
    # The benchmark patches ldm's attention class and torch.autograd.grad while it runs; neither may leak.
    assert CrossAttention.forward is forward
    assert torch.autograd.grad is grad
    written: dict[str, Any] = json.loads(out.read_text())
    assert written == json.loads(json.dumps(returned))
    return written


def test_report_metadata(report: dict[str, Any]) -> None:
    assert report["command"] == f"python tests/benchmark.py --tiny --steps {STEPS} --out " + report["command"].split()[-1]
    assert report["device"].startswith("CPU")
    assert {"torch", "diffusers", "k-diffusion", "stable-diffusion-sdkit"} <= set(report["versions"])
    assert [s["scenario"] for s in report["scenarios"]] == ["tiny-sd", "tiny-sdxl"]


def test_timings_and_ratios_are_sane(report: dict[str, Any]) -> None:
    for scenario in report["scenarios"]:
        for row in scenario["results"].values():
            assert row["seconds_per_image"] > 0 and len(row["seconds_all"]) == report["repeats"]
            assert row["peak_allocated_gib"] == 0  # CPU: no GPU memory is tracked
        ratios = scenario["ratios"]
        assert all(math.isfinite(v) and v > 0 for v in ratios.values())
        results = scenario["results"]
        assert ratios["ours_ae_over_plain"] == pytest.approx(results["ae"]["seconds_per_image"] / results["plain"]["seconds_per_image"])
        if "ref_ae" in results:
            assert ratios["ours_ae_ratio_over_reference_ratio"] == pytest.approx(
                ratios["ours_ae_over_plain"] / ratios["reference_ae_over_plain"]
            )


@pytest.mark.parametrize("name", ["tiny-sd", "tiny-sdxl"])
def test_unet_work_is_exactly_what_the_algorithm_prescribes(report: dict[str, Any], name: str) -> None:
    config = ExciteConfig()
    plan = config.plan(STEPS)
    alter, refine, iterations = plan.alter_steps, len(plan.refinement_thresholds), config.max_refinement_iterations
    assert (alter, sorted(plan.refinement_thresholds)) == (5, [0, 2, 4])
    results = next(s for s in report["scenarios"] if s["scenario"] == name)["results"]

    def work(row: str) -> tuple[int, int, int, int, int]:
        r = results[row]
        return r["unet_calls"], r["unet_grad_calls"], r["unet_calls_cut_short"], r["backward_passes"], r["unet_rows"]

    # Plain Euler: one CFG-batched call (2 rows) per step, no gradient.
    assert work("plain") == (STEPS, 0, 0, 0, 2 * STEPS)
    # + one cond-only gradient pass per altered step, each stopped after the last needed attention layer.
    assert work("ae_norefine") == (STEPS + alter, alter, alter, alter, 2 * STEPS + alter)
    # Refinement never reaches its threshold on random weights: each refinement step runs all its iterations. The
    # first iteration reuses the step's own evaluation and one more evaluates the refined latent: iterations + 1
    # passes there, 1 on the other altered steps.
    assert results["ae"]["refinement_iterations"] == {str(s): iterations for s in plan.refinement_thresholds}
    grad = alter + refine * iterations
    assert work("ae") == (STEPS + grad, grad, grad, grad, 2 * STEPS + grad)
    if name != "tiny-sd":
        assert "ref_ae" not in results
        return
    assert work("ref_plain") == (STEPS, 0, 0, 0, 2 * STEPS)
    # The reference runs a full gradient forward at every step, plus per refinement step the initial forward (whose
    # gradient it drops), `iterations` more and a final one; it differentiates only where it updates.
    ref_grad = STEPS + refine * (iterations + 1)
    assert work("ref_ae") == (STEPS + ref_grad, ref_grad, 0, alter + refine * iterations, 2 * STEPS + ref_grad)
    assert results["ref_ae"]["reference_arguments"]["max_iter_to_alter"] == alter


def test_runs_as_a_script_from_the_repository_root() -> None:
    root = Path(benchmark.__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "tests/benchmark.py", "--help"], cwd=root, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "--tiny" in done.stdout


def test_operation_count_mode_counts_what_binding_adds_to_an_evaluation() -> None:
    """`--count-ops`: binding reads the maps of the same pass, so it adds no evaluation and a few operations on the maps
    (docs: tests/benchmark-h200.json "binding"); excite's eager and graph paths dispatch the same operations."""
    returned = benchmark.main(["--tiny", "--count-ops", "--binding", "--only", "sd15", "--no-reference", "--steps", "4",
                               "--rows", "ae_norefine,ae_norefine_graph,bind,excite_bind_norefine"])
    operations = returned["scenarios"][0]["operations"]
    assert operations["plain"]["evaluations"] == 0
    evaluations = {name: row["evaluations"] for name, row in operations.items() if name != "plain"}
    assert set(evaluations.values()) == {2}, evaluations  # round(0.5 * 4) steps, no refinement, none added
    excite = operations["ae_norefine"]["per_evaluation_over_plain"]
    assert abs(operations["ae_norefine_graph"]["per_evaluation_over_plain"] - excite) <= 0.01 * excite
    added = operations["excite_bind_norefine"]["per_evaluation_over_plain"] - excite
    assert 0 < added < 0.25 * excite, (added, excite)
