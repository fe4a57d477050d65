"""The methods, one objective each: its plan over the sampler's steps and its loss on the captured maps.

An objective is all that differs between methods. The engine (`lib_ae.engine`) evaluates it, refines, updates, replays
graphs and reports the same way for every one. `objective_for(params)` is the only reader of the user's method option;
elsewhere code asks an objective what it needs (`uses_modifier_pairs`), never which method it is.

In the papers' symbols, per image at step i with the aggregated maps A (h, w, T) of the cond-only forward:

    Excite      L = max_s (1 - a_s), a_s = max over pixels of smooth(softmax_100(A)[..., s])
                (Chefer et al. 2023, Algorithm 1; `lib_ae.loss`), plan: alpha_i = 20 sqrt(linspace(1, 0.5)[i]) for
                the first half of the steps, iterative refinement at steps 0/10/20.
    Conform     L = NT-Xent over the subjects' and their modifiers' smoothed maps, this step's and the previous
                step's (Meral et al. 2024, eq. 4; `lib_ae.conform`), plan: A&E's, every refinement iteration run.
    Bind        L_bind of SynGen (Rassin et al. 2023, eq. 3-5; `lib_ae.binding`), plan: beta_i = 20 for the first half
                of the steps, no refinement.
    ExciteBind  L = L_excite + (beta_i / alpha_i) w L_bind, one backward and the update z - alpha_i grad L, so each
                loss moves the latent by its own step; A&E's plan and refinement (which reads L_excite alone).

Every objective also reports A&E's maxima a_s of the subjects it has (the trace and heatmaps show them).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import ClassVar, Literal

import torch

from .binding import BindingSelection, binding_loss, spatial_distributions
from .config import BindingConfig, ConfigError, ExciteConfig, StepPlan
from .conform import (
    OFFICIAL_TEMPERATURE,
    ConformGroups,
    ConformIndex,
    conform_embeddings,
    ntxent_loss,
    self_cross_conform_terms,
)
from .evaluation import LossGroup
from .initno import InitnoConfig, SelfRows, initno_losses
from .loss import TokenSelection, excite_losses, smooth, smoothed_subject_maps, subject_maps, subject_maxima
from .params import METHODS, AEParams

__all__ = [
    "METHODS", "Bind", "Conform", "ConformSelfCross", "Excite", "ExciteBind", "Extras", "Initno", "InitnoSelfCross",
    "Objective", "Purpose",
    "Terms", "objective_for",
]

Purpose = Literal["update", "refine", "initial"]
"""What an evaluation is for: the step's update, a refinement iteration, or the optimisation of the initial noise
(objectives that distinguish them differentiate a different loss for each)."""


@dataclass(frozen=True)
class Extras:
    """What an evaluation hands an objective beyond the cross-attention maps."""

    purpose: Purpose = "update"
    self_rows: SelfRows | None = None  # the group's self-attention rows, for an objective that `reads_self_attention`


@dataclass
class Terms:
    """An objective's terms for the rows of one loss group, on the device (maps on the CPU, with keep_maps)."""

    losses: torch.Tensor  # (R,) A&E's L, the refinement criterion; 0 where the maxima are not finite
    maxima: torch.Tensor  # (R, S) a_s
    maxima_finite: torch.Tensor  # (R,) bool
    bind_losses: torch.Tensor  # (R,) SynGen's L_bind; 0 without binding groups
    objective: torch.Tensor  # (R,) what is differentiated
    maps: list[torch.Tensor]  # keep_maps: per row, (S, h, w) smoothed subject maps
    bind_maps: list[torch.Tensor | None]  # keep_maps: per row, (K, h, w) binding maps, or None
    carry: torch.Tensor | None = None  # (R, carry_width, D): what the next step reads (`Objective.carries`)
    aux: torch.Tensor | None = None  # (R, len(Objective.aux_names)): further per-row terms, for the report


