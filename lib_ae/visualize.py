"""Pictures of what A&E did: per-subject attention heatmaps over the generated image, and the excitation trace.

PIL composes, matplotlib supplies the colour map, the font (its bundled DejaVu Sans) and the trace plot. Both are in
A1111's environment (gradio 3.41 depends on matplotlib); matplotlib is imported only when a picture is made, so an
extension with the option off never loads it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .initno import NoiseOptimisation
from .step_report import StepReport

CAPTION_HEIGHT = 28
"""Pixels of the label bar under each tile."""


@dataclass(frozen=True)
class SubjectMap:
    """One subject's aggregated attention map at one step: what the loss maximised, values in [0, 1]."""

    label: str
    values: np.ndarray  # (h, w)
    step: int

    @property
    def maximum(self) -> float:
        return float(self.values.max())


@dataclass(frozen=True)
class Tile:
    """Where a subject's tile sits in a strip, and what its caption says (tests and clients read these)."""

    label: str
    caption: str
    box: tuple[int, int, int, int]  # left, top, right, bottom, caption included


@dataclass(frozen=True)
class HeatmapStrip:
    image: Image.Image
    tiles: tuple[Tile, ...]


@dataclass(frozen=True)
class ImageTrace:
    """One image's excitation over the steps A&E ran."""

    labels: tuple[str, ...]
    steps: tuple[int, ...]
    losses: tuple[float | None, ...]
    maxima: tuple[tuple[float, ...] | None, ...]  # per step, per subject
    refinement: tuple[tuple[int, int], ...]  # (refinement step, iterations used)

    @property
    def final_min_attention(self) -> float | None:
        last = next((m for m in reversed(self.maxima) if m), None)
        return min(last) if last else None


def subject_maps_at(report: StepReport, image: int, labels: Sequence[str]) -> list[SubjectMap]:
    """The maps of one image in a report made with `keep_maps`, one per subject (empty when it has none)."""
    maps = report.maps[image] if image < len(report.maps) else None
    if maps is None:
        return []
    return [SubjectMap(label, maps[s].numpy(), report.step) for s, label in enumerate(labels[: maps.shape[0]])]


def binding_maps_at(report: StepReport, image: int, labels: Sequence[str]) -> list[SubjectMap]:
    """The binding maps of one image in a report made with `keep_maps` (`StepReport.bind_maps`): per group the noun's
    spatial distribution, then each modifier's beside it; `labels` as the host names them ("car", "red→car")."""
    maps = report.bind_maps[image] if image < len(getattr(report, "bind_maps", [])) else None
    if maps is None:
        return []
    return [SubjectMap(label, maps[k].numpy(), report.step) for k, label in enumerate(labels[: maps.shape[0]])]


def bind_loss_summary(reports: Sequence[StepReport], image: int) -> str | None:
    """"bind loss -0.012 -> -0.41": SynGen's loss of one image at the first and the last step it was evaluated
    (lower is better bound); None when the image had nothing to bind."""
    values = [r.bind_loss[image] for r in reports if r.active and image < len(r.bind_loss)]
    values = [v for v in values if v is not None]
    if not values:
        return None
    return f"bind loss {values[0]:.3g} -> {values[-1]:.3g}"


def noise_summary(reports: Sequence[NoiseOptimisation | None], image: int) -> str | None:
    """"InitNO round 2 of 5, targets not met, 50 noise steps + 50 from its noise, 9.8 s": what the optimisation of one
    image's initial noise did and cost (None: not run for it)."""
    report = reports[image] if image < len(reports) else None
    if report is None:
        return None
    if report.skipped:
        return f"InitNO: {report.skipped}"
    met = "targets met" if report.succeeded else "targets not met"
    longer = f" + {report.final_steps} from its noise" if report.final_steps else ""
    cut = ", interrupted" if report.interrupted else ""
    return (f"InitNO round {report.chosen_round + 1} of {len(report.rounds)}, {met}, "
            f"{report.evaluations - report.final_steps} noise steps{longer}, {report.seconds:.1f} s{cut}")


def loss_summary(reports: Sequence[StepReport], image: int, label: str) -> str | None:
    """"conform loss 1.08 -> 1.52": an objective's loss of one image at the first and the last step it was evaluated;
    None when the image was not."""
    values = [r.loss[image] for r in reports if r.active and image < len(r.loss)]
    values = [v for v in values if v is not None]
    if not values:
        return None
    return f"{label} {values[0]:.3g} -> {values[-1]:.3g}"


def image_trace(
    reports: Sequence[StepReport], image: int, labels: Sequence[str], refinement_steps: Sequence[int]
) -> ImageTrace:
    active = [r for r in reports if r.active and image < len(r.loss) and r.loss[image] is not None]
    refinement = tuple(
        (r.step, r.refinement_iterations[image]) for r in active if r.step in set(refinement_steps)
    )
    return ImageTrace(
        labels=tuple(labels),
        steps=tuple(r.step for r in active),
        losses=tuple(r.loss[image] for r in active),
        maxima=tuple(_maxima_of(r, image) for r in active),
        refinement=refinement,
    )


