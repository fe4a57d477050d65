"""Attend-and-Excite for the AUTOMATIC1111 Stable Diffusion WebUI v1.10.1: the one file the WebUI loads from us.

The algorithm lives in `lib_ae` (plain torch, no WebUI imports); this file adapts it to the host:

1. Host facade: the few WebUI objects used here, typed as Protocols; every `modules.*` import is in this section.
2. Parameters: script args (+ X/Y/Z overrides) -> `lib_ae.params.AEParams`; the infotext keys we own.
3. Sampling: one `AttentionCapture` per UNet (module-level registry), and a wrapper on the sampler's CFG denoiser
   `forward` that applies the A&E update in place to the sampler's own latent at the first model call of each step
   (docs: host-api.md §0.3, §2.7, §3).
4. The Script: an AlwaysVisible accordion whose controls are generated from `lib_ae.params.PARAMS`.
5. Settings (defaults of the advanced controls) and X/Y/Z plot axes, registered through `script_callbacks`.

When A&E is disabled the hooks return at once: nothing is attached or wrapped and no infotext key is written, so the
output is bit-identical to a WebUI without the extension. Any failure inside A&E is logged, reported in the image's
infotext under "AE error", and sampling continues without A&E: the image is never lost.
"""

from __future__ import annotations

import gc
import logging
import weakref
from typing import Any, Callable, Mapping, Protocol, Sequence

import gradio as gr
import torch

# -- 1. Host facade ---------------------------------------------------------------------------------------------------
# The WebUI modules this extension uses (A1111 v1.10.1, commit 82a973c0). `shared.opts` / `shared.state` are read as
# attributes at call time, never bound at import.
from modules import devices, images, prompt_parser, script_callbacks, scripts, shared
from modules.ui_components import InputAccordion

from lib_ae import AttendAndExcite, AttentionCapture, CaptureError, InSamplerExcitation, StepClock, StepReport, UNetRunner
from lib_ae.config import ConfigError
from lib_ae.engine import GraphableRunner
from lib_ae.loss import TokenSelection
from lib_ae.params import (
    PARAM_NAMES,
    PARAMS,
    PARAMS_BY_NAME,
    AEParams,
    ParamsError,
    ParamSpec,
    from_infotext,
    from_script_args,
    parse_value,
    to_infotext,
    xyz_params,
)
from lib_ae.sampling import LatentSpace
from lib_ae.tokens import EmbeddingSpan, SubjectLocation, locate_subjects, prompt_tokens

logger = logging.getLogger("lib_ae.webui")


class SamplerConfig(Protocol):
    """sd_samplers_common.SamplerData (L11-18): the sampler's name as the user picked it."""

    name: str


class PromptChunk(Protocol):
    """sd_hijack_clip.PromptChunk (L10-21): 77 token ids, [BOS, 75 prompt tokens (EOS-padded), EOS]."""

    tokens: list[int]


class TextEncoder(Protocol):
    """The CLIP wrapper that cuts prompts into chunks (sd_hijack_clip.TextConditionalModel, L30-174)."""

    id_start: int
    id_end: int
    id_pad: int

    def tokenize(self, texts: list[str]) -> list[list[int]]: ...

    def process_texts(self, texts: list[str]) -> tuple[list[list[PromptChunk]], int]: ...

    def empty_chunk(self) -> PromptChunk: ...


class Denoiser(Protocol):
    """sd_samplers_cfg_denoiser.CFGDenoiser (L33-311): `step` is the index of the current model call (reset by
    Sampler.initialize, +1 at the end of forward); `steps` / `total_steps` are set by Sampler.launch_sampling."""

    step: int
    steps: int
    total_steps: int
    inner_model: Callable[..., torch.Tensor]
    forward: Callable[..., torch.Tensor]


class Sampler(Protocol):
    config: SamplerConfig | None
    model_wrap_cfg: Denoiser


class Processing(Protocol):
    """processing.StableDiffusionProcessing (L137-): the fields read here."""

    prompts: list[str]
    steps: int
    extra_generation_params: dict[str, Any]
    sampler: Sampler
    sd_model: Any


# -- 2. Parameters ----------------------------------------------------------------------------------------------------

TITLE = "Attend and Excite"
AE_ERROR_KEY = "AE error"
"""Infotext key for what went wrong (invalid args, subjects not found, unsupported sampler, a failure)."""
INFOTEXT_KEYS: tuple[str, ...] = tuple(spec.infotext_key for spec in PARAMS) + (AE_ERROR_KEY, "AE trace")
XYZ_OVERRIDES = "_ae_xyz"
"""Attribute of a processing object holding {parameter name: value} set by our X/Y/Z axes (host-api §8)."""
MAX_ERROR_TEXT = 300


def requested_params(args: Sequence[Any], overrides: Mapping[str, Any]) -> AEParams | None:
    """The parameters of this generation, or None when A&E is off. Raises `ParamsError`.

    `args` is our slice of `p.script_args` (positional in `PARAMS` order, or a dict first, the API form); X/Y/Z
    `overrides` replace single values. Only the enable flag is looked at before deciding that A&E is off, so a
    disabled script never complains about its other values.
    """
    if args and isinstance(args[0], Mapping):
        named = dict(args[0])
    else:
        named = dict(zip(PARAM_NAMES, args))
    named.update(overrides)
    # Without overrides the args go through unchanged, so that e.g. too many positional values are reported.
    full = [named] if overrides else list(args)
    try:
        enabled = parse_value("enabled", named.get("enabled", PARAMS_BY_NAME["enabled"].default))
    except ParamsError:
        # An invalid enable flag (e.g. the API's {"enabled": "yes", "subject": "cat"}) must not hide the other
        # problems of the same args: report all of them at once.
        from_script_args(full)
        raise
    if not enabled:
        return None
    return from_script_args(full)


def xyz_overrides(p: Processing) -> Mapping[str, Any]:
    overrides: Mapping[str, Any] = getattr(p, XYZ_OVERRIDES, None) or {}
    return overrides


def clear_infotext(p: Processing) -> None:
    """Drop our keys: X/Y/Z cells share one `extra_generation_params` dict (a shallow copy of p per cell)."""
    for key in INFOTEXT_KEYS:
        p.extra_generation_params.pop(key, None)


def report_problem(p: Processing, message: str) -> None:
    """Log `message` and add it (once) to the "AE error" infotext entry of this generation."""
    logger.warning("%s: %s", TITLE, message)
    existing = p.extra_generation_params.get(AE_ERROR_KEY)
    parts = existing.split("; ") if isinstance(existing, str) and existing else []
    if message not in parts:
        parts.append(message)
    text = "; ".join(parts)
    p.extra_generation_params[AE_ERROR_KEY] = (
        text if len(text) <= MAX_ERROR_TEXT else text[: MAX_ERROR_TEXT - 3] + "..."
    )