class Objective(ABC):
    """One method. `config` holds what every objective reads the maps with (map size, smoothing, early stop) and A&E's
    schedule."""

    method: ClassVar[str]
    """The method option's value that selects this objective (the infotext's "AE method")."""
    uses_modifier_pairs: ClassVar[bool] = False
    """Whether the loss reads the subjects' (modifier, noun) groups, which the host then locates for each image."""
    computes_binding_loss: ClassVar[bool] = False
    """Whether `Terms.bind_losses` is SynGen's loss (reported per image as `StepReport.bind_loss`); the user is then
    also told why a modifier was not bound (with CONFORM, a subject without a modifier is simply its own group)."""
    carries: ClassVar[bool] = False
    """Whether the loss at step i reads what the evaluation behind step i-1's last update carried (`Terms.carry`)."""
    loss_label: ClassVar[str | None] = None
    """How the trace names `Terms.losses` when it shows them (None: A&E's maxima already say it)."""
    chains_carry: ClassVar[bool] = False
    """With `carries`: every evaluation reads the carry of the evaluation before it (an average over all of them),
    instead of every evaluation of step i reading step i-1's last."""
    reads_self_attention: ClassVar[bool] = False
    """Whether the loss reads self-attention rows (`Extras.self_rows`): the capture then records them."""
    refines_in_official_order: ClassVar[bool] = False
    """Refinement as InitNO's code runs it: each iteration evaluates again (the first at the step's latent: the
    carried average moves), differentiates the `refine` loss, and a final `update` evaluation follows."""
    reads_timestep: ClassVar[bool] = False
    """Whether `start_step` needs the step's DDPM timestep (read on the host: such an objective runs eagerly)."""
    optimises_initial_noise: ClassVar[bool] = False
    """Whether the first step starts with `lib_ae.initno.optimise_initial_noise`."""
    graph_unsafe: ClassVar[str | None] = None
    """Why the evaluation cannot be replayed as a CUDA graph (None: it can)."""
    aux_names: ClassVar[tuple[str, ...]] = ()
    """The names of `Terms.aux`'s columns."""

    def extra_map_labels(self, subjects: Sequence[str]) -> list[str] | None:
        """The labels of the maps an objective keeps in `Terms.bind_maps` for its own purpose (None: SynGen's
        modifier-noun maps, labelled by the host)."""
        return None

    def __init__(self, config: ExciteConfig | None = None) -> None:
        self.config = config or ExciteConfig()

    @abstractmethod
    def plan(self, steps: int) -> StepPlan:
        """What happens at each of `steps` sampler steps."""

    @abstractmethod
    def takes_part(self, selection: TokenSelection | None, binding: BindingSelection | None) -> bool:
        """Whether an image with these targets is evaluated at all."""

    def start_step(  # noqa: B027 - optional hook
        self, plan: StepPlan, step: int, device: torch.device, timestep: float | None = None
    ) -> None:
        """Before a step's evaluations: set the step's device scalars (a captured graph reads them, never bakes one
        in). `timestep`: the step's DDPM timestep, when the sampler gives one."""

    def refinement_target(self, threshold: float) -> float:
        """The value of `Terms.losses` below which refinement stops, for a plan's threshold: A&E's 1 - threshold."""
        return max(0.0, 1.0 - threshold)

    def refinement_unmet(self, loss: float, aux: Sequence[float], target: float) -> bool:
        """Whether a row with this `Terms.losses` value and `Terms.aux` row goes on refining (A&E: loss > target)."""
        return loss > target

    def why_idle(self, selection: TokenSelection | None, binding: BindingSelection | None) -> str | None:
        """Why an image with these targets (found in its prompt) is left alone, for the user; None when it is not."""
        return None

    def index_for(
        self, selection: TokenSelection | None, binding: BindingSelection | None, device: torch.device
    ) -> object:
        """What `terms` needs of one group's targets as device tensors, built once, before any graph capture."""
        return None

    def carry_width(self, selection: TokenSelection | None, binding: BindingSelection | None) -> int:
        """Rows of `Terms.carry` for these targets (0: nothing carried)."""
        return 0

    @abstractmethod
    def terms(
        self, group: LossGroup, attention: torch.Tensor, size: tuple[int, int], keep_maps: bool,
        carried: tuple[torch.Tensor, torch.Tensor] | None = None, extras: Extras | None = None,
    ) -> Terms:
        """The terms of one group's rows from their aggregated maps `attention` (R, h, w, T); `carried`: the rows'
        carry from the previous step (R, carry_width, D) and whether each row has one (R,), for an objective that
        `carries`."""

    def excite_terms(
        self, group: LossGroup, attention: torch.Tensor, size: tuple[int, int], keep_maps: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """A&E's (L, a_s, a_s finite, kept maps) for the group's subjects; zero-width for a group without any."""
        count = attention.shape[0]
        if group.selection is None:
            maxima = attention.new_zeros(count, 0)
            finite = torch.ones(count, dtype=torch.bool, device=attention.device)
            kept = list(attention.new_zeros(count, 0, *size).float().cpu().unbind(0)) if keep_maps else []
            return attention.new_zeros(count), maxima, finite, kept
        cfg = self.config
        maps = smoothed_subject_maps(
            attention, group.selection, smooth_attentions=cfg.smooth_attentions, kernel_size=cfg.kernel_size,
            sigma=cfg.sigma, temperature=cfg.softmax_temperature, index=group.index,
        )
        maxima = subject_maxima(maps)
        kept = list(maps.detach().float().cpu().unbind(0)) if keep_maps else []
        finite = torch.isfinite(maxima).all(dim=-1)
        # A non-finite image contributes a zero loss, which is all it can change.
        losses = torch.where(finite, excite_losses(maxima), torch.zeros_like(maxima[..., 0]))
        return losses, maxima, finite, kept

    @staticmethod
    def binding_terms(
        group: LossGroup, attention: torch.Tensor, size: tuple[int, int], keep_maps: bool
    ) -> tuple[torch.Tensor | None, list[torch.Tensor | None]]:
        """SynGen's L_bind per row (None for a group without binding groups) and, with keep_maps, per row the (K, h, w)
        spatial distributions of each group's noun then its modifiers (first word piece each), as the loss sees
        them."""
        count = attention.shape[0]
        if group.binding is None or not group.binding.groups:
            return None, [None] * count if keep_maps else []
        bind = binding_loss(attention, group.binding, group.binding_index)
        if not keep_maps:
            return bind, []
        columns = [c for g in group.binding.groups for c in (g.noun[0], *(m[0] for m in g.modifiers))]
        distributions = spatial_distributions(attention.detach().float(), columns)  # (R, K, h*w)
        return bind, list(distributions.reshape(count, len(columns), *size).cpu().unbind(0))


def _nothing(
    attention: torch.Tensor, maxima: torch.Tensor, finite: torch.Tensor, maps: list[torch.Tensor], keep_maps: bool
) -> Terms:
    """The terms of rows that have nothing to differentiate: every loss 0, A&E's maxima still reported."""
    count = attention.shape[0]
    zero = attention.new_zeros(count)
    return Terms(zero, maxima, finite, _no_binding(zero), zero, maps, [None] * count if keep_maps else [])


def _no_binding(losses: torch.Tensor) -> torch.Tensor:
    return torch.zeros(losses.shape, dtype=torch.promote_types(losses.dtype, torch.float32), device=losses.device)


class Excite(Objective):
    """Attend-and-Excite: every subject must receive a strong attention peak."""

    method = "excite"

    def plan(self, steps: int) -> StepPlan:
        return self.config.plan(steps)

    def takes_part(self, selection: TokenSelection | None, binding: BindingSelection | None) -> bool:
        return selection is not None and bool(selection.subjects)

    def terms(
        self, group: LossGroup, attention: torch.Tensor, size: tuple[int, int], keep_maps: bool,
        carried: tuple[torch.Tensor, torch.Tensor] | None = None, extras: Extras | None = None,
    ) -> Terms:
        losses, maxima, finite, maps = self.excite_terms(group, attention, size, keep_maps)
        return Terms(losses, maxima, finite, _no_binding(losses), losses, maps,
                     [None] * attention.shape[0] if keep_maps else [])


class Bind(Objective):
    """SynGen's binding alone: each modifier's attention pulled onto its noun's, away from the other words."""

    method = "bind"
    uses_modifier_pairs = True
    computes_binding_loss = True

    def __init__(self, config: ExciteConfig | None = None, binding: BindingConfig | None = None) -> None:
        super().__init__(config)
        self.binding = binding or BindingConfig()

    def plan(self, steps: int) -> StepPlan:
        return self.binding.plan(steps)

    def takes_part(self, selection: TokenSelection | None, binding: BindingSelection | None) -> bool:
        return binding is not None and bool(binding.groups)

    def terms(
        self, group: LossGroup, attention: torch.Tensor, size: tuple[int, int], keep_maps: bool,
        carried: tuple[torch.Tensor, torch.Tensor] | None = None, extras: Extras | None = None,
    ) -> Terms:
        losses, maxima, finite, maps = self.excite_terms(group, attention, size, keep_maps)
        bind, bind_maps = self.binding_terms(group, attention, size, keep_maps)
        objective = self.combined(losses, bind, attention.device)
        return Terms(losses, maxima, finite, _no_binding(losses) if bind is None else bind, objective, maps, bind_maps)

    def combined(self, losses: torch.Tensor, bind: torch.Tensor | None, device: torch.device) -> torch.Tensor:
        """What is differentiated, from A&E's loss and SynGen's (None: a group without binding groups): L_bind."""
        return _no_binding(losses) if bind is None else bind


class ExciteBind(Bind):
    """Both losses in one update, each moving the latent by its own step size."""

    method = "excite+bind"

    def __init__(self, config: ExciteConfig | None = None, binding: BindingConfig | None = None) -> None:
        super().__init__(config, binding)
        self._binding_plans: dict[int, StepPlan] = {}
        self._ratios: dict[torch.device, torch.Tensor] = {}
        """Per device, beta_i / alpha_i * w of the current step."""

    def plan(self, steps: int) -> StepPlan:
        return self.config.plan(steps)

    def takes_part(self, selection: TokenSelection | None, binding: BindingSelection | None) -> bool:
        return (selection is not None and bool(selection.subjects)) or (binding is not None and bool(binding.groups))

    def start_step(self, plan: StepPlan, step: int, device: torch.device, timestep: float | None = None) -> None:
        """L = L_excite + (beta_i / alpha_i) w L_bind, so that z - alpha_i grad L moves the latent by alpha_i along
        A&E's gradient and by beta_i w along SynGen's. alpha_i = 0 (scale factor 0) moves nothing at all."""
        if plan.steps not in self._binding_plans:
            self._binding_plans[plan.steps] = self.binding.plan(plan.steps)
        alpha = plan.step_sizes[step]
        beta = self._binding_plans[plan.steps].step_size(step)
        self._ratio(device).fill_(beta * self.binding.weight / alpha if alpha > 0 else 0.0)

    def _ratio(self, device: torch.device) -> torch.Tensor:
        if device not in self._ratios:
            self._ratios[device] = torch.zeros((), dtype=torch.float64, device=device)
        return self._ratios[device]

    def combined(self, losses: torch.Tensor, bind: torch.Tensor | None, device: torch.device) -> torch.Tensor:
        """L_excite + ratio * L_bind; L_excite alone for a group without binding groups."""
        return losses if bind is None else losses + self._ratio(device) * bind


class Conform(Objective):
    """CONFORM: each subject's attention contrasted against the others', its modifiers' attention kept with it
    (NT-Xent over the smoothed token maps, `lib_ae.conform`). A&E's schedule; refinement runs every iteration at the
    plan's refinement steps (the official code has no threshold), and each step also contrasts against the maps the
    previous step's last evaluation saw."""

    method = "conform"
    uses_modifier_pairs = True
    carries = True
    loss_label = "conform loss"

    def __init__(self, config: ExciteConfig | None = None, temperature: float = OFFICIAL_TEMPERATURE) -> None:
        super().__init__(config)
        if not (isinstance(temperature, (int, float)) and 1e-3 <= temperature <= 1e3):
            raise ConfigError(f"the CONFORM temperature must be a number in [0.001, 1000] (got {temperature!r})")
        self.temperature = float(temperature)

    def plan(self, steps: int) -> StepPlan:
        return self.config.plan(steps)

    def takes_part(self, selection: TokenSelection | None, binding: BindingSelection | None) -> bool:
        # One group has no negatives: its loss is 0 and nothing would move (the official NT-Xent gives 0).
        return ConformGroups.build(selection, binding).groups >= 2

    def refinement_target(self, threshold: float) -> float:
        return -math.inf

    def why_idle(self, selection: TokenSelection | None, binding: BindingSelection | None) -> str | None:
        if selection is None or self.takes_part(selection, binding):
            return None
        return "CONFORM contrasts two subjects or more, and this prompt gives one; the image was made without it"

    def index_for(
        self, selection: TokenSelection | None, binding: BindingSelection | None, device: torch.device
    ) -> ConformIndex | None:
        if selection is None:
            return None
        return ConformIndex.build(selection, ConformGroups.build(selection, binding), device)

    def carry_width(self, selection: TokenSelection | None, binding: BindingSelection | None) -> int:
        return len(ConformGroups.build(selection, binding).columns)

    softmax_embeddings: ClassVar[bool] = True
    """`softmax_normalize`: the embeddings are the token maps re-softmaxed over the tokens (else the raw maps)."""
    smooth_embeddings: ClassVar[bool] = True
    """`do_smoothing` (with the configuration's `smooth_attentions`)."""

    def terms(
        self, group: LossGroup, attention: torch.Tensor, size: tuple[int, int], keep_maps: bool,
        carried: tuple[torch.Tensor, torch.Tensor] | None = None, extras: Extras | None = None,
    ) -> Terms:
        _, maxima, finite, maps = self.excite_terms(group, attention, size, keep_maps)
        if group.objective_index is None:  # no subjects: nothing to contrast
            return _nothing(attention, maxima, finite, maps, keep_maps)
        losses, embeddings, bind_maps = self.contrast(group, attention, size, keep_maps, carried)
        return Terms(losses, maxima, finite, _no_binding(losses), losses, maps, bind_maps, embeddings.detach())

    def contrast(
        self, group: LossGroup, attention: torch.Tensor, size: tuple[int, int], keep_maps: bool,
        carried: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor | None]]:
        """(NT-Xent per row, this step's embeddings (R, N, D), with keep_maps the maps of each binding group)."""
        count = attention.shape[0]
        index = group.objective_index
        cfg = self.config
        embeddings = conform_embeddings(
            attention, index, smooth_maps=cfg.smooth_attentions and self.smooth_embeddings,
            kernel_size=cfg.kernel_size, sigma=cfg.sigma, softmax_normalize=self.softmax_embeddings,
        )  # (R, N, D)
        tokens = embeddings.shape[-2]
        classes, valid = index.classes, None
        everything = embeddings
        if carried is not None:
            previous, has_previous = carried
            # Each token, then its previous step's map (the official order), the latter only where there is one.
            everything = torch.stack([embeddings, previous[:, :tokens].to(embeddings.dtype)], dim=-2).flatten(-3, -2)
            classes = classes.repeat_interleave(2)
            valid = torch.stack(
                [torch.ones_like(has_previous[:, None].expand(count, tokens)),
                 has_previous[:, None].expand(count, tokens)], dim=-1,
            ).flatten(-2)
        losses = ntxent_loss(everything, classes, valid, self.temperature)
        bind_maps: list[torch.Tensor | None] = [None] * count if keep_maps else []
        if keep_maps and group.binding is not None and group.binding.groups:
            columns = [c for g in group.binding.groups for c in (g.noun[0], *(m[0] for m in g.modifiers))]
            tokens_of = ConformGroups.build(group.selection, group.binding).columns
            position = {column: k for k, column in enumerate(tokens_of)}
            shown = [position[c] for c in columns if c in position]
            if len(shown) == len(columns):
                picked = embeddings.detach().float()[:, shown].reshape(count, len(shown), *size).cpu()
                bind_maps = list(picked.unbind(0))
        return losses, embeddings, bind_maps


