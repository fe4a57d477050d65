"""What may stay on the UNet while the A&E pass is replayed as a CUDA graph.

A captured graph replays the kernels the first evaluation launched; Python that decides something per call (a hook
that acts only during some steps, a forward that reads a step counter) is frozen at capture time, and the replay
would be silently wrong. The core detector `lib_ae.graphs.find_graph_hazards` lists foreign hooks and patched
`forward`s; this module tells it which class-level patches are A1111's own and safe (docs/host-notes.md §6 lists
each one and why), and the engine falls back to eager evaluation when anything else is found.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Hashable
from typing import Any

import torch

from lib_ae import AttentionCapture
from lib_ae.graphs import GraphConditions, find_graph_hazards, owned_by

from . import controlnet, host

GraphGuard = Callable[[], "list[str] | None"]

ALLOWED_FORWARD_MODULES: dict[str, str] = {
    "modules.sd_hijack_optimizations": "A1111's cross-attention optimisations (xformers, SDP, sub-quadratic, "
    "split, InvokeAI, Doggettx): pure functions of their inputs, chosen once per model load",
    "modules.hypernetworks.hypernetwork": "A1111's cross-attention forward for hypernetworks (the 'None' "
    "optimisation): reads the hypernetworks loaded for the generation, the same at every step",
    "modules.sd_unet": "A1111's UNetModel.forward dispatcher: calls the original forward unless an sd_unet "
    "replacement (e.g. TensorRT) is selected, which is then checked separately",
    "modules.devices": "A1111's manual_cast wrappers (GPUs without autocast): a dtype cast around the original forward",
    "networks": "the built-in Lora extension's patches of Linear/Conv2d/GroupNorm/LayerNorm/MultiheadAttention "
    "(extensions-builtin/Lora/networks.py): apply the networks loaded for the generation, the same at every step",
}
"""Module of a replacement `forward` -> why it is safe under graph replay."""


CONDFUNC_MODULE = "modules.sd_hijack_utils"
"""A1111's `CondFunc` patches a function with a lambda defined in this module, whatever it substitutes; what decides is
the substitute it holds (`_CondFunc__sub_func`)."""

A1111_CONDFUNC_SUBSTITUTES: dict[str, str] = {
    "modules.sd_hijack_unet": "A1111's dtype up-casts of GroupNorm32/GEGLU/SpatialTransformer/timestep embedding "
    "(sd_hijack_unet.py), chosen by the constant --upcast-sampling flag (devices.unet_needs_upcast)",
}


def allowed_forward(cls: type, fn: Callable[..., Any]) -> bool:
    """A `forward` that differs from the class's own definition (set on the class or on an instance), but is one of
    A1111's own (see above)."""
    module = _module_of(fn)
    if module == "modules.sd_unet":
        return _no_sd_unet_replacement()
    if module == CONDFUNC_MODULE:
        substitute = _condfunc_substitute(fn)
        return substitute is not None and _module_of(substitute) in A1111_CONDFUNC_SUBSTITUTES
    return module in ALLOWED_FORWARD_MODULES


def _module_of(fn: Any) -> str:
    return getattr(inspect.unwrap(getattr(fn, "__func__", fn)), "__module__", None) or ""


def _condfunc_substitute(fn: Any) -> Any:
    """The function a `CondFunc` lambda substitutes (its closure holds the CondFunc), or None if it is not one."""
    for cell in getattr(fn, "__closure__", None) or ():
        try:
            held = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        substitute = getattr(held, "_CondFunc__sub_func", None)
        if substitute is not None:
            return substitute
    return None


def _no_sd_unet_replacement() -> bool:
    return not host.sd_unet_replaced()


def guard_for(capture: AttentionCapture, sd_model: Any) -> GraphConditions:
    """The engine's graph conditions: the reasons not to replay (empty/None = safe), checked at the first graph
    evaluation of a pass, and, beside sd-webui-controlnet, its per-call state and capture scope (controlnet.py).
    Our own capture hooks are not a hazard."""
    unet: torch.nn.Module = sd_model.model.diffusion_model
    is_own = owned_by(capture)

    def guard() -> list[str] | None:
        hook = controlnet.hook_on(unet)
        if hook is None:
            return find_graph_hazards(unet, is_own=is_own, allowed_forward=allowed_forward) or None
        if not controlnet.GRAPH_REPLAY:
            return ["ControlNet's UNet forward (graph replay beside it is switched off: controlnet.GRAPH_REPLAY)"]
        reasons = controlnet.graph_blockers(hook, unet)
        if reasons:
            return reasons

        def allowed(cls: type, fn: Callable[..., Any]) -> bool:
            return allowed_forward(cls, fn) or controlnet.is_hook_forward(hook, fn)

        reasons = find_graph_hazards(unet, is_own=is_own, allowed_forward=allowed)
        for index, param in enumerate(hook.control_params or []):
            if isinstance(param.control_model, torch.nn.Module):
                found = find_graph_hazards(param.control_model, is_own=is_own, allowed_forward=allowed_forward)
                reasons += [f"{reason} (ControlNet unit {index}'s network)" for reason in found]
        return reasons or None

    def state() -> Hashable:
        hook = controlnet.hook_on(unet)
        return None if hook is None else controlnet.step_state(hook)

    def scope() -> contextlib.AbstractContextManager[None]:
        hook = controlnet.hook_on(unet)
        return contextlib.nullcontext() if hook is None else controlnet.capture_scope(hook, unet)

    return GraphConditions(guard, state, scope)
