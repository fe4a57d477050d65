"""InitNO (Guo et al., CVPR 2024) and Self-Cross guidance on InitNO (Qiu et al., CVPR 2025): their losses on the
captured maps, and InitNO's optimisation of the initial noise (docs/initno.md).

Per image, with the subjects' re-softmaxed maps m_s and their smoothed maps c_s = smooth(m_s) (A&E's, `lib_ae.loss`):
    cross      L_cross = max_s max(0, 1 - mean of the top-k values of c_s)             (A&E's loss for k = 1)
    clean      sum_s [max bg_s if max bg_s > min fg_s else 0]: fg_s is the connected region, around c_s's peak, of
               c_s's Otsu mask, bg_s the rest (`clean_masks`)
    align      sum_s mean |c_s - smooth(E_s)|, E_s an exponential average (0.9) of m_s over every evaluation so far
               (this evaluation's included; the carry)
    conflict   InitNO: mean over subject pairs of sum min(S_i, S_j) / (sum (S_i + S_j) + 1e-6), S_s = smooth(self-
               attention row at c_s's peak)
               Self-Cross: mean over ordered pairs i != j of sum min(S_j / sum S_j, c_i), S_j = sum over c_j's Otsu
               mask of c_j(p) smooth(self-attention row p)
Sampling (every evaluation): L = L_cross + 0.1 clean + 0.1 align + conflict, refinement differentiates L; the step's
update differentiates L_cross (InitNO) or L_cross + 0.1 clean + conflict (Self-Cross). Self-Cross's conflict counts
only while L_cross <= 0.5, InitNO's so only before sampling. Before sampling (`optimise_initial_noise`):
L = L_cross + clean + conflict, without `align`.

The Otsu threshold and the region around the peak are computed on the host, as the official code does with OpenCV
(`otsu_level` reproduces `cv2.threshold(..., THRESH_OTSU)` on the official uint16 image step for step); everything
else stays on the device.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .config import ConfigError
from .loss import smooth

logger = logging.getLogger(__name__)

__all__ = [
    "InitnoConfig", "InitnoLosses", "NoiseOptimisation", "RoundReport", "clean_masks", "initno_losses", "otsu_level",
    "optimise_initial_noise",
]

FLT_EPSILON = 1.1920928955078125e-07
"""C's FLT_EPSILON, which OpenCV's Otsu search compares the class weights against."""


@dataclass(frozen=True)
class InitnoConfig:
    """The official constants (pipeline_sd_initno.py, pipeline_sc_initno.py). `self_cross`: Self-Cross guidance's
    conflict term instead of InitNO's; `top_k`: how many peak values the cross loss averages (InitNO: 1; Self-Cross's
    published runs: 16)."""

    self_cross: bool = False
    top_k: int = 1
    cross_target: float = 0.2
    conflict_target: float = 0.3
    rounds: int = 5
    round_steps: int = 10
    final_steps: int = 50
    learning_rate: float = 1e-2
    adam_eps: float = 1e-3
    kl_limit: float = 1e-3
    cache_decay: float = 0.9

    def __post_init__(self) -> None:
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or not 1 <= self.top_k <= 64:
            raise ConfigError(f"the top-k of the cross loss must be a whole number in [1, 64] (got {self.top_k!r})")
        for name in ("rounds", "round_steps", "final_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 1000:
                raise ConfigError(f"InitNO's {name} must be a whole number in [0, 1000] (got {value!r})")


# -- Otsu's threshold and the region around the peak (host) ------------------------------------------------------------


def otsu_level(levels: Sequence[int]) -> int:
    """OpenCV's Otsu threshold of a uint16 image with these pixel levels (`getThreshVal_Otsu<ushort>`): the first
    level maximising the between-class variance, with OpenCV's running means in double precision, and its skipping of
    levels where either class weight is within FLT_EPSILON of 0 or 1."""
    count = len(levels)
    histogram: dict[int, int] = {}
    for level in levels:
        histogram[level] = histogram.get(level, 0) + 1
    scale = 1.0 / count
    mu = 0.0
    top = max(histogram)
    for i in range(top + 1):
        mu += i * float(histogram.get(i, 0))
    mu *= scale
    mu1 = q1 = 0.0
    max_sigma = 0.0
    max_val = 0
    # Levels above the brightest pixel leave q1 at (about) 1 and are skipped, as every level after it in OpenCV's
    # loop over all 65536.
    for i in range(top + 1):
        p_i = histogram.get(i, 0) * scale
        mu1 *= q1
        q1 += p_i
        q2 = 1.0 - q1
        if min(q1, q2) < FLT_EPSILON or max(q1, q2) > 1.0 - FLT_EPSILON:
            continue
        mu1 = (mu1 + i * p_i) / q1
        mu2 = (mu - q1 * mu1) / q2
        sigma = q1 * q2 * (mu1 - mu2) * (mu1 - mu2)
        if sigma > max_sigma:
            max_sigma = sigma
            max_val = i
    return max_val


def clean_masks(maps: torch.Tensor, peaks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For smoothed maps (..., h, w) and their peak patches (...,) (flat index): (Otsu mask, the mask's 4-connected
    region containing the peak), each 0/1 in the maps' dtype on their device. The threshold is the official one: the
    map times 255 truncated to uint16, OpenCV's Otsu level, and `map < level / 255` in the map's dtype."""
    h, w = maps.shape[-2:]
    flat = maps.detach().reshape(-1, h * w)
    levels = (flat * 255).to("cpu", torch.int64).clamp(0, 65535).tolist()
    peak_list = peaks.reshape(-1).tolist()
    masks, regions = [], []
    for row, (row_levels, peak) in enumerate(zip(levels, peak_list)):
        threshold = otsu_level(row_levels) * 1.0 / 255.0
        mask = (flat[row] >= threshold).cpu().tolist()  # `x < threshold` -> 0, as torch compares in x's dtype
        masks.append(mask)
        regions.append(_region(mask, int(peak), h, w))
    shape = maps.shape
    as_tensor = lambda rows: torch.tensor(rows, dtype=maps.dtype).reshape(shape).to(maps.device)  # noqa: E731
    return as_tensor(masks), as_tensor(regions)


