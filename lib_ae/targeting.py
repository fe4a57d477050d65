"""Per image, what its loss reads and what the user is told about it, for any host with A1111's chunked text
conditioning (host-free):

    prompt -> first AND sub-prompt -> prompt-editing entries -> 77-token chunks (+ textual-inversion embeddings)
           -> the subjects: typed, or with none typed found in the sub-prompt (`lib_ae.suggest.suggest_subjects`)
           -> each subject's conditioning columns (`lib_ae.tokens.locate_subjects`)
           -> the (modifier, noun) pairs of those subjects (`lib_ae.suggest.modifier_pairs`) and their columns
              (`lib_ae.tokens.locate_bindings`), for an objective that `uses_modifier_pairs`

`ImageTargeting` does it for each image of a sampling pass at each step, and words every problem once (a subject not
in the prompt, only in another AND sub-prompt, in some prompt-editing entries only, a modifier split between chunks);
the token view shows the same through `SubjectFinder`. The host supplies its text encoder, its prompt-editing
schedule and its prompt syntax (`PromptSchedule`, `SuggestionText`), and where each message goes.

The subjects arrive typed (`AEParams.subject_names`, parsed once); nothing here splits subject text again.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from .binding import BindingSelection
from .evaluation import Target
from .loss import TokenSelection
from .suggest import modifier_pairs, suggest_subjects
from .tokens import CHUNK_LENGTH, BindingLocation, EmbeddingSpan, SubjectLocation, locate_bindings, locate_subjects


class PromptChunk(Protocol):
    """sd_hijack_clip.PromptChunk: 77 token ids, [BOS, 75 prompt tokens (EOS-padded), EOS], their emphasis
    multipliers, and the textual-inversion embeddings placed in it (`fixes`, PromptChunkFix(offset, embedding))."""

    tokens: list[int]
    multipliers: list[float]
    fixes: list[Any]


class TextEncoder(Protocol):
    """The CLIP wrapper that cuts prompts into chunks (sd_hijack_clip.TextConditionalModel)."""

    id_start: int
    id_end: int
    id_pad: int

    def tokenize(self, texts: list[str]) -> list[list[int]]: ...

    def process_texts(self, texts: list[str]) -> tuple[list[list[PromptChunk]], int]: ...

    def empty_chunk(self) -> PromptChunk: ...



@dataclass(frozen=True)
class PromptTokens:
    """One sub-prompt's prompt-editing schedule: per entry its last model call, text, chunks as A1111 encodes them
    (shorter entries padded with empty chunks to the longest, as A1111 encodes them together: sd_hijack_clip.py
    `TextConditionalModel.forward`), token ids and textual-inversion embeddings per chunk; `token_counts`: each entry's
    own token count."""

    ends: tuple[int, ...]
    texts: tuple[str, ...]
    chunks: tuple[tuple[PromptChunk, ...], ...]
    ids: tuple[tuple[tuple[int, ...], ...], ...]
    embeddings: tuple[tuple[tuple[EmbeddingSpan, ...], ...], ...]
    token_counts: tuple[int, ...]
    chunk_counts: tuple[int, ...]
    """Per entry: its own number of chunks (the rest of `chunks[entry]` is padding)."""

    def entry_at(self, call: int) -> int:
        """The entry in effect at model call `call` (prompt_parser.reconstruct_multicond_batch)."""
        return next((i for i, end in enumerate(self.ends) if call <= end), 0)


def encode_schedule(encoder: TextEncoder, schedule: Sequence[tuple[int, str]]) -> PromptTokens:
    """The chunks of every entry of a prompt-editing schedule, encoded together as A1111 does."""
    texts = [text for _, text in schedule]
    chunks, token_counts = [], []
    for text in texts:  # one at a time: process_texts returns only the longest entry's token count
        entry_chunks, count = encoder.process_texts([text])
        chunks.append(list(entry_chunks[0]))
        token_counts.append(int(count))
    width = max(len(entry) for entry in chunks)
    padded = [entry + [encoder.empty_chunk()] * (width - len(entry)) for entry in chunks]
    return PromptTokens(
        ends=tuple(int(end) for end, _ in schedule),
        texts=tuple(texts),
        chunks=tuple(tuple(entry) for entry in padded),
        ids=tuple(tuple(tuple(int(t) for t in chunk.tokens) for chunk in entry) for entry in padded),
        # Textual-inversion embeddings: PromptChunkFix(offset, embedding) per chunk (sd_hijack_clip.py
        # `TextConditionalModel.tokenize_line`).
        embeddings=tuple(
            tuple(
                tuple((str(fix.embedding.name), int(fix.offset), int(fix.embedding.vectors)) for fix in chunk.fixes)
                for chunk in entry
            )
            for entry in padded
        ),
        token_counts=tuple(token_counts),
        chunk_counts=tuple(len(entry) for entry in chunks),
    )


Pair = tuple[str, str]
"""(modifier, noun) as written in the prompt."""


def embedding_names(tokens: PromptTokens) -> tuple[str, ...]:
    """The textual-inversion embeddings the prompt uses, by name, in every prompt-editing entry: the words the
    subject suggestion keeps whole (A1111 found them in the text, so these are exactly the loaded ones that matter)."""
    names: dict[str, None] = {}
    for entry in tokens.embeddings:
        for chunk in entry:
            for name, _, _ in chunk:
                names[name] = None
    return tuple(names)


def pairs_of_subjects(pairs: Sequence[Pair], subjects: Sequence[str]) -> tuple[Pair, ...]:
    """The pairs whose noun is one of `subjects` or the last word of one ("red car" as a subject binds "red" to
    "car"), case-insensitively: binding works on the subjects' modifiers, typed or suggested."""
    heads = {" ".join(subject.split()).lower() for subject in subjects}
    heads |= {subject.split()[-1].lower() for subject in subjects if subject.split()}
    return tuple(pair for pair in pairs if pair[1].lower() in heads)


