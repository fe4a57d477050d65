"""The Attend-and-Excite loss, operation for operation as the official implementation (algorithm.md §1.2).

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
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import torch
import torch.nn.functional as F


@lru_cache(maxsize=8)
def _official_kernel_float32(kernel_size: int, sigma: float) -> torch.Tensor:
    # The official formula divides (x - mean) by 2*std *inside* the square, i.e. exp(-(x-mu)^2 / (4 sigma^2)):
    # an effective sigma of sqrt(2)*sigma. Replicated on purpose (algorithm.md §1.2, "Gaussian kernel bug"),
    # and built in float32 like the reference so that float64 runs see the very same rounded weights.
    grid = torch.arange(kernel_size, dtype=torch.float32)
    mean = (kernel_size - 1) / 2
    one_d = 1 / (sigma * math.sqrt(2 * math.pi)) * torch.exp(-(((grid - mean) / (2 * sigma)) ** 2))
    kernel = one_d[:, None] * one_d[None, :]
    return kernel / torch.sum(kernel)


def official_gaussian_kernel(kernel_size: int = 3, sigma: float = 0.5) -> torch.Tensor:
    """The (k, k) smoothing kernel of the official code, float32."""
    return _official_kernel_float32(kernel_size, float(sigma)).clone()


def smooth(maps: torch.Tensor, kernel_size: int = 3, sigma: float = 0.5) -> torch.Tensor:
    """Reflect-pad and convolve each (h, w) map of `maps` (..., h, w) with the official kernel."""
    kernel = _official_kernel_float32(kernel_size, float(sigma)).to(device=maps.device, dtype=maps.dtype)
    pad = kernel_size // 2
    flat = maps.reshape(-1, 1, *maps.shape[-2:])
    padded = F.pad(flat, (pad, pad, pad, pad), mode="reflect")
    return F.conv2d(padded, kernel[None, None]).reshape(maps.shape)


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
    ) -> "TokenSelection":
        """The reference's columns: 1..T-2, or with `normalize_eot` 1..end_of_text-1 (SD2.1 mode)."""
        last = num_columns - 1
        if normalize_eot:
            if end_of_text is None:
                raise ValueError("normalize_eot needs the end-of-text column")
            last = end_of_text
        return TokenSelection(tuple(range(1, last)), tuple(tuple(s) for s in subjects))


def subject_maps(attention: torch.Tensor, selection: TokenSelection, temperature: float = 100.0) -> torch.Tensor:
    """(S, h, w) re-softmaxed attention of each subject, from one image's aggregated maps (h, w, T)."""
    columns = torch.as_tensor(selection.text_columns, device=attention.device)
    text = torch.softmax(attention.index_select(-1, columns) * temperature, dim=-1)
    position = {column: i for i, column in enumerate(selection.text_columns)}
    maps = []
    for subject in selection.subjects:
        rel = [position[c] for c in subject]
        maps.append(text[..., rel[0]] if len(rel) == 1 else text[..., rel].sum(-1))
    return torch.stack(maps)


def subject_maxima(
    attention: torch.Tensor,
    selection: TokenSelection,
    *,
    smooth_attentions: bool = True,
    kernel_size: int = 3,
    sigma: float = 0.5,
    temperature: float = 100.0,
) -> torch.Tensor:
    """(S,) max over pixels of each subject's (smoothed) map."""
    maps = smoothed_subject_maps(
        attention, selection, smooth_attentions=smooth_attentions, kernel_size=kernel_size, sigma=sigma, temperature=temperature
    )
    # amax over pixels back-propagates like the reference's per-map `image.max()` (ties share the gradient).
    return maps.amax(dim=(-2, -1))


def smoothed_subject_maps(
    attention: torch.Tensor,
    selection: TokenSelection,
    *,
    smooth_attentions: bool = True,
    kernel_size: int = 3,
    sigma: float = 0.5,
    temperature: float = 100.0,
) -> torch.Tensor:
    """(S, h, w): the maps whose maxima the loss reads (re-softmaxed, smoothed); what a heatmap should show."""
    maps = subject_maps(attention, selection, temperature)
    return smooth(maps, kernel_size, sigma) if smooth_attentions else maps


def excite_loss(maxima: torch.Tensor) -> torch.Tensor:
    """max_s max(0, 1 - a_s); exactly 0 (no gradient) when every subject reaches 1, like the reference."""
    deficits = 1.0 - maxima
    # Python's max() in the reference keeps the first of equal values; argmax does the same.
    worst = deficits[int(torch.argmax(deficits))]
    return worst if bool(worst > 0) else worst.new_zeros(())
