"""SynGen's binding loss (Rassin et al., NeurIPS 2023), operation for operation as the official
code (RoyiRa/Linguistic-Binding-in-Diffusion-Models at 50b8eab: compute_loss.py, syngen_diffusion_pipeline.py).
The derivation, with file:line citations, is in docs/binding.md.

Maps. The loss reads the same aggregated cross-attention as A&E, A (h, w, T) = mean over layers x heads of the
16x16 cross-attention probabilities of the conditional forward, but NOT A&E's x100 re-softmax over tokens: each
token's column A[..., k] (times 100, which the normalisation cancels) is normalised over the pixels into a spatial
distribution P_k = A_k / sum(A_k).

Divergence. D(P, Q) = (KL(P||Q) + KL(Q||P)) / 2, with torch.distributions.Categorical's conventions: log terms use
probabilities clamped to [eps, 1 - eps] (eps of the dtype), a term with P = 0 counts 0, a term with Q = 0 < P is +inf.

Loss of one image, for each group (noun n, modifiers m_1..m_k; every word a set of word-piece columns):
    O = the prompt's word-piece columns outside the group (the official `_get_outside_indices`)
    D*(X, Y) = max over pieces x of X, y of Y of D(P_x, P_y)            (multi-piece words: the worst piece)
    N(X) = -(1/|O|) sum over o in O of D*(X, o)                        (0 when O is empty)
    L += sum over j of [ D*(m_j, n) + (N(m_j) + N(n)) / 2 ]             (a group with modifiers)
    L += N(n)                                                           (a group without modifiers)
The positive term pulls each modifier's map onto its noun's; the negative term pushes both away from every other word
of the prompt (articles, conjunctions and punctuation included, as officially).

Its schedule is `lib_ae.config.BindingConfig`; where a prompt's words are in the conditioning, `lib_ae.tokens`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

OFFICIAL_MAP_SCALE = 100.0
"""`_get_attention_maps_list` multiplies the aggregated maps by 100 (syngen_diffusion_pipeline.py
`_get_attention_maps_list`)."""

Word = tuple[int, ...]
"""The conditioning columns (word pieces) of one word."""


@dataclass(frozen=True)
class BindingGroup:
    """One noun and the words that modify it, as conditioning columns (what the official code calls a subtree)."""

    noun: Word
    modifiers: tuple[Word, ...] = ()

    def __post_init__(self) -> None:
        # A one-piece word may be given as its column: BindingGroup(3, (2,)) == BindingGroup((3,), ((2,),)).
        object.__setattr__(self, "noun", _word(self.noun))
        object.__setattr__(self, "modifiers", tuple(_word(m) for m in self.modifiers))
        if not self.noun:
            raise ValueError("a binding group's noun must have at least one column")
        for modifier in self.modifiers:
            if not modifier:
                raise ValueError("a modifier must have at least one column")

    def columns(self) -> set[int]:
        return set(self.noun).union(*self.modifiers)


def _word(columns: int | Sequence[int]) -> Word:
    if isinstance(columns, bool):
        raise TypeError("a column must be a whole number")
    if isinstance(columns, int):
        return (columns,)
    return tuple(int(c) for c in columns)


@dataclass(frozen=True)
class BindingSelection:
    """What one image's binding loss looks at.

    `groups`: the noun/modifier groups. `word_columns`: every word-piece column of the prompt, the pool the "other
    words" of each group are taken from. Officially (one 77-token chunk) columns 1..n for a prompt of n word pieces:
    the start and end tokens and the padding are not words (compute_loss.py `get_attention_map_index_to_wordpiece`).
    For A1111's several chunks,
    the prompt tokens of every chunk (see `lib_ae.tokens`), never a chunk's BOS, EOS or padding.
    """

    groups: tuple[BindingGroup, ...]
    word_columns: tuple[int, ...]

    def __post_init__(self) -> None:
        words = set(self.word_columns)
        for group in self.groups:
            stray = sorted(group.columns() - words)
            if stray:
                raise ValueError(f"binding columns {stray} are not word columns of the prompt")

    @staticmethod
    def official(num_word_pieces: int, groups: Sequence[BindingGroup]) -> BindingSelection:
        """The official columns for a one-chunk prompt of `num_word_pieces` word pieces."""
        return BindingSelection(tuple(groups), tuple(range(1, num_word_pieces + 1)))


def spatial_distributions(attention: torch.Tensor, columns: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """(..., K, h*w): each column's map of `attention` (..., h, w, T), scaled by 100 and normalised over the pixels,
    exactly as `Categorical(probs=map.reshape(-1))` normalises it."""
    index = torch.as_tensor(columns, device=attention.device, dtype=torch.long)
    maps = (attention * OFFICIAL_MAP_SCALE).index_select(-1, index)
    flat = maps.flatten(-3, -2).transpose(-1, -2)
    return flat / flat.sum(-1, keepdim=True)


def _log_clamped(probs: torch.Tensor) -> torch.Tensor:
    eps = torch.finfo(probs.dtype).eps
    return torch.log(probs.clamp(min=eps, max=1 - eps))


def _kl(p: torch.Tensor, log_p: torch.Tensor, q: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) over the last dim with Categorical's zero conventions (torch.distributions.kl, categorical)."""
    terms = p * (log_p - log_q)
    terms = terms.masked_fill((q == 0).expand_as(terms), math.inf)
    terms = terms.masked_fill((p == 0).expand_as(terms), 0.0)
    return terms.sum(-1)


