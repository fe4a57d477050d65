"""One sampler run with A&E (the txt2img pass, a hires fix pass, or one img2img batch): set up before the sampler
starts, applied by a wrapper on the CFG denoiser's `forward` that updates the sampler's own latent in place at the
first model call of each step (docs/host-notes.md §2-3), read and released after sampling.

Also here: the registry of attention captures (one per UNet) and the UNet runner the engine differentiates through.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import weakref
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from typing import Any, Protocol

import torch
from torch import nn

from lib_ae import AttendAndExcite, AttentionCapture, CaptureError, UNetRunner
from lib_ae.cpu_determinism import check_cpu_reproducibility
from lib_ae.evaluation import Target
from lib_ae.graphs import GraphableRunner, GraphConditions
from lib_ae.in_sampler import LatentSpace, seeded_noise
from lib_ae.objectives import objective_for
from lib_ae.params import AEParams
from lib_ae.pass_memory import MEMORY_MODES, MemoryMode, PassAttention, PassMemory
from lib_ae.sampling_run import SamplingRun
from lib_ae.targeting import ImageTargeting, PassSteps, TextEncoder

from . import controlnet, graph_safety, host, sgm_timestep
from .host import Denoiser, Processing
from .report import TITLE, failure_text, image_in_job, report_problem, say_once
from .subjects import UnsupportedModel, subject_finder, text_encoder

logger = logging.getLogger("lib_ae.webui")

UNSUPPORTED_SAMPLERS = frozenset({"UniPC", "DPM fast", "DPM adaptive", "Restart"})
"""Their model calls do not map to sampler steps (docs/host-notes.md §3): UniPC corrects from a state the model never
sees, DPM fast/adaptive choose their own evaluations, Restart adds re-noising segments."""
TIMESTEP_SAMPLERS = frozenset({"DDIM", "DDIM CFG++", "PLMS"})
"""CompVisSampler family (sd_samplers_timesteps.py `samplers_timesteps`): the latent is the VP latent and `sigma` the
timestep."""
CUDA_GRAPHS_SETTING = "ae_cuda_graphs"
PASS_MEMORY_SETTING = "ae_pass_memory"


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


def clock_index(call: int, *, plms: bool) -> int | None:
    """The call index `StepClock` understands. PLMS makes two model calls in its first step (the second one on a
    temporary latent) and one per step after (sd_samplers_timesteps_impl.py `plms`)."""
    if not plms:
        return call
    return None if call == 1 else max(0, call - 1)


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


def pass_memory() -> PassMemory:
    """How the gradient pass bounds its memory (`lib_ae.pass_memory`): the setting's mode ("auto": recompute only
    where keeping the activations would not fit the free memory), never recomputation under --lowvram (its blocks
    leave the GPU after their forward), and the pass's own attention with A1111's upcast rule and hypernetworks."""
    mode: MemoryMode = host.option(PASS_MEMORY_SETTING, "auto")
    if mode not in MEMORY_MODES:
        mode = "auto"
    if host.blocks_leave_the_device():
        mode = "keep"
    return PassMemory(mode, PassAttention(host.upcast_attention(), host.attention_context_transform()))


def a1111_runner(p: Processing, den: Denoiser, sigma: torch.Tensor, cond: Any, image_cond: torch.Tensor | None
                 ) -> UNetRunner:
    """The cond-only pass of CFGDenoiser.forward for the given batch rows (`cond` holds one row per image);
    `inner_model` maps the sampler's space (sigma, or the timestep for DDIM/PLMS) to the UNet's input.

    As a `GraphableRunner`: everything that changes between calls (sigma, conditioning, image conditioning) is an
    explicit batch-first input, so that an engine with CUDA graphs can replay the pass; others call it eagerly.
    On an sgm (SDXL) UNet the timestep embedding is computed on the device meanwhile (sgm_timestep.py)."""
    sd_model, inner = p.sd_model, den.inner_model
    names = sorted(cond) if isinstance(cond, dict) else None
    cond_tensors = tuple(cond[name] for name in names) if names else (cond,)
    has_image_cond = image_cond is not None
    unet = sd_model.model.diffusion_model

    def cond_forward(latent_rows: torch.Tensor, sigma_rows: torch.Tensor, *rest: torch.Tensor) -> object:
        image_rows = rest[0] if has_image_cond else None
        cond_rows = rest[1:] if has_image_cond else rest
        value = dict(zip(names, cond_rows)) if names else cond_rows[0]
        with controlnet.pass_scope(unet, host.loaded_module), sgm_timestep.device_side_embedding(
            unet, host.unet_output_dtype, host.loaded_module, controlnet.embedding_namespaces(unet)
        ):
            return inner(latent_rows, sigma_rows, cond=make_condition_dict(sd_model, value, image_rows))

    inputs = (sigma, *((image_cond,) if has_image_cond else ()), *cond_tensors)
    device = sigma.device
    inputs = tuple(t if t.device == device else t.to(device) for t in inputs)
    key = ("a1111-cond-pass", id(inner), tuple(names or ()), has_image_cond)
    return GraphableRunner(cond_forward, inputs, key=key)


class UnetHost(Protocol):
    """What differs between the hosts that keep A1111's extension surface (A1111; Forge and Forge Neo:
    `lib_ae.forge.model.ForgeUnet`): where the UNet is, how the pass calls its conditional forward, and what must
    surround the pass. `lib_ae.webui` asks nothing else of a host's model."""

    name: str

    def unsupported_reason(self, p: Processing, sampler: str) -> str | None:
        """Why A&E cannot run with this model and sampler, from names and attributes only (None: it can)."""

    def unet(self, p: Processing) -> nn.Module:
        """The module whose attention layers are captured (the same object for as long as the model is loaded)."""

    def cuda_graphs(self, p: Processing) -> tuple[bool, str | None]:
        """(replay the pass as a CUDA graph, why not although the setting asks for it)."""

    def pass_memory(self) -> PassMemory: ...

    def graph_conditions(self, capture: AttentionCapture, p: Processing) -> GraphConditions:
        """What the graph path must know in this host (asked only where `cuda_graphs` said yes)."""

    def runner(self, p: Processing, den: Denoiser, sigma: torch.Tensor, cond: Any, image_cond: torch.Tensor | None,
               space: LatentSpace) -> UNetRunner:
        """The conditional pass for one row per image (`cond`), in the sampler's `space`."""

    def gradient_scope(self, unet: nn.Module, x: torch.Tensor, sigma: torch.Tensor
                       ) -> AbstractContextManager[tuple[torch.Tensor, torch.Tensor]]:
        """Around one step's update: the latent and sigma the update works on, written back into `x` on exit."""

    def outside_inference(self) -> AbstractContextManager[None]:
        """Around whatever makes tensors the run keeps between steps."""


