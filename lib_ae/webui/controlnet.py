"""sd-webui-controlnet beside the A&E pass's CUDA graphs.

ControlNet (Mikubill/sd-webui-controlnet, `scripts/hook.py`, `UnetHook.hook`) replaces the UNet's instance `forward`
with one that decides per call, in Python, which units apply (`param.guidance_stopped`, set per step by its
`guidance_schedule_handler` on `on_cfg_denoiser`), with which hint and weights. A graph replays the decisions made
while it was captured, so it is valid exactly while those decisions are the same. Here:

- `graph_blockers`: the set-ups whose forward keeps state between calls or calls the VAE or the CPU (reference-only
  attention banks, IP-Adapter, ReVision, inpaint/colorfix latents, low-VRAM moves): the pass evaluates eagerly.
- `step_state`: every per-call input of those decisions, as a value the graph path keys its graphs with
  (`lib_ae.graphs.GraphConditions`): a unit's window opening or closing inside A&E's steps is a new capture.
- `capture_scope`: two calls in that forward cannot be captured, so while capturing they are swapped for
  equivalents: `unmark_prompt_context` reads the conditioning's cond/uncond mark on the host (a sync; for A&E's
  conditional rows it always finds them positive, checked in the warm-up before capture), and ControlNet's own
  network takes sgm's timestep embedding, whose table is copied from the host (`sgm_timestep`).

The pass's gradient under ControlNet: its forward computes the UNet's encoder and middle block under
`th.no_grad()` (UnetHook.hook's `forward`, "U-Net Encoder"), which would leave A&E's gradient only the decoder's
maps through ControlNet's residuals, and none at all while no unit is active (the real webui stopped A&E with
"element 0 of tensors does not require grad" when a unit's window started after step 0). `pass_scope` lets the
gradient through during the pass: the values are the same, the gradient is the UNet's as without ControlNet plus
ControlNet's path (docs/host-notes.md, "ControlNet").
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Callable, Hashable, Iterator
from typing import Any, cast

import torch

from . import sgm_timestep

GRAPH_REPLAY = True
"""Whether the guard lets the pass replay as a graph beside ControlNet (a switch to turn it off without a release).
Shown in the real webui (tests/webui-gpu-h200.json, "controlnet"; H100, 2026-12-07): with a unit active over all of
A&E's steps and with windows ending or starting inside them, the graphs setting gave the same PNG bytes as eager,
twice, and replayed. The first GPU run, before `pass_scope` swapped hook.py's own `timestep_embedding` (ldm's util
one, whose table A1111 leaves on the host), met a host copy in the capture, and that failed capture, which
ControlNet's `forward_webui` answers by moving its models to the CPU, gave other pixels: a capture failure inside a
foreign forward is not harmless, so each such forward needs the same proof."""

LDM_UTIL_MODULE = "ldm.modules.diffusionmodules.util"

GRAPH_SAFE_UNIT_TYPES = frozenset({"ControlNet", "ControlLoRA", "ControlNetUnion", "T2I_Adapter"})
"""`ControlModelType` names whose per-call work is a pure function of the latent, timestep, context and hint: the
control network's residuals, scaled and added. The others keep or read state across calls (AttentionInjection's
banks, IP-Adapter's and Controlllite's patched attention, ReVision's and InstantID's embeddings, SparseCtrl)."""

STATEFUL_PREPROCESSORS = ("reference", "inpaint_only", "colorfix")
"""Preprocessor names whose forward encodes the hint with the VAE on its first call (hook.py, "Convert control
image to latent") or drives the attention banks."""


def hook_on(unet: torch.nn.Module) -> Any | None:
    """ControlNet's `UnetHook` when its forward is the UNet's instance forward (otherwise None)."""
    forward = vars(unet).get("forward")
    return _find_in_closures(getattr(forward, "__func__", forward), _is_unet_hook, depth=3)


def is_hook_forward(hook: Any, fn: Any) -> bool:
    """Whether `fn` is the forward `hook` set on the UNet."""
    return _find_in_closures(getattr(fn, "__func__", fn), lambda obj: obj is hook, depth=3) is not None


def graph_blockers(hook: Any, unet: torch.nn.Module) -> list[str]:
    """Why ControlNet's forward cannot be replayed as a graph in this generation (empty: it can)."""
    reasons: list[str] = []
    if getattr(hook, "lowvram", False):
        reasons.append("ControlNet's low-VRAM mode moves its models between devices at every call")
    if getattr(hook, "attn_module_list", None) or getattr(hook, "gn_module_list", None):
        reasons.append("ControlNet's reference attention keeps banks between calls")
    in_channels = getattr(getattr(unet, "input_blocks", [[None]])[0][0], "in_channels", 4)
    if in_channels == 9:
        reasons.append("ControlNet encodes an inpainting model's extra channels with the VAE at its first call")
    for index, param in enumerate(getattr(hook, "control_params", None) or []):
        kind = getattr(getattr(param, "control_model_type", None), "name", "unknown")
        preprocessor = str((getattr(param, "preprocessor", None) or {}).get("name", ""))
        if kind not in GRAPH_SAFE_UNIT_TYPES:
            reasons.append(f"ControlNet unit {index} ({kind}) keeps state between calls")
        elif any(word in preprocessor for word in STATEFUL_PREPROCESSORS):
            reasons.append(f"ControlNet unit {index} ({preprocessor}) encodes its image with the VAE during sampling")
    return reasons


def step_state(hook: Any) -> Hashable:
    """Everything ControlNet's forward reads per call to decide what it adds (besides the tensors' shapes, which the
    graph key holds): each unit's on/off state for this step, weights, injection mode, hint and region mask."""
    return tuple(
        (
            id(param),
            bool(param.guidance_stopped),
            str(getattr(param, "hr_option", "")),
            float(param.weight),
            bool(param.soft_injection),
            bool(param.cfg_injection),
            bool(getattr(param, "global_average_pooling", False)),
            repr(getattr(param, "advanced_weighting", None)),
            id(getattr(param, "hint_cond", None)),
            id(getattr(param, "hr_hint_cond", None)),
            id(getattr(param, "effective_region_mask", None)),
            id(param.control_model),
        )
        for param in (getattr(hook, "control_params", None) or [])
    )


def embedding_namespaces(unet: torch.nn.Module) -> list[dict[str, Any]]:
    """The module namespaces of ControlNet's networks (cldm.py imports sgm's `timestep_embedding` by name), for
    `sgm_timestep.device_side_embedding`."""
    hook = hook_on(unet)
    namespaces: list[dict[str, Any]] = []
    for param in (getattr(hook, "control_params", None) or []) if hook is not None else []:
        network = getattr(param.control_model, "control_model", param.control_model)
        namespace = getattr(type(network).forward, "__globals__", None)
        if isinstance(namespace, dict) and all(namespace is not seen for seen in namespaces):
            namespaces.append(namespace)
    return namespaces


class _WithGradients:
    """hook.py's `th` (ControlNet's `TorchHijackForUnet`, torch with a resizing `cat`; or torch itself) as it is,
    except that `th.no_grad()` keeps gradients on."""

    def __init__(self, wrapped: Any) -> None:
        self._wrapped = wrapped

    def __getattr__(self, name: str) -> Any:
        return getattr(self._wrapped, name)

    @staticmethod
    def no_grad() -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()


@contextlib.contextmanager
def pass_scope(unet: torch.nn.Module, loaded_module: Callable[[str], types.ModuleType | None]) -> Iterator[None]:
    """Within (the A&E pass's UNet call, eager and captured alike): ControlNet's forward keeps the gradient through
    the UNet's encoder, and takes its timestep embedding's table from the device (hook.py imports ldm's util
    `timestep_embedding` by name, which builds the table on the host at every call; the same numbers,
    tests/test_sgm_timestep.py). Nothing changes without ControlNet. `loaded_module`: `host.loaded_module`."""
    forward = vars(unet).get("forward")
    namespace = getattr(getattr(forward, "__func__", forward), "__globals__", None)
    if hook_on(unet) is None or not isinstance(namespace, dict):
        yield
        return
    swaps: dict[str, Any] = {}
    th = namespace.get("th")
    if th is not None and getattr(th, "no_grad", None) is torch.no_grad:
        swaps["th"] = _WithGradients(th)
    util = loaded_module(LDM_UTIL_MODULE)
    original: Any = getattr(util, "timestep_embedding", None)
    if original is not None and namespace.get("timestep_embedding") is original:
        host_embedding = cast(Callable[..., torch.Tensor], original)

        def embedding(timesteps: torch.Tensor, dim: int, max_period: int = 10000, repeat_only: bool = False
                      ) -> torch.Tensor:
            return sgm_timestep.device_timestep_embedding(
                timesteps, dim, max_period, repeat_only, original=host_embedding, output_dtype=lambda t: torch.float32
            )

        swaps["timestep_embedding"] = embedding
    saved = {name: namespace[name] for name in swaps}
    namespace.update(swaps)
    try:
        yield
    finally:
        namespace.update(saved)


class GraphUnsafe(RuntimeError):
    """Raised inside a capture that would not replay what eager evaluation computes (the capture then fails and the
    pass evaluates eagerly, saying why)."""


@contextlib.contextmanager
def capture_scope(hook: Any, unet: torch.nn.Module) -> Iterator[None]:
    """Within: ControlNet's `unmark_prompt_context` answers a capture from what it found in the warm-up (same
    shapes), without reading the mark on the host."""
    forward = vars(unet).get("forward")
    namespace = getattr(getattr(forward, "__func__", forward), "__globals__", None)
    original = namespace.get("unmark_prompt_context") if isinstance(namespace, dict) else None
    if original is None:
        yield
        return
    assert namespace is not None
    found: dict[Hashable, bool] = {}

    def unmark(x: torch.Tensor) -> Any:
        key = (tuple(x.shape), x.dtype, x.device)
        if not stream_capturing():
            mark_batch, uncond_rows, cond_rows, context = original(x)
            all_conditional = not uncond_rows and bool((mark_batch == 1).all())
            if all_conditional:
                found[key] = context.shape[1] == x.shape[1] - 1  # the mark row taken off
            else:
                found.pop(key, None)
            return mark_batch, uncond_rows, cond_rows, context
        if key not in found:
            raise GraphUnsafe("ControlNet did not find A&E's rows marked as the conditional prompt")
        marked = found[key]
        ones = torch.ones(size=(x.shape[0], 1, 1, 1), dtype=x.dtype, device=x.device)
        return ones, [], list(range(x.shape[0])), x[:, 1:, :] if marked else x

    namespace["unmark_prompt_context"] = unmark
    try:
        yield
    finally:
        namespace["unmark_prompt_context"] = original


def stream_capturing() -> bool:
    """Whether this thread's current CUDA stream is capturing (never on a build or machine without CUDA)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _is_unet_hook(obj: Any) -> bool:
    return type(obj).__name__ == "UnetHook" and hasattr(obj, "control_params") and hasattr(
        obj, "guidance_schedule_handler"
    )


def _find_in_closures(fn: Any, match: Any, depth: int) -> Any | None:
    """The first object in `fn`'s closure cells (and its closed-over functions', `depth` levels) that `match`es."""
    cells = getattr(fn, "__closure__", None) or ()
    for cell in cells:
        try:
            held = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        if match(held):
            return held
    if depth > 0:
        for cell in cells:
            try:
                held = cell.cell_contents
            except ValueError:
                continue
            if callable(held) and getattr(held, "__closure__", None):
                found = _find_in_closures(held, match, depth - 1)
                if found is not None:
                    return found
    return None
