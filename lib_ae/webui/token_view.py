"""A live view, inside the accordion, of how the current prompt is tokenized by the loaded model's own text encoder
and A1111's prompt parsing (emphasis, BREAK, 75-token chunks, prompt editing, textual-inversion embeddings), with
each subject's conditioning columns and the subjects that are not found: the same pipeline as generation
(subjects.py), so the view shows what A&E will use. With an empty subject box (automatic subjects) the subjects found
in the prompt are shown marked as suggested (a click on one fixes it: it is written into the box); with a method
that binds modifiers, each bound modifier is shown in its noun's colour, with the noun's name.

javascript/attend_and_excite.js writes {prompt, subjects, steps, method} as JSON into a hidden textbox and clicks a
hidden button (the pattern of A1111's token counter, ui.py `create_ui`); the reply is the HTML. None of these
components is returned by ui(), so they carry no script argument (the positional API order is unchanged).
"""

from __future__ import annotations

import html
import json
import logging
from collections.abc import Callable
from typing import Any

from lib_ae.objectives import objective_for
from lib_ae.params import AEParams, ParamsError
from lib_ae.targeting import PromptChunk, PromptTokens, TextEncoder
from lib_ae.tokens import prompt_tokens

from . import host
from .host import gr
from .subjects import subject_finder, text_encoder

logger = logging.getLogger("lib_ae.webui")

TOKEN_VIEW_MAX_CHUNKS = 8
"""Chunks shown per schedule entry (600 tokens); the rest is summarised."""
WORD_END = "</w>"
SUBJECT_COLOURS = 6


def token_text(encoder: Any, token_id: int) -> str:
    """The text of one token id: HF CLIPTokenizer (SD1, SDXL's CLIP-L: `encoder.tokenizer`) or open_clip's tokenizer
    (the encoder's own, or SD2's module-level `sd_hijack_open_clip.tokenizer`), byte-level BPE decoded; a word end
    keeps its `</w>`."""
    tokenizer = getattr(encoder, "tokenizer", None)
    if tokenizer is not None and hasattr(tokenizer, "convert_ids_to_tokens"):
        text = str(tokenizer.convert_ids_to_tokens(int(token_id)))
    elif tokenizer is not None and isinstance(getattr(tokenizer, "decoder", None), dict):  # an open_clip tokenizer
        text = str(tokenizer.decoder.get(int(token_id), f"<{token_id}>"))
    else:
        text, tokenizer = host.open_clip_token_text(token_id)
    end = text.endswith(WORD_END)
    body = text[: -len(WORD_END)] if end else text
    byte_decoder = getattr(tokenizer, "byte_decoder", None)
    if byte_decoder:
        try:
            body = bytearray(byte_decoder[c] for c in body).decode("utf-8", errors="replace")
        except KeyError:
            pass
    return body + (WORD_END if end else "")


def _escape(text: str) -> str:
    return html.escape(text, quote=True)


def token_view_html(prompt: str, subjects_text: str, steps: int, method: str = "excite") -> str:
    """The token view of `prompt` with the subjects `subjects_text` and the A&E `method`, as HTML (messages instead of
    raising)."""
    try:
        return _token_view_html(prompt, subjects_text, steps, method)
    except Exception as error:  # the view must never break the UI; the message says what happened
        logger.debug("token view failed", exc_info=True)
        return (
            f"<div class='ae-tokens-message'>Token view unavailable: {_escape(type(error).__name__)}: "
            f"{_escape(str(error)[:200])}</div>"
        )


def _steps_label(index: int, count: int, end: int, previous_end: int) -> str:
    """A1111's own terms: an entry is used while the step counter is <= its end (prompt_parser.py
    `reconstruct_multicond_batch`)."""
    if index == 0:
        return f"until step {end}"
    if index == count - 1:
        return f"after step {previous_end}"
    return f"after step {previous_end}, until step {end}"