class ConformSelfCross(Conform):
    """Self-Cross guidance on CONFORM, as the authors run it (run_selfcross+conform.py): while a group token's peak is
    weak (its top-4 mean below 0.5) that deficit alone; while the noise is high (DDPM timestep above 881) CONFORM's
    contrast, of the raw maps (neither re-softmaxed nor smoothed); after that the deficit plus the overlap of each
    token's self-attention, gathered over its Otsu region, with the other groups' cross-attention
    (`lib_ae.conform.self_cross_conform_terms`). On SD2 (`sd2`) the authors skip the first case. Its schedule is the
    run script's: updates over the first 40 of 50 steps, 20 refinement iterations at steps 1, 10 and 20."""

    method = "conform+selfcross"
    reads_self_attention = True
    reads_timestep = True
    graph_unsafe = "Self-Cross reads each evaluation's maps on the host (Otsu's threshold of every token's map)"
    loss_label = "self-cross conform loss"
    softmax_embeddings = False
    smooth_embeddings = False
    CONTRAST_ABOVE: ClassVar[float] = 881.0
    """The official `t > 881`: the DDPM timesteps at which the contrast alone is the loss."""

    def __init__(self, config: ExciteConfig | None = None, temperature: float = OFFICIAL_TEMPERATURE,
                 sd2: bool = False) -> None:
        super().__init__(config, temperature)
        self.sd2 = sd2
        self._timesteps: dict[torch.device, torch.Tensor] = {}

    def plan(self, steps: int) -> StepPlan:
        return replace(self.config, thresholds=dict(SELF_CROSS_CONFORM_REFINEMENT), alter_fraction=0.8).plan(steps)

    def start_step(self, plan: StepPlan, step: int, device: torch.device, timestep: float | None = None) -> None:
        if timestep is None:
            raise ConfigError("Self-Cross on CONFORM needs the step's DDPM timestep (the sampler gave none)")
        self._timestep(device).fill_(float(timestep))

    def _timestep(self, device: torch.device) -> torch.Tensor:
        if device not in self._timesteps:
            self._timesteps[device] = torch.zeros((), dtype=torch.float64, device=device)
        return self._timesteps[device]

    def terms(
        self, group: LossGroup, attention: torch.Tensor, size: tuple[int, int], keep_maps: bool,
        carried: tuple[torch.Tensor, torch.Tensor] | None = None, extras: Extras | None = None,
    ) -> Terms:
        _, maxima, finite, maps = self.excite_terms(group, attention, size, keep_maps)
        index = group.objective_index
        if index is None or extras is None or extras.self_rows is None:
            return _nothing(attention, maxima, finite, maps, keep_maps)
        contrast, embeddings, bind_maps = self.contrast(group, attention, size, keep_maps, carried)
        cross, self_cross = self_cross_conform_terms(attention, index, extras.self_rows)
        # Above 881 to within 1e-6: a sigma-space timestep is interpolated from sigma, and DDIM's 881 is not above.
        early = self._timestep(attention.device) > self.CONTRAST_ABOVE + 1e-6
        later = torch.where(early, contrast, cross + self_cross)
        losses = later if self.sd2 else torch.where(cross > 0.5, cross, later)
        return Terms(losses, maxima, finite, _no_binding(losses), losses, maps, bind_maps, embeddings.detach())


