"""After a batch: the one-line excitation trace in each image's infotext and, with heatmaps on, each image's heatmap
strip and trace plot (drawn by `lib_ae.visualize`), appended to the results after the generated images."""

from __future__ import annotations

from typing import Any

from lib_ae.visualize import (
    ImageTrace,
    bind_loss_summary,
    binding_maps_at,
    heatmap_strip,
    image_trace,
    loss_summary,
    noise_summary,
    subject_maps_at,
    trace_plot,
    trace_summary,
)

from . import host
from .host import Processing
from .report import AE_BINDINGS_KEY, AE_HIRES_TRACE_KEY, AE_SUBJECTS_USED_KEY, AE_TRACE_KEY, NOTHING_USED, image_in_job
from .run_state import BatchVisual, existing_state, state_of
from .sampling_pass import SamplingPass


def record_batch_traces(p: Processing) -> None:
    """The trace line of each image for the first pass ("AE trace") and, when A&E also ran there, the hires fix pass
    ("AE hires trace"); with heatmaps on, what to draw from the first pass that ran A&E."""
    state = state_of(p)
    state.visuals = {}
    record_subjects_used(p, state.passes)
    ran = [sp for sp in state.passes if sp.run.reports]
    if not ran:
        return
    interrupted = host.interrupted()
    first = next((sp for sp in ran if not sp.is_hr), None)
    hires = next((sp for sp in ran if sp.is_hr), None)
    for sampling_pass, key in ((first, AE_TRACE_KEY), (hires, AE_HIRES_TRACE_KEY)):
        if sampling_pass is None:
            continue
        summaries = _summaries(sampling_pass, interrupted)
        if summaries:
            # Evaluated per image when A1111 writes the infotext (processing.py `create_infotext`; `index` = position
            # in batch).
            p.extra_generation_params[key] = lambda index=0, _summaries=summaries, **_: _summaries.get(index)
    shown = ran[0]
    if shown.params.heatmaps:
        state.visuals = _visuals(shown)


def record_subjects_used(p: Processing, passes: list[SamplingPass]) -> None:
    """Per image of the batch, from the first pass: with automatic subjects "AE subjects used" (what was found in its
    prompt), with a method that binds modifiers "AE bindings" (the pairs bound). Written even when A&E found nothing
    to do, so the infotext says what it looked at."""
    first = next((sp for sp in passes if not sp.is_hr), None)
    if first is None:
        return
    found = first.targeting
    if first.params.auto_subjects and found.subjects_used:
        used = {b: ", ".join(subjects) or NOTHING_USED for b, subjects in found.subjects_used.items()}
        per_image = lambda index=0, _used=used, **_: _used.get(index)  # noqa: E731  # evaluated per image by A1111
        _put_after(p.extra_generation_params, "AE subjects", AE_SUBJECTS_USED_KEY, per_image)
    if found.uses_modifier_pairs and found.subjects_used:
        bound = {
            b: ", ".join(f"{modifier}->{noun}" for modifier, noun in found.bound.get(b, {})) or NOTHING_USED
            for b in found.subjects_used
        }
        p.extra_generation_params[AE_BINDINGS_KEY] = lambda index=0, _bound=bound, **_: _bound.get(index)


def _put_after(entries: dict[str, Any], anchor: str, key: str, value: Any) -> None:
    """entries[key] = value, placed right after `anchor` when it is there ("AE subjects: auto, AE subjects used: ..."
    reads as one statement). The dict is reordered in place: it is p's own, other scripts may hold it."""
    entries.pop(key, None)
    if anchor not in entries:
        entries[key] = value
        return
    items = list(entries.items())
    position = [k for k, _ in items].index(anchor) + 1
    items.insert(position, (key, value))
    entries.clear()
    entries.update(items)


def _traces(sampling_pass: SamplingPass) -> dict[int, ImageTrace]:
    excitation = sampling_pass.run.excitation
    assert excitation is not None
    traces = {}
    for b, labels in sampling_pass.targeting.labels.items():
        if labels:
            trace = image_trace(excitation.reports, b, labels, sorted(excitation.plan.refinement_thresholds))
            if trace.steps:
                traces[b] = trace
    return traces


def _summaries(sampling_pass: SamplingPass, interrupted: bool) -> dict[int, str]:
    reports = sampling_pass.run.reports
    cut = interrupted or any(r.interrupted for r in reports)
    eager_reason = sampling_pass.run.eager_reason
    eager = f", no CUDA graph ({eager_reason})" if eager_reason else ""
    if "recompute" in sampling_pass.run.memory_modes:  # the low-memory mode ran (same result, more GPU time)
        eager += ", activations recomputed to save memory"
    summaries = {}
    for b, trace in _traces(sampling_pass).items():
        objective = sampling_pass.run.engine.objective
        extra = [
            noise_summary(sampling_pass.run.excitation.noise_reports, b) if sampling_pass.run.excitation else None,
            bind_loss_summary(reports, b) if objective.computes_binding_loss else None,
            loss_summary(reports, b, objective.loss_label) if objective.loss_label else None,
        ]
        summaries[b] = trace_summary(trace, interrupted=cut) + "".join(f", {e}" for e in extra if e) + eager
    return summaries


def _visuals(sampling_pass: SamplingPass) -> dict[int, BatchVisual]:
    excitation = sampling_pass.run.excitation
    assert excitation is not None
    visuals = {}
    for b, trace in _traces(sampling_pass).items():
        labels = sampling_pass.targeting.labels[b]
        own = sampling_pass.run.engine.objective.extra_map_labels(labels)
        bind_labels = own if own is not None else sampling_pass.targeting.binding_labels.get(b, [])
        by_step = {
            r.step: subject_maps_at(r, b, labels) + binding_maps_at(r, b, bind_labels)  # the modifier beside its noun
            for r in excitation.reports
            if r.step in excitation.map_steps
        }
        rows = [by_step[step] for step in sorted(by_step, reverse=True) if by_step[step]]
        visuals[b] = BatchVisual(rows, trace)
    return visuals


def draw_heatmaps(p: Processing, image: Any) -> None:
    """For the image A1111 just finished (p.batch_index of batch p.iteration): its heatmap strip and trace plot."""
    state = existing_state(p)
    b = int(getattr(p, "batch_index", 0))
    visual = state.visuals.get(b) if state is not None else None
    if state is None or visual is None:
        return
    pictures = ([heatmap_strip(image, visual.rows).image] if visual.rows else []) + [trace_plot(visual.trace)]
    state.pictures.append((image_in_job(p, b), pictures))


def add_heatmaps_to_results(p: Processing, processed: Any) -> None:
    """Append the pictures after the generated images (never replacing one), each with its image's infotext, and save
    them the way A1111 saves samples (images.save_image, suffix "-ae-heatmaps" / "-ae-trace")."""
    state = existing_state(p)
    if state is None or not state.pictures:
        return
    outputs, state.pictures = state.pictures, []
    first = int(getattr(processed, "index_of_first_image", 0))
    for job_index, pictures in outputs:
        position = first + job_index
        info = processed.infotexts[position] if position < len(processed.infotexts) else None
        for picture, suffix in zip(pictures, ("-ae-heatmaps", "-ae-trace") if len(pictures) == 2 else ("-ae-trace",)):
            processed.images.append(picture)
            processed.infotexts.append(info)
            host.save_image(p, picture, job_index, info, suffix)