def _token_view_html(prompt: str, subjects_text: str, steps: int, method: str) -> str:
    sd_model = host.loaded_model()
    if sd_model is None:
        return "<div class='ae-tokens-message'>No model is loaded.</div>"
    encoder = text_encoder(sd_model)
    problems: list[str] = []
    params, subjects_valid = AEParams(), True
    attempts: tuple[dict[str, Any], ...] = ({"subjects": subjects_text, "method": method}, {"subjects": subjects_text})
    for values in attempts:  # as generation does
        try:
            params = AEParams(**values)
            break
        except ParamsError as error:
            problems = problems or ["; ".join(error.messages)]  # the first attempt's messages name every problem
    else:
        subjects_valid = False  # the problem is in the subjects: show the tokens without any
    first, others = host.first_subprompt(host.strip_extra_networks(prompt or ""))
    finder = subject_finder(encoder, params.subject_names)
    objective = objective_for(params)
    uses_pairs = objective.uses_modifier_pairs
    schedule_steps = max(1, int(steps or 20))
    tokens = finder.schedule_tokens(first, schedule_steps)
    suggested = finder.automatic and subjects_valid
    subjects = finder.subjects_for(first, tokens, schedule_steps) if suggested else params.subject_names
    parts: list[str] = [f"<div class='ae-tokens-problem'>{_escape(problem)}</div>" for problem in problems]
    if others:
        parts.append("<div class='ae-tokens-note'>AND: A&amp;E uses the first sub-prompt only.</div>")
    found_in: dict[str, list[tuple[str, tuple[int, ...]]]] = {}  # subject -> (steps, columns) of the entries with it
    missing: dict[str, str] = {}
    notes: dict[str, None] = {}
    order = {subject: i for i, subject in enumerate(subjects)}
    previous_end = 0
    count = len(tokens.ends)
    for entry in range(count):
        steps_label = _steps_label(entry, count, tokens.ends[entry], previous_end)
        previous_end = tokens.ends[entry]
        location = finder.locate(tokens, entry, subjects)
        for subject, columns in location.found.items():
            found_in.setdefault(subject, []).append((steps_label, columns))
        for subject in location.missing:
            default = f"subject {subject!r} is not in the prompt"
            reason = next((m for m in location.messages if repr(subject) in m), default)
            missing.setdefault(subject, reason.removeprefix("AE: "))
        owner = {column: subject for subject, columns in location.found.items() for column in columns}
        modifiers: dict[int, str] = {}  # modifier column -> its noun
        if uses_pairs:
            binding, messages = finder.bindings_in(first, tokens, entry, subjects, schedule_steps)
            notes.update(dict.fromkeys(messages if objective.computes_binding_loss else ()))
            if binding is not None:
                for _, noun, modifier_columns, noun_columns in binding.bound:
                    noun_owner = owner.get(noun_columns[0], noun)
                    modifiers.update({column: noun_owner for column in modifier_columns})
        marks = _Marks(owner, order, suggested, modifiers)
        parts.append(_entry_html(encoder, tokens, entry, steps_label, marks))
    legend = [_legend_html(i, subject, found_in, missing, count, suggested) for i, subject in enumerate(subjects)]
    if suggested and subjects:
        # A pasted infotext writes "auto" into the box (A1111 drops empty values): say what the box shows.
        box = "says auto" if subjects_text.strip() else "is empty"
        legend.append(
            f"<span class='ae-tokens-note'>suggested: the subject box {box}, so A&amp;E finds the subjects; "
            "click one to fix it</span>"
        )
    elif not subjects:
        legend.append("<span class='ae-tokens-note'>Click a word to make it a subject.</span>")
    legend_html = "<div class='ae-tokens-legend'>" + "".join(legend) + "</div>"
    notes_html = "".join(f"<div class='ae-tokens-note'>{_escape(note.removeprefix('AE '))}</div>" for note in notes)
    return "<div class='ae-tokens'>" + legend_html + notes_html + "".join(parts) + "</div>"


