"""One subject pipeline, used by generation (sampling_pass.py) and by the token view (token_view.py) alike:

    prompt -> first AND sub-prompt -> prompt-editing entries -> 77-token chunks (+ textual-inversion embeddings)
           -> the subjects: typed, or with none typed found in the sub-prompt (`lib_ae.suggest.suggest_subjects`)
           -> each subject's conditioning columns (`lib_ae.tokens.locate_subjects`)
           -> the (modifier, noun) pairs of those subjects (`lib_ae.suggest.modifier_pairs`) and their columns
              (`lib_ae.binding.locate_bindings`), for the `bind` methods

The subjects arrive typed (`AEParams.subject_names`, parsed once); nothing here splits subject text again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from lib_ae.binding import BindingLocation, locate_bindings
from lib_ae.suggest import modifier_pairs, suggest_subjects
from lib_ae.tokens import CHUNK_LENGTH, EmbeddingSpan, SubjectLocation, locate_subjects

from . import host
from .host import PromptChunk, TextEncoder


class UnsupportedModel(Exception):
    """The loaded model lacks something A&E needs; the message says what."""


def text_encoder(sd_model: Any) -> TextEncoder:
    """The CLIP wrapper whose chunks make the conditioning columns. SD1/SD2: `cond_stage_model` itself. SDXL: the
    conditioner, whose `process_texts`/`tokenize` delegate to its first embedder that has them, CLIP-L
    (sd_models_xl.py `tokenize`); the token ids BOS/EOS/pad live on that embedder (sd_hijack_clip.py
    `FrozenCLIPEmbedderWithCustomWords.__init__`)."""
    model = sd_model.cond_stage_model
    if hasattr(model, "id_start"):
        encoder: TextEncoder = model
        return encoder
    for embedder in getattr(model, "embedders", []):
        if hasattr(embedder, "process_texts") and hasattr(embedder, "id_start"):
            found: TextEncoder = embedder
            return found
    raise UnsupportedModel("its text encoder does not cut prompts into A1111 chunks, so subjects cannot be located")


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


@dataclass
class SubjectFinder:
    """Locates `subjects` in the chunks of one text encoder; caches each subject's token ids, each prompt's schedule
    and each prompt's suggestions (a pass sees the same few prompts at every step).

    No `subjects` (automatic): each prompt's subjects are suggested from its text (`subjects_for`)."""

    encoder: TextEncoder
    subjects: tuple[str, ...]
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
            self._suggested[key] = (
                tuple(suggest_subjects(text, embeddings=names, steps=steps)),
                tuple(modifier_pairs(text, embeddings=names, steps=steps)),
            )
        return self._suggested[key]

    def prompt_tokens(self, text: str, base_steps: int, hires_steps: int | None = None) -> PromptTokens:
        """`text` (one sub-prompt, extra-network tags removed) as A1111 conditions it with these step counts."""
        key = (text, base_steps, hires_steps)
        if key not in self._schedules:
            self._schedules[key] = encode_schedule(self.encoder, host.prompt_schedule(text, base_steps, hires_steps))
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
