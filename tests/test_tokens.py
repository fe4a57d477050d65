"""Locating subjects in A1111-style 77-token chunks, with the real CLIP BPE tokenizer (open_clip's SimpleTokenizer,
the same vocabulary and ids as SD1's HF CLIPTokenizer and SD2's OpenCLIP tokenizer)."""

from __future__ import annotations

import re
from typing import Callable, Sequence

import pytest
import torch
from support.thirdparty import ClipTokenizer, clip_tokenizer

from lib_ae.loss import TokenSelection, subject_maps
from lib_ae.params import AEParams
from lib_ae.tokens import CHUNK_LENGTH, SubjectLocation, locate_subjects, prompt_tokens

BOS, EOS = 49406, 49407
SD1_PAD, SD2_PAD = EOS, 0


@pytest.fixture(scope="module")
def tok() -> ClipTokenizer:
    return clip_tokenizer()


# ---------------------------------------------------------------------------------------------------------------------
# The chunks as A1111 v1.10.1 builds them for a plain prompt (no emphasis brackets, no embeddings):
# prompt_parser.parse_prompt_attention splits at BREAK (`re_break`) and merges equal-weight runs;
# sd_hijack_clip.FrozenCLIPEmbedderWithCustomWordsBase.tokenize_line tokenizes each segment separately, fills chunks of
# 75 tokens, moves the text after a comma found within the last `comma_padding_backtrack` (default 20) tokens to the
# next chunk, pads with EOS and wraps [BOS] + tokens + [EOS]; process_tokens sets everything after the first EOS to the
# pad id for OpenCLIP models (id_pad 0 != id_end).

A1111_RE_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def a1111_chunks(
    prompt: str, tok: ClipTokenizer, *, comma_backtrack: int = 20, pad_id: int = SD1_PAD
) -> list[list[int]]:
    segments: list[tuple[str, float]] = []
    for i, part in enumerate(re.split(A1111_RE_BREAK, prompt)):
        if i > 0:
            segments.append(("BREAK", -1.0))
        segments.append((part, 1.0))
    comma = tok.encoder[",</w>"]  # type: ignore[attr-defined]
    chunks: list[list[int]] = []
    chunk: list[int] = []
    last_comma = -1

    def next_chunk() -> None:
        nonlocal chunk, last_comma
        padded = chunk + [EOS] * (75 - len(chunk))
        chunks.append([BOS] + padded + [EOS])
        chunk, last_comma = [], -1

    for text, weight in segments:
        if text == "BREAK" and weight == -1:
            next_chunk()
            continue
        for token in tok.encode(text):
            if token == comma:
                last_comma = len(chunk)
            elif comma_backtrack and len(chunk) == 75 and last_comma != -1 and 75 - last_comma <= comma_backtrack:
                moved = chunk[last_comma + 1 :]
                chunk = chunk[: last_comma + 1]
                next_chunk()
                chunk = moved
            if len(chunk) == 75:
                next_chunk()
            chunk.append(token)
    if chunk or not chunks:
        next_chunk()
    if pad_id != EOS:
        for c in chunks:
            first_eos = c.index(EOS)
            c[first_eos + 1 :] = [pad_id] * (CHUNK_LENGTH - first_eos - 1)
    return chunks


def locate(
    prompt: str,
    subjects: Sequence[str],
    tok: ClipTokenizer,
    *,
    normalize_eot: bool = False,
    pad_id: int = SD1_PAD,
    encode: Callable[[str], Sequence[int]] | None = None,
) -> SubjectLocation:
    chunks = a1111_chunks(prompt, tok, pad_id=pad_id)
    return locate_subjects(
        chunks, subjects, encode or tok.encode, bos_id=BOS, eos_id=EOS, pad_id=pad_id, normalize_eot=normalize_eot
    )


def test_chunk_builder_matches_a1111_layout(tok: ClipTokenizer) -> None:
    chunks = a1111_chunks("a cat and a dog", tok)
    assert chunks == [[BOS] + tok.encode("a cat and a dog") + [EOS] * 71]
    assert all(len(c) == CHUNK_LENGTH for c in chunks)
    assert a1111_chunks("", tok) == [[BOS] + [EOS] * 76]
    assert len(a1111_chunks("a cat BREAK a dog", tok)) == 2
    assert len(a1111_chunks("a cat BREAK", tok)) == 1  # no trailing empty chunk, as in tokenize_line
    sd2 = a1111_chunks("a cat", tok, pad_id=SD2_PAD)[0]
    assert sd2[:4] == [BOS, 320, 2368, EOS] and sd2[4:] == [0] * 73


