"""One sampler run with A&E (the txt2img pass, a hires fix pass, or one img2img batch): set up before the sampler
starts, applied by a wrapper on the CFG denoiser's `forward` that updates the sampler's own latent in place at the
first model call of each step (docs/host-notes.md §2-3), read and released after sampling.

Also here: the registry of attention captures (one per UNet) and the UNet runner the engine differentiates through.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import torch

from lib_ae import AttendAndExcite, AttentionCapture, CaptureError, InSamplerExcitation, StepClock, StepPlan, UNetRunner
from lib_ae.binding import BindingLocation, BindingSelection
from lib_ae.config import ConfigError
from lib_ae.cpu_determinism import check_cpu_reproducibility
from lib_ae.engine import GraphableRunner
from lib_ae.loss import TokenSelection
from lib_ae.params import AEParams
from lib_ae.sampling import LatentSpace
from lib_ae.step_report import read_reports
from lib_ae.tokens import SubjectLocation

from . import graph_safety, host, sgm_timestep
from .host import Denoiser, Processing, TextEncoder
from .report import TITLE, failure_text, log_reports, report_problem, say_once
from .run_state import image_in_job, state_of
from .subjects import (
    Pair,
    PromptTokens,
    SubjectFinder,
    UnsupportedModel,
    straddling_notes,
    text_encoder,
    unbound_note,
)

logger = logging.getLogger("lib_ae.webui")

UNSUPPORTED_SAMPLERS = frozenset({"UniPC", "DPM fast", "DPM adaptive", "Restart"})
"""Their model calls do not map to sampler steps (docs/host-notes.md §3): UniPC corrects from a state the model never
sees, DPM fast/adaptive choose their own evaluations, Restart adds re-noising segments."""
TIMESTEP_SAMPLERS = frozenset({"DDIM", "DDIM CFG++", "PLMS"})
"""CompVisSampler family (sd_samplers_timesteps.py `samplers_timesteps`): the latent is the VP latent and `sigma` the
timestep."""
CUDA_GRAPHS_SETTING = "ae_cuda_graphs"


# -- Captures: one per UNet --------------------------------------------------------------------------------------------

_captures: dict[int, weakref.ReferenceType[AttentionCapture]] = {}
"""id(UNet) -> its capture. Weak: the hooks on the UNet's modules keep a capture alive exactly as long as its UNet,
so an unloaded checkpoint is not kept in memory by this registry."""

CAPTURE_ATTRIBUTE = "_ae_attention_capture"
"""Attribute of a UNet holding the capture attached to it. The UNet outlives a "Reload UI", and a copy of this package
loaded anew (tests, a changed install) starts with an empty `_captures`; the attribute lets it find and remove a
capture left behind instead of hooking every layer a second time."""


def capture_for(unet: torch.nn.Module) -> AttentionCapture:
    """The capture on `unet`, attached on first use; captures on other UNets (a previous model) are removed."""
    ref = _captures.get(id(unet))
    capture = ref() if ref is not None else None
    if capture is not None and capture.unet is unet and capture.attached:
        return capture
    remove_captures()
    stale = getattr(unet, CAPTURE_ATTRIBUTE, None)
    if stale is not None:
        logger.debug("removing an attention capture left on the UNet by an earlier load of %s", TITLE)
        stale.remove()
    capture = AttentionCapture(unet)
    setattr(unet, CAPTURE_ATTRIBUTE, capture)
    _captures[id(unet)] = weakref.ref(capture)
    logger.debug("attention capture attached to %d layers", len(capture.module_names))
    return capture


def remove_captures() -> None:
    """Detach every capture (model change, script unload, a refused run): no hook of ours stays on any module."""
    for ref in list(_captures.values()):
        capture: AttentionCapture | None = ref()
        if capture is None:
            continue
        capture.remove()
        unet = capture.unet
        if getattr(unet, CAPTURE_ATTRIBUTE, None) is capture:
            delattr(unet, CAPTURE_ATTRIBUTE)
    _captures.clear()


# -- What the host gives the engine ------------------------------------------------------------------------------------


def sampler_name(p: Processing) -> str:
    config = getattr(p.sampler, "config", None)
    return str(getattr(config, "name", None) or getattr(p, "sampler_name", "?"))


def unsupported_reason(p: Processing) -> str | None:
    """Why A&E cannot run on this model/sampler, in words; None when it can. Decided from names and attributes only,
    before anything is attached: a refused run costs nothing."""
    model = p.sd_model
    if getattr(model, "is_sd3", False):
        return "SD3 models are not supported (no UNet cross-attention); A&E was not applied"
    name = sampler_name(p)
    if name in UNSUPPORTED_SAMPLERS:
        return f"sampler {name} is not supported (its model calls do not follow the steps); try Euler, DPM++ 2M or DDIM"
    if getattr(getattr(model, "model", None), "diffusion_model", None) is None:
        return "this model has no ldm/sgm UNet (model.diffusion_model); A&E was not applied"
    return None


def make_condition_dict(sd_model: Any, cond: Any, image_cond: torch.Tensor | None) -> dict[str, Any]:
    """The UNet conditioning of sd_samplers_cfg_denoiser.py `CFGDenoiser.forward`: unCLIP models take the image
    embedding as `c_adm`; SDXL conds are dicts (crossattn/vector); SD1/SD2 a tensor. A new dict every call:
    A1111's apply_model casts the dict's entries in place (sd_hijack_unet.py `apply_model`)."""
    if getattr(sd_model.model, "conditioning_key", None) == "crossattn-adm":
        return {"c_crossattn": [cond], "c_adm": image_cond}
    if isinstance(cond, dict):
        return {**cond, "c_concat": [image_cond]}
    return {"c_crossattn": [cond], "c_concat": [image_cond]}


def select_rows(cond: Any, rows: torch.Tensor) -> Any:
    return {key: value[rows] for key, value in cond.items()} if isinstance(cond, dict) else cond[rows]


def use_cuda_graphs(p: Processing) -> bool:
    """Replay the A&E pass as a CUDA graph: on CUDA, when the setting allows it, and not under --lowvram/--medvram
    (`graphs_refused`). SDXL's timestep embedding is computed on the device during the pass (sgm_timestep.py)."""
    if not host.option(CUDA_GRAPHS_SETTING, True) or not host.on_cuda():
        return False
    return graphs_refused(p) is None