def _maxima_of(report: StepReport, image: int) -> tuple[float, ...] | None:
    maxima = report.maxima[image]
    return tuple(maxima) if maxima is not None else None


def trace_summary(trace: ImageTrace, *, interrupted: bool = False) -> str:
    """One infotext line, e.g. `25 steps, refinement 20/4/0, final min attention 0.83`; an interrupted run says so
    first (`interrupted after 1 step, refinement 5`), so that its short trace is not read as the whole run."""
    count = len(trace.steps)
    parts = [f"{'interrupted after ' if interrupted else ''}{count} {'step' if count == 1 else 'steps'}"]
    if trace.refinement:
        parts.append("refinement " + "/".join(str(n) for _, n in trace.refinement))
    final = trace.final_min_attention
    if final is not None:
        parts.append(f"final min attention {final:.2f}")
    return ", ".join(parts)


@lru_cache(maxsize=4)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    from matplotlib import font_manager

    try:
        return ImageFont.truetype(font_manager.findfont("DejaVu Sans"), size)
    except OSError:  # a matplotlib without its fonts
        return ImageFont.load_default()


def _colour(values: np.ndarray, size: tuple[int, int], colormap: str) -> Image.Image:
    import matplotlib

    source = Image.fromarray(np.asarray(values, dtype=np.float32), mode="F")
    upsampled = np.asarray(source.resize(size, Image.Resampling.BICUBIC))
    # Each map scaled by its own maximum, as the official visualisation does (ptp_utils.show_cross_attention): the
    # shape is what the picture shows; how strong the peak is, the caption says.
    peak = float(np.max(values))
    scaled = np.clip(upsampled / peak, 0.0, 1.0) if peak > 0 else np.zeros_like(upsampled)
    rgba = matplotlib.colormaps[colormap](scaled, bytes=True)
    return Image.fromarray(rgba[..., :3], mode="RGB")


def heatmap_strip(
    image: Image.Image,
    rows: Sequence[Sequence[SubjectMap]],
    *,
    tile_height: int = 256,
    colormap: str = "jet",
    alpha: float = 0.5,
) -> HeatmapStrip:
    """One tile per subject (columns, in subject order), one row per step (e.g. the last step A&E ran, then step 0):
    the map upsampled over the image, scaled to its own maximum and blended with `alpha`, captioned with the subject,
    its max attention and the step."""
    rows = [row for row in rows if row]
    if not rows:
        raise ValueError("no subject maps to draw")
    base = image.convert("RGB")
    width = max(1, round(base.width * tile_height / base.height))
    base = base.resize((width, tile_height), Image.Resampling.LANCZOS)
    columns = max(len(row) for row in rows)
    strip = Image.new("RGB", (columns * width, len(rows) * (tile_height + CAPTION_HEIGHT)), "black")
    draw = ImageDraw.Draw(strip)
    font = _font(max(10, CAPTION_HEIGHT - 12))
    tiles: list[Tile] = []
    for r, row in enumerate(rows):
        top = r * (tile_height + CAPTION_HEIGHT)
        for c, subject in enumerate(row):
            left = c * width
            overlay = Image.blend(base, _colour(subject.values, base.size, colormap), alpha)
            strip.paste(overlay, (left, top))
            caption = f"{subject.label}  max {subject.maximum:.2f}  step {subject.step + 1}"
            draw.text((left + 6, top + tile_height + 5), caption, fill="white", font=font)
            tiles.append(Tile(subject.label, caption, (left, top, left + width, top + tile_height + CAPTION_HEIGHT)))
    return HeatmapStrip(strip, tuple(tiles))


def trace_plot(trace: ImageTrace, *, size: tuple[int, int] = (512, 320)) -> Image.Image:
    """Max attention per subject and the loss over the altered steps; refinement iterations as bars."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    dpi = 100
    figure = Figure(figsize=(size[0] / dpi, size[1] / dpi), dpi=dpi)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    steps = [s + 1 for s in trace.steps]
    for s, label in enumerate(trace.labels):
        values = [m[s] if m is not None and s < len(m) else math.nan for m in trace.maxima]
        axes.plot(steps, values, marker=".", label=f"max attention: {label}")
    axes.plot(steps, [math.nan if v is None else v for v in trace.losses], "k--", label="loss")
    axes.set_ylim(0, 1.05)
    axes.set_xlabel("sampling step")
    axes.set_title(trace_summary(trace), fontsize=9)
    if trace.refinement:
        bars = axes.twinx()
        bars.bar([s + 1 for s, _ in trace.refinement], [n for _, n in trace.refinement], alpha=0.25, color="grey",
                 label="refinement iterations")
        bars.set_ylabel("refinement iterations")
    axes.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    canvas: Any = figure.canvas
    canvas.draw()
    return Image.frombuffer("RGBA", canvas.get_width_height(), canvas.buffer_rgba(), "raw", "RGBA", 0, 1).convert("RGB")