class A1111Unet:
    """`UnetHost` for A1111: ldm's / sgm's UNet at `sd_model.model.diffusion_model`, called through the denoiser's
    `inner_model`; the sampler's latent is updated in place, as it is."""

    name = "A1111"

    def unsupported_reason(self, p: Processing, sampler: str) -> str | None:
        return unsupported_reason(p)

    def unet(self, p: Processing) -> nn.Module:
        return p.sd_model.model.diffusion_model  # type: ignore[no-any-return]

    def cuda_graphs(self, p: Processing) -> tuple[bool, str | None]:
        graphs = use_cuda_graphs(p)
        return graphs, None if graphs else graphs_refused(p)

    def pass_memory(self) -> PassMemory:
        return pass_memory()

    def graph_conditions(self, capture: AttentionCapture, p: Processing) -> GraphConditions:
        return graph_safety.guard_for(capture, p.sd_model)

    def runner(self, p: Processing, den: Denoiser, sigma: torch.Tensor, cond: Any, image_cond: torch.Tensor | None,
               space: LatentSpace) -> UNetRunner:
        return a1111_runner(p, den, sigma, cond, image_cond)

    def gradient_scope(self, unet: nn.Module, x: torch.Tensor, sigma: torch.Tensor
                       ) -> AbstractContextManager[tuple[torch.Tensor, torch.Tensor]]:
        return contextlib.nullcontext((x, sigma))

    def outside_inference(self) -> AbstractContextManager[None]:
        return contextlib.nullcontext()


def unet_host() -> UnetHost:
    """The running host's `UnetHost`: Forge's where `host.FORGE` (told at import), else A1111's."""
    if host.FORGE:
        from lib_ae.forge.model import ForgeUnet

        return ForgeUnet(pass_memory(), bool(host.option(CUDA_GRAPHS_SETTING, True)) and host.on_cuda())
    return A1111Unet()


# -- The pass ----------------------------------------------------------------------------------------------------------