def failure_text(error: BaseException, where: str) -> str:
    """The user's line for an unexpected failure inside the A&E pass at `where` ("step 3"). Out of memory (CUDA's
    OutOfMemoryError, or the RuntimeError other backends raise) says what to change; anything else names the error
    with the first line of its text (CUDA's out-of-memory text runs over several)."""
    name = type(error).__name__
    if isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower():
        return (
            f"A&E ran out of memory at {where} ({name}); sampling went on without A&E: "
            "lower the batch size or image size"
        )
    detail = (str(error).splitlines() or [""])[0][:120]
    return f"A&E stopped at {where} ({name}: {detail}); sampling went on without it"


# -- 3. Sampling ------------------------------------------------------------------------------------------------------

UNSUPPORTED_SAMPLERS = frozenset({"UniPC", "DPM fast", "DPM adaptive", "Restart"})
"""Their model calls do not map to sampler steps (host-api §3): UniPC corrects from a state the model never sees,
DPM fast/adaptive choose their own evaluations, Restart adds re-noising segments."""
TIMESTEP_SAMPLERS = frozenset({"DDIM", "DDIM CFG++", "PLMS"})
"""CompVisSampler family (sd_samplers_timesteps.py L11-16): the latent is the VP latent and `sigma` the timestep."""

_captures: dict[int, weakref.ReferenceType[AttentionCapture]] = {}
"""id(UNet) -> its capture. Weak: the hooks on the UNet's modules keep a capture alive exactly as long as its UNet,
so an unloaded checkpoint is not kept in memory by this registry."""


def capture_for(unet: torch.nn.Module) -> AttentionCapture:
    """The capture on `unet`, attached on first use; captures on other UNets (a previous model) are removed."""
    ref = _captures.get(id(unet))
    capture = ref() if ref is not None else None
    if capture is not None and capture.unet is unet and capture.attached:
        return capture
    remove_captures()
    stale = getattr(unet, CAPTURE_ATTRIBUTE, None)
    if stale is not None:
        # Left by an earlier copy of this file (a "Reload UI" whose script_unloaded callback did not run).
        logger.debug("removing an attention capture left on the UNet by an earlier load of %s", TITLE)
        stale.remove()
    capture = AttentionCapture(unet)
    setattr(unet, CAPTURE_ATTRIBUTE, capture)
    _captures[id(unet)] = weakref.ref(capture)
    logger.debug("attention capture attached to %d layers", len(capture.module_names))
    return capture


CAPTURE_ATTRIBUTE = "_ae_attention_capture"
"""Attribute of a UNet holding the capture attached to it. The UNet outlives a "Reload UI", which executes this file
anew with an empty `_captures`; the attribute lets the new copy find and remove a capture the old one left behind,
instead of hooking every layer a second time."""


def remove_captures() -> None:
    """Detach every capture (model change, script unload): no hook of ours stays on any module."""
    for ref in list(_captures.values()):
        capture = ref()
        if capture is not None:
            capture.remove()
            if getattr(capture.unet, CAPTURE_ATTRIBUTE, None) is capture:
                delattr(capture.unet, CAPTURE_ATTRIBUTE)
    _captures.clear()


def free_memory() -> None:
    gc.collect()
    devices.torch_gc()


def unsupported_reason(p: Processing) -> str | None:
    """Why A&E cannot run on this model/sampler, in words; None when it can."""
    model = p.sd_model
    if getattr(model, "is_sd3", False):
        return "SD3 models are not supported (no UNet cross-attention); A&E was not applied"
    name = sampler_name(p)
    if name in UNSUPPORTED_SAMPLERS:
        return f"sampler {name} is not supported (its model calls do not follow the steps); try Euler, DPM++ 2M or DDIM"
    if getattr(getattr(model, "model", None), "diffusion_model", None) is None:
        return "this model has no ldm/sgm UNet (model.diffusion_model); A&E was not applied"
    return None


class UnsupportedModel(Exception):
    """The loaded model lacks something A&E needs; the message says what."""


def sampler_name(p: Processing) -> str:
    config = getattr(p.sampler, "config", None)
    return str(getattr(config, "name", None) or getattr(p, "sampler_name", "?"))


def text_encoder(sd_model: Any) -> TextEncoder:
    """The CLIP wrapper whose chunks make the conditioning columns. SD1/SD2: `cond_stage_model` itself. SDXL: the
    conditioner, whose `process_texts`/`tokenize` delegate to its first embedder that has them, CLIP-L
    (sd_models_xl.py L65-87); the token ids BOS/EOS/pad live on that embedder (sd_hijack_clip.py L342-344)."""
    model = sd_model.cond_stage_model
    if hasattr(model, "id_start"):
        encoder: TextEncoder = model
        return encoder
    for embedder in getattr(model, "embedders", []):
        if hasattr(embedder, "process_texts") and hasattr(embedder, "id_start"):
            found: TextEncoder = embedder
            return found
    raise UnsupportedModel("its text encoder does not cut prompts into A1111 chunks, so subjects cannot be located")


def make_condition_dict(sd_model: Any, cond: Any, image_cond: torch.Tensor | None) -> dict[str, Any]:
    """The UNet conditioning of CFGDenoiser.forward (sd_samplers_cfg_denoiser.py L192-200): unCLIP models take the
    image embedding as `c_adm`; SDXL conds are dicts (crossattn/vector); SD1/SD2 a tensor. A new dict every call:
    A1111's apply_model casts the dict's entries in place (sd_hijack_unet.py L40-50)."""
    if getattr(sd_model.model, "conditioning_key", None) == "crossattn-adm":
        return {"c_crossattn": [cond], "c_adm": image_cond}
    if isinstance(cond, dict):
        return {**cond, "c_concat": [image_cond]}
    return {"c_crossattn": [cond], "c_concat": [image_cond]}


def select_rows(cond: Any, rows: torch.Tensor) -> Any:
    return {key: value[rows] for key, value in cond.items()} if isinstance(cond, dict) else cond[rows]


# No @dataclass in this file: A1111 executes script files without registering them in sys.modules
# (script_loading.py L10-16), and dataclasses looks the defining module up there to resolve string annotations.