PromptSchedule = Callable[[str, int, "int | None"], "list[tuple[int, str]]"]
"""schedule(text, base_steps, hires_steps): the host's prompt editing of one sub-prompt, as (last model call, text)
entries (A1111: prompt_parser.get_learned_conditioning_prompt_schedules)."""

SuggestionText = Callable[[str, int], str]
"""plain_text(text, steps): the host's prompt syntax resolved to the plain text conditioned on at the first step, as
`lib_ae.suggest` reads it (A1111: `lib_ae.webui.prompt_syntax.first_step_text`)."""


@dataclass
class SubjectFinder:
    """Locates `subjects` in the chunks of one text encoder; caches each subject's token ids, each prompt's schedule
    and each prompt's suggestions (a pass sees the same few prompts at every step).

    No `subjects` (automatic): each prompt's subjects are suggested from its text (`subjects_for`). The host's prompt
    syntax comes in through `schedule` and `plain_text`."""

    encoder: TextEncoder
    subjects: tuple[str, ...]
    schedule: PromptSchedule
    plain_text: SuggestionText
    normalize_eot: bool = False
    _ids: dict[str, list[int]] = field(default_factory=dict)
    _schedules: dict[tuple[str, int, int | None], PromptTokens] = field(default_factory=dict)
    _suggested: dict[tuple[str, int], tuple[tuple[str, ...], tuple[Pair, ...]]] = field(default_factory=dict)

    @property
    def automatic(self) -> bool:
        return not self.subjects

    def subjects_for(self, text: str, tokens: PromptTokens, steps: int) -> tuple[str, ...]:
        """The subjects of one sub-prompt `text` (extra-network tags removed): the typed ones, or, automatic, the head
        nouns of its noun phrases at the first step (`steps`: the schedule's step count, for `[a:b:0.5]`)."""
        if not self.automatic:
            return self.subjects
        return self._suggestions(text, tokens, steps)[0]

    def pairs_for(self, text: str, tokens: PromptTokens, steps: int) -> tuple[tuple[Pair, ...], tuple[Pair, ...]]:
        """(the modifier-noun pairs of the subjects of `text`, every pair of `text`)."""
        every = self._suggestions(text, tokens, steps)[1]
        return pairs_of_subjects(every, self.subjects_for(text, tokens, steps)), every

    def _suggestions(self, text: str, tokens: PromptTokens, steps: int) -> tuple[tuple[str, ...], tuple[Pair, ...]]:
        key = (text, steps)
        if key not in self._suggested:
            names = embedding_names(tokens)
            plain = self.plain_text(text, steps)
            self._suggested[key] = (
                tuple(suggest_subjects(plain, embeddings=names)),
                tuple(modifier_pairs(plain, embeddings=names)),
            )
        return self._suggested[key]

    def schedule_tokens(self, text: str, base_steps: int, hires_steps: int | None = None) -> PromptTokens:
        """`text` (one sub-prompt, extra-network tags removed) as the host conditions it with these step counts: its
        prompt-editing schedule, each entry's chunks."""
        key = (text, base_steps, hires_steps)
        if key not in self._schedules:
            self._schedules[key] = encode_schedule(self.encoder, self.schedule(text, base_steps, hires_steps))
        return self._schedules[key]

    def locate(self, tokens: PromptTokens, entry: int, subjects: Sequence[str] | None = None) -> SubjectLocation:
        """The columns of `subjects` (default: all of ours) in schedule entry `entry`, embeddings included."""
        return locate_subjects(
            tokens.ids[entry],
            self.subjects if subjects is None else subjects,
            self.encode,
            bos_id=self.encoder.id_start,
            eos_id=self.encoder.id_end,
            pad_id=self.encoder.id_pad,
            normalize_eot=self.normalize_eot,
            embeddings=tokens.embeddings[entry],
        )

    def bindings_in(
        self, text: str, tokens: PromptTokens, entry: int, subjects: Sequence[str], steps: int
    ) -> tuple[BindingLocation | None, list[str]]:
        """The columns of the subjects' modifier-noun pairs in schedule entry `entry`, and what to tell the user about
        them: (None, [why]) when nothing can be bound (no modifier in the prompt, or none of the subjects'), else the
        location, with a line per pair left out and per pair whose words lie in different chunks."""
        pairs, every = self.pairs_for(text, tokens, steps)
        note = unbound_note(pairs, every, subjects)
        if note is not None:
            return None, [note]
        binding = self.locate_bindings(tokens, entry, pairs)
        return binding, [*binding.messages, *straddling_notes(binding)]

    def locate_bindings(self, tokens: PromptTokens, entry: int, pairs: Sequence[Pair]) -> BindingLocation:
        """The columns of the (modifier, noun) `pairs` in schedule entry `entry`, embeddings included."""
        return locate_bindings(
            tokens.ids[entry],
            pairs,
            self.encode,
            bos_id=self.encoder.id_start,
            eos_id=self.encoder.id_end,
            pad_id=self.encoder.id_pad,
            embeddings=tokens.embeddings[entry],
        )

    def encode(self, subject: str) -> list[int]:
        if subject not in self._ids:
            self._ids[subject] = [int(t) for t in self.encoder.tokenize([subject])[0]]
        return self._ids[subject]