class Initno(Objective):
    """InitNO: the initial noise optimised before sampling (a cross-attention response, a self-attention conflict and
    the peaks' clean regions, kept near N(0, I)), then A&E's updates, with refinement at steps 10 and 20 of 50 on the
    joint loss (`lib_ae.initno`)."""

    method = "initno"
    carries = True
    chains_carry = True
    reads_self_attention = True
    refines_in_official_order = True
    optimises_initial_noise = True
    graph_unsafe = "InitNO reads each evaluation's maps on the host (Otsu's threshold of every subject's map)"
    aux_names = ("cross", "clean", "align", "conflict")
    self_cross: ClassVar[bool] = False

    def __init__(self, config: ExciteConfig | None = None, initno: InitnoConfig | None = None) -> None:
        super().__init__(config)
        self.initno = initno or InitnoConfig(self_cross=self.self_cross, top_k=16 if self.self_cross else 1)
        if self.initno.self_cross != self.self_cross:
            raise ConfigError(f"{type(self).__name__} needs an InitnoConfig with self_cross={self.self_cross}")

    def plan(self, steps: int) -> StepPlan:
        return replace(self.config, thresholds=dict(INITNO_REFINEMENT)).plan(steps)

    def takes_part(self, selection: TokenSelection | None, binding: BindingSelection | None) -> bool:
        return selection is not None and bool(selection.subjects)

    def refinement_target(self, threshold: float) -> float:
        return self.initno.cross_target

    def refinement_unmet(self, loss: float, aux: Sequence[float], target: float) -> bool:
        return loss > target or aux[3] > self.initno.conflict_target

    def carry_width(self, selection: TokenSelection | None, binding: BindingSelection | None) -> int:
        return len(selection.subjects) if selection is not None else 0

    def extra_map_labels(self, subjects: Sequence[str]) -> list[str] | None:
        """Beside each subject's cross-attention map, the self-attention map its conflict term compares: at its peak
        (InitNO), or gathered over its Otsu region (Self-Cross)."""
        return [f"{subject} (self-attention)" for subject in subjects]

    def terms(
        self, group: LossGroup, attention: torch.Tensor, size: tuple[int, int], keep_maps: bool,
        carried: tuple[torch.Tensor, torch.Tensor] | None = None, extras: Extras | None = None,
    ) -> Terms:
        extras = extras or Extras()
        count = attention.shape[0]
        if group.selection is None or extras.self_rows is None:
            zero = attention.new_zeros(count)
            maxima = attention.new_zeros(count, 0)
            finite = torch.ones(count, dtype=torch.bool, device=attention.device)
            none: list[torch.Tensor | None] = [None] * count if keep_maps else []
            kept = list(attention.new_zeros(count, 0, *size).float().cpu().unbind(0)) if keep_maps else []
            return Terms(zero, maxima, finite, _no_binding(zero), zero, kept, none, None, attention.new_zeros(count, 4))
        cfg = self.config
        raw = subject_maps(attention, group.selection, cfg.softmax_temperature, index=group.index)
        smoothed = smooth(raw, cfg.kernel_size, cfg.sigma) if cfg.smooth_attentions else raw
        maxima = subject_maxima(smoothed)
        finite = torch.isfinite(maxima).all(dim=-1)
        cache, has_cache = (None, None) if carried is None else carried
        parts = initno_losses(
            raw, smoothed, extras.self_rows, self.initno, cache, has_cache, kernel_size=cfg.kernel_size,
            sigma=cfg.sigma, initial=extras.purpose == "initial",
        )
        differentiated = {"update": parts.update, "refine": parts.joint, "initial": parts.initial}[extras.purpose]
        losses = torch.where(finite, parts.update, torch.zeros_like(parts.update))
        maps = list(smoothed.detach().float().cpu().unbind(0)) if keep_maps else []
        conflict_maps: list[torch.Tensor | None] = list(parts.self_maps.float().cpu().unbind(0)) if keep_maps else []
        aux = torch.stack([parts.cross, parts.clean, parts.align, parts.conflict], dim=-1).detach()
        carry = parts.cache if extras.purpose != "initial" else None
        return Terms(losses, maxima, finite, _no_binding(losses), differentiated, maps, conflict_maps, carry, aux)


