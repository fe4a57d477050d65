"""Stand-in for modules/prompt_parser.py: AND sub-prompts, (trivial) schedules and the per-step batch reconstruction.

Prompt editing (`[a:b:N]`, `[a|b]`) is NOT parsed here: every prompt has a one-entry schedule, as in A1111 for a
prompt without editing syntax (L30-32: `g("test") == [[10, 'test']]`). A test that needs a real schedule replaces
`get_learned_conditioning_prompt_schedules` on this module (the extension looks it up here at call time).
"""

from __future__ import annotations

import re
from collections import namedtuple
from typing import Any

import torch

ScheduledPromptConditioning = namedtuple("ScheduledPromptConditioning", ["end_at_step", "cond"])
"""L136."""


class SdConditioning(list):
    """L139-153: a list of prompts that also carries the image size."""

    def __init__(
        self,
        prompts: list[str],
        is_negative_prompt: bool = False,
        width: int | None = None,
        height: int | None = None,
        copy_from: Any = None,
    ) -> None:
        super().__init__()
        self.extend(prompts)
        source = prompts if copy_from is None else copy_from
        self.is_negative_prompt = is_negative_prompt or getattr(source, "is_negative_prompt", False)
        self.width = width or getattr(source, "width", None)
        self.height = height or getattr(source, "height", None)


def get_learned_conditioning_prompt_schedules(
    prompts: list[str], base_steps: int, hires_steps: int | None = None, use_old_scheduling: bool = False
) -> list[list[list[Any]]]:
    """L28-133 for prompts without editing syntax: `[[steps, prompt]]` each, where steps is `base_steps`, or
    `hires_steps` for a hires pass with the new scheduling (L66-73)."""
    steps = base_steps if hires_steps is None or use_old_scheduling else hires_steps
    return [[[steps, prompt]] for prompt in prompts]


def get_learned_conditioning(
    model: Any, prompts: list[str], steps: int, hires_steps: int | None = None, use_old_scheduling: bool = False
) -> list[list[ScheduledPromptConditioning]]:
    """L157-202: each distinct prompt's schedule texts are encoded together in one call (so they share the chunk
    count); the result is one list of ScheduledPromptConditioning per prompt."""
    res: list[list[ScheduledPromptConditioning]] = []
    schedules = get_learned_conditioning_prompt_schedules(prompts, steps, hires_steps, use_old_scheduling)
    cache: dict[str, list[ScheduledPromptConditioning]] = {}
    for prompt, schedule in zip(prompts, schedules):
        if prompt not in cache:
            conds = model.get_learned_conditioning(SdConditioning([text for _, text in schedule], copy_from=prompts))
            cache[prompt] = [ScheduledPromptConditioning(end, conds[i]) for i, (end, _) in enumerate(schedule)]
        res.append(cache[prompt])
    return res


_AND = re.compile(r"\bAND\b")  # the separator of L205
_TEXT_AND_WEIGHT = re.compile(r"(.*?)(?:\s*:\s*([-+]?(?:\d+\.?\d*|\.\d+)))?\s*", re.S)  # text[:weight], as L206


def get_multicond_prompt_list(
    prompts: list[str],
) -> tuple[list[list[tuple[int, float]]], SdConditioning, dict[str, int]]:
    """L209-237: split every prompt on AND, strip an optional trailing `:weight`, and number the distinct sub-prompt
    texts; returns (per prompt: [(text index, weight)], the distinct texts, text -> index)."""
    res_indexes: list[list[tuple[int, float]]] = []
    flat = SdConditioning(list(prompts))
    flat.clear()
    index_of: dict[str, int] = {}
    for prompt in prompts:
        indexes = []
        for subprompt in _AND.split(prompt):
            match = _TEXT_AND_WEIGHT.fullmatch(subprompt)
            text, weight = match.groups() if match is not None else (subprompt, 1.0)
            if text not in index_of:
                index_of[text] = len(flat)
                flat.append(text)
            indexes.append((index_of[text], float(weight) if weight is not None else 1.0))
        res_indexes.append(indexes)
    return res_indexes, flat, index_of


class ComposableScheduledPromptConditioning:
    """L240-243."""

    def __init__(self, schedules: list[ScheduledPromptConditioning], weight: float = 1.0) -> None:
        self.schedules = schedules
        self.weight = weight


class MulticondLearnedConditioning:
    """L246-249."""

    def __init__(self, shape: tuple[int, ...], batch: list[list[ComposableScheduledPromptConditioning]]) -> None:
        self.shape = shape
        self.batch = batch


def get_multicond_learned_conditioning(
    model: Any, prompts: list[str], steps: int, hires_steps: int | None = None, use_old_scheduling: bool = False
) -> MulticondLearnedConditioning:
    """L252-267."""
    res_indexes, flat, _ = get_multicond_prompt_list(prompts)
    learned = get_learned_conditioning(model, flat, steps, hires_steps, use_old_scheduling)
    batch = [
        [ComposableScheduledPromptConditioning(learned[i], weight) for i, weight in indexes] for indexes in res_indexes
    ]
    return MulticondLearnedConditioning(shape=(len(prompts),), batch=batch)


def _target_index(schedule: list[ScheduledPromptConditioning], current_step: int) -> int:
    # L291-296 / L331-335: the first entry whose end_at_step is not before the current model call, else the first.
    return next((i for i, entry in enumerate(schedule) if current_step <= entry.end_at_step), 0)


def reconstruct_cond_batch(c: list[list[ScheduledPromptConditioning]], current_step: int) -> torch.Tensor:
    """L280-304 for tensor conds: the schedule entry in effect at `current_step`, per prompt, stacked."""
    return torch.stack([schedule[_target_index(schedule, current_step)].cond for schedule in c])


def _stack_conds(tensors: list[torch.Tensor]) -> torch.Tensor:
    # L307-317: rows shorter than the longest are padded by repeating their last vector.
    length = max(t.shape[0] for t in tensors)
    padded = [t if t.shape[0] == length else torch.cat([t, t[-1:].expand(length - t.shape[0], -1)]) for t in tensors]
    return torch.stack(padded)


def reconstruct_multicond_batch(
    c: MulticondLearnedConditioning, current_step: int
) -> tuple[list[list[tuple[int, float]]], torch.Tensor]:
    """L321-349 for tensor conds: one row per sub-prompt of every image, in order; `conds_list[i]` holds
    (row, weight) of image i's sub-prompts."""
    tensors: list[torch.Tensor] = []
    conds_list: list[list[tuple[int, float]]] = []
    for composable_prompts in c.batch:
        rows = []
        for composable in composable_prompts:
            rows.append((len(tensors), composable.weight))
            tensors.append(composable.schedules[_target_index(composable.schedules, current_step)].cond)
        conds_list.append(rows)
    return conds_list, _stack_conds(tensors)