def _region(mask: list[bool], start: int, h: int, w: int) -> list[bool]:
    """The 4-connected region of `mask` containing `start` (the official depth-first fill, iteratively)."""
    region = [False] * (h * w)
    if not mask[start]:
        return region
    stack = [start]
    region[start] = True
    while stack:
        at = stack.pop()
        y, x = divmod(at, w)
        for ny, nx in ((y, x + 1), (y, x - 1), (y + 1, x), (y - 1, x)):
            if 0 <= ny < h and 0 <= nx < w:
                n = ny * w + nx
                if mask[n] and not region[n]:
                    region[n] = True
                    stack.append(n)
    return region


# -- The losses --------------------------------------------------------------------------------------------------------


@dataclass
class InitnoLosses:
    """Per row (R,): the official terms. `update`: what the sampling step's update differentiates; `refine`: what a
    refinement iteration differentiates (the official joint loss); `initial`: the noise optimisation's loss."""

    cross: torch.Tensor
    clean: torch.Tensor
    align: torch.Tensor
    conflict: torch.Tensor
    joint: torch.Tensor
    update: torch.Tensor
    initial: torch.Tensor
    cache: torch.Tensor  # (R, S, h*w): the exponential average after this evaluation (detached)
    self_maps: torch.Tensor  # (R, S, h, w): each subject's self-attention map the conflict compares (detached)


SelfRows = Callable[[torch.Tensor], torch.Tensor]
"""self_rows(weights (R, K, N)) -> (R, K, N): weighted sums of the aggregated self-attention rows
(`Recording.self_attention_rows`)."""


