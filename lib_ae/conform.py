"""CONFORM's contrastive loss (Meral et al., CVPR 2024), operation for operation as the official code
(gemlab-vt/CONFORM at 4ad0e37: pipeline_conform.py `ConformPipeline._compute_contrastive_loss`, with
pytorch-metric-learning 2.5.0's `NTXentLoss`). The derivation is in docs/conform.md.

Embeddings. From the aggregated maps A (h, w, T) of the cond-only forward (the maps A&E reads): the text columns
(official 1..T-2) times 100, softmaxed over the tokens (A&E's re-softmax); each group token's map is reflect-padded by
one pixel, smoothed with the official 3x3 kernel and flattened into a vector of h*w. A token's class is its group.
The previous step's embeddings of the same tokens (official `attention_maps_t_plus_one`, the maps of the step's last
evaluation) join with the same classes.

Loss (NT-Xent, cosine similarity, temperature tau): s_ij = <e_i, e_j> / (|e_i| |e_j| tau), then for every ordered pair
(a, p) of different embeddings of one class, with m = max(s_ap, max over n of s_an) over the embeddings n of the other
classes:
    l_ap = -log( exp(s_ap - m) / (exp(s_ap - m) + sum_n exp(s_an - m)) + tiny )
and L = the mean of l_ap over all such pairs; L = 0 when there is no positive pair or no negative pair (one group).
`tiny` is the dtype's smallest normal number, as pytorch-metric-learning adds it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .binding import BindingSelection
from .loss import TokenSelection, smooth

OFFICIAL_TEMPERATURE = 0.5
"""`ConformPipeline.__call__`'s `temperature` default (also the authors' notebook)."""
OFFICIAL_MAP_SCALE = 100.0
"""`attention_for_text *= 100` before the softmax over the tokens (`softmax_normalize=True`)."""


@dataclass(frozen=True)
class ConformGroups:
    """One image's token groups: each subject's columns with the columns of the modifiers bound to it ("a red car":
    red and car), in the official layout: `columns[k]` is a token, `classes[k]` its group."""

    columns: tuple[int, ...]
    classes: tuple[int, ...]

    @staticmethod
    def build(selection: TokenSelection | None, binding: BindingSelection | None) -> ConformGroups:
        """A group per subject, with the modifiers of every binding group whose noun lies in that subject, in prompt
        order ("red car": red, car, as the official groups are written). A token in two groups keeps its first place
        and takes the later group, as the official `indices_to_clases` does."""
        classes: dict[int, int] = {}
        if selection is not None:
            for group, subject in enumerate(selection.subjects):
                members = set(subject)
                for pair in (binding.groups if binding is not None else ()):
                    if set(pair.noun) & set(subject):
                        members.update(c for modifier in pair.modifiers for c in modifier)
                for column in sorted(members):
                    classes[column] = group
        return ConformGroups(tuple(classes), tuple(classes.values()))

    @property
    def groups(self) -> int:
        return len(set(self.classes))


@dataclass(frozen=True, eq=False)
class ConformIndex:
    """`ConformGroups` as device tensors, built once per selection and device outside any graph capture."""

    text_columns: torch.Tensor  # (K,) the columns of the re-softmax
    positions: torch.Tensor  # (N,) each group token's position among the text columns
    classes: torch.Tensor  # (N,)

    @staticmethod
    def build(selection: TokenSelection, groups: ConformGroups, device: torch.device | str) -> ConformIndex:
        where = {column: i for i, column in enumerate(selection.text_columns)}
        return ConformIndex(
            torch.as_tensor(selection.text_columns, device=device),
            torch.as_tensor([where[c] for c in groups.columns], device=device, dtype=torch.long),
            torch.as_tensor(groups.classes, device=device, dtype=torch.long),
        )


def conform_embeddings(
    attention: torch.Tensor, index: ConformIndex, *, smooth_maps: bool = True, kernel_size: int = 3,
    sigma: float = 0.5, softmax_normalize: bool = True,
) -> torch.Tensor:
    """(..., N, h*w): each group token's map of `attention` (..., h, w, T), re-softmaxed (`softmax_normalize`: x100,
    over the tokens), smoothed (`smooth_maps`) and flattened."""
    text = attention.index_select(-1, index.text_columns)
    if softmax_normalize:
        text = torch.softmax(text * OFFICIAL_MAP_SCALE, dim=-1)
    maps = text.index_select(-1, index.positions).movedim(-1, -3)  # (..., N, h, w)
    if smooth_maps:
        # The official pads by 1 whatever the kernel size; `smooth` pads by kernel_size // 2, which is 1 at size 3.
        maps = smooth(maps, kernel_size, sigma)
    return maps.flatten(-2)


def ntxent_loss(
    embeddings: torch.Tensor, classes: torch.Tensor, valid: torch.Tensor | None = None,
    temperature: float = OFFICIAL_TEMPERATURE,
) -> torch.Tensor:
    """(...) NT-Xent of `embeddings` (..., M, D) with `classes` (M,), as pytorch-metric-learning computes it (module
    docstring). `valid` (..., M) bool leaves embeddings out (a previous step's that does not exist yet); computed with
    masks and no host read, so it can be captured in a CUDA graph."""
    unit = torch.nn.functional.normalize(embeddings, p=2, dim=-1)
    similarity = unit @ unit.transpose(-1, -2) / temperature  # (..., M, M)
    count = classes.shape[0]
    same = classes[:, None] == classes[None, :]
    eye = torch.eye(count, dtype=torch.bool, device=embeddings.device)
    positive = same & ~eye
    negative = ~same
    if valid is not None:
        both = valid[..., :, None] & valid[..., None, :]
        positive = positive & both
        negative = negative & both
    else:
        positive = positive.expand(similarity.shape)
        negative = negative.expand(similarity.shape)
    lowest = torch.finfo(similarity.dtype).min
    negatives = torch.where(negative, similarity, lowest)  # (..., a, n)
    worst_negative = negatives.amax(-1, keepdim=True)  # (..., a, 1)
    top = torch.maximum(similarity, worst_negative).detach()  # (..., a, p): m of the pair (a, p)
    numerator = torch.exp(similarity - top)
    # sum over n of exp(s_an - m_ap) = exp(-m_ap) * sum_n exp(s_an), in the stable form of the official code.
    spread = torch.exp(negatives.unsqueeze(-2) - top.unsqueeze(-1))  # (..., a, p, n)
    spread = torch.where(negative.unsqueeze(-2), spread, torch.zeros_like(spread))
    denominator = spread.sum(-1) + numerator
    pair_losses = -torch.log(numerator / denominator + torch.finfo(similarity.dtype).tiny)
    pairs = positive.sum((-2, -1))
    has_negative = negative.any(-1).any(-1)
    total = torch.where(positive, pair_losses, torch.zeros_like(pair_losses)).sum((-2, -1))
    mean = total / pairs.clamp(min=1).to(total.dtype)
    return torch.where((pairs > 0) & has_negative, mean, torch.zeros_like(mean))


def self_cross_conform_terms(
    attention: torch.Tensor,
    index: ConformIndex,
    self_rows: Callable[[torch.Tensor], torch.Tensor],
    top_k: int = 4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Self-Cross guidance's terms on CONFORM's token groups (mengtang-lab/selfcross-guidance 9e54e74,
    pipeline_sc_conform.py `_compute_contrastive_loss`), per row of `attention` (R, h, w, T): (L_cross, the
    self-cross loss), each (R,).

    Each group token t has its re-softmaxed map c_t (x100, not smoothed); L_cross = max_t max(0, 1 - mean of c_t's
    top-k values); S_t = sum over c_t's Otsu mask of c_t(p) * self-attention row p, divided by its sum. Over the
    ordered pairs (i, j) of tokens in different groups, in the official order, S_i is divided again by (its sum +
    1e-4) before each of its pairs (the official code rebinds it in the loop; above 16x16 maps c_j too), and the loss
    is the mean of sum min(S_i, c_j)."""
    from .initno import clean_masks

    rows, h, w, _ = attention.shape
    text = torch.softmax(attention.index_select(-1, index.text_columns) * OFFICIAL_MAP_SCALE, dim=-1)
    maps = text.index_select(-1, index.positions).movedim(-1, -3)  # (R, N, h, w)
    tokens = maps.shape[1]
    flat = maps.reshape(rows, tokens, h * w)
    k = min(top_k, h * w)
    response = flat.topk(k, dim=-1, largest=True, sorted=True).values.mean(-1)  # (R, N)
    deficits = 1.0 - response
    worst = deficits.gather(-1, torch.argmax(deficits, dim=-1, keepdim=True)).squeeze(-1)
    cross = torch.where(worst > 0, worst, torch.zeros_like(worst))
    peaks = flat.detach().argmax(-1)
    otsu, _ = clean_masks(maps, peaks)
    weights = flat * (otsu.reshape(rows, tokens, h * w) != 0)
    gathered = self_rows(weights)  # (R, N, h*w)
    self_maps = [gathered[:, t] / gathered[:, t].sum(-1, keepdim=True) for t in range(tokens)]
    cross_maps = [flat[:, t] for t in range(tokens)]
    classes = index.classes.tolist()
    total = attention.new_zeros(rows)
    pairs = 0
    for i in range(tokens):
        for j in range(tokens):
            if classes[i] == classes[j]:
                continue
            self_maps[i] = self_maps[i] / (self_maps[i].sum(-1, keepdim=True) + 0.0001)
            if h > 16:
                cross_maps[j] = cross_maps[j] / (cross_maps[j].sum(-1, keepdim=True) + 0.0001)
            total = total + torch.minimum(self_maps[i], cross_maps[j]).sum(-1)
            pairs += 1
    return cross, total / pairs if pairs else total