class _PromptTokens:
    """One sub-prompt's prompt-editing schedule: end step, 77-id chunks (shorter entries padded with empty chunks to
    the longest, as A1111 encodes them together: sd_hijack_clip.py L210-217), text and per-chunk textual-inversion
    embeddings of each entry."""

    def __init__(
        self,
        ends: list[int],
        chunks: list[list[list[int]]],
        texts: list[str],
        embeddings: list[list[list[EmbeddingSpan]]],
    ) -> None:
        self.ends = ends
        self.chunks = chunks
        self.texts = texts
        self.embeddings = embeddings


class SamplingPass:
    """A&E over one sampler run (txt2img, a hires pass, or one img2img batch)."""

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
        self.encoder = encoder
        self.space: LatentSpace = space
        self.is_hr = is_hr
        self.plms = plms
        self.excitation: InSamplerExcitation | None = None
        self.active = True
        self._schedules: dict[str, _PromptTokens] = {}
        self._locations: dict[tuple[str, int], SubjectLocation] = {}
        self._subject_ids: dict[str, list[int]] = {}
        self.labels: dict[int, list[str]] = {}
        """Image b -> the subjects found in its prompt, in the order of its maps (heatmap and trace legends)."""
        self._step: int | None = None
        self._nonfinite: set[int] = set()

    def before_model_call(self, x: torch.Tensor, sigma: torch.Tensor, kwargs: Mapping[str, Any]) -> None:
        """Called by the wrapped forward with the sampler's own tensor; updates it in place at the first call of an
        active step. Never raises an Exception: a failure turns A&E off for the rest of this pass."""
        if not self.active:
            return
        failure: str | None = None
        textinfo = shared.state.textinfo
        try:
            self._update(x, sigma, kwargs)
        except (ConfigError, CaptureError) as error:
            # The settings do not fit this model or image size; raised before that step changed the latent.
            logger.warning("%s: %s", TITLE, error)
            ran = self.excitation is not None and any(r.active for r in self.excitation.reports)
            failure = f"A&E {'stopped at ' + self._where() if ran else 'was not applied'}: {error}"
        except Exception as error:  # includes torch.cuda.OutOfMemoryError; InterruptedException is a BaseException
            logger.exception("%s failed at %s; sampling continues without it", TITLE, self._where())
            failure = failure_text(error, self._where())
        finally:
            shared.state.textinfo = textinfo
        if failure is not None:
            # Outside the except block, so the traceback (and the tensors it references) is already released.
            self.active = False
            report_problem(self.p, failure)
            free_memory()

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
        if step is None or step >= excitation.plan.steps or not excitation.plan.is_active(step):
            return
        self._step = step
        if self.p.sd_model.model.diffusion_model is not self.engine.capture.unet:
            # The refiner (sd_samplers_common.apply_refiner) swapped the model during this pass.
            self.active = False
            report_problem(self.p, "the model changed during sampling (refiner); A&E stopped there")
            return
        cond, image_cond = kwargs["cond"], kwargs["image_cond"]
        conds_list, tensor = prompt_parser.reconstruct_multicond_batch(cond, call)
        selections = [self._selection(b, cond, call) for b in range(len(conds_list))]
        if all(selection is None for selection in selections):
            return
        # Each image's loss uses its first AND sub-prompt, whose row is the first of its rows in `tensor` (L168, L203).
        first_rows = torch.as_tensor([rows[0][0] for rows in conds_list], device=x.device)

        run_unet = self._runner(sigma, select_rows(tensor, first_rows), image_cond)

        max_iterations = self.params.max_refinement_steps

        def on_iteration(step: int, iteration: int) -> None:
            shared.state.textinfo = f"{TITLE}: step {step + 1}, refinement {iteration}/{max_iterations}"

        shared.state.textinfo = f"{TITLE}: step {step + 1}"
        report = excitation.before_model_call(
            index,  # type: ignore[arg-type]  # not None here
            x,
            sigma,
            selections,
            run_unet,
            should_stop=lambda: bool(shared.state.interrupted or shared.state.skipped),
            on_iteration=on_iteration,
        )
        if report is not None:
            log_report(report)
            for b in report.skipped_nonfinite:
                if b not in self._nonfinite:  # once per image and pass: the step where it first happened
                    self._nonfinite.add(b)
                    report_problem(
                        self.p,
                        f"non-finite attention loss or gradient at step {report.step + 1}; that update was skipped"
                        + self._image_suffix(b, always=True),
                    )

    def _runner(self, sigma: torch.Tensor, cond: Any, image_cond: torch.Tensor | None) -> UNetRunner:
        """The cond-only pass of CFGDenoiser.forward for the given batch rows (`cond` holds one row per image);
        `inner_model` maps the sampler's space (sigma, or the timestep for DDIM/PLMS) to the UNet's input.

        As a `GraphableRunner`: everything that changes between calls (sigma, conditioning, image conditioning) is an
        explicit batch-first input, so that an engine with CUDA graphs can replay the pass; others call it eagerly."""
        sd_model, inner = self.p.sd_model, self.den.inner_model
        names = sorted(cond) if isinstance(cond, dict) else None
        cond_tensors = tuple(cond[name] for name in names) if names else (cond,)
        has_image_cond = image_cond is not None

        def cond_forward(latent_rows: torch.Tensor, sigma_rows: torch.Tensor, *rest: torch.Tensor) -> object:
            image_rows = rest[0] if has_image_cond else None
            cond_rows = rest[1:] if has_image_cond else rest
            value = dict(zip(names, cond_rows)) if names else cond_rows[0]
            return inner(latent_rows, sigma_rows, cond=make_condition_dict(sd_model, value, image_rows))

        inputs = (sigma, *((image_cond,) if has_image_cond else ()), *cond_tensors)
        device = sigma.device
        inputs = tuple(t if t.device == device else t.to(device) for t in inputs)
        return GraphableRunner(cond_forward, inputs, key=("a1111-cond-pass", id(inner), tuple(names or ()), has_image_cond))

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
        temporary latent) and one per step after (sd_samplers_timesteps_impl.py L109-137)."""
        if not self.plms:
            return call
        return None if call == 1 else max(0, call - 1)

    def _selection(self, b: int, cond: Any, call: int) -> TokenSelection | None:
        """Image b's subject columns in the conditioning row in effect at model call `call`."""
        prompts = getattr(self.p, "hr_prompts", None) if self.is_hr else self.p.prompts
        if not prompts or b >= len(prompts):
            return None
        indexes, texts, _ = prompt_parser.get_multicond_prompt_list([prompts[b]])
        text = texts[indexes[0][0][0]]
        tokens = self._prompt_tokens(text)
        schedule = cond.batch[b][0].schedules
        if [entry.end_at_step for entry in schedule] != tokens.ends:
            self._report_once(b, f"could not follow the prompt editing schedule of {text!r}; image skipped")
            return None
        # The entry reconstruct_multicond_batch uses at this call (prompt_parser.py L331-335).
        target = next((i for i, end in enumerate(tokens.ends) if call <= end), 0)
        key = (text, target)
        if key not in self._locations:
            location = locate_subjects(
                tokens.chunks[target],
                self.params.subject_list,
                self._encode,
                bos_id=self.encoder.id_start,
                eos_id=self.encoder.id_end,
                pad_id=self.encoder.id_pad,
                normalize_eot=self.params.normalize_eot,
                embeddings=tokens.embeddings[target],
            )
            self._report_location(b, location, tokens, target, [texts[i] for i, _ in indexes[0][1:]], call)
            self._locations[key] = location
        self.labels[b] = list(self._locations[key].found)
        return self._locations[key].selection

    def _prompt_tokens(self, text: str) -> _PromptTokens:
        if text not in self._schedules:
            base_steps, hires_steps = self._schedule_steps()
            schedule = prompt_parser.get_learned_conditioning_prompt_schedules(
                [text], base_steps, hires_steps, shared.opts.use_old_scheduling
            )[0]
            batch_chunks, _ = self.encoder.process_texts([entry_text for _, entry_text in schedule])
            width = max(len(chunks) for chunks in batch_chunks)
            empty = list(self.encoder.empty_chunk().tokens)
            chunks = [[list(c.tokens) for c in entry] + [empty] * (width - len(entry)) for entry in batch_chunks]
            # Textual-inversion embeddings: PromptChunkFix(offset, embedding) per chunk (sd_hijack_clip.py L24, L167).
            embeddings: list[list[list[EmbeddingSpan]]] = [
                [
                    [(str(fix.embedding.name), int(fix.offset), int(fix.embedding.vectors)) for fix in c.fixes]
                    for c in entry
                ]
                for entry in batch_chunks
            ]
            self._schedules[text] = _PromptTokens(
                [int(end) for end, _ in schedule], chunks, [entry_text for _, entry_text in schedule], embeddings
            )
        return self._schedules[text]

    def _report_location(
        self, b: int, location: SubjectLocation, tokens: _PromptTokens, target: int, others: list[str], call: int
    ) -> None:
        """Report what `locate_subjects` found wrong with image b's subjects in schedule entry `target`, precisely:
        which steps a prompt-editing entry covers, when a subject is in another AND sub-prompt (A&E reads only the
        first, whose conditioning row is the image's first), and many absent subjects as one counted message (the
        "AE error" text is cut at MAX_ERROR_TEXT)."""
        where = self._entry_span(tokens, target)
        absent = set(location.absent)
        elsewhere: dict[str, int] = {}
        for number, other in enumerate(others, start=2):
            pending = [s for s in location.absent if s not in elsewhere]
            if not pending:
                break
            other_tokens = self._prompt_tokens(other)
            entry = next((i for i, end in enumerate(other_tokens.ends) if call <= end), 0)
            other_location = locate_subjects(
                other_tokens.chunks[entry],
                pending,
                self._encode,
                bos_id=self.encoder.id_start,
                eos_id=self.encoder.id_end,
                pad_id=self.encoder.id_pad,
                embeddings=other_tokens.embeddings[entry],
            )
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

    def _entry_span(self, tokens: _PromptTokens, target: int) -> str:
        """" during steps 2-3 (prompt editing: the prompt then reads '...')" for an entry of a prompt-editing
        schedule, "" for a prompt without editing. Entry i is in effect for model calls ends[i-1]+1 .. ends[i]
        (prompt_parser.reconstruct_multicond_batch L331-335), shown as 1-based sampler steps."""
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
        (processing.py L493-503, stored as p.firstpass_steps); hires pass (firstpass_steps, hires total steps)
        (L1499-1511)."""
        p = self.p
        multiplier = max(1, int(self.den.total_steps) // int(self.den.steps))
        base = int(getattr(p, "firstpass_steps", 0) or p.steps * multiplier)
        if not self.is_hr:
            return base, None
        hires = (getattr(p, "hr_second_pass_steps", 0) or p.steps) * multiplier
        return base, hires

    def _encode(self, subject: str) -> list[int]:
        if subject not in self._subject_ids:
            self._subject_ids[subject] = [int(t) for t in self.encoder.tokenize([subject])[0]]
        return self._subject_ids[subject]

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
        return f" (image {int(getattr(p, 'iteration', 0) or 0) * batch_size + b + 1})"


def log_report(report: StepReport) -> None:
    if logger.isEnabledFor(logging.DEBUG):
        logger.debug(
            "%s step %d: loss %s, refinement iterations %s%s",
            TITLE,
            report.step,
            [None if v is None else round(v, 4) for v in report.loss],
            report.refinement_iterations,
            " (interrupted)" if report.interrupted else "",
        )


def install(p: Processing, params: AEParams) -> None:
    """Set A&E up for the sampler run about to start (called from process_before_every_sampling)."""
    reason = unsupported_reason(p)
    if reason is not None:
        report_problem(p, reason)
        return
    try:
        capture = capture_for(p.sd_model.model.diffusion_model)
        engine = AttendAndExcite(capture, params.to_config(), cuda_graphs=use_cuda_graphs(p))
        encoder = text_encoder(p.sd_model)
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
    wrap_forward(den, sampling_pass)
    setattr(p, LIVE_PASSES, [*(getattr(p, LIVE_PASSES, None) or []), sampling_pass])


CUDA_GRAPHS_SETTING = "ae_cuda_graphs"
LIVE_PASSES = "_ae_passes"
"""Attribute of a processing object: this batch's sampling passes; `post_sample` reads their reports and frees their
engines' CUDA graphs."""


