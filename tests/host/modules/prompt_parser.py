"""Stand-in for modules/prompt_parser.py: AND sub-prompts, prompt-editing schedules, emphasis parsing and the
per-step batch reconstruction.

Prompt editing: A1111 parses with a lark grammar (L15-25), which the test venv does not have. `_parse_schedule` is a
small hand-written parser for the same constructs, `[from:to:when]`, `[to:when]`, `[from::when]` and `[a|b|...]`,
nested or not, with `(...)` / `[...]` emphasis and backslash escapes passed through as text; the step arithmetic
(`collect_steps`, `at_step`, L75-120) is A1111's. A prompt the grammar cannot parse (unbalanced brackets) gets the
one-entry schedule, as A1111's `get_schedule` falls back on a parse error (L122-128). A test may still replace
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


class _Scheduled:
    """The lark tree's `scheduled` node (L20): `[before:after:when]`, `before` may be absent."""

    def __init__(self, before: list[Any] | None, after: list[Any], when: str) -> None:
        self.before = before
        self.after = after
        self.when_text = when
        self.when = 0


class _Alternate:
    """The lark tree's `alternate` node (L21): `[a|b|...]`, empty options allowed."""

    def __init__(self, options: list[list[Any]]) -> None:
        self.options = options


class _ParseError(Exception):
    pass


class _Sep(str):
    """A `:` or `|` directly inside the bracket being read: a separator if that bracket turns out to be scheduling or
    alternation, plain text otherwise."""


def _plain(items: list[Any]) -> list[Any]:
    return [str.__str__(item) if isinstance(item, _Sep) else item for item in items]


_NUMBER = re.compile(r"\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)\s*")  # common.SIGNED_NUMBER (L24)


def _split_top(items: list[Any], separator: str) -> list[list[Any]]:
    """Split a bracket's content at its own (not nested) separators; separators are single-character strings."""
    parts: list[list[Any]] = [[]]
    for item in items:
        if isinstance(item, _Sep) and item == separator:
            parts.append([])
        else:
            parts[-1].append(item)
    return parts


def _text(items: list[Any]) -> str | None:
    return "".join(items) if all(isinstance(item, str) and not isinstance(item, _Sep) for item in items) else None


def _parse_schedule(prompt: str) -> list[Any]:
    """The prompt as a list of text pieces and `_Scheduled` / `_Alternate` nodes. Raises `_ParseError` where lark
    would fail (the caller then uses the prompt as it is)."""
    stack: list[tuple[str, list[Any]]] = [("", [])]
    i = 0
    while i < len(prompt):
        char = prompt[i]
        if char == "\\" and i + 1 < len(prompt):
            stack[-1][1].append(prompt[i : i + 2])  # `plain` keeps escapes verbatim (L22)
            i += 2
            continue
        if char in "([":
            stack.append((char, []))
        elif char in ")]":
            if len(stack) == 1 or stack[-1][0] != ("(" if char == ")" else "["):
                raise _ParseError(prompt)
            kind, items = stack.pop()
            stack[-1][1].extend(_close(kind, items) if kind == "[" else ["(", *_plain(items), ")"])
        elif char in ":|":
            stack[-1][1].append(_Sep(char))  # a separator, until its bracket closes
        else:
            stack[-1][1].append(char)
        i += 1
    if len(stack) != 1:
        raise _ParseError(prompt)
    items = stack[0][1]
    if any(isinstance(item, _Sep) and item == "|" for item in items):
        raise _ParseError(prompt)  # `|` only inside alternation brackets (plain excludes it, L22)
    return _plain(items)


def _close(kind: str, items: list[Any]) -> list[Any]:
    """A closed `[...]`: alternation if it has a top-level `|`, scheduling if it ends in `:NUMBER`, else emphasis."""
    if any(isinstance(item, _Sep) and item == "|" for item in items):
        return [_Alternate([_plain(option) for option in _split_top(items, "|")])]
    parts = _split_top(items, ":")
    when = _text(parts[-1]) if len(parts) in (2, 3) else None
    if when is not None and _NUMBER.fullmatch(when):
        number = _NUMBER.fullmatch(when).group(1)  # type: ignore[union-attr]
        if len(parts) == 3:
            return [_Scheduled(_plain(parts[0]), _plain(parts[1]), number)]
        return [_Scheduled(None, _plain(parts[0]), number)]
    return ["[", *_plain(items), "]"]  # emphasized: "[" prompt "]" (L18-19), separators are text there


