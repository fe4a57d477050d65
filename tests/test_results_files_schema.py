"""The shape of the committed GPU results files (their keys and value types; the README's tables are read from them).

This runs no measuring code: it checks only that the JSON files keep the structure issue 10 asks of them, not that
their numbers are right (those come from the H200 runs they record)."""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).parent
RATIO_KEYS = {"sd15_512_b1_norefine", "sd15_512_b1_worst", "sdxl_1024_b1_norefine", "sdxl_1024_b1_worst",
              "sd15_512_b4_norefine"}


def test_webui_gpu_results_have_the_required_keys() -> None:
    found = json.loads((HERE / "webui-gpu-h200.json").read_text())
    assert isinstance(found["host"], str) and "A1111" in found["host"]
    assert isinstance(found["device"], str) and found["device"]
    assert set(found["ratios"]) == RATIO_KEYS
    assert all(isinstance(v, float) and v > 0.5 for v in found["ratios"].values()), found["ratios"]
    assert set(found["graph_equals_eager"]) == {"sd15", "sdxl"}
    assert set(found["reproducible"]) == {"cpu", "cuda"}
    assert all(isinstance(v, bool) for v in [*found["graph_equals_eager"].values(), *found["reproducible"].values()])
    assert {"controlnet", "lora"} <= set(found["compat"])
    assert {"dynamic_thresholding", "regional_prompter"} & set(found["compat"])
    for name, entry in found["compat"].items():
        assert isinstance(entry["ok"], bool) and isinstance(entry["note"], str) and entry["note"], name


def test_webui_gpu_results_cover_batch_4_and_say_what_was_not_measured() -> None:
    found = json.loads((HERE / "webui-gpu-h200.json").read_text())
    batch4 = found["batch4_draw_c"]
    for row in ("sd15_512_b4_norefine", "sd15_512_b4_worst", "sdxl_1024_b4_norefine", "sdxl_1024_b4_worst"):
        assert batch4["ratios_graphs_on"][row] > 0.5 and batch4["ratios_graphs_off"][row] > 0.5, row
    assert all(v["norefine_pixels"] and v["worst_pixels"] for v in batch4["graph_equals_eager"].values())
    assert not any("SDXL 1024 batch 4" in line for line in found["not_measured"])
    for rows in found["memory_growth_found"]["fix_confirmed_draw_c"].values():
        if isinstance(rows, dict):  # per configuration, the peak of each round (MiB): flat now
            assert all(max(peaks) - min(peaks) < 32 for peaks in rows.values()), rows


def test_binding_cost_rows_are_recorded() -> None:
    binding = json.loads((HERE / "benchmark-h200.json").read_text())["binding"]
    assert set(binding["excite_bind_over_excite_median_of_per_round"]) == {"norefine_eager", "norefine_graph", "worst_graph"}
    counts = binding["same_work"]
    assert counts["excite_bind_norefine_graph"]["ae_evaluations"] == counts["ae_norefine_graph"]["ae_evaluations"]
    assert binding["added_operations"]["excite_bind_minus_excite"] > 0


def test_conform_cost_rows_are_recorded() -> None:
    conform = json.loads((HERE / "benchmark-h200.json").read_text())["conform"]
    assert set(conform["conform_over_excite_median_of_per_round"]) == {"draw_a", "draw_b", "draw_c"}
    assert set(conform["gpu_busy_conform_over_excite"]) == {"eager", "graph"}
    assert all(isinstance(v, float) and v > 0.5 for v in conform["gpu_busy_conform_over_excite"].values())
    assert isinstance(conform["verdict"], str) and conform["verdict"]


ATTENTION_OPTIONS = {"Doggettx", "sdp", "sdp-no-mem", "sub-quadratic", "InvokeAI", "V1", "None"}


