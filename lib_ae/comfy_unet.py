"""A forward and backward through a ComfyUI-layout UNet, with exact gradients with respect to its input, entered while
the host holds the whole generation in `torch.inference_mode()`. Written for Forge and Forge Neo
(`backend.nn.unet.IntegratedUNet2DConditionModel`, derived from ComfyUI's UNet: the same blocks, `transformer_options`
patches and `apply_control`), whose adapter is `lib_ae.forge`; a host-neutral part of the core, like
`lib_ae.pass_memory`, because it imports nothing of a host and serves any host of that family.

Forge builds its UNet for inference only; four things stop autograd:

1. **Inference-tensor weights.** Forge's model loader runs under `torch.inference_mode()`, so every parameter is an
   inference tensor, and autograd refuses to save one for the backward ("Inference tensors cannot be saved for
   backward"), even inside `inference_mode(False)` + `enable_grad()`: every Linear, Conv2d, GroupNorm or LayerNorm
   whose input requires grad saves its weight. `normal_weights` replaces each inference parameter and buffer by a
   normal tensor for the duration (and puts the originals back):
     - "clone": a copy. Extra memory: the UNet's weights once, for as long as the block is entered (SD1.5
       fp16 1.6 GiB, SDXL fp16 4.8 GiB; `PassWeights.extra_bytes` tells the exact figure).
     - "alias" (default): a normal tensor on the same storage (`Tensor.set_`), no copy, no extra memory. Autograd's
       version-counter check does not cover the weight then (an inference tensor has none), which is harmless as long
       as nothing rewrites the weights in place between the forward and the backward (Forge patches LoRA weights
       only while loading the model, before sampling).
   Lazier alternatives to a whole clone: cloning per layer in a forward pre-hook and dropping the reference in a
   forward hook (autograd then keeps only the clones of the layers the pass ran through, until the backward: roughly
   the weights up to the last captured layer), or cloning only the layers before the last captured layer. Weights
   that Forge casts per call (`parameters_manual_cast`: partial loading, fp8 storage) are fresh normal tensors when
   the cast runs outside inference mode, but a cast that changes nothing (`.to()` to the same device and dtype)
   returns the parameter itself, so they are replaced like the others.
2. **In-place additions.** `BasicTransformerBlock._forward` adds the attention outputs with `x += n`, into a tensor
   its LayerNorms saved ("one of the variables needed for gradient computation has been modified by an inplace
   operation" in the backward). `out_of_place_blocks` gives every transformer block an instance `forward` that
   computes what Forge's computes, with out-of-place additions.
3. **ControlNet residuals.** The UNet adds them with `h += ctrl` in the module-level `apply_control`; for "output"
   residuals `h` is a skip tensor that the next input block already saved. `out_of_place_control` replaces that
   module global (`IntegratedUNet2DConditionModel.forward` looks it up at every call) for the duration.
4. **Attention kernels without backward.** Forge picks its attention function at import (SageAttention, its
   flash-attention custom op, xformers, PyTorch SDPA, split, sub-quadratic); the first two have no backward.
   `own_attention` gives every attention layer an instance `forward` that computes PyTorch's scaled dot-product
   attention exactly as Forge's "pytorch" attention does (same projections and head layout, no upcast, the mask
   passed as `attn_mask`).

`differentiable_unet` applies the four and opens `inference_mode(False)` + `enable_grad()` inside. The instance
`forward`s still call the attention modules through `Module.__call__`, so `lib_ae.capture`'s forward hooks see them,
and `lib_ae.pass_memory.lean_forward` wraps them (its own attention defers to ours, since Forge passes
`transformer_options`; its recomputation checkpoints our block forwards).

Patches (`transformer_options["patches"]`, `["patches_replace"]`, set by Forge extensions through `UnetPatcher`): the
block forward honours the ones Forge's block honours in line (`attn1_patch`, `attn1_output_patch`, `middle_patch`,
`attn2_patch`, `attn2_output_patch`: callables on tensors, applied as Forge applies them), and **refuses**
`patches_replace["attn1"/"attn2"]` entries that apply to a block (`UnsupportedForgePatch`): such a replacement calls
the projections and its own attention directly, never the attention module, so the capture's hooks would silently
miss the layer, and it usually calls Forge's attention function, whose kernel may have no backward.
`unsupported_patches` says so before a pass. Note that Forge gives self-attention a context whenever an `attn1_patch`
list exists (even an empty one); `lib_ae.capture` then does not count that layer as self-attention. Patches that read
the block position from `extra_options` see, under `lean_forward`'s recomputation, the `transformer_options` dict as
the UNet forward left it (it rewrites "block" and "block_index" in place as it goes).

The latent: an inference tensor cannot take `requires_grad_`; `differentiable_latent` makes the normal copy (outside
inference mode). The sampler's own latent is an inference tensor too, which PyTorch does not let anything update in
place outside inference mode ("Inplace update to inference tensor outside InferenceMode"), so `x.copy_(new)` fails
inside this block: `update_in_inference_mode` does the write inside inference mode.

This module imports only torch and the standard library: Forge's module namespace is taken from the UNet's class
(`forge_namespace`), so nothing here imports `backend.*` or `modules.*`.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import sys
from collections.abc import Callable, Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from .pass_memory import attention_parts, instance_forwards, multi_head_sdpa

logger = logging.getLogger(__name__)

__all__ = [
    "ForgeUnetError",
    "PassWeights",
    "UnetPass",
    "UnsupportedForgePatch",
    "WeightMode",
    "differentiable_latent",
    "differentiable_unet",
    "forge_namespace",
    "normal_weights",
    "out_of_place_blocks",
    "out_of_place_control",
    "own_attention",
    "unsupported_patches",
    "update_in_inference_mode",
]

WeightMode = Literal["clone", "alias"]
WEIGHT_MODES: tuple[WeightMode, ...] = ("clone", "alias")

REPLACED_ATTENTIONS = ("attn1", "attn2")
"""The `patches_replace` kinds a transformer block looks up (Forge's `BasicTransformerBlock._forward`)."""


class ForgeUnetError(RuntimeError):
    """The module is not a Forge-layout UNet, or holds weights this pass cannot make differentiable."""


class UnsupportedForgePatch(RuntimeError):
    """`transformer_options` carries a patch that the differentiable pass does not honour (see the module docstring)."""


@dataclass
class PassWeights:
    """What `normal_weights` replaced: `tensors` parameters and buffers (distinct tensors), `extra_bytes` allocated
    for their copies (0 with "alias")."""

    mode: WeightMode
    tensors: int = 0
    extra_bytes: int = 0


@dataclass
class UnetPass:
    """What `differentiable_unet` set up: the weights replaced, the transformer blocks and attention layers given an
    instance `forward`."""

    weights: PassWeights
    blocks: int
    attention_layers: int


# -- The host's namespace ----------------------------------------------------------------------------------------------


def forge_namespace(unet: nn.Module) -> MutableMapping[str, Any]:
    """The globals of the module that defines `unet`'s class (`backend.nn.unet` in Forge): where its `forward` looks up
    `apply_control` at every call, and where `BasicTransformerBlock` and `CrossAttention` live."""
    forward = inspect.unwrap(type(unet).forward)
    namespace: MutableMapping[str, Any] | None = getattr(forward, "__globals__", None)
    if namespace is None or "apply_control" not in namespace:
        # A forward defined elsewhere (a wrapper another extension put on the class): the class's own module.
        module = sys.modules.get(type(unet).__module__)
        namespace = vars(module) if module is not None else None
    if namespace is None:
        raise ForgeUnetError(f"cannot find the module of {type(unet).__qualname__}")
    missing = [name for name in ("apply_control", "BasicTransformerBlock", "CrossAttention") if name not in namespace]
    if missing:
        raise ForgeUnetError(
            f"{type(unet).__module__}.{type(unet).__qualname__} is not a Forge UNet (its module has no "
            + ", ".join(missing) + ")"
        )
    return namespace


def _instances(unet: nn.Module, cls: object) -> list[nn.Module]:
    if not isinstance(cls, type):
        raise ForgeUnetError(f"the UNet's module defines {cls!r} where a class was expected")
    return [m for m in unet.modules() if isinstance(m, cls)]


# -- 1. Weights --------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def normal_weights(unet: nn.Module, mode: WeightMode = "alias") -> Iterator[PassWeights]:
    """Every inference-tensor parameter and buffer of `unet` replaced by a normal tensor (`mode`: a "clone", or an
    "alias" of the same storage) inside this block, the originals put back on exit. Replacements never require grad:
    the pass differentiates with respect to its input only. A tensor shared by several modules gets one replacement,
    so tied weights stay tied."""
    if mode not in WEIGHT_MODES:
        raise ValueError(f"weight mode must be one of {', '.join(WEIGHT_MODES)} (got {mode!r})")
    found: list[tuple[nn.Module, bool, str, torch.Tensor]] = []
    unsupported: list[str] = []
    for module_name, module in unet.named_modules():
        for is_parameter, table in ((True, module._parameters), (False, module._buffers)):
            for name, tensor in table.items():
                if tensor is None or not tensor.is_inference():
                    continue
                # Quantised storage (Forge's GGUF and bitsandbytes parameters) keeps its state in the subclass; a
                # plain copy would lose it.
                if type(tensor) not in (nn.Parameter, torch.Tensor):
                    unsupported.append(f"{module_name}.{name} ({type(tensor).__name__})")
                found.append((module, is_parameter, name, tensor))
    if unsupported:
        raise ForgeUnetError(
            "the A&E pass cannot differentiate through quantised weights: " + ", ".join(unsupported[:3])
            + (f" and {len(unsupported) - 3} more" if len(unsupported) > 3 else "")
        )
    report = PassWeights(mode)
    replaced: list[tuple[nn.Module, bool, str, torch.Tensor]] = []
    try:
        # Outside inference mode, so that the new tensors are normal ones.
        with torch.inference_mode(False):
            replacements: dict[int, torch.Tensor] = {}
            for module, is_parameter, name, tensor in found:
                new = replacements.get(id(tensor))
                if new is None:
                    data = _normal_copy(tensor) if mode == "clone" else _normal_alias(tensor)
                    new = nn.Parameter(data, requires_grad=False) if is_parameter else data
                    replacements[id(tensor)] = new
                    report.tensors += 1
                    if mode == "clone":
                        report.extra_bytes += data.numel() * data.element_size()
                table = module._parameters if is_parameter else module._buffers
                table[name] = new  # type: ignore[assignment]  # a Parameter where the table holds parameters
                replaced.append((module, is_parameter, name, tensor))
        logger.debug("A&E pass: %d inference tensors of the UNet replaced (%s, %d extra bytes)", report.tensors, mode,
                     report.extra_bytes)
        yield report
    finally:
        for module, is_parameter, name, tensor in reversed(replaced):
            table = module._parameters if is_parameter else module._buffers
            table[name] = tensor  # type: ignore[assignment]


def _normal_copy(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().clone()


def _normal_alias(tensor: torch.Tensor) -> torch.Tensor:
    """A normal tensor viewing `tensor`'s storage: made outside inference mode, so it is not an inference tensor
    although its memory is."""
    alias = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
    return alias.set_(tensor.untyped_storage(), tensor.storage_offset(), tensor.size(), tensor.stride())


# -- 2. Transformer blocks ---------------------------------------------------------------------------------------------


def unsupported_patches(transformer_options: Mapping[str, Any]) -> str | None:
    """Why a pass with these `transformer_options` would be refused (None: it would not): attention replacements
    (see the module docstring). For a message before the pass; the block forward checks each block itself."""
    replaces = transformer_options.get("patches_replace") or {}
    found = [f"{kind} replacement for {', '.join(map(str, table))}"
             for kind in REPLACED_ATTENTIONS if (table := replaces.get(kind))]
    if not found:
        return None
    return ("an extension replaces attention layers (" + "; ".join(found) + "); A&E cannot read or differentiate "
            "through a replaced attention layer")


def _refuse_replacement(replaces: Mapping[str, Any], kind: str, block: Any, position: Any) -> None:
    """Raise if Forge's block would call a `patches_replace[kind]` entry here (it looks up the block with its index
    inside the spatial transformer first, then the block alone)."""
    table = replaces.get(kind) or {}
    for key in (position, block):
        if key is not None and key in table:
            raise UnsupportedForgePatch(
                f"{kind} of transformer block {key} is replaced by an extension's patch "
                f"({getattr(table[key], '__qualname__', type(table[key]).__name__)}); the A&E pass would not see that "
                "layer's attention, and the replacement may have no backward"
            )


def _out_of_place_block_forward(block: nn.Module) -> Callable[..., torch.Tensor]:
    """Forge's `BasicTransformerBlock.forward` for `block` (the checkpoint flag is always off in Forge, so it is
    `_forward`), with every addition out of place. The attention modules are called as Forge calls them (first
    argument the normalised hidden states, `context`, `value`, `transformer_options` by keyword), through
    `Module.__call__`, so that hooks on them run.

    `transformer_options` is passed before `value`: `lib_ae.pass_memory`'s own attention tests its extra keywords in
    that order with `value not in (None, 0)`, which raises for a tensor `value` (an attn1/attn2 patch sets one) unless
    the dict, which sends it to the host forward (ours), comes first."""
    attn1: nn.Module = block.attn1  # type: ignore[assignment]
    attn2: nn.Module | None = block.attn2  # type: ignore[assignment]
    norm1: nn.Module = block.norm1  # type: ignore[assignment]
    norm2: nn.Module = block.norm2  # type: ignore[assignment]
    norm3: nn.Module = block.norm3  # type: ignore[assignment]
    feed_forward: nn.Module = block.ff  # type: ignore[assignment]

    def forward(x: torch.Tensor, context: torch.Tensor | None = None,
                transformer_options: Mapping[str, Any] | None = None) -> torch.Tensor:
        options: Mapping[str, Any] = {} if transformer_options is None else transformer_options
        patches: Mapping[str, Sequence[Callable[..., Any]]] = options.get("patches", {})
        replaces: Mapping[str, Any] = options.get("patches_replace", {})
        # What the patches and attention modules receive: every option but the patch tables, plus the head layout.
        extra = {k: v for k, v in options.items() if k not in ("patches", "patches_replace")}
        extra["n_heads"] = block.n_heads
        extra["dim_head"] = block.d_head
        block_key = options.get("block")
        position = None if block_key is None else (block_key[0], block_key[1], options.get("block_index", 0))
        for kind in REPLACED_ATTENTIONS:
            _refuse_replacement(replaces, kind, block_key, position)

        # `ff_in` is a module where the block has an input feed-forward, else False (unused by SD1/SD2/SDXL).
        if block.ff_in:
            residual = x
            x = block.ff_in(block.norm_in(x))  # type: ignore[operator]
            if block.is_res:
                x = x + residual

        n = norm1(x)
        context_1 = context if block.disable_self_attn else None
        value_1 = None
        if "attn1_patch" in patches:
            # Forge hands self-attention its own input as context and value as soon as the patch list exists.
            if context_1 is None:
                context_1 = n
            value_1 = context_1
            for patch in patches["attn1_patch"]:
                n, context_1, value_1 = patch(n, context_1, value_1, extra)
        n = attn1(n, context=context_1, transformer_options=extra, value=value_1)
        for patch in patches.get("attn1_output_patch", ()):
            n = patch(n, extra)
        x = x + n
        for patch in patches.get("middle_patch", ()):
            x = patch(x, extra)

        # Forge adds `n` again when the block has no cross-attention (then still the self-attention's output);
        # kept as it is, so that this forward computes what Forge's does.
        if attn2 is not None:
            n = norm2(x)
            context_2 = context
            value_2 = None
            if "attn2_patch" in patches:
                value_2 = context_2
                for patch in patches["attn2_patch"]:
                    n, context_2, value_2 = patch(n, context_2, value_2, extra)
            n = attn2(n, context=context_2, transformer_options=extra, value=value_2)
        for patch in patches.get("attn2_output_patch", ()):
            n = patch(n, extra)
        x = x + n

        if block.is_res:
            return feed_forward(norm3(x)) + x  # type: ignore[no-any-return]
        return feed_forward(norm3(x))  # type: ignore[no-any-return]

    return forward


@contextlib.contextmanager
def _instance_forwards(modules: Sequence[nn.Module], make: Callable[[nn.Module], Callable[..., Any]]
                       ) -> Iterator[None]:
    """`module.forward = make(module)` for each module inside this block (`pass_memory.instance_forwards`)."""
    with instance_forwards((module, make(module)) for module in modules):
        yield


@contextlib.contextmanager
def out_of_place_blocks(unet: nn.Module, namespace: Mapping[str, Any] | None = None) -> Iterator[int]:
    """Every `BasicTransformerBlock` of `unet` computes with out-of-place additions inside this block; yields how many
    blocks there are."""
    namespace = forge_namespace(unet) if namespace is None else namespace
    blocks = _instances(unet, namespace["BasicTransformerBlock"])
    if not blocks:
        raise ForgeUnetError(f"{type(unet).__qualname__} has no transformer blocks")
    with _instance_forwards(blocks, _out_of_place_block_forward):
        yield len(blocks)


# -- 3. ControlNet residuals -------------------------------------------------------------------------------------------


def _apply_control_out_of_place(h: torch.Tensor, control: Mapping[str, list[Any]] | None, name: str) -> torch.Tensor:
    """Forge's `apply_control` with `h + ctrl` for `h += ctrl`: the next residual of `control[name]` (popped from the
    end, as Forge consumes the lists), or `h` unchanged where there is none or it does not fit. "Fits" is what the
    in-place addition accepts: a residual that broadcasts to `h`'s shape, the sum cast back to `h`'s dtype (an
    in-place add computes in the promoted dtype and writes `h`'s)."""
    if control is None or name not in control or len(control[name]) == 0:
        return h
    ctrl = control[name].pop()
    if ctrl is None:
        return h
    try:
        if torch.broadcast_shapes(h.shape, ctrl.shape) != h.shape:
            raise RuntimeError("the residual is larger than the hidden states")
        total = h + ctrl
    except RuntimeError as error:
        # Forge prints a warning and goes on without the residual; so does the pass (same output).
        logger.warning("ControlNet residual %s of shape %s not applied to %s: %s", name, tuple(ctrl.shape),
                       tuple(h.shape), error)
        return h
    return total if total.dtype == h.dtype else total.to(h.dtype)


@contextlib.contextmanager
def out_of_place_control(namespace: MutableMapping[str, Any]) -> Iterator[None]:
    """The module global `apply_control` of Forge's UNet module replaced by an out-of-place version inside this block.
    Process-wide while it lasts: another caller of the UNet in that time gets the same values, in a new tensor."""
    original = namespace["apply_control"]
    namespace["apply_control"] = _apply_control_out_of_place
    try:
        yield
    finally:
        namespace["apply_control"] = original


# -- 4. Attention ------------------------------------------------------------------------------------------------------


def _sdpa_forward(module: nn.Module) -> Callable[..., torch.Tensor]:
    """Forge's `CrossAttention.forward` with PyTorch's scaled dot-product attention as its kernel, laid out as Forge's
    `attention_pytorch` lays it out (heads split from the last dimension, no upcast; SDPA's own scale
    dim_head ** -0.5, which is Forge's)."""
    heads, to_q, to_k, to_v, to_out = attention_parts(module)

    def forward(x: torch.Tensor, context: torch.Tensor | None = None, value: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, transformer_options: Mapping[str, Any] | None = None
                ) -> torch.Tensor:
        q_in = to_q(x)
        context = x if context is None else context
        k_in = to_k(context)
        v_in = to_v(context if value is None else value)
        return to_out(multi_head_sdpa(q_in, k_in, v_in, heads, mask=mask))

    return forward


@contextlib.contextmanager
def own_attention(unet: nn.Module, namespace: Mapping[str, Any] | None = None) -> Iterator[int]:
    """Every Forge `CrossAttention` of `unet` computes with PyTorch SDPA inside this block, whatever attention function
    Forge chose; yields how many layers there are."""
    namespace = forge_namespace(unet) if namespace is None else namespace
    layers = _instances(unet, namespace["CrossAttention"])
    with _instance_forwards(layers, _sdpa_forward):
        yield len(layers)


# -- Together ----------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def differentiable_unet(unet: nn.Module, *, weights: WeightMode = "alias", attention: bool = True
                        ) -> Iterator[UnetPass]:
    """Inside this block a forward and backward through Forge's `unet` works and gives exact gradients with respect to
    its input: inference mode off, grad mode on, the four changes of the module docstring applied (`weights`: how
    inference weights are replaced; `attention`: False keeps Forge's attention function, for a host whose kernel has
    a backward). Enter it from inside Forge's inference mode, around the whole pass (forward and backward); on exit
    everything is as it was, also when the body raises.

    Use a fresh `transformer_options` dict for each UNet call (its forward writes into it) and a latent from
    `differentiable_latent`. With "clone", the copies live until the block ends, and longer where something keeps a
    reference to them (a parameter list cached inside the block)."""
    namespace = forge_namespace(unet)
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.inference_mode(False))
        stack.enter_context(torch.enable_grad())
        swapped = stack.enter_context(normal_weights(unet, weights))
        blocks = stack.enter_context(out_of_place_blocks(unet, namespace))
        stack.enter_context(out_of_place_control(namespace))
        layers = stack.enter_context(own_attention(unet, namespace)) if attention else 0
        yield UnetPass(swapped, blocks, layers)


def differentiable_latent(x: torch.Tensor) -> torch.Tensor:
    """A normal copy of `x` (an inference tensor from Forge's sampler, or any tensor), detached: one that may take
    `requires_grad_`."""
    with torch.inference_mode(False):
        return x.detach().clone()


def update_in_inference_mode(target: torch.Tensor, value: torch.Tensor) -> None:
    """`target.copy_(value)` inside inference mode: the sampler's latent is an inference tensor, which outside
    inference mode cannot be updated in place ("Inplace update to inference tensor outside InferenceMode")."""
    with torch.inference_mode():
        target.copy_(value)