class SamplingPass:
    """A&E over one A1111 sampler run: the `SamplingRun` fed from the CFG denoiser's model calls."""

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
        unet_host: UnetHost | None = None,
    ) -> None:
        self.p = p
        self.unet_host: UnetHost = unet_host or A1111Unet()
        self.params = params
        self.den = den
        self.is_hr = is_hr
        self.plms = plms
        self.targeting = ImageTargeting(
            subject_finder(encoder, params.subject_names, params.normalize_eot == "on"),
            engine.objective,
            self._report_once,
        )
        """Per image: its targets, and what was found for the infotext, the trace and the heatmaps."""
        self.run = SamplingRun(
            engine, self.targeting, space, report=lambda message: report_problem(p, message),
            heatmaps=params.heatmaps, heatmaps_first_step=params.heatmaps_first_step,
        )

    def before_model_call(self, x: torch.Tensor, sigma: torch.Tensor, kwargs: Mapping[str, Any]) -> None:
        """Called by the wrapped forward with the sampler's own tensor; updates it in place at the first call of an
        active step. Never raises an Exception: a failure turns A&E off for the rest of this pass."""
        if not self.run.active:
            return
        failure: str | None = None
        textinfo = host.progress_text()
        try:
            self._update(x, sigma, kwargs)
        except Exception as error:  # includes torch.cuda.OutOfMemoryError; InterruptedException is a BaseException
            failure = self.run.failure(error, self.den.step, self._advice)
        finally:
            host.show_progress(textinfo)
        if failure is not None:
            # Outside the except block, so the traceback (and the tensors it references) is already released.
            report_problem(self.p, failure)
            host.free_memory()

    def _advice(self, error: Exception, where: str) -> str:
        evaluator = self.run.engine.evaluator
        recomputed = evaluator.memory.mode == "recompute" or "recompute" in evaluator.memory_modes_used
        return failure_text(error, where, recomputed)

    def _update(self, x: torch.Tensor, sigma: torch.Tensor, kwargs: Mapping[str, Any]) -> None:
        call = self.den.step
        if self.run.excitation is None or call == 0:
            # At the first model call: only then are den.steps/total_steps set (launch_sampling runs after
            # process_before_every_sampling).
            steps = int(self.den.steps)
            with self.unet_host.outside_inference():
                self.run.start(steps, max(1, int(self.den.total_steps) // steps), **self._start_options(x))
        index = clock_index(call, plms=self.plms)
        if self.run.due_step(index) is None:
            return
        assert index is not None
        unet = self.unet_host.unet(self.p)
        if unet is not self.run.engine.capture.unet:
            # The refiner (sd_samplers_common.apply_refiner) swapped the model during this pass.
            self.run.stop("the model changed during sampling (refiner); A&E stopped there")
            return
        cond, image_cond = kwargs["cond"], kwargs["image_cond"]
        conds_list, tensor = host.reconstruct_multicond_batch(cond, call)
        targets = [self._targets(b, cond, call) for b in range(len(conds_list))]
        # Each image's loss uses its first AND sub-prompt, whose row is the first of its rows in `tensor`
        # (CFGDenoiser.forward: reconstruct_multicond_batch's conds_list, then the rows in that order).
        first_rows = torch.as_tensor([rows[0][0] for rows in conds_list], device=x.device)
        run_unet = self.unet_host.runner(self.p, self.den, sigma, select_rows(tensor, first_rows), image_cond,
                                         self.run.space)
        with self.unet_host.gradient_scope(unet, x, sigma) as (latent, latent_sigma):
            self.run.apply(index, latent, latent_sigma, targets, run_unet, should_stop=host.stop_requested,
                           progress=host.show_progress)

    def _start_options(self, x: torch.Tensor) -> dict[str, Any]:
        """The DDPM timestep of a sigma (k-diffusion's `sigma_to_t`), for Self-Cross on CONFORM; for InitNO: its
        rounds' noise drawn from each image's seed (`seeded_noise`), scaled as A1111 scales the first latent's
        (KDiffusionSampler.sample: `noise * sigmas[0]`, or `* sqrt(1 + sigmas[0]^2)` with the "SGM noise
        multiplier" option; the timestep samplers start from the noise itself), only on txt2img's first pass, whose
        first latent is noise."""
        p = self.p
        seeds = list(getattr(p, "seeds", None) or [])
        if len(seeds) < x.shape[0]:
            seeds += [int(getattr(p, "seed", 0) or 0) + k for k in range(len(seeds), x.shape[0])]
        sgm = self.run.space == "sigma" and bool(host.option("sgm_noise_multiplier", False))
        txt2img = not getattr(p, "init_images", None) and not self.is_hr
        sigma_to_t = getattr(self.den.inner_model, "sigma_to_t", None)
        return {
            "fresh_noise": seeded_noise(x.shape[1:], seeds),
            "timestep_of": sigma_to_t if self.run.space == "sigma" else None,
            "noise_scale": (lambda s: torch.sqrt(1 + s * s)) if sgm else None,
            "optimise_noise": txt2img,
        }

    def _targets(self, b: int, cond: Any, call: int) -> Target:
        """Image b's targets in the conditioning row in effect at model call `call` (`ImageTargeting.targets`)."""
        prompts = getattr(self.p, "hr_prompts", None) if self.is_hr else self.p.prompts
        if not prompts or b >= len(prompts):
            return None, None
        text, others = host.first_subprompt(prompts[b])
        ends = host.schedule_ends(cond, b)
        return self.targeting.targets(b, text, others, ends, call, self._pass_steps())

    def _pass_steps(self) -> PassSteps:
        """The step counts A1111 built this pass's prompt schedules with: first pass `total_steps` of the sampler
        (processing.py `StableDiffusionProcessing.setup_conds`, stored as p.firstpass_steps); hires pass
        (firstpass_steps, hires total steps: `StableDiffusionProcessingTxt2Img.calculate_hr_conds`)."""
        p = self.p
        multiplier = max(1, int(self.den.total_steps) // int(self.den.steps))
        base = int(getattr(p, "firstpass_steps", 0) or p.steps * multiplier)
        hires = (getattr(p, "hr_second_pass_steps", 0) or p.steps) * multiplier if self.is_hr else None
        excitation = self.run.excitation
        calls_per_step = excitation.clock.calls_per_step if excitation is not None else 1
        return PassSteps(base, hires, calls_per_step, max(0, int(self.den.total_steps) - 1))

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
        """After sampling (or an interrupt): the run's reports read and reported (`SamplingRun.finish`), the graphs
        freed, and our wrapper taken off the denoiser. Idempotent."""
        try:
            self.run.finish(lambda b: self._image_suffix(b, always=True))
            fallback = self.run.engine.graph_fallback_reason
            if fallback:
                say_once(f"the CUDA-graph fast path is off ({fallback}); A&E evaluates eagerly, same result")
        finally:
            unwrap_forward(self.den)


# -- Install and release -----------------------------------------------------------------------------------------------


def for_model(params: AEParams, sd_model: Any) -> AEParams:
    """`params` with "auto" settings resolved for the loaded model: the prompt-only softmax (the official SD 2.1 mode)
    on for an SD2-family checkpoint, whose OpenCLIP text encoder the authors ran it with, off for the others. The
    infotext then records what the image was made with."""
    if params.normalize_eot != "auto":
        return params
    return dataclasses.replace(params, normalize_eot="on" if host.is_sd2(sd_model) else "off")


def install(p: Processing, params: AEParams) -> SamplingPass | None:
    """Set A&E up for the sampler run about to start (called from process_before_every_sampling); the pass, which
    post_sample reads and releases, or None when nothing was installed. A refused
    sampler or model installs nothing: no capture, no wrapper, no engine (and an idle capture from an earlier run
    is taken off, so the refused run's model calls meet no hook of ours)."""
    unet_host_ = unet_host()
    reason = unet_host_.unsupported_reason(p, sampler_name(p))
    if reason is not None:
        remove_captures()
        report_problem(p, reason)
        return None
    try:
        encoder = text_encoder(p.sd_model)
        capture = capture_for(unet_host_.unet(p))
        graphs, refused = unet_host_.cuda_graphs(p)
        guard = unet_host_.graph_conditions(capture, p) if graphs else None
        objective = objective_for(params, sd2=host.is_sd2(p.sd_model))
        with unet_host_.outside_inference():  # the engine keeps tensors (the smoothing kernel) for every step
            engine = AttendAndExcite(capture, objective, cuda_graphs=graphs, graph_guard=guard,
                                     pass_memory=unet_host_.pass_memory())
    except (CaptureError, UnsupportedModel) as error:
        report_problem(p, f"A&E was not applied: {error}")
        return None
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
        unet_host=unet_host_,
    )
    sampling_pass.run.eager_reason = refused
    if not host.on_cuda():
        warning = check_cpu_reproducibility()
        if warning is not None:
            say_once(warning)
    wrap_forward(den, sampling_pass)
    return sampling_pass


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