def test_memory_per_attention_optimisation_is_recorded() -> None:
    """Issue 21: per A1111 attention optimisation, what A&E adds to a request's peak at SD1.5 512 b1 and SDXL 1024 b1/b4
    (xformers: recorded as unavailable where it does not install)."""
    memory = json.loads((HERE / "webui-gpu-h200.json").read_text())["memory"]
    assert ATTENTION_OPTIONS <= set(memory)
    assert "xformers" in memory
    for option in ATTENTION_OPTIONS:
        entry = memory[option]
        for key in ("sd15_512_b1_added_gib", "sdxl_1024_b1_added_gib", "sdxl_1024_b4_added_gib"):
            assert isinstance(entry[key], float), (option, key)
    assert isinstance(memory["targets_met"], bool)


def test_pass_memory_and_initno_cost_rows_are_recorded() -> None:
    results = json.loads((HERE / "benchmark-h200.json").read_text())
    memory = results["pass_memory"]
    for config in ("sd15_512_b1", "sdxl_1024_b1", "sdxl_1024_b4"):
        assert {"keep_graph", "recompute_graph"} <= set(memory["added_gib"][config])
        assert {"keep_graph", "recompute_graph"} <= set(memory["x_plain"][config])
    initno = results["initno"]
    assert set(initno["noise_optimisation_seconds"]) == {"sd15_512_b1", "sdxl_1024_b1"}
    assert all(v > 0 for rows in initno["noise_optimisation_x_plain"].values() for v in rows.values())
    assert {"initno_selfcross_over_initno", "conform_selfcross_over_conform"} == set(initno["selfcross_over_base"])


def test_controlnet_and_eager_rows_are_recorded() -> None:
    """Issue 21 parts 2 and 3: the keys the issue names, and a reason wherever a target was missed."""
    webui = json.loads((HERE / "webui-gpu-h200.json").read_text())["controlnet"]
    assert isinstance(webui["ratio_norefine_graphs"], float) and isinstance(webui["ratio_norefine_eager"], float)
    assert isinstance(webui["graph_equals_eager"], bool) and isinstance(webui["graphs_replayed"], bool)
    if not (webui["target_met"] and webui["graph_equals_eager"] and webui["graphs_replayed"]):
        assert webui["why_missed"]
    eager = json.loads((HERE / "benchmark-h200.json").read_text())["eager"]
    assert {"sd15_512_b1_norefine_eager", "sd15_512_b1_worst_eager"} <= set(eager["ratios"])
    if not all(eager["targets_met"].values()):
        assert eager["why_missed"]


def test_forge_gpu_results_have_the_required_keys() -> None:
    """Issue 22 part 5: the checks of webui-gpu-h200.json in the real Forge (SD1.5 512 b1 and SDXL 1024 b1, graphs on
    and off, the same bytes twice, graph on == off) and its built-in ControlNet, with what was not measured."""
    found = json.loads((HERE / "forge-gpu-h200.json").read_text())
    assert isinstance(found["host"], str) and "Forge" in found["host"]
    assert isinstance(found["device"], str) and found["device"]
    rows = {"sd15_512_b1_norefine", "sd15_512_b1_worst", "sdxl_1024_b1_norefine", "sdxl_1024_b1_worst"}
    assert set(found["ratios"]) == rows
    assert all(isinstance(v, float) and v > 0.5 for v in found["ratios"].values()), found["ratios"]
    assert {"sd15_512_b1_norefine", "sdxl_1024_b1_norefine"} <= set(found["ratios_graphs_off"])
    assert set(found["graph_equals_eager"]) == {"sd15", "sdxl"}
    assert all(isinstance(v, bool) for v in found["graph_equals_eager"].values())
    assert isinstance(found["graphs_replayed"], bool) and found["graphs_replayed_evidence"]
    assert isinstance(found["reproducible"]["cuda"], bool)
    controlnet = found["controlnet"]
    assert isinstance(controlnet["ratio_norefine_eager"], float)
    assert isinstance(controlnet["graph_setting_equals_eager_pixels"], bool)
    if not controlnet["graphs_replayed"]:
        assert controlnet["why_eager"]
    assert isinstance(found["not_measured"], list) and all(isinstance(line, str) for line in found["not_measured"])
    columns = found["requests"]["columns"]
    assert all(len(row) == len(columns) for key, rows_ in found["requests"].items() if key != "columns"
               for row in rows_)