# ---------------------------------------------------------------------------------------------------------------------
# One chunk: the official columns


@pytest.mark.parametrize("normalize_eot", [False, True])
@pytest.mark.parametrize("pad_id", [SD1_PAD, SD2_PAD])
def test_single_chunk_is_the_official_selection(tok: ClipTokenizer, normalize_eot: bool, pad_id: int) -> None:
    prompt = "a cat and a dog"  # a cat and a dog -> columns 1..5
    location = locate(prompt, ["cat", "dog"], tok, normalize_eot=normalize_eot, pad_id=pad_id)
    assert location.found == {"cat": (2,), "dog": (5,)}
    assert location.missing == [] and location.messages == []
    assert location.num_columns == 77
    assert location.selection == TokenSelection.official(77, [(2,), (5,)], end_of_text=6, normalize_eot=normalize_eot)
    expected_columns = tuple(range(1, 6)) if normalize_eot else tuple(range(1, 76))
    assert location.selection is not None and location.selection.text_columns == expected_columns


def test_full_single_chunk_normalize_eot(tok: ClipTokenizer) -> None:
    words = ["cat"] + ["dog"] * 74  # exactly 75 prompt tokens: the first EOS is column 76
    location = locate(" ".join(words), ["cat"], tok, normalize_eot=True)
    assert location.num_columns == 77
    assert location.selection == TokenSelection((tuple(range(1, 76))), ((1,),))


def test_multi_token_word_and_phrase(tok: ClipTokenizer) -> None:
    assert len(tok.encode("hippopotamus")) == 3
    location = locate("a hippopotamus next to a red car", ["hippopotamus", "red car"], tok)
    assert location.found == {"hippopotamus": (2, 3, 4), "red car": (8, 9)}


def test_first_occurrence_is_used(tok: ClipTokenizer) -> None:
    location = locate("a dog, a cat and another cat", ["cat"], tok)
    assert location.found == {"cat": (5,)}


def test_case_insensitive(tok: ClipTokenizer) -> None:
    location = locate("A CAT and a Dog", ["Cat", "DOG"], tok)
    assert location.found == {"Cat": (2,), "DOG": (5,)}
    # a case-sensitive encoder still matches the (lower-cased) prompt ids, because subjects are lower-cased first
    strict: Callable[[str], list[int]] = lambda text: tok.encode(text) if text == text.lower() else [1, 2, 3]
    assert locate("A CAT", ["CAT"], tok, encode=strict).found == {"CAT": (2,)}


def test_whole_words_only(tok: ClipTokenizer) -> None:
    location = locate("two cats on a catwalk", ["cat"], tok)
    assert location.found == {} and location.missing == ["cat"]
    assert location.selection is None
    assert location.messages == ["AE: subject 'cat' is not in the prompt"]


def test_missing_subjects(tok: ClipTokenizer) -> None:
    location = locate("a cat on a sofa", ["dog", "cat", "red car"], tok)
    assert location.found == {"cat": (2,)}
    assert location.missing == ["dog", "red car"]
    assert location.messages == ["AE: subject 'dog' is not in the prompt", "AE: subject 'red car' is not in the prompt"]
    assert location.selection == TokenSelection.official(77, [(2,)])


def test_phrase_needs_contiguous_tokens(tok: ClipTokenizer) -> None:
    location = locate("a red and blue car", ["red car"], tok)
    assert location.missing == ["red car"]


def test_duplicated_subjects(tok: ClipTokenizer) -> None:
    location = locate("a cat and a dog", ["cat", "Cat", " cat ", "dog", "cat"], tok)
    assert location.found == {"cat": (2,), "dog": (5,)}
    assert location.selection is not None and location.selection.subjects == ((2,), (5,))
    assert location.messages == [
        "AE: subject 'Cat' is given more than once; it is used once",
        "AE: subject ' cat ' is given more than once; it is used once",
        "AE: subject 'cat' is given more than once; it is used once",
    ]


def test_overlapping_subjects_are_reported(tok: ClipTokenizer) -> None:
    location = locate("a red car", ["red car", "car"], tok)
    assert location.found == {"red car": (2, 3), "car": (3,)}
    assert location.messages == ["AE: subject 'car' shares prompt tokens with 'red car'"]


