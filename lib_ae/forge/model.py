"""The UNet side of A&E in Forge and Forge Neo: where the UNet is, how the pass calls it, what the pass does around it.

Forge keeps A1111's extension surface (the script, its hooks, `p.sampler.model_wrap_cfg`, `prompt_parser`, infotext),
so `lib_ae.webui` serves it and asks this module only for what `lib_ae.webui.sampling_pass.UnetHost` names. What
differs (docs/host-notes.md §12):

* the model is a `ForgeDiffusionEngine`; its UNet is `forge_objects.unet` (a `UnetPatcher`, cloned per generation by
  LoRA and ControlNet, so read at every model call) `.model` (`KModel`) `.diffusion_model`
  (`IntegratedUNet2DConditionModel`, shared by every clone): A&E runs on that class only;
* the cond-only pass is `KModel.apply_model(x, sigma, c_crossattn=, y=, control=, transformer_options=)`, the call
  Forge's `calc_cond_uncond_batch` makes for one chunk of conditional rows, with the patcher's `transformer_options`
  (other extensions' patches) and its ControlNet chain;
* the whole generation runs under `torch.inference_mode()` with inference-tensor weights: the pass runs inside
  `lib_ae.comfy_unet.differentiable_unet`, on a normal copy of the sampler's latent that is written back inside
  inference mode;
* CUDA graphs only where nothing in Forge's forward decides per call (`graph_conditions`), and with its timestep
  table kept on the device while a graph is captured (`GRAPH_REPLAY`: on since tests/forge-gpu-h200.json's GPU run).
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Callable, Iterator, MutableMapping
from typing import Any

import torch
from torch import nn

from lib_ae import comfy_unet, pass_memory
from lib_ae.capture import AttentionCapture
from lib_ae.comfy_unet import (
    ForgeUnetError,
    differentiable_latent,
    differentiable_unet,
    forge_namespace,
    unsupported_patches,
    update_in_inference_mode,
)
from lib_ae.engine import UNetRunner
from lib_ae.graphs import GraphableRunner, GraphConditions, find_graph_hazards, owned_by
from lib_ae.in_sampler import LatentSpace
from lib_ae.pass_memory import PassAttention, PassMemory
from lib_ae.targeting import TextEncoder

FORGE_UNET_CLASS = "IntegratedUNet2DConditionModel"
"""Forge's UNet (`backend.nn.unet`), which SD1.5, SD2 and SDXL checkpoints load into; every other family Forge runs
(Flux, Chroma, SD3, Lumina, Wan, ...) is a transformer without that UNet's cross-attention layers."""

UNSUPPORTED_SAMPLERS = frozenset({
    "UniPC", "DPM fast", "DPM adaptive", "Restart", "Kohaku LoNyu Yog", "HeunPP2", "DPM++ 2s a RF", "Flux Realistic",
})
"""A1111's refused samplers, plus those whose model calls per step Forge's step count does not tell
(`launch_sampling` counts two calls per step only for samplers flagged "second_order"): Neo's Kohaku LoNyu Yog (three
calls per step in its first half, one after), Forge's HeunPP2 (up to three), Neo's "DPM++ 2s a RF" (two, unflagged;
shown as "Flux Realistic" with one option on). Every other Forge sampler makes one call per step, or two and says so."""

GRAPH_REPLAY = True
"""Whether the pass may be replayed as a CUDA graph in Forge (where `graph_conditions` finds nothing that decides per
call). A switch because a capture that fails inside a host's forward is not always harmless; on since the first GPU run
in the real Forge Neo (tests/forge-gpu-h200.json): the graphs setting gave the same PNG bytes as eager for SD1.5
(with and without refinement) and SDXL, every graph replayed, and beside Forge's ControlNet the guard fell back to
eager with the same pixels."""

EAGER_REASON = "Forge: the A&E pass runs eagerly there (CUDA-graph replay in Forge is switched off: GRAPH_REPLAY)"