def initno_losses(
    raw: torch.Tensor,
    smoothed: torch.Tensor,
    self_rows: SelfRows,
    config: InitnoConfig,
    cache: torch.Tensor | None = None,
    has_cache: torch.Tensor | None = None,
    *,
    kernel_size: int = 3,
    sigma: float = 0.5,
    initial: bool = False,
) -> InitnoLosses:
    """The official terms from each row's subject maps: `raw` m_s and `smoothed` c_s (R, S, h, w). `cache`: the
    previous exponential average (R, S, h*w) and which rows have one (R,) (without one the average starts at this
    evaluation's maps). `initial`: the noise optimisation's form (Self-Cross normalises there without its 1e-4)."""
    rows, subjects, h, w = smoothed.shape
    dtype = smoothed.dtype
    flat = smoothed.reshape(rows, subjects, h * w)
    k = min(config.top_k, h * w)
    peaks = flat.detach().topk(k, dim=-1, largest=True, sorted=True).indices  # (R, S, k)
    peak_values = flat.gather(-1, peaks)
    response = peak_values.sum(-1) / k if not config.self_cross else peak_values.mean(-1)
    deficits = 1.0 - response
    worst = deficits.gather(-1, torch.argmax(deficits, dim=-1, keepdim=True)).squeeze(-1)  # Python's max: the first
    cross = torch.where(worst > 0, worst, torch.zeros_like(worst))

    otsu, region = clean_masks(smoothed, peaks[..., 0])
    background = smoothed * (1 - region)
    foreground = smoothed * region + (1 - region)
    background_max = background.amax(dim=(-2, -1))
    clean_terms = torch.where(background_max > foreground.amin(dim=(-2, -1)), background_max, background_max * 0)
    clean = clean_terms.sum(-1)

    now = raw.detach().reshape(rows, subjects, h * w)
    if cache is None:
        average = now
    else:
        previous = cache[:, :subjects].to(dtype)
        blended = previous * config.cache_decay + now * (1 - config.cache_decay)
        average = torch.where(has_cache.reshape(rows, 1, 1), blended, now) if has_cache is not None else blended
    smoothed_average = smooth(average.reshape(rows, subjects, h, w), kernel_size, sigma)
    align = (smoothed - smoothed_average).abs().mean(dim=(-2, -1)).sum(-1)

    if config.self_cross:
        weights = smoothed.reshape(rows, subjects, h * w) * (otsu.reshape(rows, subjects, h * w) != 0)
        self_maps = smooth(self_rows(weights).reshape(rows, subjects, h, w), kernel_size, sigma)
        conflict = _self_cross_conflict(smoothed, self_maps, initial)
    else:
        # The mean of the rows at the k peaks (one row for InitNO's k = 1).
        at_peaks = torch.zeros(rows, subjects, h * w, dtype=dtype, device=smoothed.device)
        at_peaks.scatter_(-1, peaks, 1.0 / k)
        self_maps = smooth(self_rows(at_peaks).reshape(rows, subjects, h, w), kernel_size, sigma)
        conflict = _initno_conflict(self_maps)
    # The conflict counts only once the subjects are there (L_cross <= 0.5): always for Self-Cross, in the noise
    # optimisation only for InitNO (its sampling loss `fn_augmented_compute_losss` counts it throughout).
    counted = torch.where(cross > 0.5, conflict * 0, conflict) if config.self_cross or initial else conflict
    joint = cross + 0.1 * clean + 0.1 * align + counted
    update = cross + 0.1 * clean + counted if config.self_cross else cross
    initial_loss = cross + clean + counted if config.self_cross else cross + counted + clean  # the official orders
    return InitnoLosses(cross, clean, align, counted, joint, update, initial_loss, average, self_maps.detach())


def _initno_conflict(self_maps: torch.Tensor) -> torch.Tensor:
    rows, subjects = self_maps.shape[:2]
    total = self_maps.new_zeros(rows)
    pairs = 0
    for i in range(subjects):
        for j in range(i + 1, subjects):
            a, b = self_maps[:, i], self_maps[:, j]
            total = total + torch.minimum(a, b).sum(dim=(-2, -1)) / ((a + b).sum(dim=(-2, -1)) + 1e-6)
            pairs += 1
    return total / pairs if pairs else total


def _self_cross_conflict(cross_maps: torch.Tensor, self_maps: torch.Tensor, initial: bool) -> torch.Tensor:
    rows, subjects, h, _ = cross_maps.shape
    epsilon = 0.0 if initial else 1e-4
    total = cross_maps.new_zeros(rows)
    pairs = 0
    for i in range(subjects):
        for j in range(subjects):
            if i == j:
                continue
            normalised_self = self_maps[:, j] / (self_maps[:, j].sum(dim=(-2, -1), keepdim=True) + epsilon)
            cross = cross_maps[:, i]
            if h > 16:  # the official code normalises the cross map above 16x16 maps only
                cross = cross / (cross.sum(dim=(-2, -1), keepdim=True) + epsilon)
            total = total + torch.minimum(normalised_self, cross).sum(dim=(-2, -1))
            pairs += 1
    return total / pairs if pairs else total


# -- The initial noise -------------------------------------------------------------------------------------------------


@dataclass
class RoundReport:
    round: int
    steps: int  # loss evaluations made
    succeeded: bool
    score: float  # L_cross + conflict at the last evaluation (InitNO adds 1 to a conflict of 0)


@dataclass
class NoiseOptimisation:
    """What the optimisation of one image's initial noise did."""

    rounds: list[RoundReport] = field(default_factory=list)
    chosen_round: int = 0
    succeeded: bool = False
    final_steps: int = 0  # the longer run from the best round's noise when no round succeeded
    seconds: float = 0.0
    interrupted: bool = False
    skipped: str | None = None  # why the image kept its noise (a non-finite loss)

    @property
    def evaluations(self) -> int:
        return sum(r.steps for r in self.rounds) + self.final_steps