def get_learned_conditioning_prompt_schedules(
    prompts: list[str], base_steps: int, hires_steps: int | None = None, use_old_scheduling: bool = False
) -> list[list[list[Any]]]:
    """L28-133: for each prompt, `[[end_at_step, text], ...]`. Steps are `base_steps`, or `hires_steps` for a hires
    pass with the new scheduling, where integers count from the first pass's end and floats from 1.0 (L66-73)."""
    if hires_steps is None or use_old_scheduling:
        int_offset, flt_offset, steps = 0, 0.0, base_steps
    else:
        int_offset, flt_offset, steps = base_steps, 1.0, hires_steps

    def nodes(items: list[Any]) -> list[Any]:
        found: list[Any] = []
        for item in items:
            if isinstance(item, _Scheduled):
                found.append(item)
                found += nodes(item.before or []) + nodes(item.after)
            elif isinstance(item, _Alternate):
                found.append(item)
                for option in item.options:
                    found += nodes(option)
        return found

    def collect_steps(tree: list[Any]) -> list[int]:  # L75-97
        res = [steps]
        for node in nodes(tree):
            if isinstance(node, _Scheduled):
                s = node.when_text
                v = float(s)
                if use_old_scheduling:
                    v = v * steps if v < 1 else v
                elif "." in s:
                    v = (v - flt_offset) * steps
                else:
                    v = v - int_offset
                node.when = min(steps, int(v))
                if node.when >= 1:
                    res.append(node.when)
            else:
                res.extend(range(1, steps + 1))
        return sorted(set(res))

    def at_step(step: int, items: list[Any]) -> str:  # L99-120
        out: list[str] = []
        for item in items:
            if isinstance(item, _Scheduled):
                out.append(at_step(step, (item.before or []) if step <= item.when else item.after))
            elif isinstance(item, _Alternate):
                out.append(at_step(step, item.options[(step - 1) % len(item.options)]))
            else:
                out.append(item)
        return "".join(out)

    def get_schedule(prompt: str) -> list[list[Any]]:  # L122-130
        try:
            tree = _parse_schedule(prompt)
        except _ParseError:
            return [[steps, prompt]]
        return [[t, at_step(t, tree)] for t in collect_steps(tree)]

    promptdict = {prompt: get_schedule(prompt) for prompt in set(prompts)}
    return [promptdict[prompt] for prompt in prompts]


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


re_attention = re.compile(
    r"""
\\\(|
\\\)|
\\\[|
\\]|
\\\\|
\\|
\(|
\[|
:\s*([+-]?[.\d]+)\s*\)|
\)|
]|
[^\\()\[\]:]+|
:
""",
    re.X,
)
"""L352-366."""

re_break = re.compile(r"\s*\bBREAK\b\s*", re.S)
"""L368."""


def parse_prompt_attention(text: str) -> list[list[Any]]:
    """L370-464, verbatim: `[[text, weight], ...]` with the brackets removed, `["BREAK", -1]` markers, adjacent
    equal weights merged. `(a)` x1.1, `[a]` /1.1, `(a:w)` xw."""
    res: list[list[Any]] = []
    round_brackets: list[int] = []
    square_brackets: list[int] = []

    round_bracket_multiplier = 1.1
    square_bracket_multiplier = 1 / 1.1

    def multiply_range(start_position: int, multiplier: float) -> None:
        for p in range(start_position, len(res)):
            res[p][1] *= multiplier

    for m in re_attention.finditer(text):
        text = m.group(0)
        weight = m.group(1)

        if text.startswith("\\"):
            res.append([text[1:], 1.0])
        elif text == "(":
            round_brackets.append(len(res))
        elif text == "[":
            square_brackets.append(len(res))
        elif weight is not None and round_brackets:
            multiply_range(round_brackets.pop(), float(weight))
        elif text == ")" and round_brackets:
            multiply_range(round_brackets.pop(), round_bracket_multiplier)
        elif text == "]" and square_brackets:
            multiply_range(square_brackets.pop(), square_bracket_multiplier)
        else:
            parts = re.split(re_break, text)
            for i, part in enumerate(parts):
                if i > 0:
                    res.append(["BREAK", -1])
                res.append([part, 1.0])

    for pos in round_brackets:
        multiply_range(pos, round_bracket_multiplier)

    for pos in square_brackets:
        multiply_range(pos, square_bracket_multiplier)

    if len(res) == 0:
        res = [["", 1.0]]

    i = 0
    while i + 1 < len(res):
        if res[i][1] == res[i + 1][1]:
            res[i][0] += res[i + 1][0]
            res.pop(i + 1)
        else:
            i += 1

    return res