class InitnoSelfCross(Initno):
    """Self-Cross guidance on InitNO: InitNO's conflict replaced by the overlap of each subject's self-attention
    (gathered over its Otsu region, weighted by its cross-attention) with every other subject's cross-attention, and
    counted in every update; the cross loss averages each map's 16 highest values (the published runs' K)."""

    method = "initno+selfcross"
    self_cross = True


SELF_CROSS_CONFORM_REFINEMENT: Mapping[int, float] = {1: 1.0, 10: 1.0, 20: 1.0}
"""The run script's `iterative_refinement_steps=[1, 10, 20]` (of 50); CONFORM's refinement has no threshold."""

INITNO_REFINEMENT: Mapping[int, float] = {10: 0.8, 20: 0.8}
"""InitNO's refinement steps (of 50) and threshold (`_perform_iterative_refinement_step(threshold=0.8)`: the cross
loss's target 0.2); its conflict's target is 0.3."""

OBJECTIVES: Mapping[str, type[Objective]] = {
    kind.method: kind for kind in (Excite, Bind, ExciteBind, Conform, Initno, InitnoSelfCross, ConformSelfCross)
}
"""The method option's value -> its objective, in the order the UI lists them (`lib_ae.params.METHODS`)."""
if tuple(OBJECTIVES) != METHODS:
    raise AssertionError(f"the method choices {METHODS} are not the objectives {tuple(OBJECTIVES)}")


