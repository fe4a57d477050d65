"""One subject pipeline, used by generation (sampling_pass.py) and by the token view (token_view.py) alike:

    prompt -> first AND sub-prompt -> prompt-editing entries -> 77-token chunks (+ textual-inversion embeddings)
           -> each subject's conditioning columns (`lib_ae.tokens.locate_subjects`)

The subjects arrive typed (`AEParams.subject_names`, parsed once); nothing here splits subject text again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from lib_ae.tokens import EmbeddingSpan, SubjectLocation, locate_subjects

from . import host
from .host import PromptChunk, TextEncoder


class UnsupportedModel(Exception):
    """The loaded model lacks something A&E needs; the message says what."""


def text_encoder(sd_model: Any) -> TextEncoder:
    """The CLIP wrapper whose chunks make the conditioning columns. SD1/SD2: `cond_stage_model` itself. SDXL: the
    conditioner, whose `process_texts`/`tokenize` delegate to its first embedder that has them, CLIP-L
    (sd_models_xl.py L65-87); the token ids BOS/EOS/pad live on that embedder (sd_hijack_clip.py L342-344)."""
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
    L210-217), token ids and textual-inversion embeddings per chunk; `token_counts`: each entry's own token count."""

    ends: tuple[int, ...]
    texts: tuple[str, ...]
    chunks: tuple[tuple[PromptChunk, ...], ...]
    ids: tuple[tuple[tuple[int, ...], ...], ...]
    embeddings: tuple[tuple[tuple[EmbeddingSpan, ...], ...], ...]
    token_counts: tuple[int, ...]
    chunk_counts: tuple[int, ...]
    """Per entry: its own number of chunks (the rest of `chunks[entry]` is padding)."""

    def entry_at(self, call: int) -> int:
        """The entry in effect at model call `call` (prompt_parser.reconstruct_multicond_batch L331-335)."""
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
        # Textual-inversion embeddings: PromptChunkFix(offset, embedding) per chunk (sd_hijack_clip.py L24, L167).
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


@dataclass
class SubjectFinder:
    """Locates `subjects` in the chunks of one text encoder; caches each subject's token ids and each prompt's
    schedule (a pass sees the same few prompts at every step)."""

    encoder: TextEncoder
    subjects: tuple[str, ...]
    normalize_eot: bool = False
    _ids: dict[str, list[int]] = field(default_factory=dict)
    _schedules: dict[tuple[str, int, int | None], PromptTokens] = field(default_factory=dict)

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

    def encode(self, subject: str) -> list[int]:
        if subject not in self._ids:
            self._ids[subject] = [int(t) for t in self.encoder.tokenize([subject])[0]]
        return self._ids[subject]