OWN_FORWARD_MODULES = frozenset({comfy_unet.__name__, pass_memory.__name__})
"""The pass's own instance forwards (out-of-place blocks, own attention, lean forwards): set for the pass only."""


def diffusion_model(sd_model: Any) -> nn.Module | None:
    """`sd_model.forge_objects.unet.model.diffusion_model`, or None where a part is missing."""
    patcher = getattr(getattr(sd_model, "forge_objects", None), "unet", None)
    return getattr(getattr(patcher, "model", None), "diffusion_model", None)


def family(sd_model: Any) -> str:
    """The model family in the user's words: the engine's class name (StableDiffusionXL, Flux, Chroma, ...)."""
    return type(sd_model).__name__


class ForgeUnet:
    """`lib_ae.webui.sampling_pass.UnetHost` for Forge. `memory`: the pass memory the user's setting asks for;
    `graphs_asked`: the CUDA-graphs setting, on a CUDA device (only to say why the pass runs eagerly)."""

    name = "Forge"

    def __init__(self, memory: PassMemory, graphs_asked: bool) -> None:
        self.memory = memory
        self.graphs_asked = graphs_asked

    def unsupported_reason(self, p: Any, sampler: str) -> str | None:
        model = p.sd_model
        unet = diffusion_model(model)
        if unet is None or type(unet).__name__ != FORGE_UNET_CLASS:
            return (f"{family(model)} models are not supported: A&E needs a UNet with cross-attention (SD1.5, SD2, "
                    "SDXL); the image was made without it")
        if sampler in UNSUPPORTED_SAMPLERS:
            return (f"sampler {sampler} is not supported (its model calls do not follow the steps); try Euler, "
                    "DPM++ 2M or DDIM")
        options = model.forge_objects.unet.model_options.get("transformer_options", {})
        patched = unsupported_patches(options)
        return None if patched is None else f"A&E was not applied: {patched}"

    def unet(self, p: Any) -> nn.Module:
        unet = diffusion_model(p.sd_model)
        if unet is None:
            raise ForgeUnetError("the loaded model has no Forge UNet (forge_objects.unet.model.diffusion_model)")
        return unet

    def cuda_graphs(self, p: Any) -> tuple[bool, str | None]:
        if not self.graphs_asked:
            return False, None
        return (True, None) if GRAPH_REPLAY else (False, EAGER_REASON)

    def graph_conditions(self, capture: AttentionCapture, p: Any) -> GraphConditions:
        """Why a graph would be wrong in this pass (`graph_blockers`, plus foreign hooks and forwards), asked at its
        first graph evaluation; around a capture, Forge's timestep table kept on the device (`device_timestep_table`).
        Nothing of Forge's per-call state keys the graphs: a set-up that has any is refused."""
        unet = capture.unet
        namespace = forge_namespace(unet)

        def guard() -> list[str] | None:
            reasons = graph_blockers(p.sd_model.forge_objects.unet, unet)
            reasons += find_graph_hazards(unet, is_own=owned_by(capture), allowed_forward=_own_forward)
            return reasons or None

        return GraphConditions(guard=guard, capture_scope=lambda: device_timestep_table(namespace))

    def pass_memory(self) -> PassMemory:
        # Forge's attention ignores A1111's upcast setting and has no hypernetworks; `comfy_unet.own_attention`
        # computes the pass's attention itself.
        return PassMemory(self.memory.mode, PassAttention())

    def runner(self, p: Any, den: Any, sigma: torch.Tensor, cond: Any, image_cond: torch.Tensor | None,
               space: LatentSpace) -> UNetRunner:
        """Forge's cond-only pass for one row per image: `KModel.apply_model` as `calc_cond_uncond_batch` calls it for
        a chunk of conditional rows (a fresh `transformer_options` from the patcher's, marking every row as
        conditional; ControlNet's residuals from its chain, for these rows and this sigma). DDIM and PLMS hand the
        sampler's VP latent and timestep: mapped as Forge's `CFGDenoiser.forward` maps them (`fake_sigmas`)."""
        sd_model = getattr(den.inner_model, "inner_model", p.sd_model)
        names = sorted(cond) if isinstance(cond, dict) else None
        cond_tensors = tuple(cond[name] for name in names) if names else (cond,)
        inpaint = image_cond is not None and bool(getattr(sd_model, "is_inpaint", False))
        fake_sigmas = None
        if space == "vp":
            alphas = den.inner_model.inner_model.alphas_cumprod
            fake_sigmas = ((1 - alphas) / alphas) ** 0.5

        def cond_forward(latent_rows: torch.Tensor, sigma_rows: torch.Tensor, *rest: torch.Tensor) -> object:
            image_rows = rest[0] if inpaint else None
            value = dict(zip(names, rest[1 if inpaint else 0:])) if names else rest[1 if inpaint else 0]
            context = value["crossattn"] if isinstance(value, dict) else value
            x, s = latent_rows, sigma_rows
            if fake_sigmas is not None:
                s = fake_sigmas.to(sigma_rows.device)[sigma_rows.round().long().clamp(0, fake_sigmas.shape[0] - 1)]
                x = latent_rows * torch.sqrt(s * s + 1.0).to(latent_rows.dtype)[:, None, None, None]
            return _apply_model(sd_model.forge_objects.unet, x, s, context,
                                value.get("vector") if isinstance(value, dict) else None, image_rows)

        inputs = (sigma, *((image_cond,) if inpaint else ()), *cond_tensors)
        device = sigma.device
        # Normal copies on the device: inference tensors cannot be saved for the backward.
        inputs = tuple(differentiable_latent(t.to(device)) for t in inputs)  # type: ignore[arg-type]
        key = ("forge-cond-pass", id(den), tuple(names or ()), inpaint, space)
        return GraphableRunner(cond_forward, inputs, key=key)

    @contextlib.contextmanager
    def gradient_scope(self, unet: nn.Module, x: torch.Tensor, sigma: torch.Tensor
                       ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Inside: Forge's UNet differentiable (`differentiable_unet`), and normal copies of the sampler's latent and
        sigma, which the pass updates; on a normal exit the latent is written back into the sampler's tensor, inside
        inference mode (an exception leaves the sampler's latent as it was)."""
        with differentiable_unet(unet):
            latent = differentiable_latent(x)
            yield latent, differentiable_latent(sigma)
        update_in_inference_mode(x, latent)

    @contextlib.contextmanager
    def outside_inference(self) -> Iterator[None]:
        """Tensors the run keeps between steps (plan, noise, loss indices) made as normal tensors."""
        with torch.inference_mode(False):
            yield


def _apply_model(patcher: Any, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor, vector: torch.Tensor | None,
                 concat: torch.Tensor | None) -> object:
    rows = x.shape[0]
    options = {
        **patcher.model_options.get("transformer_options", {}),
        "cond_or_uncond": [0],
        "sigmas": sigma,
        "cond_mark": torch.zeros(rows, dtype=sigma.dtype, device=sigma.device),
        "cond_indices": list(range(rows)),
        "uncond_indices": [],
    }
    conds: dict[str, Any] = {"c_crossattn": context, "transformer_options": options}
    if vector is not None:
        conds["y"] = vector
    if concat is not None:
        conds["c_concat"] = concat
    control = patcher.controlnet_linked_list
    if control is not None:
        link = control
        while link is not None:
            link.transformer_options = options
            link = link.previous_controlnet
        # ControlNet's residuals enter as constants of the pass: its models' weights are inference tensors and its
        # merge works in place; the UNet's own path carries the gradient.
        with torch.no_grad():
            conds["control"] = control.get_control(x, sigma, dict(conds), 1)
        conds["control_model"] = control
    wrapper = patcher.model_options.get("model_function_wrapper")
    if wrapper is not None:
        return wrapper(patcher.model.apply_model, {"input": x, "timestep": sigma, "c": conds, "cond_or_uncond": [0]})
    return patcher.model.apply_model(x, sigma, **conds)


def graph_blockers(patcher: Any, unet: nn.Module) -> list[str]:
    """What in Forge's set-up decides per call, which a replayed graph would freeze: the patcher's patches and
    wrappers (Python run at every call), its ControlNet chain (a window in sigma, hints), and weights cast or patched
    per call (partial loading, fp8/GGUF storage, online LoRA: `weights_manual_cast` on every layer)."""
    reasons: list[str] = []
    options = patcher.model_options
    transformer = options.get("transformer_options", {})
    patched = sorted(kind for kind in ("patches", "patches_replace", "block_modifiers", "block_inner_modifiers",
                                       "group_norm_wrapper") if transformer.get(kind))
    if patched:
        reasons.append("an extension patches the UNet per call (" + ", ".join(patched) + ")")
    if options.get("model_function_wrapper") is not None:
        reasons.append("an extension wraps the UNet call (model_function_wrapper)")
    if getattr(patcher, "controlnet_linked_list", None) is not None:
        reasons.append("Forge's ControlNet decides per call (its window and hint)")
    cast = next((name for name, module in unet.named_modules()
                 if getattr(module, "parameters_manual_cast", False) or getattr(module, "weight_function", None)
                 or getattr(module, "bias_function", None)), None)
    if cast is not None:
        reasons.append(f"weights are cast or patched at every call (partial loading, fp8/GGUF, online LoRA; {cast})")
    return reasons


def _own_forward(cls: type, fn: Callable[..., Any]) -> bool:
    return getattr(inspect.unwrap(getattr(fn, "__func__", fn)), "__module__", None) in OWN_FORWARD_MODULES


def _timestep_table(dim: int, max_period: float) -> torch.Tensor:
    """The frequencies of the sinusoidal timestep embedding, computed as Forge computes them (float32, on the host)."""
    half = dim // 2
    return torch.exp(-math.log(max_period) * torch.arange(start=0, end=half, dtype=torch.float32) / half)


@contextlib.contextmanager
def device_timestep_table(namespace: MutableMapping[str, Any]) -> Iterator[None]:
    """Forge's `timestep_embedding` (a module global its UNet looks up at every call) replaced inside this block by one
    that moves its frequency table to the device once and keeps it there: Forge's builds it on the host and copies it
    at every call, a copy a CUDA graph cannot capture. The same table, so the same bits as Forge's."""
    original = namespace["timestep_embedding"]
    tables: dict[tuple[int, float, torch.device], torch.Tensor] = {}

    def embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000, repeat_only: bool = False,
                  ) -> torch.Tensor:
        if repeat_only:
            return original(timesteps, dim, max_period, repeat_only)  # type: ignore[no-any-return]
        key = (dim, max_period, timesteps.device)
        table = tables.get(key)
        if table is None:
            table = tables[key] = _timestep_table(dim, max_period).to(timesteps.device)
        angles = timesteps[:, None].float() * table[None]
        out = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
        if dim % 2:
            out = torch.cat([out, torch.zeros_like(out[:, :1])], dim=-1)
        return out

    namespace["timestep_embedding"] = embedding
    try:
        yield
    finally:
        namespace["timestep_embedding"] = original


def text_encoder(sd_model: Any) -> TextEncoder | None:
    """Forge's A1111-style chunking text engine: CLIP-L's for SDXL (as A1111 reads SDXL's prompts), else the only one
    (SD1/SD2; the SDXL refiner has only CLIP-G's)."""
    for name in ("text_processing_engine_l", "text_processing_engine", "text_processing_engine_g"):
        engine = getattr(sd_model, name, None)
        if engine is not None and hasattr(engine, "process_texts") and hasattr(engine, "id_start"):
            found: TextEncoder = engine
            return found
    return None


def is_sd2(sd_model: Any) -> bool:
    return bool(getattr(sd_model, "is_sd2", False))