def symmetric_kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """(KL(p||q) + KL(q||p)) / 2 over the last dim of normalised distributions (broadcasting)."""
    log_p, log_q = _log_clamped(p), _log_clamped(q)
    return (_kl(p, log_p, q, log_q) + _kl(q, log_q, p, log_p)) / 2


@dataclass(frozen=True)
class BindingIndex:
    """A `BindingSelection` as device tensors, so that `binding_loss` is a fixed sequence of tensor operations with no
    host reads (it can be captured in a CUDA graph). Build it once per selection and device, outside any capture.

    Units are the words that receive a negative term (each group's noun and each of its modifiers); S is the number
    of pieces of all groups, W the number of word columns.
    """

    words: torch.Tensor  # (W,) word columns
    pieces: torch.Tensor  # (S,) positions in `words` of every group's pieces, group after group
    unit_pieces: torch.Tensor  # (U, S) bool: the unit's own pieces
    unit_outside: torch.Tensor  # (U, W) bool: the other words of the unit's group
    outside_count: torch.Tensor  # (U,) |O| of the unit's group, as the loss dtype later
    pair_modifier: torch.Tensor  # (P, S) bool: the modifier's pieces, one row per (modifier, noun) pair
    pair_noun: torch.Tensor  # (P, W) bool: the noun's pieces, as word positions
    pair_units: torch.Tensor  # (P, 2) long: (modifier unit, noun unit)
    lone_nouns: torch.Tensor  # (N,) long: units of nouns without modifiers

    @staticmethod
    def build(selection: BindingSelection, device: torch.device | str = "cpu") -> BindingIndex:
        words = list(selection.word_columns)
        position = {column: i for i, column in enumerate(words)}
        pieces: list[int] = []
        unit_pieces: list[list[int]] = []  # piece slots per unit
        unit_group: list[int] = []
        pairs: list[tuple[int, int]] = []
        lone: list[int] = []
        outside_rows: list[list[bool]] = []
        for g, group in enumerate(selection.groups):
            slot = {}
            for column in sorted(group.columns()):
                slot[column] = len(pieces)
                pieces.append(position[column])
            inside = group.columns()
            outside_rows.append([c not in inside for c in words])
            noun_unit = len(unit_pieces)
            unit_pieces.append([slot[c] for c in group.noun])
            unit_group.append(g)
            if not group.modifiers:
                lone.append(noun_unit)
            for modifier in group.modifiers:
                pairs.append((len(unit_pieces), noun_unit))
                unit_pieces.append([slot[c] for c in modifier])
                unit_group.append(g)
        total = len(pieces)
        unit_mask = torch.zeros(len(unit_pieces), total, dtype=torch.bool)
        for u, slots in enumerate(unit_pieces):
            unit_mask[u, slots] = True
        outside = torch.tensor([outside_rows[g] for g in unit_group], dtype=torch.bool)
        outside = outside.reshape(len(unit_group), len(words))
        pair_noun = torch.zeros(len(pairs), len(words), dtype=torch.bool)
        for p, (_, noun_unit) in enumerate(pairs):
            pair_noun[p, [pieces[slot] for slot in unit_pieces[noun_unit]]] = True
        pair_units = torch.tensor(pairs, dtype=torch.long).reshape(len(pairs), 2)
        return BindingIndex(
            words=torch.tensor(words, dtype=torch.long, device=device),
            pieces=torch.tensor(pieces, dtype=torch.long, device=device),
            unit_pieces=unit_mask.to(device),
            unit_outside=outside.to(device),
            outside_count=outside.sum(-1).to(device),
            pair_modifier=unit_mask[pair_units[:, 0]].to(device),
            pair_noun=pair_noun.to(device),
            pair_units=pair_units.to(device),
            lone_nouns=torch.tensor(lone, dtype=torch.long, device=device),
        )