class _Marks:
    """How the tokens of one schedule entry are marked: `owner` column -> subject, `order` subject -> colour index,
    `suggested` (automatic subjects), `modifiers` column -> the subject (noun) the modifier is bound to."""

    def __init__(
        self, owner: dict[int, str], order: dict[str, int], suggested: bool, modifiers: dict[int, str]
    ) -> None:
        self.owner = owner
        self.order = order
        self.suggested = suggested
        self.modifiers = modifiers


def _entry_html(encoder: TextEncoder, tokens: PromptTokens, entry: int, steps_label: str, marks: _Marks) -> str:
    chunk_count = tokens.chunk_counts[entry]
    header = f"{tokens.token_counts[entry]} tokens, {chunk_count} chunk{'s' if chunk_count != 1 else ''} of 75"
    if len(tokens.ends) > 1:
        header = f"{steps_label} (prompt editing): " + header
    parts = [f"<div class='ae-tokens-entry'><div class='ae-tokens-header'>{_escape(header)}</div>"]
    for k in range(min(chunk_count, TOKEN_VIEW_MAX_CHUNKS)):
        parts.append(_chunk_html(encoder, tokens.chunks[entry][k], list(tokens.ids[entry][k]), k, marks))
    if chunk_count > TOKEN_VIEW_MAX_CHUNKS:
        parts.append(f"<div class='ae-tokens-note'>... {chunk_count - TOKEN_VIEW_MAX_CHUNKS} more chunks</div>")
    parts.append("</div>")
    return "".join(parts)


def _chunk_html(encoder: TextEncoder, chunk: PromptChunk, ids: list[int], k: int, marks: _Marks) -> str:
    fixes = {int(fix.offset) + 1: fix.embedding for fix in getattr(chunk, "fixes", [])}
    real = len(prompt_tokens(ids, bos_id=encoder.id_start, eos_id=encoder.id_end, pad_id=encoder.id_pad))
    word: list[tuple[int, str]] = []
    words: list[list[tuple[int, str]]] = []
    for j in range(1, real + 1):
        word.append((j, token_text(encoder, ids[j])))
        if word[-1][1].endswith(WORD_END) or j == real:
            words.append(word)
            word = []
    multipliers = list(getattr(chunk, "multipliers", [1.0] * len(ids)))
    spans: list[str] = []
    skip_until = 0
    for word_tokens in words:
        whole = "".join(t.removesuffix(WORD_END) for _, t in word_tokens)
        for j, tok in word_tokens:
            column = 77 * k + j
            if j < skip_until:
                continue
            classes = ["ae-token"]
            attrs = [f"data-ae-col='{column}'", f"data-ae-word='{_escape(whole)}'"]
            label = tok.removesuffix(WORD_END)
            title = f"column {column}, id {ids[j]}"
            if j in fixes:
                embedding = fixes[j]
                vectors = int(getattr(embedding, "vectors", 1) or 1)
                skip_until = j + vectors
                label = str(getattr(embedding, "name", "embedding"))
                title = f"columns {column}-{column + vectors - 1}: textual inversion embedding ({vectors} vectors)"
                classes.append("ae-token-embedding")
                attrs[1] = f"data-ae-word='{_escape(label)}'"
            weight = float(multipliers[j]) if j < len(multipliers) else 1.0
            if abs(weight - 1.0) > 1e-6:
                title += f", weight {weight:.3g}"
                classes.append("ae-token-weighted")
            if not tok.endswith(WORD_END) and j not in fixes:
                classes.append("ae-token-cont")  # the word goes on in the next token
            subject = marks.owner.get(column)
            noun = marks.modifiers.get(column)
            if subject is not None:
                classes.append(f"ae-subject ae-subject-{marks.order.get(subject, 0) % SUBJECT_COLOURS}")
                attrs.append(f"data-ae-subject='{_escape(subject)}'")
                if marks.suggested:
                    classes.append("ae-suggested")
                    attrs.append("data-ae-suggested='1'")
                    title += f", suggested subject '{subject}' (click to fix it)"
                else:
                    title += f", subject '{subject}'"
            elif noun is not None:
                classes.append(f"ae-modifier ae-subject-{marks.order.get(noun, 0) % SUBJECT_COLOURS}")
                attrs.append(f"data-ae-noun='{_escape(noun)}'")
                title += f", modifier bound to '{noun}'"
            attrs.append(f"title='{_escape(title)}'")
            weight_mark = f"<sub>{weight:.2g}</sub>" if "ae-token-weighted" in classes else ""
            noun_mark = f"<sup class='ae-bound-noun'>&#8594;{_escape(noun)}</sup>" if noun is not None else ""
            spans.append(
                f"<span class='{' '.join(classes)}' {' '.join(attrs)}>{_escape(label)}{weight_mark}{noun_mark}</span>"
            )
    pad = 75 - real
    return (
        f"<div class='ae-tokens-chunk'><span class='ae-chunk-label' title='columns {77 * k}-{77 * k + 76}'>"
        f"chunk {k + 1}</span>{''.join(spans)}"
        f"<span class='ae-token-pad'>{'+' + str(pad) + ' pad' if pad else 'full'}</span></div>"
    )


