"""Locating subject words in A1111-style prompt conditioning (host-free).

A1111 encodes a prompt in chunks of 77 tokens, `[BOS, 75 prompt tokens padded with EOS, EOS]`, each chunk a separate
CLIP pass, and concatenates the chunks' outputs: chunk k occupies conditioning columns 77*k .. 77*k + 76, and the
prompt token at index j of chunk k (j = 0 is that chunk's BOS) is column 77*k + j (docs/host-notes.md §5).
A new chunk starts
when 75 tokens are full (A1111 may move the text after a nearby comma along) and at every BREAK.

Subjects. A subject's token ids (`encode(subject)`, no special tokens) must appear as one contiguous run inside one
chunk's prompt tokens (never BOS, EOS or padding). The first occurrence in prompt order is used. A word the BPE
splits into several tokens, or a phrase, gets all its columns; the loss sums their maps (lib_ae/loss.py).
Matching is on token ids, so it follows the tokenizer exactly: CLIP's BPE tokenizes each word on its own and marks
its end (`</w>`), so "cat" matches the word "cat" but not "cats" or "catalog", with no leading-space variants to try
(unlike GPT-2 style BPE). Subjects are lower-cased before encoding because CLIP lower-cases prompts; the tokenizer
would do it anyway, this only keeps a case-sensitive `encode` consistent with the prompt's ids.

Text columns (what enters the x100 re-softmax of the loss):
* one chunk (T = 77): exactly the official `TokenSelection.official(77, subjects, end_of_text, normalize_eot)`,
  i.e. columns 1..75, or with `normalize_eot` the prompt's own tokens 1..EOT-1.
* n chunks (T = 77*n, long prompts or BREAK): every chunk is treated as the official code treats its only one:
  chunk k contributes its columns 77k+1 .. 77k+75, leaving out its BOS (77k) and its closing EOS (77k+76); with
  `normalize_eot`, only the real prompt tokens of every chunk. Each chunk is a separate CLIP pass, so every chunk's
  BOS is a full "start of text" attention sink like the official column 0, and its closing EOS stands where the
  official excluded column T-1 stands. At n = 1 the rule is the official one.

The chunks passed in must be the whole conditioning row: when A1111 batches prompts of different lengths it appends
empty chunks `[BOS, EOS * 76]` to the shorter ones (`FrozenCLIPEmbedderWithCustomWordsBase.forward`); pass those too.

Textual-inversion embeddings appear in A1111's chunks as placeholder ids 0, one per vector, with a `PromptChunkFix`
(offset, embedding) saying where its vectors go (sd_hijack_clip.py `TextConditionalModel.tokenize_line`). Given as
`embeddings`, an embedding's
name is a subject like a word: its columns are those of its vectors. The placeholders are never matched as tokens
(id 0 is also the token "!"), and a subject that is only part of an embedding's name is reported as such.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .loss import TokenSelection

logger = logging.getLogger(__name__)

CHUNK_LENGTH = 77
"""Tokens per A1111 chunk: BOS, 75 prompt tokens (padded), EOS."""
PROMPT_TOKENS_PER_CHUNK = CHUNK_LENGTH - 2

EmbeddingSpan = tuple[str, int, int]
"""(name, offset, vectors) of one textual-inversion embedding in a chunk: its vectors sit at the chunk's token indices
offset + 1 .. offset + vectors (A1111's `PromptChunkFix.offset` counts from after the BOS)."""

Encoder = Callable[[str], Sequence[int]]
"""encode(text) -> token ids without BOS/EOS (e.g. open_clip's `SimpleTokenizer.encode`, or an HF tokenizer with
`add_special_tokens=False`)."""


@dataclass(frozen=True)
class SubjectLocation:
    """Where the subjects are in one conditioning row.

    `selection`: the columns for the loss, subjects in the order given; None when no subject was found.
    `found`: subject (as given) -> its columns. `missing`: subjects not in the prompt. `messages`: one human line per
    missing, duplicated or overlapping subject, for the UI/log. `num_columns`: T = 77 * number of chunks.
    `absent`: the missing subjects with no more to say than "not in the prompt" (not split between chunks, not part of
    an embedding's name, not without tokens), so that a host can word many of them as one message.
    """

    selection: TokenSelection | None
    found: dict[str, tuple[int, ...]]
    missing: list[str]
    messages: list[str]
    num_columns: int
    absent: tuple[str, ...] = ()


def prompt_tokens(chunk: Sequence[int], *, bos_id: int, eos_id: int, pad_id: int) -> list[int]:
    """The real prompt tokens of one 77-token chunk: those between its BOS and the first EOS.

    The end is found by EOS, not by `pad_id`: OpenCLIP's pad id 0 is also the token "!" (and A1111's placeholder for
    embedding vectors), so a 0 before the first EOS is a real token. After the first EOS only EOS/pad may follow
    (SD1 pads with EOS; A1111 replaces everything after the first EOS with pad id 0 for OpenCLIP models).
    Raises ValueError for a malformed chunk (a host bug, not a user error).
    """
    if len(chunk) != CHUNK_LENGTH:
        raise ValueError(f"a prompt chunk must have {CHUNK_LENGTH} token ids, got {len(chunk)}")
    ids = [int(t) for t in chunk]
    if ids[0] != bos_id:
        raise ValueError(f"a prompt chunk must start with BOS {bos_id}, got {ids[0]}")
    try:
        end = ids.index(eos_id, 1)
    except ValueError:
        raise ValueError(f"a prompt chunk must contain EOS {eos_id} after its prompt tokens") from None
    tail = ids[end + 1 :]
    if any(t not in (eos_id, pad_id) for t in tail):
        raise ValueError(f"a prompt chunk must hold only EOS {eos_id} / pad {pad_id} after its first EOS")
    return ids[1:end]


def locate_subjects(
    chunks: Sequence[Sequence[int]],
    subjects: Sequence[str],
    encode: Encoder,
    *,
    bos_id: int,
    eos_id: int,
    pad_id: int,
    normalize_eot: bool = False,
    embeddings: Sequence[Sequence[EmbeddingSpan]] | None = None,
) -> SubjectLocation:
    """Find each subject's conditioning columns and the loss's text columns (rules in the module docstring).
    `embeddings[k]`: the textual-inversion embeddings of chunk k (none when not given)."""
    if isinstance(subjects, str):
        raise TypeError("subjects must be a sequence of strings, not one string (split it with parse_subjects)")
    if not chunks:
        raise ValueError("a prompt has at least one chunk")
    tokens = [prompt_tokens(chunk, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id) for chunk in chunks]
    num_columns = CHUNK_LENGTH * len(chunks)
    spans = embedding_columns(embeddings or [], len(chunks))
    placeholders = {column for _, columns in spans for column in columns}

    found: dict[str, tuple[int, ...]] = {}
    missing: list[str] = []
    absent: list[str] = []
    messages: list[str] = []
    seen: dict[str, str] = {}  # normalised subject -> the spelling first given
    owner: dict[int, str] = {}  # column -> the first subject using it
    for subject in subjects:
        key = " ".join(subject.split()).lower()
        if not key:
            messages.append("AE: an empty subject was ignored")
            continue
        if key in seen:
            messages.append(f"AE: subject {subject!r} is given more than once; it is used once")
            continue
        seen[key] = subject
        columns = next((cols for name, cols in spans if " ".join(name.split()).lower() == key), None)
        ids = [int(t) for t in encode(key)]
        if columns is None and not ids:
            missing.append(subject)
            messages.append(f"AE: subject {subject!r} has no tokens")
            continue
        if columns is None:
            columns = _first_occurrence(tokens, ids, placeholders)
        if columns is None:
            missing.append(subject)
            container = next((name for name, _ in spans if key in name.lower()), None)
            if container is not None:
                messages.append(
                    f"AE: subject {subject!r} is part of the textual-inversion embedding {container!r}; "
                    "give the embedding's whole name as the subject"
                )
            elif _straddles_chunks(tokens, ids):
                messages.append(
                    f"AE: subject {subject!r} is split between two chunks of the prompt (75-token limit or BREAK); "
                    "move it, or put BREAK before it"
                )
            else:
                absent.append(subject)
                messages.append(f"AE: subject {subject!r} is not in the prompt")
            continue
        shared = sorted({owner[c] for c in columns if c in owner})
        if shared:
            others = ", ".join(repr(s) for s in shared)
            messages.append(f"AE: subject {subject!r} shares prompt tokens with {others}")
        for column in columns:
            owner.setdefault(column, subject)
        found[subject] = columns

    selection = _selection(tokens, list(found.values()), normalize_eot) if found else None
    for message in messages:
        logger.debug(message)
    return SubjectLocation(selection, found, missing, messages, num_columns, tuple(absent))


def embedding_columns(
    embeddings: Sequence[Sequence[EmbeddingSpan]], chunk_count: int
) -> list[tuple[str, tuple[int, ...]]]:
    """(name, columns) of every embedding, in prompt order."""
    spans: list[tuple[str, tuple[int, ...]]] = []
    for k, chunk_embeddings in enumerate(embeddings[:chunk_count]):
        for name, offset, vectors in chunk_embeddings:
            first = CHUNK_LENGTH * k + 1 + int(offset)
            last = min(first + int(vectors), CHUNK_LENGTH * k + 1 + PROMPT_TOKENS_PER_CHUNK)
            if last > first:
                spans.append((str(name), tuple(range(first, last))))
    return spans


def _first_occurrence(
    tokens: Sequence[Sequence[int]], ids: Sequence[int], blocked: set[int] | frozenset[int] = frozenset()
) -> tuple[int, ...] | None:
    """Columns of the first contiguous run of `ids` inside one chunk's prompt tokens, in prompt order, touching no
    `blocked` column (an embedding's placeholder ids are not tokens)."""
    width = len(ids)
    for k, chunk_tokens in enumerate(tokens):
        for start in range(len(chunk_tokens) - width + 1):
            if list(chunk_tokens[start : start + width]) == list(ids):
                first = CHUNK_LENGTH * k + 1 + start  # +1: the chunk's BOS
                columns = tuple(range(first, first + width))
                if not blocked.intersection(columns):
                    return columns
    return None


def _straddles_chunks(tokens: Sequence[Sequence[int]], ids: Sequence[int]) -> bool:
    """Whether `ids` would match across the boundary of two consecutive chunks (only a multi-token subject can)."""
    width = len(ids)
    for left, right in zip(tokens, tokens[1:]):
        joined = list(left[-(width - 1) :] if width > 1 else []) + list(right[: width - 1])
        for start in range(len(joined) - width + 1):
            if joined[start : start + width] == list(ids):
                return True
    return False


def _selection(tokens: Sequence[Sequence[int]], subjects: list[tuple[int, ...]], normalize_eot: bool) -> TokenSelection:
    if len(tokens) == 1:
        # Exactly the reference's columns; end_of_text is the column of the first EOS.
        end_of_text = len(tokens[0]) + 1
        return TokenSelection.official(CHUNK_LENGTH, subjects, end_of_text=end_of_text, normalize_eot=normalize_eot)
    columns: list[int] = []
    for k, chunk_tokens in enumerate(tokens):
        base = CHUNK_LENGTH * k
        count = len(chunk_tokens) if normalize_eot else PROMPT_TOKENS_PER_CHUNK
        columns.extend(range(base + 1, base + 1 + count))
    return TokenSelection(tuple(columns), tuple(subjects))