def graphs_refused(p: Processing) -> str | None:
    """Why the graph fast path cannot be used on this host although it is asked for: --lowvram/--medvram hooks move
    UNet blocks between devices during the forward (lowvram.py), which no graph can hold. Said once in the console."""
    if not host.option(CUDA_GRAPHS_SETTING, True) or not host.on_cuda():
        return None
    flag = host.low_vram_flag(p.sd_model)
    if flag is None:
        return None
    reason = f"{flag} moves UNet blocks between devices"
    say_once(f"{reason}, which a CUDA graph cannot replay; A&E evaluates eagerly, same result")
    return reason


def heatmap_steps(plan: StepPlan, params: AEParams) -> frozenset[int]:
    """The steps whose subject maps are kept: the last step A&E runs, and with `heatmaps_first_step` the first one."""
    if not params.heatmaps:
        return frozenset()
    active = [step for step in range(plan.steps) if plan.is_active(step)]
    if not active:
        return frozenset()
    return frozenset({active[-1], active[0]} if params.heatmaps_first_step else {active[-1]})


# -- The pass ----------------------------------------------------------------------------------------------------------


class SamplingPass:
    """A&E over one sampler run."""

    def __init__(
        self,
        p: Processing,
        params: AEParams,
        den: Denoiser,
        engine: AttendAndExcite,
        encoder: TextEncoder,
        space: LatentSpace,
        *,
        is_hr: bool,
        plms: bool,
    ) -> None:
        self.p = p
        self.params = params
        self.den = den
        self.engine = engine
        self.space: LatentSpace = space
        self.is_hr = is_hr
        self.plms = plms
        self.finder = SubjectFinder(encoder, params.subject_names, params.normalize_eot) if encoder else None
        self.excitation: InSamplerExcitation | None = None
        self.active = True
        self._locations: dict[tuple[str, int], tuple[tuple[str, ...], SubjectLocation, BindingLocation | None]] = {}
        """(sub-prompt, schedule entry) -> its subjects (typed or suggested), their columns, and with a `bind`
        method the columns of their modifier-noun pairs."""
        self.labels: dict[int, list[str]] = {}
        """Image b -> the subjects found in its prompt, in the order of its maps (heatmap and trace legends)."""
        self.subjects_used: dict[int, tuple[str, ...]] = {}
        """Image b -> the subjects used for it (typed, or suggested: written as "AE subjects used")."""
        self.bound: dict[int, dict[Pair, None]] = {}
        """Image b -> the (modifier, noun) pairs bound at some step, in order (written as "AE bindings")."""
        self.binding_labels: dict[int, list[str]] = {}
        """Image b -> the captions of its binding maps (`StepReport.bind_maps`): each noun, then "red→car"."""
        self._step: int | None = None
        self.finished = False
        self.eager_reason: str | None = None
        """Why this pass evaluated eagerly although CUDA graphs were asked for (shown in the AE trace)."""

    def before_model_call(self, x: torch.Tensor, sigma: torch.Tensor, kwargs: Mapping[str, Any]) -> None:
        """Called by the wrapped forward with the sampler's own tensor; updates it in place at the first call of an
        active step. Never raises an Exception: a failure turns A&E off for the rest of this pass."""
        if not self.active:
            return
        failure: str | None = None
        textinfo = host.progress_text()
        try:
            self._update(x, sigma, kwargs)
        except (ConfigError, CaptureError) as error:
            # The settings do not fit this model or image size; raised before that step changed the latent.
            # Not logged here: report_problem logs the one line the user also reads in the infotext.
            ran = self.excitation is not None and any(r.active for r in self.excitation.reports)
            failure = f"A&E {'stopped at ' + self._where() if ran else 'was not applied'}: {error}"
        except Exception as error:  # includes torch.cuda.OutOfMemoryError; InterruptedException is a BaseException
            logger.exception("%s failed at %s; sampling continues without it", TITLE, self._where())
            failure = failure_text(error, self._where(), host.attention_optimization())
        finally:
            host.show_progress(textinfo)
        if failure is not None:
            # Outside the except block, so the traceback (and the tensors it references) is already released.
            self.active = False
            report_problem(self.p, failure)
            host.free_memory()

    def _where(self) -> str:
        """The step being updated, in the user's 1-based numbering (the model call before the plan exists)."""
        return f"step {self._step + 1}" if self._step is not None else f"model call {self.den.step}"

    def _update(self, x: torch.Tensor, sigma: torch.Tensor, kwargs: Mapping[str, Any]) -> None:
        call = self.den.step
        self._step = None
        if self.excitation is None or call == 0:
            self.excitation = self._start()
        index = self._clock_index(call)
        excitation = self.excitation
        step = excitation.clock.step_of(index) if index is not None else None
        if index is None or step is None or step >= excitation.plan.steps or not excitation.plan.is_active(step):
            return
        self._step = step
        if self.p.sd_model.model.diffusion_model is not self.engine.capture.unet:
            # The refiner (sd_samplers_common.apply_refiner) swapped the model during this pass.
            self.active = False
            report_problem(self.p, "the model changed during sampling (refiner); A&E stopped there")
            return
        cond, image_cond = kwargs["cond"], kwargs["image_cond"]
        conds_list, tensor = host.reconstruct_multicond_batch(cond, call)
        targets = [self._targets(b, cond, call) for b in range(len(conds_list))]
        selections = [excite for excite, _ in targets]
        bindings = [bind for _, bind in targets]
        if all(selection is None for selection in selections) and all(bind is None for bind in bindings):
            return
        # Each image's loss uses its first AND sub-prompt, whose row is the first of its rows in `tensor`
        # (CFGDenoiser.forward: reconstruct_multicond_batch's conds_list, then the rows in that order).
        first_rows = torch.as_tensor([rows[0][0] for rows in conds_list], device=x.device)
        run_unet = self._runner(sigma, select_rows(tensor, first_rows), image_cond)
        max_iterations = self.params.max_refinement_steps

        def on_iteration(step: int, iteration: int) -> None:
            host.show_progress(f"{TITLE}: step {step + 1}, refinement {iteration}/{max_iterations}")

        host.show_progress(f"{TITLE}: step {step + 1}")
        # The report is not read here: reading it may wait for the device; finish() reads them all once.
        excitation.before_model_call(
            index, x, sigma, selections, run_unet, should_stop=host.stop_requested, on_iteration=on_iteration,
            bindings=bindings if self.params.binds else None,
        )

    def _runner(self, sigma: torch.Tensor, cond: Any, image_cond: torch.Tensor | None) -> UNetRunner:
        """The cond-only pass of CFGDenoiser.forward for the given batch rows (`cond` holds one row per image);
        `inner_model` maps the sampler's space (sigma, or the timestep for DDIM/PLMS) to the UNet's input.

        As a `GraphableRunner`: everything that changes between calls (sigma, conditioning, image conditioning) is an
        explicit batch-first input, so that an engine with CUDA graphs can replay the pass; others call it eagerly.
        On an sgm (SDXL) UNet the timestep embedding is computed on the device meanwhile (sgm_timestep.py)."""
        sd_model, inner = self.p.sd_model, self.den.inner_model
        names = sorted(cond) if isinstance(cond, dict) else None
        cond_tensors = tuple(cond[name] for name in names) if names else (cond,)
        has_image_cond = image_cond is not None
        unet = sd_model.model.diffusion_model

        def cond_forward(latent_rows: torch.Tensor, sigma_rows: torch.Tensor, *rest: torch.Tensor) -> object:
            image_rows = rest[0] if has_image_cond else None
            cond_rows = rest[1:] if has_image_cond else rest
            value = dict(zip(names, cond_rows)) if names else cond_rows[0]
            with sgm_timestep.device_side_embedding(unet, host.unet_output_dtype, host.loaded_module):
                return inner(latent_rows, sigma_rows, cond=make_condition_dict(sd_model, value, image_rows))

        inputs = (sigma, *((image_cond,) if has_image_cond else ()), *cond_tensors)
        device = sigma.device
        inputs = tuple(t if t.device == device else t.to(device) for t in inputs)
        key = ("a1111-cond-pass", id(inner), tuple(names or ()), has_image_cond)
        return GraphableRunner(cond_forward, inputs, key=key)

    def _start(self) -> InSamplerExcitation:
        """The step plan, built at the first model call: only then are den.steps/total_steps set (launch_sampling
        runs after process_before_every_sampling)."""
        steps = int(self.den.steps)
        calls_per_step = max(1, int(self.den.total_steps) // steps)
        plan = self.engine.plan(steps)
        logger.debug(
            "%s: %d steps, %d model calls per step, %d altered, refinement at %s",
            TITLE,
            steps,
            calls_per_step,
            plan.alter_steps,
            dict(plan.refinement_thresholds),
        )
        return InSamplerExcitation(
            self.engine, plan, self.space, StepClock(calls_per_step), map_steps=heatmap_steps(plan, self.params)
        )

    def _clock_index(self, call: int) -> int | None:
        """The call index StepClock understands. PLMS makes two model calls in its first step (the second one on a
        temporary latent) and one per step after (sd_samplers_timesteps_impl.py `plms`)."""
        if not self.plms:
            return call
        return None if call == 1 else max(0, call - 1)

    def _targets(self, b: int, cond: Any, call: int) -> tuple[TokenSelection | None, BindingSelection | None]:
        """Image b's subject columns and, with a `bind` method, its modifier-noun columns in the conditioning row in
        effect at model call `call` (None where there is nothing). With `bind` alone the subjects are not excited:
        the engine reads their maps for the trace and the heatmaps only."""
        assert self.finder is not None
        prompts = getattr(self.p, "hr_prompts", None) if self.is_hr else self.p.prompts
        if not prompts or b >= len(prompts):
            return None, None
        text, others = host.first_subprompt(prompts[b])
        tokens = self._prompt_tokens(text)
        schedule = cond.batch[b][0].schedules
        if [entry.end_at_step for entry in schedule] != list(tokens.ends):
            self._report_once(b, f"could not follow the prompt editing schedule of {text!r}; image skipped")
            return None, None
        target = tokens.entry_at(call)
        key = (text, target)
        if key not in self._locations:
            subjects = self.finder.subjects_for(text, tokens, self._schedule_steps()[0])
            location = self.finder.locate(tokens, target, subjects)
            if subjects:
                self._report_location(b, location, tokens, target, others, call)
            else:
                self._report_once(b, "automatic subjects: no noun found in the prompt; type the subject words")
            binding = self._locate_binding(b, text, tokens, target, subjects) if self.params.binds else None
            self._locations[key] = (subjects, location, binding)
        subjects, location, binding = self._locations[key]
        self.labels[b] = list(location.found)
        self.subjects_used[b] = subjects
        if binding is not None:
            self.bound.setdefault(b, {}).update({(modifier, noun): None for modifier, noun, _, _ in binding.bound})
            self.binding_labels[b] = binding_labels(binding)
        return location.selection, binding.selection if binding is not None else None

    def _locate_binding(
        self, b: int, text: str, tokens: PromptTokens, target: int, subjects: tuple[str, ...]
    ) -> BindingLocation | None:
        """The columns of the subjects' modifier-noun pairs in schedule entry `target`, every problem reported (a
        modifier not in the entry, a word split between chunks, nothing to bind, a pair across a chunk boundary)."""
        assert self.finder is not None
        pairs, every = self.finder.pairs_for(text, tokens, self._schedule_steps()[0])
        where = self._entry_span(tokens, target)
        note = unbound_note(pairs, every, subjects)
        if note is not None:
            self._report_once(b, note.removeprefix("AE ") + where)
            return None
        binding = self.finder.locate_bindings(tokens, target, pairs)
        for message in [*binding.messages, *straddling_notes(binding)]:
            self._report_once(b, message.removeprefix("AE ") + where)
        return binding

    def _prompt_tokens(self, text: str) -> PromptTokens:
        assert self.finder is not None
        base_steps, hires_steps = self._schedule_steps()
        return self.finder.prompt_tokens(text, base_steps, hires_steps)

    def _report_location(
        self, b: int, location: SubjectLocation, tokens: PromptTokens, target: int, others: list[str], call: int
    ) -> None:
        """Report what `locate_subjects` found wrong with image b's subjects in schedule entry `target`, precisely:
        which steps a prompt-editing entry covers, when a subject is in another AND sub-prompt (A&E reads only the
        first, whose conditioning row is the image's first), and many absent subjects as one counted message (the
        "AE error" text is cut at MAX_ERROR_TEXT)."""
        assert self.finder is not None
        where = self._entry_span(tokens, target)
        absent = set(location.absent)
        elsewhere: dict[str, int] = {}
        for number, other in enumerate(others, start=2):
            pending = [s for s in location.absent if s not in elsewhere]
            if not pending:
                break
            other_tokens = self._prompt_tokens(other)
            other_location = self.finder.locate(other_tokens, other_tokens.entry_at(call), pending)
            elsewhere.update({s: number for s in other_location.found})
        for message in location.messages:
            if not any(message == f"AE: subject {s!r} is not in the prompt" for s in absent):
                self._report_once(b, message.removeprefix("AE: ") + where)
        for subject, number in elsewhere.items():
            self._report_once(
                b, f"subject {subject!r} is only in AND sub-prompt {number}; A&E reads the first sub-prompt only"
            )
        rest = [s for s in location.absent if s not in elsewhere]
        if len(rest) == 1:
            self._report_once(b, f"subject {rest[0]!r} is not in the prompt{where}")
        elif rest:
            self._report_once(b, f"{len(rest)} subjects are not in the prompt{where}: " + ", ".join(map(repr, rest)))

    def _entry_span(self, tokens: PromptTokens, target: int) -> str:
        """" during steps 2-3 (prompt editing: the prompt then reads '...')" for an entry of a prompt-editing
        schedule, "" for a prompt without editing. Entry i is in effect for model calls ends[i-1]+1 .. ends[i]
        (prompt_parser.reconstruct_multicond_batch), shown as 1-based sampler steps."""
        if len(tokens.ends) < 2:
            return ""
        calls_per_step = self.excitation.clock.calls_per_step if self.excitation is not None else 1
        last_call = max(0, int(self.den.total_steps) - 1)
        first = 0 if target == 0 else tokens.ends[target - 1] + 1
        last = min(tokens.ends[target], last_call)
        lo, hi = first // calls_per_step + 1, max(first, last) // calls_per_step + 1
        steps = f"step {lo}" if lo == hi else f"steps {lo}-{hi}"
        return f" during {steps} (prompt editing: the prompt then reads {tokens.texts[target]!r})"

    def _schedule_steps(self) -> tuple[int, int | None]:
        """The step counts A1111 built this pass's prompt schedules with: first pass `total_steps` of the sampler
        (processing.py `StableDiffusionProcessing.setup_conds`, stored as p.firstpass_steps); hires pass
        (firstpass_steps, hires total steps: `StableDiffusionProcessingTxt2Img.calculate_hr_conds`)."""
        p = self.p
        multiplier = max(1, int(self.den.total_steps) // int(self.den.steps))
        base = int(getattr(p, "firstpass_steps", 0) or p.steps * multiplier)
        if not self.is_hr:
            return base, None
        hires = (getattr(p, "hr_second_pass_steps", 0) or p.steps) * multiplier
        return base, hires

    def _report_once(self, b: int, message: str) -> None:
        report_problem(self.p, message + self._image_suffix(b))

    def _image_suffix(self, b: int, *, always: bool = False) -> str:
        """" (image N)", N counted over the whole job (the infotext of every image carries the same "AE error"),
        when the message is not about all images alike: prompts differ in the batch, or `always` (a fault of one
        image) with more than one image in the job."""
        p = self.p
        batch_size = int(getattr(p, "batch_size", 1) or 1)
        images = batch_size * int(getattr(p, "n_iter", 1) or 1)
        if not (len(set(p.prompts)) > 1 or (always and images > 1)):
            return ""
        return f" (image {image_in_job(p, b) + 1})"

    def finish(self) -> None:
        """After sampling (or an interrupt): read the step reports once, report what they say, free the graphs, and
        take our wrapper off the denoiser. Idempotent."""
        if self.finished:
            return
        self.finished = True
        self.active = False  # inert even if another wrapper on top keeps ours in its chain
        try:
            reports = self.excitation.reports if self.excitation is not None else []
            read_reports(reports)  # one host transfer for the whole pass
            log_reports(reports)
            reported: set[int] = set()
            for report in reports:
                for b in report.skipped_nonfinite:
                    if b not in reported:  # once per image and pass: the step where it first happened
                        reported.add(b)
                        report_problem(
                            self.p,
                            f"non-finite attention loss or gradient at step {report.step + 1}; that update was skipped"
                            + self._image_suffix(b, always=True),
                        )
            fallback = getattr(self.engine, "graph_fallback_reason", None)
            if fallback:
                say_once(f"the CUDA-graph fast path is off ({fallback}); A&E evaluates eagerly, same result")
                self.eager_reason = str(fallback)
        finally:
            self.engine.release_graphs()
            unwrap_forward(self.den)


def binding_labels(location: BindingLocation) -> list[str]:
    """Captions of the engine's binding maps, in their order: per group its noun, then each modifier as
    "modifier→noun" (the modifier's map beside the noun's)."""
    if location.selection is None:
        return []
    words = {}
    for modifier, noun, modifier_columns, noun_columns in location.bound:
        words[noun_columns] = noun
        words[modifier_columns] = modifier
    labels = []
    for group in location.selection.groups:
        noun = words.get(group.noun, "?")
        labels.append(noun)
        labels.extend(f"{words.get(modifier, '?')}\u2192{noun}" for modifier in group.modifiers)
    return labels


# -- Install and release -----------------------------------------------------------------------------------------------


def install(p: Processing, params: AEParams) -> None:
    """Set A&E up for the sampler run about to start (called from process_before_every_sampling). A refused
    sampler or model installs nothing: no capture, no wrapper, no engine (and an idle capture from an earlier run
    is taken off, so the refused run's model calls meet no hook of ours)."""
    reason = unsupported_reason(p)
    if reason is not None:
        remove_captures()
        report_problem(p, reason)
        return
    try:
        encoder = text_encoder(p.sd_model)
        capture = capture_for(p.sd_model.model.diffusion_model)
        graphs = use_cuda_graphs(p)
        guard = graph_safety.guard_for(capture, p.sd_model) if graphs else None
        engine = AttendAndExcite(
            capture, params.to_config(), cuda_graphs=graphs, graph_guard=guard,
            binding=params.to_binding_config() if params.binds else None, excite=params.excites,
        )
    except (CaptureError, UnsupportedModel) as error:
        report_problem(p, f"A&E was not applied: {error}")
        return
    den = p.sampler.model_wrap_cfg
    name = sampler_name(p)
    timesteps = name in TIMESTEP_SAMPLERS or type(den).__name__ == "CFGDenoiserTimesteps"
    sampling_pass = SamplingPass(
        p=p,
        params=params,
        den=den,
        engine=engine,
        encoder=encoder,
        space="vp" if timesteps else "sigma",
        is_hr=bool(getattr(p, "is_hr_pass", False)),
        plms=name == "PLMS",
    )
    sampling_pass.eager_reason = None if graphs else graphs_refused(p)
    if not host.on_cuda():
        warning = check_cpu_reproducibility()
        if warning is not None:
            say_once(warning)
    wrap_forward(den, sampling_pass)
    state_of(p).passes.append(sampling_pass)


def wrap_forward(den: Denoiser, sampling_pass: Any) -> None:
    """Make `den.forward` (an instance attribute, used by nn.Module.__call__) run A&E before the original forward.
    Idempotent per denoiser: img2img reuses one sampler for every batch (processing.py
    `StableDiffusionProcessingImg2Img.init`), so a second install replaces our wrapper instead of stacking another."""
    original: Callable[..., torch.Tensor] = getattr(den.forward, "_ae_original", den.forward)

    def forward(x: torch.Tensor, sigma: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        sampling_pass.before_model_call(x, sigma, kwargs)
        return original(x, sigma, *args, **kwargs)

    forward._ae_original = original  # type: ignore[attr-defined]
    den.forward = forward  # type: ignore[method-assign]


def unwrap_forward(den: Denoiser) -> None:
    """Undo `wrap_forward` after sampling (post_sample), so the sampler A1111 keeps on `p` holds no A&E code or
    state. Only our wrapper is removed: if another extension wrapped on top of it since, that chain is left alone."""
    current = vars(den).get("forward")
    original = getattr(current, "_ae_original", None)
    if original is None:
        return
    if getattr(original, "__self__", None) is den and getattr(original, "__func__", None) is type(den).forward:
        del den.forward  # back to the class's forward, as before wrap_forward
    else:
        den.forward = original  # type: ignore[method-assign]  # the instance attribute someone else had set before us