def use_cuda_graphs(p: Processing) -> bool:
    """Replay the A&E pass as a CUDA graph: on CUDA, when the setting allows it, and not under --lowvram/--medvram,
    whose hooks move UNet blocks between devices during the forward (lowvram.py), which no graph can hold.
    SDXL's sgm UNet builds its timestep frequencies on the CPU (A1111 patches only ldm's, sd_hijack_unet.py L126), so
    its capture fails once and the engine evaluates eagerly from then on: same result, no speed-up."""
    if not getattr(shared.opts, CUDA_GRAPHS_SETTING, True) or not torch.cuda.is_available():
        return False
    if getattr(p.sd_model, "lowvram", False):
        return False
    return str(getattr(devices, "device", "cpu")).startswith("cuda")


def release_passes(p: Processing) -> None:
    for sampling_pass in getattr(p, LIVE_PASSES, None) or []:
        sampling_pass.engine.release_graphs()
        sampling_pass.active = False  # inert even if another wrapper on top keeps ours in its chain
        unwrap_forward(sampling_pass.den)
    if hasattr(p, LIVE_PASSES):
        setattr(p, LIVE_PASSES, [])


# -- Heatmaps and the excitation trace (lib_ae.visualize draws them) ---------------------------------------------------

AE_TRACE_KEY = "AE trace"
"""Infotext key of the one-line excitation summary, e.g. "25 steps, refinement 20/4/0, final min attention 0.83"."""
BATCH_VISUALS = "_ae_visuals"
"""Attribute of a processing object: image index in the current batch -> (subject map rows, trace), set by
post_sample, read by postprocess_image."""
HEATMAP_OUTPUTS = "_ae_heatmap_outputs"
"""Attribute of a processing object: (image index in the whole job, pictures) collected by postprocess_image, added to
the results by postprocess."""


