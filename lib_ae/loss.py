"""The Attend-and-Excite loss, operation for operation as the official implementation (docs/algorithm.md §1.2).

Per image: A (h, w, T) = mean over layers x heads of the cross-attention probabilities;
keep the text columns (official: 1..T-2), multiply by the temperature 100 and re-softmax over them; for each subject,
reflect-pad and smooth its map with the official 3x3 kernel, take the max over pixels; the loss is
max over subjects of max(0, 1 - max attention), so only the most neglected subject receives gradient.

A subject may span several tokens (a word the tokenizer splits, or a phrase): its map is the sum of its tokens'
re-softmaxed maps, i.e. the probability mass the pixel gives to the whole word. For a one-token subject this is
exactly the official map.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F


@lru_cache(maxsize=8)
def _official_kernel_float32(kernel_size: int, sigma: float) -> torch.Tensor:
    # The official formula divides (x - mean) by 2*std *inside* the square, i.e. exp(-(x-mu)^2 / (4 sigma^2)):
    # an effective sigma of sqrt(2)*sigma. Replicated on purpose (docs/algorithm.md §1.2, "Gaussian kernel bug"),
    # and built in float32 like the reference so that float64 runs see the very same rounded weights.
    grid = torch.arange(kernel_size, dtype=torch.float32)
    mean = (kernel_size - 1) / 2
    one_d = 1 / (sigma * math.sqrt(2 * math.pi)) * torch.exp(-(((grid - mean) / (2 * sigma)) ** 2))
    kernel = one_d[:, None] * one_d[None, :]
    return kernel / torch.sum(kernel)


def official_gaussian_kernel(kernel_size: int = 3, sigma: float = 0.5) -> torch.Tensor:
    """The (k, k) smoothing kernel of the official code, float32."""
    return _official_kernel_float32(kernel_size, float(sigma)).clone()


@lru_cache(maxsize=32)
def _device_kernel(kernel_size: int, sigma: float, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    # Cached per device: a fresh host-to-device copy at every evaluation would wait for the GPU (and cannot be
    # captured in a CUDA graph).
    return _official_kernel_float32(kernel_size, sigma).to(device=device, dtype=dtype)[None, None]


def smooth(maps: torch.Tensor, kernel_size: int = 3, sigma: float = 0.5) -> torch.Tensor:
    """Reflect-pad and convolve each (h, w) map of `maps` (..., h, w) with the official kernel."""
    kernel = _device_kernel(kernel_size, float(sigma), maps.device, maps.dtype)
    pad = kernel_size // 2
    flat = maps.reshape(-1, 1, *maps.shape[-2:])
    padded = F.pad(flat, (pad, pad, pad, pad), mode="reflect")
    return F.conv2d(padded, kernel).reshape(maps.shape)


@dataclass(frozen=True)
class TokenSelection:
    """Which conditioning columns one image's loss looks at.

    `text_columns`: the columns that enter the x100 re-softmax, in order (official: range(1, T-1)).
    `subjects`: for each subject, its columns (absolute positions in the conditioning, each one of `text_columns`).
    """

    text_columns: tuple[int, ...]
    subjects: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        allowed = set(self.text_columns)
        for subject in self.subjects:
            if not subject:
                raise ValueError("a subject must have at least one token")
            for column in subject:
                if column not in allowed:
                    raise ValueError(f"subject token at column {column} is outside the text columns")

    @staticmethod
    def official(
        num_columns: int,
        subjects: Sequence[Sequence[int]],
        end_of_text: int | None = None,
        normalize_eot: bool = False,
    ) -> TokenSelection:
        """The reference's columns: 1..T-2, or with `normalize_eot` 1..end_of_text-1 (SD2.1 mode)."""
        last = num_columns - 1
        if normalize_eot:
            if end_of_text is None:
                raise ValueError("normalize_eot needs the end-of-text column")
            last = end_of_text
        return TokenSelection(tuple(range(1, last)), tuple(tuple(s) for s in subjects))