def binding_loss(
    attention: torch.Tensor, selection: BindingSelection, index: BindingIndex | None = None
) -> torch.Tensor:
    """The official loss from aggregated maps `attention` (..., h, w, T): one value per image, shape (...)
    (0 without groups); float32 for half-precision maps. Images of a batch share `selection`.
    `index`: `BindingIndex.build(selection, device)`, to
    build once and keep (required for a host-read-free evaluation); built here when not given.

    Every divergence is computed in one batched call (each group piece against every word column), then reduced with
    masks: max over a word's pieces, mean over the group's other words, sums over pairs. Equal to the official
    per-pair Python loops up to the order of float summation."""
    batch_shape = attention.shape[:-3]
    if attention.dtype in (torch.float16, torch.bfloat16):
        # The official code runs in float32. In half precision the clamp floor eps (~1e-3) is above many pixels'
        # probability (1/256 on average at 16x16), which would flatten the logarithms; compute in float32 instead.
        attention = attention.float()
    if not selection.groups:
        return attention.new_zeros(batch_shape)
    if index is None:
        index = BindingIndex.build(selection, attention.device)
    distributions = spatial_distributions(attention, index.words)  # (..., W, HW)
    piece_rows = distributions.index_select(-2, index.pieces)  # (..., S, HW)
    divergence = symmetric_kl(piece_rows.unsqueeze(-2), distributions.unsqueeze(-3))  # (..., S, W)
    lowest = torch.finfo(divergence.dtype).min

    # Negative term per unit: -(1/|O|) sum over o in O of max over the unit's pieces of D(piece, o); 0 when O is empty.
    per_unit = torch.where(index.unit_pieces[:, :, None], divergence.unsqueeze(-3), lowest).amax(-2)  # (..., U, W)
    outside_sum = torch.where(index.unit_outside, per_unit, 0.0).sum(-1)  # (..., U)
    count = index.outside_count.to(divergence.dtype)
    negative = torch.where(count > 0, -outside_sum / count.clamp(min=1), 0.0)  # (..., U)

    loss = negative.index_select(-1, index.lone_nouns).sum(-1)
    if index.pair_units.shape[0]:
        # Positive term per pair: max over modifier pieces x noun pieces of D.
        mask = index.pair_modifier[:, :, None] & index.pair_noun[:, None, :]  # (P, S, W)
        positive = torch.where(mask, divergence.unsqueeze(-3), lowest).amax((-2, -1))  # (..., P)
        modifier_negative = negative.index_select(-1, index.pair_units[:, 0])
        noun_negative = negative.index_select(-1, index.pair_units[:, 1])
        pair_negative = (modifier_negative + noun_negative) / 2
        loss = loss + positive.sum(-1) + pair_negative.sum(-1)
    return loss