def heatmap_steps(plan: Any, params: AEParams) -> frozenset[int]:
    """The steps whose subject maps are kept: the last step A&E runs, and with `heatmaps_first_step` the first one."""
    if not params.heatmaps:
        return frozenset()
    active = [step for step in range(plan.steps) if plan.is_active(step)]
    if not active:
        return frozenset()
    return frozenset({active[-1], active[0]} if params.heatmaps_first_step else {active[-1]})


def record_batch_trace(p: Processing) -> None:
    """After sampling a batch: the trace line for each image's infotext and, with heatmaps on, what to draw. Reads the
    first pass that ran A&E (the txt2img first pass; the hires pass only when it alone did)."""
    from lib_ae.visualize import image_trace, subject_maps_at, trace_summary

    passes = [sp for sp in getattr(p, LIVE_PASSES, None) or [] if sp.excitation is not None and sp.excitation.reports]
    setattr(p, BATCH_VISUALS, {})
    if not passes:
        return
    sampling_pass = passes[0]
    excitation = sampling_pass.excitation
    assert excitation is not None
    reports, plan = excitation.reports, excitation.plan
    summaries: dict[int, str] = {}
    visuals: dict[int, tuple[list[list[Any]], Any]] = {}
    for b, labels in sampling_pass.labels.items():
        if not labels:
            continue
        trace = image_trace(reports, b, labels, sorted(plan.refinement_thresholds))
        if not trace.steps:
            continue
        summaries[b] = trace_summary(trace)
        if sampling_pass.params.heatmaps:
            by_step = {r.step: subject_maps_at(r, b, labels) for r in reports if r.step in excitation.map_steps}
            rows = [by_step[step] for step in sorted(by_step, reverse=True) if by_step[step]]
            visuals[b] = (rows, trace)
    setattr(p, BATCH_VISUALS, visuals)
    if summaries:
        # Evaluated per image when A1111 writes the infotext (processing.py L802-810; `index` = position in the batch).
        p.extra_generation_params[AE_TRACE_KEY] = lambda index=0, **_: summaries.get(index)


def draw_heatmaps(p: Processing, image: Any) -> None:
    """For the image A1111 just finished (p.batch_index of batch p.iteration): its heatmap strip and trace plot."""
    from lib_ae.visualize import heatmap_strip, trace_plot

    b = int(getattr(p, "batch_index", 0))
    visual = (getattr(p, BATCH_VISUALS, None) or {}).get(b)
    if visual is None:
        return
    rows, trace = visual
    pictures = ([heatmap_strip(image, rows).image] if rows else []) + [trace_plot(trace)]
    job_index = int(getattr(p, "iteration", 0)) * int(getattr(p, "batch_size", 1)) + b
    setattr(p, HEATMAP_OUTPUTS, [*(getattr(p, HEATMAP_OUTPUTS, None) or []), (job_index, pictures)])


def add_heatmaps_to_results(p: Processing, processed: Any) -> None:
    """Append the pictures after the generated images (never replacing one), each with its image's infotext, and save
    them the way A1111 saves samples (images.save_image, suffix "-ae-heatmaps" / "-ae-trace")."""
    outputs = getattr(p, HEATMAP_OUTPUTS, None) or []
    setattr(p, HEATMAP_OUTPUTS, [])
    first = int(getattr(processed, "index_of_first_image", 0))
    save = bool(getattr(shared.opts, "samples_save", True)) and not getattr(p, "do_not_save_samples", False)
    for job_index, pictures in outputs:
        position = first + job_index
        info = processed.infotexts[position] if position < len(processed.infotexts) else None
        for picture, suffix in zip(pictures, ("-ae-heatmaps", "-ae-trace") if len(pictures) == 2 else ("-ae-trace",)):
            processed.images.append(picture)
            processed.infotexts.append(info)
            if save:
                images.save_image(
                    picture,
                    p.outpath_samples,
                    "",
                    p.all_seeds[job_index],
                    p.all_prompts[job_index],
                    shared.opts.samples_format,
                    info=info,
                    p=p,
                    suffix=suffix,
                )


