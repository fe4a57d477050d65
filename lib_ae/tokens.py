"""Where a prompt's words are in A1111-style prompt conditioning (host-free): the subjects' columns for A&E's loss
and the (modifier, noun) pairs' columns for SynGen's, found by one word search (`_PromptWords`).

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

from .binding import BindingGroup, BindingSelection
from .loss import TokenSelection

logger = logging.getLogger(__name__)

CHUNK_LENGTH = 77
"""Tokens per A1111 chunk: BOS, 75 prompt tokens (padded), EOS."""
PROMPT_TOKENS_PER_CHUNK = CHUNK_LENGTH - 2

EmbeddingSpan = tuple[str, int, int]
"""(name, offset, vectors) of one textual-inversion embedding in a chunk: its vectors sit at the chunk's token indices
offset + 1 .. offset + vectors (A1111's `PromptChunkFix.offset` counts from after the BOS)."""

Word = tuple[int, ...]
"""The conditioning columns (word pieces) of one word."""

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


class _PromptWords:
    """One conditioning row's words: every chunk's prompt tokens and its embeddings' columns, searched for words."""

    SPLIT = "is split between two chunks of the prompt (75-token limit or BREAK)"
    ABSENT = "is not in the prompt"
    NO_TOKENS = "has no tokens"

    def __init__(
        self,
        chunks: Sequence[Sequence[int]],
        encode: Encoder,
        *,
        bos_id: int,
        eos_id: int,
        pad_id: int,
        embeddings: Sequence[Sequence[EmbeddingSpan]] | None,
    ) -> None:
        if not chunks:
            raise ValueError("a prompt has at least one chunk")
        self.tokens = [prompt_tokens(chunk, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id) for chunk in chunks]
        self.encode = encode
        self.spans = embedding_columns(embeddings or [], len(chunks))
        self.placeholders = {column for _, columns in self.spans for column in columns}

    def word_columns(self) -> tuple[int, ...]:
        """Every chunk's prompt-token columns, never a chunk's BOS, EOS or padding."""
        return tuple(
            CHUNK_LENGTH * k + 1 + j for k, chunk_tokens in enumerate(self.tokens) for j in range(len(chunk_tokens))
        )

    def find(self, word: str) -> list[Word] | str:
        """Every occurrence of `word` (normalised like `normalised`) in prompt order: a textual-inversion embedding by
        its name, else each contiguous run of its token ids inside one chunk that touches no embedding placeholder.
        None found: why, as `NO_TOKENS`, `SPLIT` or `ABSENT`."""
        key = normalised(word)
        named = [columns for name, columns in self.spans if normalised(name) == key]
        if named:
            return named
        ids = [int(t) for t in self.encode(key)]
        if not ids:
            return self.NO_TOKENS
        width = len(ids)
        found: list[Word] = []
        for k, chunk_tokens in enumerate(self.tokens):
            for start in range(len(chunk_tokens) - width + 1):
                if list(chunk_tokens[start : start + width]) == ids:
                    first = CHUNK_LENGTH * k + 1 + start  # +1: the chunk's BOS
                    columns = tuple(range(first, first + width))
                    if not self.placeholders.intersection(columns):
                        found.append(columns)
        if found:
            return found
        return self.SPLIT if self._straddles_chunks(ids) else self.ABSENT

    def embedding_containing(self, word: str) -> str | None:
        """The embedding whose name contains `word` (a subject typed as part of an embedding's name)."""
        key = normalised(word)
        return next((name for name, _ in self.spans if key in name.lower()), None)

    def _straddles_chunks(self, ids: Sequence[int]) -> bool:
        """Whether `ids` would match across the boundary of two consecutive chunks (only a multi-token word can)."""
        width = len(ids)
        for left, right in zip(self.tokens, self.tokens[1:]):
            joined = list(left[-(width - 1) :] if width > 1 else []) + list(right[: width - 1])
            for start in range(len(joined) - width + 1):
                if joined[start : start + width] == list(ids):
                    return True
        return False


def normalised(word: str) -> str:
    """A word as it is searched for: whitespace runs collapsed, lower case (CLIP lower-cases prompts)."""
    return " ".join(word.split()).lower()


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
    words = _PromptWords(chunks, encode, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id, embeddings=embeddings)
    found: dict[str, tuple[int, ...]] = {}
    missing: list[str] = []
    absent: list[str] = []
    messages: list[str] = []
    seen: set[str] = set()
    owner: dict[int, str] = {}  # column -> the first subject using it
    for subject in subjects:
        key = normalised(subject)
        if not key:
            messages.append("AE: an empty subject was ignored")
            continue
        if key in seen:
            messages.append(f"AE: subject {subject!r} is given more than once; it is used once")
            continue
        seen.add(key)
        places = words.find(subject)
        if isinstance(places, str):
            missing.append(subject)
            container = words.embedding_containing(subject) if places != words.NO_TOKENS else None
            if container is not None:
                messages.append(
                    f"AE: subject {subject!r} is part of the textual-inversion embedding {container!r}; "
                    "give the embedding's whole name as the subject"
                )
            elif places == words.SPLIT:
                messages.append(f"AE: subject {subject!r} {places}; move it, or put BREAK before it")
            else:
                if places == words.ABSENT:
                    absent.append(subject)
                messages.append(f"AE: subject {subject!r} {places}")
            continue
        columns = places[0]  # the first occurrence in prompt order
        shared = sorted({owner[c] for c in columns if c in owner})
        if shared:
            others = ", ".join(repr(s) for s in shared)
            messages.append(f"AE: subject {subject!r} shares prompt tokens with {others}")
        for column in columns:
            owner.setdefault(column, subject)
        found[subject] = columns

    selection = _selection(words.tokens, list(found.values()), normalize_eot) if found else None
    for message in messages:
        logger.debug(message)
    return SubjectLocation(selection, found, missing, messages, CHUNK_LENGTH * len(chunks), tuple(absent))


@dataclass(frozen=True)
class BindingLocation:
    """Where the (modifier, noun) pairs are in one conditioning row.

    `selection`: the groups for `binding_loss` (None when no pair was found). `bound`: the pairs used, as
    (modifier, noun, modifier columns, noun columns), in prompt order. `messages`: one human line per pair left out
    (a word not in the prompt, or split between two chunks) and when there is nothing to bind, for the UI / log.
    """

    selection: BindingSelection | None
    bound: tuple[tuple[str, str, Word, Word], ...]
    messages: tuple[str, ...]


def locate_bindings(
    chunks: Sequence[Sequence[int]],
    pairs: Sequence[tuple[str, str]],
    encode: Encoder,
    *,
    bos_id: int,
    eos_id: int,
    pad_id: int,
    embeddings: Sequence[Sequence[EmbeddingSpan]] | None = None,
) -> BindingLocation:
    """Columns of each (modifier, noun) pair in A1111's 77-token `chunks`, found as subjects are (`_PromptWords`).

    Pairs are placed in order, the way one reads them: a modifier takes its first occurrence not yet bound, and its
    noun the nearest occurrence after it (else the first one), so "a red car and a red bench" binds each "red" to its
    own noun, and "a red car and a blue car" makes two groups. Modifiers placed on the same noun occurrence form one
    group ("a big red car"). The other words are every chunk's prompt tokens, never a chunk's BOS, EOS or padding; a
    pair may straddle a chunk boundary (all chunks are in the same attention)."""
    if isinstance(pairs, str) or any(isinstance(p, str) or len(p) != 2 for p in pairs):
        raise TypeError("pairs must be a sequence of (modifier, noun) pairs")
    words = _PromptWords(chunks, encode, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id, embeddings=embeddings)
    messages: list[str] = []
    bound: list[tuple[str, str, Word, Word]] = []
    used_modifiers: set[Word] = set()
    groups: dict[Word, list[Word]] = {}
    for modifier, noun in pairs:
        modifier_places, noun_places = words.find(modifier), words.find(noun)
        if isinstance(modifier_places, str) or isinstance(noun_places, str):
            problems = [
                f"{role} {word!r} {places}"
                for role, word, places in (("modifier", modifier, modifier_places), ("noun", noun, noun_places))
                if isinstance(places, str)
            ]
            messages.append(f"AE bind: {' and '.join(problems)}; the pair ({modifier!r}, {noun!r}) is not bound")
            continue
        free = [m for m in modifier_places if m not in used_modifiers] or modifier_places
        modifier_columns = free[0]
        after = [n for n in noun_places if n[0] > modifier_columns[-1]]
        noun_columns = after[0] if after else noun_places[0]
        if set(modifier_columns) & set(noun_columns):
            messages.append(f"AE bind: modifier {modifier!r} and noun {noun!r} are the same words; not bound")
            continue
        used_modifiers.add(modifier_columns)
        modifiers = groups.setdefault(noun_columns, [])
        if modifier_columns not in modifiers:
            modifiers.append(modifier_columns)
        bound.append((modifier, noun, modifier_columns, noun_columns))
    if not bound and not messages:
        messages.append("AE bind: the prompt has no modifier to bind (no adjective or other modifier before a noun)")
    selection = None
    if groups:
        ordered = sorted(groups.items(), key=lambda item: item[0][0])
        selection = BindingSelection(tuple(BindingGroup(n, tuple(ms)) for n, ms in ordered), words.word_columns())
    for message in messages:
        logger.debug(message)
    return BindingLocation(selection, tuple(bound), tuple(messages))


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
