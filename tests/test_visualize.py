"""Heatmaps and the excitation trace: the maps are the ones the loss read, the pictures are laid out as documented."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lib_ae import AttendAndExcite, AttentionCapture, ExciteConfig, InSamplerExcitation, StepClock, TokenSelection
from lib_ae.visualize import (
    CAPTION_HEIGHT,
    SubjectMap,
    heatmap_strip,
    image_trace,
    subject_maps_at,
    trace_plot,
    trace_summary,
)
from support.models import SD1_LIKE, make_unet

SUBJECTS = [["cat", "dog"], ["red car", "tree", "sun"]]  # a batch of 2 with different subjects
SELECTIONS = [TokenSelection.official(77, [[2], [5]]), TokenSelection.official(77, [[3, 4], [7], [9]])]


@pytest.fixture(scope="module")
def runs() -> dict[bool, tuple[list, int]]:
    """Four Euler-like steps (a fixed sigma per step) with and without keeping the maps; UNet calls counted."""
    torch.set_num_threads(1)
    unet = make_unet(SD1_LIKE, seed=5)
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(2, 4, 16, 16, generator=g)
    context = torch.randn(2, 77, SD1_LIKE.context_dim, generator=g)
    out: dict[bool, tuple[list, int]] = {}
    for keep in (False, True):
        capture = AttentionCapture(unet)
        engine = AttendAndExcite(capture, ExciteConfig(max_refinement_iterations=2))
        plan = engine.plan(4)
        excitation = InSamplerExcitation(engine, plan, "vp", StepClock(1), map_steps=frozenset({0, 1}) if keep else frozenset())
        calls = [0]

        def run_unet(latent: torch.Tensor, rows: torch.Tensor) -> None:
            calls[0] += 1
            unet(latent, torch.full((len(rows),), 600.0), context=context[rows])

        x = x0.clone()
        with torch.no_grad():
            for step in range(4):
                excitation.before_model_call(step, x, torch.ones(2), SELECTIONS, run_unet)
        capture.remove()
        out[keep] = (excitation.reports, calls[0])
    return out


def test_kept_maps_are_the_maps_whose_maxima_the_loss_read(runs: dict[bool, tuple[list, int]]) -> None:
    reports, _ = runs[True]
    for report in reports[:2]:
        for b, selection in enumerate(SELECTIONS):
            maps = report.maps[b]
            assert maps is not None and maps.shape == (len(selection.subjects), 4, 4)
            assert maps.dtype == torch.float32 and maps.device.type == "cpu"
            assert maps.amax(dim=(-2, -1)).tolist() == pytest.approx(report.maxima[b], abs=1e-6)
    assert all(m is None for r in reports[2:] for m in r.maps)


def test_maps_off_cost_nothing_and_change_nothing(runs: dict[bool, tuple[list, int]]) -> None:
    (off, off_calls), (on, on_calls) = runs[False], runs[True]
    assert off_calls == on_calls  # the same UNet passes: maps come from evaluations that run anyway
    assert all(m is None for r in off for m in r.maps)
    assert [r.maxima for r in off] == [r.maxima for r in on] and [r.loss for r in off] == [r.loss for r in on]


def test_heatmap_strips_for_a_batch_of_two_with_different_subjects(runs: dict[bool, tuple[list, int]]) -> None:
    reports, _ = runs[True]
    last = reports[1]  # the last step A&E ran with maps (alter_steps = 2 of 4)
    for b, labels in enumerate(SUBJECTS):
        image = Image.new("RGB", (96, 64), (120, 120, 120))
        rows = [subject_maps_at(last, b, labels), subject_maps_at(reports[0], b, labels)]
        strip = heatmap_strip(image, rows, tile_height=128)
        width = 96 * 128 // 64
        assert strip.image.size == (len(labels) * width, 2 * (128 + CAPTION_HEIGHT))
        assert [t.label for t in strip.tiles] == labels * 2  # subject order, last step first, then step 0
        assert [t.box[0] for t in strip.tiles[: len(labels)]] == [i * width for i in range(len(labels))]
        for tile, subject in zip(strip.tiles, rows[0] + rows[1]):
            assert tile.caption == f"{subject.label}  max {subject.maximum:.2f}  step {subject.step + 1}"
        assert strip.tiles[0].caption.endswith("step 2") and strip.tiles[len(labels)].caption.endswith("step 1")


def test_overlay_follows_the_map() -> None:
    values = np.zeros((4, 4), dtype=np.float32)
    values[0, 0] = 0.2  # all attention in the top-left corner; drawn relative to the map's own maximum
    strip = heatmap_strip(Image.new("RGB", (64, 64), "white"), [[SubjectMap("cat", values, 0)]], tile_height=64, alpha=1.0)
    pixels = np.asarray(strip.image).astype(int)
    hot, cold = pixels[2, 2], pixels[60, 60]
    assert hot[0] > 100 and cold[2] > 100 and cold[0] < 50  # jet: red where the map is 1, blue where it is 0
    with pytest.raises(ValueError, match="no subject maps"):
        heatmap_strip(Image.new("RGB", (8, 8)), [[]])


def test_trace_summary_and_plot(runs: dict[bool, tuple[list, int]]) -> None:
    reports, _ = runs[False]
    trace = image_trace(reports, 1, SUBJECTS[1], refinement_steps=[0, 1, 2])
    # 4 steps: the update runs at steps 0 and 1, refinement at 0, 1 and 2 (the plan scales 0/10/20 of 50 steps)
    assert trace.steps == (0, 1, 2) and len(trace.maxima[0]) == 3
    assert [n for _, n in trace.refinement] == [r.refinement_iterations[1] for r in reports[:3]]
    summary = trace_summary(trace)
    expected_refinement = "/".join(str(n) for _, n in trace.refinement)
    assert summary == f"3 steps, refinement {expected_refinement}, final min attention {min(trace.maxima[-1]):.2f}"
    one_step = image_trace(reports[:1], 1, SUBJECTS[1], refinement_steps=[0])
    assert trace_summary(one_step).startswith("1 step, refinement ")
    assert trace_summary(one_step, interrupted=True).startswith("interrupted after 1 step, ")
    plot = trace_plot(trace, size=(400, 250))
    assert plot.size == (400, 250) and plot.mode == "RGB"
    assert len(set(plot.getdata())) > 10  # something was drawn


def test_binding_maps_and_bind_loss_summary() -> None:
    from lib_ae import StepReport
    from lib_ae.visualize import bind_loss_summary, binding_maps_at

    maps = torch.full((4, 2, 2), 0.25)
    reports = [
        StepReport(0, True, [0.5, 0.4], [[0.5], [0.6]], [0, 0], bind_loss=[-0.01, None], bind_maps=[maps, None]),
        StepReport(1, True, [0.4, 0.3], [[0.6], [0.7]], [0, 0], bind_loss=[-0.25, None]),
        StepReport(2, False, bind_loss=[None, None]),
    ]
    tiles = binding_maps_at(reports[0], 0, ["car", "red\u2192car", "bench", "blue\u2192bench"])
    assert [t.label for t in tiles] == ["car", "red\u2192car", "bench", "blue\u2192bench"]
    assert all(t.step == 0 and t.maximum == 0.25 for t in tiles)
    assert binding_maps_at(reports[0], 1, ["x"]) == [] and binding_maps_at(reports[1], 0, ["x"]) == []
    assert bind_loss_summary(reports, 0) == "bind loss -0.01 -> -0.25"
    assert bind_loss_summary(reports, 1) is None  # nothing bound for image 1