def wrap_forward(den: Denoiser, sampling_pass: SamplingPass) -> None:
    """Make `den.forward` (an instance attribute, used by nn.Module.__call__) run A&E before the original forward.
    Idempotent per denoiser: img2img reuses one sampler for every batch (processing.py L1607), so a second install
    replaces our wrapper instead of stacking another."""
    original: Callable[..., torch.Tensor] = getattr(den.forward, "_ae_original", den.forward)

    def forward(x: torch.Tensor, sigma: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        sampling_pass.before_model_call(x, sigma, kwargs)
        return original(x, sigma, *args, **kwargs)

    forward._ae_original = original  # type: ignore[attr-defined]
    den.forward = forward


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
        den.forward = original  # the instance attribute someone else had set before us


# -- 4. The Script ----------------------------------------------------------------------------------------------------

MAIN_PARAMS = frozenset({"enabled", "subjects"})
"""Shown in the accordion itself; every other parameter is in its "Advanced" section."""


def setting_key(spec: ParamSpec) -> str:
    return f"ae_default_{spec.name}"


def initial_value(spec: ParamSpec) -> Any:
    """A control's initial value: the user's default from Settings (section 5) if valid, else the spec's default.
    A1111 also takes the API's default args from these values (api.py L315-333 calls ui())."""
    if spec.name in MAIN_PARAMS:
        return spec.default
    raw = getattr(shared.opts, setting_key(spec), spec.default)
    try:
        return parse_value(spec.name, raw)
    except ParamsError as error:
        logger.warning("%s: ignoring the setting %s (%s)", TITLE, setting_key(spec), "; ".join(error.messages))
        return spec.default


def make_control(spec: ParamSpec, value: Any, elem_id: str) -> Any:
    """The gradio control of one parameter: Checkbox (bool), Slider (number, with the spec's range), Textbox (text)."""
    if spec.kind == "bool":
        return gr.Checkbox(value=value, label=spec.label, info=spec.help, elem_id=elem_id)
    if spec.kind in ("int", "float"):
        assert spec.minimum is not None and spec.maximum is not None  # ParamSpec requires a range for numbers
        return gr.Slider(
            minimum=spec.minimum,
            maximum=spec.maximum,
            step=spec.step,
            value=value,
            label=spec.label,
            info=spec.help,
            elem_id=elem_id,
        )
    return gr.Textbox(value=value, label=spec.label, info=spec.help, lines=1, elem_id=elem_id)


def pasted_value(name: str) -> Callable[[dict[str, Any]], Any]:
    """Infotext paste reader for one parameter: its typed value, None (no change) when absent. For `enabled`: whether
    the infotext has any A&E key, so pasting parameters without A&E switches it off."""

    def read(fields: dict[str, Any]) -> Any:
        return from_infotext(fields).get(name)

    return read


class AttendAndExciteScript(scripts.Script):
    def title(self) -> str:
        return TITLE

    def show(self, is_img2img: bool) -> Any:
        return scripts.AlwaysVisible

    def ui(self, is_img2img: bool) -> list[Any]:
        controls: dict[str, Any] = {}
        enabled = PARAMS_BY_NAME["enabled"]
        with InputAccordion(False, label=enabled.label, elem_id=self.elem_id(enabled.name)) as accordion:
            controls[enabled.name] = accordion
            for spec in PARAMS:
                if spec.name in MAIN_PARAMS and spec.name != enabled.name:
                    controls[spec.name] = make_control(spec, initial_value(spec), self.elem_id(spec.name))
            token_view_ui(self.elem_id, controls["subjects"])  # section 4b; adds no script argument
            with gr.Accordion("Advanced", open=False, elem_id=self.elem_id("advanced")):
                for spec in PARAMS:
                    if spec.name not in MAIN_PARAMS:
                        controls[spec.name] = make_control(spec, initial_value(spec), self.elem_id(spec.name))
        # Pasting infotext (infotext_utils.connect_paste L477-, Api.apply_infotext api.py L363-): text and number
        # parameters by key (A1111 casts to the control's type); the enable flag and the booleans through a reader,
        # because the API casts with bool(), which would read "False" as True.
        self.infotext_fields = [
            (controls[spec.name], pasted_value(spec.name) if spec.kind == "bool" else spec.infotext_key)
            for spec in PARAMS
        ]
        # "Send to img2img/inpaint" copies the controls whose infotext field is one of these keys (L169-175).
        self.paste_field_names = [spec.infotext_key for spec in PARAMS if spec.kind != "bool"]
        return [controls[name] for name in PARAM_NAMES]  # positional API order = PARAMS order

    def process(self, p: Processing, *args: Any) -> None:
        params = self._params(p, args, report=True)
        if params is not None:
            p.extra_generation_params.update(to_infotext(params))

    def process_before_every_sampling(self, p: Processing, *args: Any, **kwargs: Any) -> None:
        params = self._params(p, args, report=False)
        if params is None:
            return
        if getattr(p, "is_hr_pass", False) and not params.apply_to_hires:
            return
        install(p, params)

    def post_sample(self, p: Processing, *args: Any) -> None:
        try:
            record_batch_trace(p)
        finally:
            release_passes(p)  # the graphs' memory pool; a later pass (img2img's next batch) captures anew

    def postprocess_image(self, p: Processing, pp: Any, *args: Any) -> None:
        if getattr(p, BATCH_VISUALS, None):
            draw_heatmaps(p, pp.image)

    def postprocess(self, p: Processing, processed: Any, *args: Any) -> None:
        if getattr(p, HEATMAP_OUTPUTS, None):
            add_heatmaps_to_results(p, processed)

    @staticmethod
    def _params(p: Processing, args: Sequence[Any], *, report: bool) -> AEParams | None:
        """This generation's parameters, None when A&E is off or the args are invalid (reported once, by process)."""
        try:
            params = requested_params(args, xyz_overrides(p))
        except ParamsError as error:
            if report:
                clear_infotext(p)
                report_problem(p, "invalid settings, A&E not applied: " + "; ".join(error.messages))
            return None
        if report:
            clear_infotext(p)  # pops nothing unless an earlier X/Y/Z cell left keys in the shared dict
        return params


# -- 4b. Token view ---------------------------------------------------------------------------------------------------
# A live view, inside the accordion, of how the current prompt is tokenized by the loaded model's own text encoder and
# A1111's prompt parsing (emphasis, BREAK, 75-token chunks, prompt editing), with each subject's conditioning columns
# and the subjects that are not found. javascript/attend_and_excite.js writes {prompt, subjects, steps} as JSON into a
# hidden textbox and clicks a hidden button (the pattern of A1111's token counter, ui.py L491); the reply is the HTML.
# None of these components is returned by ui(), so they carry no script argument (positional API order unchanged).

TOKEN_VIEW_MAX_CHUNKS = 8
"""Chunks shown per schedule entry (600 tokens); the rest is summarised."""
WORD_END = "</w>"


def token_text(encoder: Any, token_id: int) -> str:
    """The text of one token id: HF CLIPTokenizer (SD1, SDXL's CLIP-L: `encoder.tokenizer`) or open_clip's tokenizer
    (SD2: module-level `sd_hijack_open_clip.tokenizer`), byte-level BPE decoded; a word end keeps its `</w>`."""
    tokenizer = getattr(encoder, "tokenizer", None)
    if tokenizer is not None and hasattr(tokenizer, "convert_ids_to_tokens"):
        text = str(tokenizer.convert_ids_to_tokens(int(token_id)))
    else:
        from modules.sd_hijack_open_clip import tokenizer as open_clip_tokenizer

        tokenizer = open_clip_tokenizer
        text = str(open_clip_tokenizer.decoder.get(int(token_id), f"<{token_id}>"))
    end = text.endswith(WORD_END)
    body = text[: -len(WORD_END)] if end else text
    byte_decoder = getattr(tokenizer, "byte_decoder", None)
    if byte_decoder:
        try:
            body = bytearray(byte_decoder[c] for c in body).decode("utf-8", errors="replace")
        except KeyError:
            pass
    return body + (WORD_END if end else "")


def _escape(text: str) -> str:
    import html

    return html.escape(text, quote=True)


def token_view_html(prompt: str, subjects_text: str, steps: int) -> str:
    """The token view of `prompt` with the subjects `subjects_text`, as HTML (messages instead of raising)."""
    try:
        return _token_view_html(prompt, subjects_text, steps)
    except Exception as error:  # the view must never break the UI; the message says what happened
        logger.debug("token view failed", exc_info=True)
        return f"<div class='ae-tokens-message'>Token view unavailable: {_escape(type(error).__name__)}: {_escape(str(error)[:200])}</div>"


def _token_view_html(prompt: str, subjects_text: str, steps: int) -> str:
    from modules import extra_networks

    sd_model = getattr(shared, "sd_model", None)
    if sd_model is None:
        return "<div class='ae-tokens-message'>No model is loaded.</div>"
    encoder = text_encoder(sd_model)
    try:
        subjects = parse_value("subjects", subjects_text)
    except ParamsError as error:
        subjects = ""
        subject_problem = "; ".join(error.messages)
    else:
        subject_problem = ""
    subject_list = [s for s in str(subjects).split(", ") if s]
    text, _ = extra_networks.parse_prompt(prompt or "")  # <lora:...> tags are removed before conditioning
    indexes, texts, _ = prompt_parser.get_multicond_prompt_list([text])
    first = texts[indexes[0][0][0]] if indexes and indexes[0] else text
    steps = max(1, int(steps or 20))
    schedule = prompt_parser.get_learned_conditioning_prompt_schedules(
        [first], steps, None, shared.opts.use_old_scheduling
    )[0]
    parts: list[str] = []
    if subject_problem:
        parts.append(f"<div class='ae-tokens-problem'>{_escape(subject_problem)}</div>")
    if len(texts) > 1:
        parts.append("<div class='ae-tokens-note'>AND: A&amp;E uses the first sub-prompt only.</div>")
    found_in: dict[str, list[tuple[str, tuple[int, ...]]]] = {}  # subject -> (steps, columns) of the entries with it
    missing: dict[str, str] = {}
    previous_end = 0
    for entry_index, (end_at_step, entry_text) in enumerate(schedule):
        batch_chunks, token_count = encoder.process_texts([entry_text])
        chunks = batch_chunks[0]
        ids = [[int(t) for t in chunk.tokens] for chunk in chunks]
        location = locate_subjects(
            ids,
            subject_list,
            lambda s: [int(t) for t in encoder.tokenize([s])[0]],
            bos_id=encoder.id_start,
            eos_id=encoder.id_end,
            pad_id=encoder.id_pad,
        )
        # A1111's own terms: an entry is used while the step counter is <= its end (prompt_parser.py L331-335).
        if entry_index == 0:
            steps_label = f"until step {end_at_step}"
        elif entry_index == len(schedule) - 1:
            steps_label = f"after step {previous_end}"
        else:
            steps_label = f"after step {previous_end}, until step {end_at_step}"
        previous_end = int(end_at_step)
        for subject, columns in location.found.items():
            found_in.setdefault(subject, []).append((steps_label, columns))
        for subject in location.missing:
            reason = next((m for m in location.messages if repr(subject) in m), f"subject {subject!r} is not in the prompt")
            missing.setdefault(subject, reason.removeprefix("AE: "))
        owner = {column: subject for subject, columns in location.found.items() for column in columns}
        order = {subject: i for i, subject in enumerate(subject_list)}
        header = f"{token_count} tokens, {len(chunks)} chunk{'s' if len(chunks) != 1 else ''} of 75"
        if len(schedule) > 1:
            header = f"{steps_label} (prompt editing): " + header
        parts.append(f"<div class='ae-tokens-entry'><div class='ae-tokens-header'>{_escape(header)}</div>")
        for k, chunk in enumerate(chunks[:TOKEN_VIEW_MAX_CHUNKS]):
            fixes = {int(fix.offset) + 1: fix.embedding for fix in getattr(chunk, "fixes", [])}
            real = len(prompt_tokens(ids[k], bos_id=encoder.id_start, eos_id=encoder.id_end, pad_id=encoder.id_pad))
            spans: list[str] = []
            word: list[tuple[int, str]] = []
            words: list[list[tuple[int, str]]] = []
            for j in range(1, real + 1):
                word.append((j, token_text(encoder, ids[k][j])))
                if word[-1][1].endswith(WORD_END) or j == real:
                    words.append(word)
                    word = []
            multipliers = list(getattr(chunk, "multipliers", [1.0] * len(ids[k])))
            skip_until = 0
            for word_tokens in words:
                whole = "".join(t.removesuffix(WORD_END) for _, t in word_tokens)
                for j, tok in word_tokens:
                    column = 77 * k + j
                    if j < skip_until:
                        continue
                    classes = ["ae-token"]
                    attrs = [f"data-ae-col='{column}'", f"data-ae-word='{_escape(whole)}'"]
                    label = tok.removesuffix(WORD_END)
                    title = f"column {column}, id {ids[k][j]}"
                    if j in fixes:
                        embedding = fixes[j]
                        vectors = int(getattr(embedding, "vectors", 1) or 1)
                        skip_until = j + vectors
                        label = str(getattr(embedding, "name", "embedding"))
                        title = f"columns {column}-{column + vectors - 1}: textual inversion embedding ({vectors} vectors)"
                        classes.append("ae-token-embedding")
                        attrs[1] = f"data-ae-word='{_escape(label)}'"
                    weight = float(multipliers[j]) if j < len(multipliers) else 1.0
                    if abs(weight - 1.0) > 1e-6:
                        title += f", weight {weight:.3g}"
                        classes.append("ae-token-weighted")
                    if not tok.endswith(WORD_END) and j not in fixes:
                        classes.append("ae-token-cont")  # the word goes on in the next token
                    subject = owner.get(column)
                    if subject is not None:
                        classes.append(f"ae-subject ae-subject-{order.get(subject, 0) % 6}")
                        attrs.append(f"data-ae-subject='{_escape(subject)}'")
                        title += f", subject '{subject}'"
                    attrs.append(f"title='{_escape(title)}'")
                    weight_mark = f"<sub>{weight:.2g}</sub>" if "ae-token-weighted" in classes else ""
                    spans.append(f"<span class='{' '.join(classes)}' {' '.join(attrs)}>{_escape(label)}{weight_mark}</span>")
            pad = 75 - real
            parts.append(
                f"<div class='ae-tokens-chunk'><span class='ae-chunk-label' title='columns {77 * k}-{77 * k + 76}'>"
                f"chunk {k + 1}</span>{''.join(spans)}"
                f"<span class='ae-token-pad'>{'+' + str(pad) + ' pad' if pad else 'full'}</span></div>"
            )
        if len(chunks) > TOKEN_VIEW_MAX_CHUNKS:
            parts.append(f"<div class='ae-tokens-note'>... {len(chunks) - TOKEN_VIEW_MAX_CHUNKS} more chunks</div>")
        parts.append("</div>")
    legend: list[str] = []
    for i, subject in enumerate(subject_list):
        if subject in found_in:
            entries = found_in[subject]
            columns = entries[0][1]
            where = f"column {columns[0]}" if len(columns) == 1 else f"columns {columns[0]}-{columns[-1]}"
            classes = f"ae-legend ae-subject ae-subject-{i % 6}"
            title = "click to remove"
            if len(entries) < len(schedule):  # prompt editing: only some entries contain it
                where += " (" + ", ".join(steps for steps, _ in entries) + " only)"
                classes += " ae-partial"
                title = f"{missing.get(subject, 'not in every prompt-editing entry')}; click to remove"
            legend.append(
                f"<span class='{classes}' data-ae-subject='{_escape(subject)}' "
                f"title='{_escape(title)}'>{_escape(subject)}: {where}</span>"
            )
        else:
            reason = missing.get(subject, f"subject {subject!r} is not in the prompt")
            legend.append(
                f"<span class='ae-legend ae-missing' data-ae-subject='{_escape(subject)}' title='{_escape(reason)}'>"
                f"{_escape(subject)}: not found</span>"
            )
    if not subject_list:
        legend.append("<span class='ae-tokens-note'>Click a word to make it a subject.</span>")
    return (
        "<div class='ae-tokens'><div class='ae-tokens-legend'>" + "".join(legend) + "</div>" + "".join(parts) + "</div>"
    )


def token_view_request(request: str, subjects_text: str) -> str:
    """Gradio handler: `request` is the JSON the javascript wrote ({"prompt", "subjects", "steps"})."""
    import json

    try:
        data = json.loads(request or "{}")
    except ValueError:
        data = {}
    prompt = str(data.get("prompt", ""))
    subjects = data.get("subjects", subjects_text)
    try:
        steps = int(float(data.get("steps", 20)))
    except (TypeError, ValueError):
        steps = 20
    return token_view_html(prompt, subjects if isinstance(subjects, str) else subjects_text, steps)


def token_view_ui(elem_id: Callable[[str], str], subjects: Any) -> None:
    """The view and its hidden bridge, created inside the accordion (not returned by ui(): no script argument)."""
    if not (hasattr(gr, "HTML") and hasattr(gr, "Button")):
        return  # the gradio stand-in of tests/host has neither; the real gradio 3.41.2 has both
    view = gr.HTML(
        "<div class='ae-tokens-message'>Open this section and type a prompt to see its tokens.</div>",
        elem_id=elem_id("tokens"),
        elem_classes=["ae-tokens-view"],
    )
    request = gr.Textbox(visible=False, elem_id=elem_id("tokens_request"))
    refresh = gr.Button(visible=False, elem_id=elem_id("tokens_refresh"))
    refresh.click(fn=token_view_request, inputs=[request, subjects], outputs=[view], show_progress=False, queue=False)


# -- 5. Settings and X/Y/Z --------------------------------------------------------------------------------------------

SETTINGS_SECTION = ("attend_and_excite", TITLE)
XYZ_PREFIX = "[AE] "


def on_ui_settings() -> None:
    """Settings > Attend and Excite: the initial values of the "Advanced" controls (and of the positional API args)."""
    for spec in PARAMS:
        if spec.name in MAIN_PARAMS:
            continue
        component: Any
        component_args: dict[str, Any] | None = None
        if spec.kind == "bool":
            component = gr.Checkbox
        elif spec.kind in ("int", "float"):
            component = gr.Slider
            component_args = {"minimum": spec.minimum, "maximum": spec.maximum, "step": spec.step}
        else:
            component = gr.Textbox
        option = shared.OptionInfo(
            spec.default,
            f"Default: {spec.label}",
            component,
            component_args,
            section=SETTINGS_SECTION,
            category_id="sd",
        )
        shared.opts.add_option(setting_key(spec), option.info(spec.help))
    graphs = shared.OptionInfo(
        True, "Replay the A&E gradient pass as a CUDA graph", gr.Checkbox, section=SETTINGS_SECTION, category_id="sd"
    )
    shared.opts.add_option(
        CUDA_GRAPHS_SETTING,
        graphs.info(
            "same result, about 3x less time per pass at batch 1 on fast GPUs; off if another extension's UNet hooks "
            "misbehave under graph capture"
        ),
    )


def xyz_apply(name: str) -> Callable[[Any, Any, Sequence[Any]], None]:
    def apply(p: Any, x: Any, xs: Sequence[Any]) -> None:
        # A new dict per cell: the cell's p is a shallow copy of the original.
        setattr(p, XYZ_OVERRIDES, {**(getattr(p, XYZ_OVERRIDES, None) or {}), name: x})

    return apply


def xyz_confirm(name: str) -> Callable[[Any, Sequence[Any]], None]:
    def confirm(p: Any, xs: Sequence[Any]) -> None:
        for x in xs:
            try:
                parse_value(name, x)
            except ParamsError as error:
                raise RuntimeError("; ".join(error.messages)) from None

    return confirm


def register_xyz_axes() -> None:
    """Append our axes to the X/Y/Z plot script before the UI is built (its options are frozen by its ui())."""
    xyz = next((d.module for d in scripts.scripts_data if d.script_class.__module__ == "xyz_grid.py"), None)
    if xyz is None:
        logger.debug("%s: X/Y/Z plot script not found; no axes added", TITLE)
        return
    if any(getattr(option, "label", "").startswith(XYZ_PREFIX) for option in xyz.axis_options):
        return
    types: dict[str, Callable[[Any], Any]] = {"bool": str, "int": int, "float": float, "str": str}
    for spec in xyz_params():
        choices = (lambda: ["True", "False"]) if spec.kind == "bool" else None
        xyz.axis_options.append(
            xyz.AxisOption(
                XYZ_PREFIX + spec.label,
                types[spec.kind],
                xyz_apply(spec.name),
                confirm=xyz_confirm(spec.name),
                choices=choices,
            )
        )


script_callbacks.on_ui_settings(on_ui_settings)
script_callbacks.on_before_ui(register_xyz_axes)
script_callbacks.on_script_unloaded(remove_captures)