def straddling_notes(location: BindingLocation) -> list[str]:
    """One line per bound pair whose modifier and noun lie in different 77-token chunks. They are bound (every chunk's
    columns are in the same cross-attention), but CLIP encoded the chunks apart, so the user should know."""
    notes = []
    for modifier, noun, modifier_columns, noun_columns in location.bound:
        if modifier_columns[0] // CHUNK_LENGTH != noun_columns[0] // CHUNK_LENGTH:
            notes.append(
                f"AE bind: modifier {modifier!r} and its noun {noun!r} are in different chunks of the prompt "
                "(75-token limit or BREAK); they are bound, but the text encoder read them apart"
            )
    return notes


def unbound_note(pairs: Sequence[Pair], every: Sequence[Pair], subjects: Sequence[str]) -> str | None:
    """Why nothing can be bound before any column is looked at: no modifier in the prompt, or none of the subjects'."""
    if pairs:
        return None
    if not subjects:
        return "AE bind: no subject to bind a modifier to"
    if every:
        nouns = ", ".join(dict.fromkeys(repr(noun) for _, noun in every))
        return (
            f"AE bind: no modifier of the subjects ({', '.join(map(repr, subjects))}) to bind; the prompt's modifiers "
            f"belong to {nouns}"
        )
    return "AE bind: the prompt has no modifier to bind (no adjective or other modifier before a noun)"