def _legend_html(
    i: int, subject: str, found_in: dict[str, list[tuple[str, tuple[int, ...]]]], missing: dict[str, str], count: int,
    suggested: bool,
) -> str:
    if subject not in found_in:
        reason = missing.get(subject, f"subject {subject!r} is not in the prompt")
        return (
            f"<span class='ae-legend ae-missing' data-ae-subject='{_escape(subject)}' title='{_escape(reason)}'>"
            f"{_escape(subject)}: not found</span>"
        )
    entries = found_in[subject]
    columns = entries[0][1]
    where = f"column {columns[0]}" if len(columns) == 1 else f"columns {columns[0]}-{columns[-1]}"
    classes = f"ae-legend ae-subject ae-subject-{i % SUBJECT_COLOURS}"
    action = "click to fix it" if suggested else "click to remove"
    title = ("suggested subject; " if suggested else "") + action
    suggestion = " data-ae-suggested='1'" if suggested else ""
    if suggested:
        classes += " ae-suggested"
        where += ", suggested"
    if len(entries) < count:  # prompt editing: only some entries contain it
        where += " (" + ", ".join(steps for steps, _ in entries) + " only)"
        classes += " ae-partial"
        title = f"{missing.get(subject, 'not in every prompt-editing entry')}; {action}"
    return (
        f"<span class='{classes}' data-ae-subject='{_escape(subject)}'{suggestion} "
        f"title='{_escape(title)}'>{_escape(subject)}: {where}</span>"
    )


def token_view_request(request: str, subjects_text: str) -> str:
    """Gradio handler: `request` is the JSON the javascript wrote ({"prompt", "subjects", "steps", "method"})."""
    try:
        data = json.loads(request or "{}")
    except ValueError:
        data = {}
    if not isinstance(data, dict):
        data = {}
    prompt = str(data.get("prompt", ""))
    subjects = data.get("subjects", subjects_text)
    try:
        steps = int(float(data.get("steps", 20)))
    except (TypeError, ValueError):
        steps = 20
    method = data.get("method", "excite")
    subjects_value = subjects if isinstance(subjects, str) else subjects_text
    return token_view_html(prompt, subjects_value, steps, method if isinstance(method, str) else "")


def token_view_ui(elem_id: Callable[[str], str], subjects: Any) -> None:
    """The view and its hidden bridge, created inside the accordion (not returned by ui(): no script argument)."""
    view = gr.HTML(
        "<div class='ae-tokens-message'>Open this section and type a prompt to see its tokens.</div>",
        elem_id=elem_id("tokens"),
        elem_classes=["ae-tokens-view"],
    )
    request = gr.Textbox(visible=False, elem_id=elem_id("tokens_request"))
    refresh = gr.Button(visible=False, elem_id=elem_id("tokens_refresh"))
    refresh.click(fn=token_view_request, inputs=[request, subjects], outputs=[view], show_progress=False, queue=False)