def test_subjects_without_tokens(tok: ClipTokenizer) -> None:
    encode: Callable[[str], list[int]] = lambda t: [] if t == "nothing" else tok.encode(t)
    location = locate("a cat", ["", "   ", "cat", "nothing"], tok, encode=encode)
    assert location.found == {"cat": (2,)}
    assert location.missing == ["nothing"]
    assert location.messages == [
        "AE: an empty subject was ignored",
        "AE: an empty subject was ignored",
        "AE: subject 'nothing' has no tokens",
    ]


def test_subjects_must_be_a_sequence_of_strings(tok: ClipTokenizer) -> None:
    with pytest.raises(TypeError, match="not one string"):
        locate("a cat", "cat", tok)


# ---------------------------------------------------------------------------------------------------------------------
# Several chunks


def per_chunk_columns(n: int) -> tuple[int, ...]:
    """The documented multi-chunk rule without normalize_eot: columns 77k+1 .. 77k+75 of every chunk."""
    return tuple(c for k in range(n) for c in range(77 * k + 1, 77 * k + 76))


@pytest.mark.parametrize("pad_id", [SD1_PAD, SD2_PAD])
def test_subject_after_break_is_in_the_second_chunk(tok: ClipTokenizer, pad_id: int) -> None:
    location = locate("a cat BREAK a dog", ["dog", "cat"], tok, pad_id=pad_id)
    assert location.num_columns == 154
    assert location.found == {"dog": (77 + 2,), "cat": (2,)}  # chunk 1, in-chunk index j=2 -> column 77+2
    assert location.selection == TokenSelection(per_chunk_columns(2), ((79,), (2,)))


def test_multi_chunk_normalize_eot_keeps_only_prompt_tokens(tok: ClipTokenizer) -> None:
    location = locate("a cat BREAK a big dog", ["dog"], tok, normalize_eot=True)
    assert location.selection == TokenSelection((1, 2, 78, 79, 80), ((80,),))


def test_multi_chunk_text_columns_leave_out_each_chunks_bos_and_closing_eos(tok: ClipTokenizer) -> None:
    location = locate("a cat BREAK a dog BREAK a bird", ["bird"], tok)
    assert location.selection is not None
    columns = set(location.selection.text_columns)
    assert location.num_columns == 231 and len(columns) == 3 * 75
    for k in range(3):
        assert 77 * k not in columns and 77 * k + 76 not in columns
        assert {77 * k + 1, 77 * k + 75} <= columns
    assert location.found == {"bird": (154 + 2,)}


def test_long_prompt_overflows_into_the_second_chunk(tok: ClipTokenizer) -> None:
    # 80 single-token words with commas: A1111 moves the text after the last comma to the second chunk.
    words = ["dog"] * 70 + ["zebra"] + ["dog"] * 9
    prompt = ", ".join(words[:35]) + " " + " ".join(words[35:])
    chunks = a1111_chunks(prompt, tok)
    assert len(chunks) == 2
    location = locate(prompt, ["zebra"], tok)
    tokens_1 = prompt_tokens(chunks[1], bos_id=BOS, eos_id=EOS, pad_id=EOS)
    j = tokens_1.index(tok.encode("zebra")[0]) + 1
    assert location.found == {"zebra": (77 + j,)}
    assert location.selection == TokenSelection(per_chunk_columns(2), ((77 + j,),))


def test_subject_split_between_chunks(tok: ClipTokenizer) -> None:
    prompt = " ".join(["dog"] * 74 + ["red", "car"])  # no comma: "red" is token 75 of chunk 0, "car" opens chunk 1
    chunks = a1111_chunks(prompt, tok)
    assert chunks[0][75] == tok.encode("red")[0] and chunks[1][1] == tok.encode("car")[0]
    location = locate(prompt, ["red car", "car"], tok)
    assert location.missing == ["red car"]
    assert location.found == {"car": (78,)}
    assert location.messages == [
        "AE: subject 'red car' is split between two chunks of the prompt (75-token limit or BREAK); "
        "move it, or put BREAK before it"
    ]


