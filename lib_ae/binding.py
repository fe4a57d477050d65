"""SynGen's binding loss and update schedule (Rassin et al., NeurIPS 2023), operation for operation as the official
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

Schedule (`BindingPlan`): one plain gradient step z <- z - 20 * grad_z L at each of the first 25 loop iterations,
in the scheduler's (VP) latent space, no refinement, no decay; nothing after. In k-diffusion sigma space the same step
is taken with the factor (1 + sigma^2) of `lib_ae.sampling.sigma_space_gradient_scale`, as for A&E.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .tokens import CHUNK_LENGTH, EmbeddingSpan, embedding_columns, prompt_tokens

logger = logging.getLogger(__name__)

OFFICIAL_STEP_SIZE = 20.0
"""`syngen_step_size` (syngen_diffusion_pipeline.py `SynGenDiffusionPipeline.__call__`; run.py --step_size default)."""
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


# --- words -> columns ----------------------------------------------------------------------------------------------

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
    encode: Callable[[str], Sequence[int]],
    *,
    bos_id: int,
    eos_id: int,
    pad_id: int,
    embeddings: Sequence[Sequence[EmbeddingSpan]] | None = None,
) -> BindingLocation:
    """Columns of each (modifier, noun) pair in A1111's 77-token `chunks` (the layout of `lib_ae.tokens`).

    A word's columns are a contiguous run of its token ids inside one chunk (a textual-inversion embedding: its
    vectors, matched by name). Pairs are placed in order, the way one reads them: a modifier takes its first
    occurrence not yet bound, and its noun the nearest occurrence after it (else the first one), so "a red car and a
    red bench" binds each "red" to its own noun, and "a red car and a blue car" makes two groups. Modifiers placed on
    the same noun occurrence form one group ("a big red car"). The other words are every chunk's prompt tokens, never a
    chunk's BOS, EOS or padding; a pair may straddle a chunk boundary (all chunks are in the same attention)."""
    if isinstance(pairs, str) or any(isinstance(p, str) or len(p) != 2 for p in pairs):
        raise TypeError("pairs must be a sequence of (modifier, noun) pairs")
    if not chunks:
        raise ValueError("a prompt has at least one chunk")
    tokens = [prompt_tokens(chunk, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id) for chunk in chunks]
    word_columns = tuple(
        CHUNK_LENGTH * k + 1 + j for k, chunk_tokens in enumerate(tokens) for j in range(len(chunk_tokens))
    )
    spans = embedding_columns(embeddings or [], len(tokens))
    placeholders = {column for _, columns in spans for column in columns}

    def occurrences(word: str) -> list[Word] | str:
        key = " ".join(word.split()).lower()
        named = [columns for name, columns in spans if " ".join(name.split()).lower() == key]
        if named:
            return named
        ids = [int(t) for t in encode(key)]
        if not ids:
            return "has no tokens"
        found: list[Word] = []
        for k, chunk_tokens in enumerate(tokens):
            for start in range(len(chunk_tokens) - len(ids) + 1):
                if list(chunk_tokens[start : start + len(ids)]) == ids:
                    columns = tuple(range(CHUNK_LENGTH * k + 1 + start, CHUNK_LENGTH * k + 1 + start + len(ids)))
                    if not placeholders.intersection(columns):
                        found.append(columns)
        if found:
            return found
        for left, right in zip(tokens, tokens[1:]):
            joined = list(left[-(len(ids) - 1) :] if len(ids) > 1 else []) + list(right[: len(ids) - 1])
            if any(joined[i : i + len(ids)] == ids for i in range(len(joined) - len(ids) + 1)):
                return "is split between two chunks of the prompt (75-token limit or BREAK)"
        return "is not in the prompt"

    messages: list[str] = []
    bound: list[tuple[str, str, Word, Word]] = []
    used_modifiers: set[Word] = set()
    groups: dict[Word, list[Word]] = {}
    for modifier, noun in pairs:
        modifier_places, noun_places = occurrences(modifier), occurrences(noun)
        problems = [
            f"{role} {word!r} {places}"
            for role, word, places in (("modifier", modifier, modifier_places), ("noun", noun, noun_places))
            if isinstance(places, str)
        ]
        if problems or isinstance(modifier_places, str) or isinstance(noun_places, str):
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
        selection = BindingSelection(tuple(BindingGroup(n, tuple(ms)) for n, ms in ordered), word_columns)
    for message in messages:
        logger.debug(message)
    return BindingLocation(selection, tuple(bound), tuple(messages))

# --- the schedule ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BindingConfig:
    """SynGen's schedule parameters, official defaults.

    `step_size`: the constant step (no decay over the steps, unlike A&E's 20 * sqrt(linspace(1, 0.5))).
    `intervention_steps`: the update runs at loop index i < intervention_steps. None = round(fraction * steps), which
    is the official 25 at 50 steps; an int is used verbatim, as the official pipeline does for any step count.
    `weight`: the factor on this loss when it is added to A&E's (`excite+bind`); 1 for `bind` alone.
    """

    step_size: float = OFFICIAL_STEP_SIZE
    intervention_fraction: float = 0.5
    intervention_steps: int | None = None
    weight: float = 1.0

    def __post_init__(self) -> None:
        for name, value, high in (("step_size", self.step_size, 1e4), ("weight", self.weight, 1e4)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number (got {value!r})")
            if not 0.0 <= value <= high:
                raise ValueError(f"{name} must be in [0, {high:g}] (got {value!r})")
        if not 0.0 <= self.intervention_fraction <= 1.0:
            raise ValueError(f"intervention_fraction must be in [0, 1] (got {self.intervention_fraction!r})")
        if self.intervention_steps is not None and (
            isinstance(self.intervention_steps, bool) or not isinstance(self.intervention_steps, int)
            or self.intervention_steps < 0
        ):
            raise ValueError(f"intervention_steps must be a whole number >= 0 (got {self.intervention_steps!r})")

    def plan(self, steps: int) -> BindingPlan:
        return binding_plan(steps, self)


@dataclass(frozen=True)
class BindingPlan:
    """What SynGen does at each of `steps` sampler steps: `step_sizes[i]` > 0 means one update
    z <- z - step_sizes[i] * grad_z L at step i (VP space), after a single cond-only forward at that step's latent;
    0 means no gradient pass at all. There is never more than one update per step (no refinement)."""

    steps: int
    step_sizes: tuple[float, ...]
    intervention_steps: int

    def step_size(self, step: int) -> float:
        return self.step_sizes[step] if 0 <= step < self.steps else 0.0


def binding_plan(steps: int, config: BindingConfig | None = None) -> BindingPlan:
    """The per-step schedule (official: 50 steps -> 20.0 at steps 0..24, nothing at 25..49)."""
    config = config or BindingConfig()
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a whole number >= 1 (got {steps!r})")
    if config.intervention_steps is not None:
        active = config.intervention_steps
    else:
        active = int(math.floor(config.intervention_fraction * steps + 0.5))
    active = min(active, steps)
    sizes = tuple(float(config.step_size) if i < active else 0.0 for i in range(steps))
    return BindingPlan(steps, sizes, active)

