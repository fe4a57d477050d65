"""Every call into the AUTOMATIC1111 WebUI (v1.10.1, commit 82a973c0), typed: the rest of `lib_ae.webui` goes
through these names and never imports `modules.*` or gradio itself (`gr` is the WebUI's gradio). Line numbers:
docs/host-notes.md.

`shared.opts`, `shared.state` and `shared.sd_model` are read as attributes at call time, never bound at import: A1111
replaces them (a model load, the tests' stand-in state).
"""

from __future__ import annotations

import gc
import importlib.util
import inspect
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any, Protocol

import gradio as gr
import torch
from modules import devices, extra_networks, images, prompt_parser, script_callbacks, scripts, shared
from modules.ui_components import InputAccordion

from lib_ae.targeting import PromptChunk, TextEncoder

Script = scripts.Script
ALWAYS_VISIBLE = scripts.AlwaysVisible
FORGE: bool = "modules_forge" in sys.modules or importlib.util.find_spec("modules_forge") is not None
"""SD WebUI Forge or Forge Neo (their `modules_forge` package; A1111 has none), told once at import: they keep this
extension surface and differ in the model (`lib_ae.forge`)."""
__all__ = ["ALWAYS_VISIBLE", "InputAccordion", "PromptChunk", "Script", "TextEncoder", "gr"]


# -- The WebUI objects read here ---------------------------------------------------------------------------------------


class SamplerConfig(Protocol):
    """sd_samplers_common.SamplerData: the sampler's name as the user picked it."""

    name: str