@dataclass(frozen=True, eq=False)
class SelectionIndex:
    """A `TokenSelection`'s columns as index tensors on one device, built once per run: an evaluation then makes no
    host-to-device copy (which would wait for the GPU, and which a CUDA graph cannot hold)."""

    columns: torch.Tensor
    """(K,) the text columns, in order."""
    single: torch.Tensor | None
    """(S,) each subject's position among the text columns, when every subject is one token; else None."""
    subjects: tuple[torch.Tensor, ...]
    """Per subject, its positions among the text columns."""

    @staticmethod
    def build(selection: TokenSelection, device: torch.device | str) -> SelectionIndex:
        position = {column: i for i, column in enumerate(selection.text_columns)}
        relative = [[position[c] for c in subject] for subject in selection.subjects]
        single = None
        if all(len(rel) == 1 for rel in relative):
            single = torch.as_tensor([rel[0] for rel in relative], device=device)
        return SelectionIndex(
            torch.as_tensor(selection.text_columns, device=device),
            single,
            tuple(torch.as_tensor(rel, device=device) for rel in relative),
        )


def subject_maps(
    attention: torch.Tensor,
    selection: TokenSelection,
    temperature: float = 100.0,
    *,
    index: SelectionIndex | None = None,
) -> torch.Tensor:
    """(..., S, h, w) re-softmaxed attention of each subject, from aggregated maps (..., h, w, T) of one or more images
    that share `selection`."""
    if index is None:
        index = SelectionIndex.build(selection, attention.device)
    text = torch.softmax(attention.index_select(-1, index.columns) * temperature, dim=-1)
    if index.single is not None:  # one gather for all subjects instead of one per subject
        return text.index_select(-1, index.single).movedim(-1, -3)
    maps = [text[..., rel[0]] if rel.numel() == 1 else text.index_select(-1, rel).sum(-1) for rel in index.subjects]
    return torch.stack(maps, dim=-3)


def smoothed_subject_maps(
    attention: torch.Tensor,
    selection: TokenSelection,
    *,
    smooth_attentions: bool = True,
    kernel_size: int = 3,
    sigma: float = 0.5,
    temperature: float = 100.0,
    index: SelectionIndex | None = None,
) -> torch.Tensor:
    """(..., S, h, w): the maps whose maxima the loss reads (re-softmaxed, smoothed); what a heatmap should show."""
    maps = subject_maps(attention, selection, temperature, index=index)
    return smooth(maps, kernel_size, sigma) if smooth_attentions else maps


def subject_maxima(maps: torch.Tensor) -> torch.Tensor:
    """(..., S) the paper's a_s: max over pixels of each subject's smoothed map (..., S, h, w)."""
    # amax over pixels back-propagates like the reference's per-map `image.max()` (ties share the gradient).
    return maps.amax(dim=(-2, -1))


def excite_losses(maxima: torch.Tensor) -> torch.Tensor:
    """(...) max_s max(0, 1 - a_s) per image from maxima (..., S), computed on the device without reading any value
    on the host (the engine's form, also inside CUDA graphs). An image whose subjects all reach 1 gets exactly 0."""
    deficits = 1.0 - maxima
    # Python's max() in the reference keeps the first of equal values; argmax does the same.
    worst = deficits.gather(-1, torch.argmax(deficits, dim=-1, keepdim=True)).squeeze(-1)
    return torch.where(worst > 0, worst, torch.zeros_like(worst))


def excite_loss(maxima: torch.Tensor) -> torch.Tensor:
    """The reference's loss of one image, maxima (S,): `excite_losses` with the reference's Python test on the host,
    so that a fully excited image gives a constant 0 without gradient (the reference returns int 0 then)."""
    loss = excite_losses(maxima)
    return loss if bool(loss > 0) else loss.new_zeros(())