InitialLoss = Callable[[torch.Tensor], tuple[torch.Tensor, float, float]]
"""loss(v) for the VP latent v (1, ...) of one image: (the loss, differentiable with respect to v; L_cross; the
conflict), the latter two read on the host."""


def optimise_initial_noise(
    v: torch.Tensor,
    loss: InitialLoss,
    fresh_noise: Callable[[int], torch.Tensor],
    config: InitnoConfig,
    should_stop: Callable[[], bool] | None = None,
) -> tuple[torch.Tensor, NoiseOptimisation]:
    """InitNO's `fn_initno` rounds for one image (pipeline_sd_initno.py `__call__`): from `v` (its VP latent, the
    UNet's input at the first step), then from `fresh_noise(r)` for rounds r = 1, 2, ... while none succeeds; the best
    round's result, or, when none succeeded, a longer run from the best round's noise. Returns (the optimised v, the
    report)."""
    stop = should_stop or (lambda: False)
    report = NoiseOptimisation()
    started = time.perf_counter()
    pool: list[tuple[float, int, torch.Tensor, torch.Tensor, bool]] = []
    start = v.detach().clone()
    for round_index in range(config.rounds):
        optimised, succeeded, score, steps = _optimise(start, loss, config, config.round_steps, stop)
        report.rounds.append(RoundReport(round_index, steps, succeeded, score))
        pool.append((score, round_index, optimised, start, succeeded))
        if succeeded or stop() or not math.isfinite(score):
            break
        if round_index + 1 < config.rounds:
            start = fresh_noise(round_index + 1).to(v.device, v.dtype).reshape(v.shape)
    report.interrupted = stop()
    finite = [entry for entry in pool if math.isfinite(entry[0])]
    if not finite:
        report.skipped = "InitNO's loss was not finite; the image kept its noise"
        report.seconds = time.perf_counter() - started
        return v, report
    best = min(finite, key=lambda entry: (entry[0], entry[1]))  # the official sort: score, then round
    report.chosen_round, report.succeeded = best[1], best[4]
    result = best[2]
    if not best[4] and not report.interrupted and config.final_steps > 0:
        result, _, _, report.final_steps = _optimise(best[3], loss, config, config.final_steps, stop)
    report.seconds = time.perf_counter() - started
    return result, report


def _optimise(
    start: torch.Tensor, loss: InitialLoss, config: InitnoConfig, max_steps: int, stop: Callable[[], bool]
) -> tuple[torch.Tensor, bool, float, int]:
    """One `fn_initno` call: Adam on a per-element scale exp(log_var / 2) and shift mu of the noise, each step then
    pulled back (Adam on the KL divergence to N(0, I)) until the KL is at most `kl_limit`. Returns (the optimised
    noise, whether it met both targets, its score, the loss evaluations made)."""
    log_var = torch.zeros_like(start, requires_grad=True)
    mu = torch.zeros_like(start, requires_grad=True)
    optimizer = torch.optim.Adam([log_var, mu], lr=config.learning_rate, eps=config.adam_eps)
    succeeded = False
    cross = conflict = math.inf
    steps = 0
    for _ in range(max_steps):
        if stop():
            break
        with torch.enable_grad():
            optimised = start * torch.exp(0.5 * log_var) + mu
            value, cross, conflict = loss(optimised)
        steps += 1
        if not (math.isfinite(cross) and math.isfinite(conflict)):
            break
        if cross < config.cross_target and conflict < config.conflict_target:
            succeeded = True
            break
        optimizer.zero_grad()
        with torch.enable_grad():
            value.backward()
        optimizer.step()
        with torch.enable_grad():
            kl = _kl(log_var, mu)
            while kl.item() > config.kl_limit:
                optimizer.zero_grad()
                kl.backward()
                optimizer.step()
                kl = _kl(log_var, mu)
    with torch.no_grad():
        optimised = (start * torch.exp(0.5 * log_var) + mu).detach()
    if not config.self_cross and conflict <= 1e-6:
        conflict += 1.0  # InitNO ranks a round without a counted conflict below one with it
    return optimised, succeeded, cross + conflict, steps


def _kl(log_var: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """The official `fn_calc_kld_loss_func`: KL(N(mu, exp(log_var)) || N(0, 1)), averaged over the elements."""
    return torch.mean(-0.5 * torch.mean(1 + log_var - mu**2 - log_var.exp()), dim=0)