def binding_labels(location: BindingLocation) -> list[str]:
    """Captions of the engine's binding maps, in their order: per group its noun, then each modifier as
    "modifier→noun" (the modifier's map beside the noun's)."""
    if location.selection is None:
        return []
    words = {}
    for modifier, noun, modifier_columns, noun_columns in location.bound:
        words[noun_columns] = noun
        words[modifier_columns] = modifier
    labels = []
    for group in location.selection.groups:
        noun = words.get(group.noun, "?")
        labels.append(noun)
        labels.extend(f"{words.get(modifier, '?')}\u2192{noun}" for modifier in group.modifiers)
    return labels



class TargetReader(Protocol):
    """What `ImageTargeting` asks of the objective (`lib_ae.objectives.Objective`)."""

    @property
    def uses_modifier_pairs(self) -> bool: ...

    @property
    def computes_binding_loss(self) -> bool: ...

    def why_idle(self, selection: TokenSelection | None, binding: BindingSelection | None) -> str | None: ...


@dataclass(frozen=True)
class PassSteps:
    """The step counts of one sampling pass, as the host built its prompt schedules (`base`, and `hires` for a hires
    fix pass) and as its sampler calls the model (`calls_per_step`, `last_call`: the index of its last model call)."""

    base: int
    hires: int | None
    calls_per_step: int
    last_call: int