def test_empty_chunks_appended_for_batch_alignment(tok: ClipTokenizer) -> None:
    chunks = a1111_chunks("a cat", tok) + [[BOS] + [EOS] * 76]
    location = locate_subjects(chunks, ["cat"], tok.encode, bos_id=BOS, eos_id=EOS, pad_id=EOS)
    assert location.selection == TokenSelection(per_chunk_columns(2), ((2,),))
    location = locate_subjects(chunks, ["cat"], tok.encode, bos_id=BOS, eos_id=EOS, pad_id=EOS, normalize_eot=True)
    assert location.selection == TokenSelection((1, 2), ((2,),))


def test_fifty_subjects(tok: ClipTokenizer) -> None:
    words = (
        "cat dog bird fish horse cow sheep goat pig duck frog bear wolf fox deer lion tiger zebra monkey rabbit "
        "mouse snake owl eagle hawk crow swan goose chicken turtle shark whale seal otter camel llama panda koala "
        "sloth bat bee ant spider crab squid octopus lobster snail worm moth"
    ).split()
    assert len(words) == 50
    prompt = ", ".join(words)  # 99 tokens: two chunks
    location = locate(prompt, words, tok)
    assert location.missing == [] and location.messages == []
    assert list(location.found) == words
    chunks = a1111_chunks(prompt, tok)
    assert len(chunks) == 2
    for word, columns in location.found.items():
        ids = tok.encode(word)
        k, j = divmod(columns[0], 77)
        assert chunks[k][j : j + len(ids)] == ids and len(columns) == len(ids)
    assert location.selection is not None and len(location.selection.subjects) == 50


def test_unicode_and_emoji_subjects(tok: ClipTokenizer) -> None:
    prompt = "a 🐱 and a 🐶 on a café table, 猫, 日本語 text, über-cat"
    subjects = ["🐱", "🐶", "café", "猫", "日本語", "über-cat"]
    location = locate(prompt, subjects, tok)
    assert location.missing == []
    assert [len(location.found[s]) for s in ("猫", "日本語", "über-cat")] == [3, 4, 4]
    tokens = a1111_chunks(prompt, tok)[0]
    for subject, columns in location.found.items():
        assert [tokens[c] for c in columns] == tok.encode(subject)


def test_glued_emoji_are_one_word(tok: ClipTokenizer) -> None:
    # CLIP pre-tokenizes a run of symbols as one word: in "🐱🐶" the cat is not the standalone token of "🐱".
    location = locate("a 🐱🐶 pair", ["🐱", "🐶"], tok)
    assert location.missing == ["🐱"]
    assert location.found == {"🐶": (3,)}


def test_zero_is_a_real_token_for_openclip_padding() -> None:
    # OpenCLIP pads with id 0, which is also the token "!" (and A1111's embedding placeholder): only EOS ends a prompt.
    chunk = [BOS, 5, 0, 7, EOS] + [0] * 72
    assert prompt_tokens(chunk, bos_id=BOS, eos_id=EOS, pad_id=0) == [5, 0, 7]
    location = locate_subjects([chunk], ["x"], lambda _: [0, 7], bos_id=BOS, eos_id=EOS, pad_id=0)
    assert location.found == {"x": (2, 3)}


@pytest.mark.parametrize(
    "chunk, message",
    [
        ([BOS, EOS] + [EOS] * 74, "must have 77 token ids, got 76"),
        ([1] + [EOS] * 76, "must start with BOS"),
        ([BOS] + [5] * 76, "must contain EOS"),
        ([BOS, 5, EOS, 6] + [EOS] * 73, "only EOS"),
    ],
)
def test_malformed_chunks(chunk: list[int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        locate_subjects([chunk], ["x"], lambda _: [5], bos_id=BOS, eos_id=EOS, pad_id=EOS)
    with pytest.raises(ValueError, match="at least one chunk"):
        locate_subjects([], ["x"], lambda _: [5], bos_id=BOS, eos_id=EOS, pad_id=EOS)


def test_with_params_and_the_loss(tok: ClipTokenizer) -> None:
    params = AEParams(enabled=True, subjects="Cat, red car, cat")
    location = locate("a cat BREAK a red car", list(params.subject_names), tok)
    assert location.found == {"Cat": (2,), "red car": (79, 80)}
    assert location.selection is not None
    attention = torch.softmax(torch.randn(8, 8, location.num_columns, generator=torch.Generator().manual_seed(0)), -1)
    maps = subject_maps(attention, location.selection)
    assert maps.shape == (2, 8, 8) and bool(torch.isfinite(maps).all())