def excite_config(params: AEParams) -> ExciteConfig:
    """The maps' and A&E's configuration from the user's parameters (the defaults give exactly `ExciteConfig()`)."""
    side = params.attention_res
    return ExciteConfig(
        step_size=params.scale_factor,
        alter_fraction=params.alter_fraction,
        thresholds=dict(params.threshold_steps),
        max_refinement_iterations=params.max_refinement_steps,
        smooth_attentions=params.smooth_attentions,
        sigma=params.sigma,
        kernel_size=params.kernel_size,
        attention_res=None if side == 0 else (side, side),
        normalize_eot=params.normalize_eot == "on",  # 'auto' is resolved by the host (unresolved: off)
    )


def binding_config(params: AEParams) -> BindingConfig:
    """SynGen's schedule: the binding step size, over the same fraction of the steps as A&E's updates (the official
    25 of 50 is the default 0.5)."""
    return BindingConfig(step_size=params.bind_step_size, intervention_fraction=params.alter_fraction)


def objective_for(params: AEParams, *, sd2: bool = False) -> Objective:
    """The objective of the user's method option, configured from their parameters; `sd2`: the model is of the SD2
    family (Self-Cross on CONFORM then follows the authors' SD 2.1 rule)."""
    kind = OBJECTIVES[params.method]
    if issubclass(kind, Bind):
        return kind(excite_config(params), binding_config(params))
    if issubclass(kind, ConformSelfCross):
        return kind(excite_config(params), params.conform_temperature, sd2=sd2)
    if issubclass(kind, Conform):
        return kind(excite_config(params), params.conform_temperature)
    if issubclass(kind, Initno):
        return kind(excite_config(params))
    return kind(excite_config(params))