class Denoiser(Protocol):
    """sd_samplers_cfg_denoiser.CFGDenoiser: `step` is the index of the current model call (reset by
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
    """processing.StableDiffusionProcessing: the fields read here."""

    prompts: list[str]
    steps: int
    extra_generation_params: dict[str, Any]
    sampler: Sampler
    sd_model: Any


# -- Options, progress, memory -----------------------------------------------------------------------------------------


def option(name: str, default: Any) -> Any:
    """A WebUI setting (ours or A1111's), `default` when it is not registered."""
    return getattr(shared.opts, name, default)


def add_setting(key: str, default: Any, label: str, component: Any, component_args: dict[str, Any] | None,
                section: tuple[str, str], info: str) -> None:
    """Register a setting in Settings > `section` (shared_options.py OptionInfo; ui.py `create_ui` calls
    on_ui_settings)."""
    shared.opts.add_option(
        key, shared.OptionInfo(default, label, component, component_args, section=section, category_id="sd").info(info)
    )


def progress_text() -> str | None:
    return shared.state.textinfo  # type: ignore[no-any-return]


def show_progress(text: str | None) -> None:
    """The line under the progress bar (shared.state.textinfo)."""
    shared.state.textinfo = text


def stop_requested() -> bool:
    """Interrupt or Skip was pressed (shared_state.State.interrupted / skipped)."""
    return bool(shared.state.interrupted or shared.state.skipped)


def interrupted() -> bool:
    return bool(shared.state.interrupted)


def free_memory() -> None:
    gc.collect()
    devices.torch_gc()


def upcast_attention() -> bool:
    """Settings > Optimizations > "Upcast cross attention layer to float32" (`upcast_attn`), which every A1111
    attention optimisation honours (sd_hijack_optimizations.py)."""
    return bool(option("upcast_attn", False))


def attention_context_transform() -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None:
    """What A1111's attention forwards do to the context before the key and value projections: the loaded
    hypernetworks (`hypernetwork.apply_hypernetworks(shared.loaded_hypernetworks, context)`), or None without any."""
    if not getattr(shared, "loaded_hypernetworks", None):
        return None
    from modules.hypernetworks import hypernetwork

    def transform(context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return hypernetwork.apply_hypernetworks(shared.loaded_hypernetworks, context)  # type: ignore[no-any-return]

    return transform


def blocks_leave_the_device() -> bool:
    """--lowvram: each UNet block is moved to the GPU by a pre-hook on its top-level block and back when another
    block runs (lowvram.py `setup_for_low_vram`), so a transformer block recomputed in the backward would find its
    weights on the CPU. (--medvram moves the UNet as a whole, before the forward.)"""
    return bool(getattr(getattr(shared, "cmd_opts", None), "lowvram", False))


def on_cuda() -> bool:
    return torch.cuda.is_available() and str(getattr(devices, "device", "cpu")).startswith("cuda")


def low_vram_flag(sd_model: Any) -> str | None:
    """The command-line flag that moves UNet blocks between devices during the forward (lowvram.py), if in effect:
    no CUDA graph can hold that. --medvram-sdxl only acts on SDXL models (lowvram.is_needed)."""
    options = getattr(shared, "cmd_opts", None)
    if getattr(options, "lowvram", False):
        return "--lowvram"
    if getattr(options, "medvram", False):
        return "--medvram"
    if getattr(options, "medvram_sdxl", False) and hasattr(sd_model, "conditioner"):
        return "--medvram-sdxl"
    if getattr(sd_model, "lowvram", False):
        return "--medvram/--lowvram"
    return None


def unet_output_dtype(timesteps: torch.Tensor) -> torch.dtype:
    """The dtype A1111 casts the timestep embedding to (sd_hijack_unet.py `timestep_embedding_cast_result`)."""
    if getattr(devices, "unet_needs_upcast", False) and timesteps.dtype == torch.int64:
        return torch.float32
    return getattr(devices, "dtype_unet", torch.float32)  # type: ignore[no-any-return]


def is_sd2(sd_model: Any) -> bool:
    """An SD2-family checkpoint (its text encoder is OpenCLIP ViT-H): sd_models.py `set_model_type` sets `is_sd2`."""
    return bool(getattr(sd_model, "is_sd2", False))


def loaded_model() -> Any:
    return getattr(shared, "sd_model", None)


# -- Prompts -----------------------------------------------------------------------------------------------------------


def strip_extra_networks(prompt: str) -> str:
    """The prompt without <lora:...> and other extra-network tags, as conditioning sees it (extra_networks.py)."""
    text, _ = extra_networks.parse_prompt(prompt)
    return str(text)


def first_subprompt(prompt: str) -> tuple[str, list[str]]:
    """(first AND sub-prompt, the others) of one prompt (prompt_parser.get_multicond_prompt_list)."""
    indexes, texts, _ = prompt_parser.get_multicond_prompt_list([prompt])
    if not indexes or not indexes[0]:
        return prompt, []
    return texts[indexes[0][0][0]], [texts[i] for i, _ in indexes[0][1:]]


def prompt_schedule(text: str, base_steps: int, hires_steps: int | None) -> list[tuple[int, str]]:
    """Prompt editing: (last model call, text) entries (prompt_parser.get_learned_conditioning_prompt_schedules)."""
    schedules = prompt_parser.get_learned_conditioning_prompt_schedules
    old_scheduling = (  # Forge Neo dropped the option and the argument
        (getattr(shared.opts, "use_old_scheduling", False),)
        if "use_old_scheduling" in inspect.signature(schedules).parameters else ()
    )
    schedule = schedules([text], base_steps, hires_steps, *old_scheduling)[0]
    return [(int(end), str(entry)) for end, entry in schedule]


def reconstruct_multicond_batch(cond: Any, call: int) -> tuple[list[list[tuple[int, float]]], Any]:
    """(per image: (row, weight) of each AND sub-prompt, the stacked conditioning in effect at model call `call`)."""
    return prompt_parser.reconstruct_multicond_batch(cond, call)  # type: ignore[no-any-return]


def schedule_ends(cond: Any, image: int) -> list[int]:
    """The last model call of each prompt-editing entry of image `image`'s first AND sub-prompt, as the sampler's
    conditioning holds it (prompt_parser.MulticondLearnedConditioning: batch[image][0].schedules)."""
    return [int(entry.end_at_step) for entry in cond.batch[image][0].schedules]


def open_clip_token_text(token_id: int) -> tuple[str, Any]:
    """SD2's open_clip tokenizer (module-level in sd_hijack_open_clip): (the token's text, the tokenizer)."""
    from modules.sd_hijack_open_clip import tokenizer

    return str(tokenizer.decoder.get(int(token_id), f"<{token_id}>")), tokenizer


# -- Results, callbacks, other scripts ---------------------------------------------------------------------------------


def save_image(p: Any, picture: Any, job_index: int, info: str | None, suffix: str) -> None:
    """Save like A1111 saves samples (images.save_image), when it saves them."""
    if not bool(option("samples_save", True)) or getattr(p, "do_not_save_samples", False):
        return
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


def register_callbacks(*, ui_settings: Callable[[], None], before_ui: Callable[[], None],
                       script_unloaded: Callable[[], None]) -> None:
    script_callbacks.on_ui_settings(ui_settings)
    script_callbacks.on_before_ui(before_ui)
    script_callbacks.on_script_unloaded(script_unloaded)


def xyz_grid_module() -> ModuleType | None:
    """The loaded X/Y/Z plot script (scripts/xyz_grid.py, loaded as a module named "xyz_grid.py")."""
    return next((d.module for d in scripts.scripts_data if d.script_class.__module__ == "xyz_grid.py"), None)


def sd_unet_replaced() -> bool:
    """Whether an sd_unet replacement (TensorRT and the like: `modules.sd_unet.current_unet`) runs instead of ldm's
    UNetModel.forward. Read from sys.modules: A1111 imports that module only with such an option, and importing it
    here would load it for every user."""
    sd_unet = sys.modules.get("modules.sd_unet")
    return getattr(sd_unet, "current_unet", None) is not None


def loaded_module(name: str) -> ModuleType | None:
    """A module the host has already imported (e.g. sgm's openaimodel for an SDXL UNet), or None; imports nothing."""
    return sys.modules.get(name)