class ImageTargeting:
    """The targets of each image of one sampling pass, located once per (sub-prompt, schedule entry), every problem
    reported once through `report(b, message)`.

    What it learned, per image b, for the infotext, the trace and the heatmaps: `labels` (the subjects found, in the
    order of its maps), `subjects_used` (typed or suggested), `bound` (the (modifier, noun) pairs bound at some step,
    in order), `binding_labels` (the captions of its binding maps: each noun, then "red→car")."""

    def __init__(self, finder: SubjectFinder, objective: TargetReader, report: Callable[[int, str], None]) -> None:
        self.finder = finder
        self.objective = objective
        self.uses_modifier_pairs = objective.uses_modifier_pairs
        self.report = report
        self._locations: dict[tuple[str, int], tuple[tuple[str, ...], SubjectLocation, BindingLocation | None]] = {}
        self.labels: dict[int, list[str]] = {}
        self.subjects_used: dict[int, tuple[str, ...]] = {}
        self.bound: dict[int, dict[Pair, None]] = {}
        self.binding_labels: dict[int, list[str]] = {}

    def targets(
        self, b: int, text: str, others: Sequence[str], ends: Sequence[int], call: int, steps: PassSteps
    ) -> Target:
        """Image b's subject columns and, for an objective that uses them, its modifier-noun columns, in the
        conditioning row in effect at model call `call` (None where there is nothing). `text`: its first AND
        sub-prompt, `others`: the rest; `ends`: the last model call of each entry of the schedule the host conditions
        on (checked against ours)."""
        tokens = self.finder.schedule_tokens(text, steps.base, steps.hires)
        if list(ends) != list(tokens.ends):
            self.report(b, f"could not follow the prompt editing schedule of {text!r}; image skipped")
            return None, None
        target = tokens.entry_at(call)
        key = (text, target)
        if key not in self._locations:
            subjects = self.finder.subjects_for(text, tokens, steps.base)
            location = self.finder.locate(tokens, target, subjects)
            if subjects:
                self._report_location(b, location, tokens, target, others, call, steps)
            else:
                self.report(b, "automatic subjects: no noun found in the prompt; type the subject words")
            binding = (
                self._locate_binding(b, text, tokens, target, subjects, steps) if self.uses_modifier_pairs else None
            )
            idle = self.objective.why_idle(location.selection, binding.selection if binding is not None else None)
            if idle is not None:
                self.report(b, idle + entry_span(tokens, target, steps))
            self._locations[key] = (subjects, location, binding)
        subjects, location, binding = self._locations[key]
        self.labels[b] = list(location.found)
        self.subjects_used[b] = subjects
        if binding is not None:
            self.bound.setdefault(b, {}).update({(modifier, noun): None for modifier, noun, _, _ in binding.bound})
            self.binding_labels[b] = binding_labels(binding)
        return location.selection, binding.selection if binding is not None else None

    def _locate_binding(
        self, b: int, text: str, tokens: PromptTokens, target: int, subjects: tuple[str, ...], steps: PassSteps
    ) -> BindingLocation | None:
        """The columns of the subjects' modifier-noun pairs in schedule entry `target`, every problem reported (a
        modifier not in the entry, a word split between chunks, nothing to bind, a pair across a chunk boundary)."""
        binding, messages = self.finder.bindings_in(text, tokens, target, subjects, steps.base)
        where = entry_span(tokens, target, steps)
        for message in messages if self.objective.computes_binding_loss else ():
            self.report(b, message.removeprefix("AE ") + where)
        return binding

    def _report_location(
        self, b: int, location: SubjectLocation, tokens: PromptTokens, target: int, others: Sequence[str], call: int,
        steps: PassSteps,
    ) -> None:
        """Report what `locate_subjects` found wrong with image b's subjects in schedule entry `target`, precisely:
        which steps a prompt-editing entry covers, when a subject is in another AND sub-prompt (A&E reads only the
        first, whose conditioning row is the image's first), and many absent subjects as one counted message."""
        where = entry_span(tokens, target, steps)
        absent = set(location.absent)
        elsewhere: dict[str, int] = {}
        for number, other in enumerate(others, start=2):
            pending = [s for s in location.absent if s not in elsewhere]
            if not pending:
                break
            other_tokens = self.finder.schedule_tokens(other, steps.base, steps.hires)
            other_location = self.finder.locate(other_tokens, other_tokens.entry_at(call), pending)
            elsewhere.update({s: number for s in other_location.found})
        for message in location.messages:
            if not any(message == f"AE: subject {s!r} is not in the prompt" for s in absent):
                self.report(b, message.removeprefix("AE: ") + where)
        for subject, number in elsewhere.items():
            self.report(
                b, f"subject {subject!r} is only in AND sub-prompt {number}; A&E reads the first sub-prompt only"
            )
        rest = [s for s in location.absent if s not in elsewhere]
        if len(rest) == 1:
            self.report(b, f"subject {rest[0]!r} is not in the prompt{where}")
        elif rest:
            self.report(b, f"{len(rest)} subjects are not in the prompt{where}: " + ", ".join(map(repr, rest)))


def entry_span(tokens: PromptTokens, target: int, steps: PassSteps) -> str:
    """" during steps 2-3 (prompt editing: the prompt then reads '...')" for an entry of a prompt-editing schedule,
    "" for a prompt without editing. Entry i is in effect for model calls ends[i-1]+1 .. ends[i], shown as 1-based
    sampler steps."""
    if len(tokens.ends) < 2:
        return ""
    first = 0 if target == 0 else tokens.ends[target - 1] + 1
    last = min(tokens.ends[target], steps.last_call)
    lo, hi = first // steps.calls_per_step + 1, max(first, last) // steps.calls_per_step + 1
    span = f"step {lo}" if lo == hi else f"steps {lo}-{hi}"
    return f" during {span} (prompt editing: the prompt then reads {tokens.texts[target]!r})"
