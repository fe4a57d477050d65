"""The gradient pass's memory: what autograd keeps between the pass's forward and its backward.

The pass (`Evaluator.forward_backward`) runs the conditional UNet forward up to the last captured layer with gradients
enabled. Left alone, autograd keeps every activation of every transformer block on the way for the backward; at SDXL's
32x32 maps that is 2 x 10 down, 10 middle and 3 x 10 up blocks, and under attention implementations that materialise
the probabilities (A1111's Doggettx, InvokeAI, V1, "none") every (N, N) probability matrix too: +6.3 GiB at SDXL 1024
batch 1 in A1111 (tests/webui-gpu-h200.json). Two means, both host-neutral, bound the pass's memory:

* **Own attention** (`PassAttention`): during the pass every ldm/sgm attention layer computes its attention with
  `torch.nn.functional.scaled_dot_product_attention`, exactly as A1111's SDP option does (same projections, same
  upcast rule, the host's context transform for hypernetworks), whatever the host's option. SDPA's fused kernels keep
  no probability matrix for the backward, and their result does not depend on the free memory (Doggettx and
  sub-quadratic attention choose their slicing from it at every call). The captured probabilities are computed by
  `lib_ae.capture` from the layer's inputs either way, so the maps the loss reads do not change.
* **Recomputation** (`recompute=True`): each transformer block runs under non-reentrant activation checkpointing, so
  only its input is kept and its activations are recomputed, one block at a time, in the backward. The capture's
  hooks run again during that recomputation (`AttentionCapture.replaying`) so that the recomputed operations are
  exactly the forward's. Same operations on the same inputs: the gradient is bit-identical with and without it
  (tests/test_pass_memory.py), so choosing it from the free memory (`choose_recompute`) never changes an image. It
  costs one more forward of the pass's blocks, on the GPU.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .capture import AttentionCapture, ForwardComplete, is_attention_module

logger = logging.getLogger(__name__)

MemoryMode = Literal["auto", "keep", "recompute"]
MEMORY_MODES: tuple[MemoryMode, ...] = ("auto", "keep", "recompute")

KEEP_BYTES_PER_LATENT_PIXEL = 320 * 1024
"""What keeping the pass's activations costs per conditional row and latent pixel, with own attention, rounded up:
SDXL 1024 (128 x 128 latent pixels) added 4.8 GiB at batch 1 and 18.9 GiB at batch 4 in the engine benchmark
(tests/benchmark-h200.json, "pass_memory"), about 300 KiB a pixel and row; SD1.5 512 adds 0.39 GiB (its pass stops
earlier, 100 KiB a pixel). `auto` keeps the activations only where twice this estimate is free: SDXL 1024 at batch 1
then recomputes on cards with less than 10 GiB free while sampling, i.e. 12-16 GB cards."""


@dataclass(frozen=True)
class PassAttention:
    """How the pass computes attention itself. `upcast`: q, k, v in float32 (A1111's "upcast cross attention layer to
    float32"). `context_for_kv(context) -> (context_k, context_v)`: the host's transform of the context before the key
    and value projections (A1111's hypernetworks); None: the context itself."""

    upcast: bool = False
    context_for_kv: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None


@dataclass(frozen=True)
class PassMemory:
    """`mode`: "keep" (every activation kept: the fastest), "recompute" (per-block recomputation), "auto" (recompute
    only where keeping would not fit the free memory, `choose_recompute`). `attention`: the pass's own attention, or
    None to run the host's attention layers as they are."""

    mode: MemoryMode = "auto"
    attention: PassAttention | None = PassAttention()

    def __post_init__(self) -> None:
        if self.mode not in MEMORY_MODES:
            raise ValueError(f"pass memory mode must be one of {', '.join(MEMORY_MODES)} (got {self.mode!r})")


def free_device_memory(device: torch.device) -> int | None:
    """Bytes the pass could still allocate on `device`: the driver's free memory plus what PyTorch's caching allocator
    holds unused. None where unknown (CPU)."""
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    cached_unused = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return int(free + max(cached_unused, 0))


def keep_estimate(rows: int, latent_height: int, latent_width: int) -> int:
    """Bytes the pass keeps for its backward without recomputation (an upper estimate, see
    `KEEP_BYTES_PER_LATENT_PIXEL`)."""
    return rows * latent_height * latent_width * KEEP_BYTES_PER_LATENT_PIXEL


def choose_recompute(mode: MemoryMode, free_bytes: int | None, needed_keep_bytes: int) -> bool:
    """Whether the pass recomputes. `auto` keeps the activations only where twice the estimate is free (the backward
    needs room of its own); where the free memory is unknown (CPU), it keeps them."""
    if mode == "recompute":
        return True
    if mode == "keep" or free_bytes is None:
        return False
    return free_bytes < 2 * needed_keep_bytes


def transformer_blocks(unet: nn.Module) -> list[nn.Module]:
    """The transformer blocks (ldm / sgm / diffusers `BasicTransformerBlock`: self-attention, cross-attention and a
    feed-forward), in execution order."""
    return [m for m in unet.modules() if all(hasattr(m, name) for name in ("attn1", "attn2", "ff"))]


@contextlib.contextmanager
def lean_forward(
    unet: nn.Module, capture: AttentionCapture, memory: PassMemory, recompute: bool
) -> Iterator[None]:
    """The pass's forward inside this block runs with `memory`'s own attention and, with `recompute`, each transformer
    block checkpointed. Instance-level `forward`s, set here and restored on exit (a `forward` another extension had
    put on an instance is wrapped, and put back). One-off: an Evaluator keeps a `LeanForward` for a whole pass."""
    with LeanForward()(unet, capture, memory, recompute):
        yield


class LeanForward:
    """`lean_forward` with its instance forwards built once and set again at every evaluation of a sampling pass
    (until `release()`): walking the UNet's ~400 modules and building the wrappers took ~9 ms of CPU per evaluation,
    a tenth of an eager evaluation at batch 1 (cProfile of SD1.5's layout)."""

    def __init__(self) -> None:
        self._built: dict[tuple[int, bool, bool], list[tuple[nn.Module, Callable[..., Any]]]] = {}

    def release(self) -> None:
        """The end of a sampling pass: the next one finds the modules and their host forwards again."""
        self._built.clear()

    def patches(
        self, unet: nn.Module, memory: PassMemory, recompute: bool
    ) -> list[tuple[nn.Module, Callable[..., Any]]]:
        """(module, the forward the pass gives it), in the order they are set."""
        key = (id(unet), memory.attention is not None, recompute)
        built = self._built.get(key)
        if built is None:
            built = []
            if memory.attention is not None:
                for module in unet.modules():
                    if is_attention_module(module) and hasattr(module, "to_v") and hasattr(module, "to_out") \
                            and not hasattr(module, "processor"):  # diffusers' Attention already runs SDPA
                        built.append((module, _own_attention(module, module.forward, memory.attention)))
            if recompute:
                built += [(block, _recomputed(block.forward)) for block in transformer_blocks(unet)]
            self._built[key] = built
        return built

    @contextlib.contextmanager
    def __call__(
        self, unet: nn.Module, capture: AttentionCapture, memory: PassMemory, recompute: bool
    ) -> Iterator[None]:
        with instance_forwards(self.patches(unet, memory, recompute)):
            yield


@contextlib.contextmanager
def instance_forwards(forwards: Iterable[tuple[nn.Module, Callable[..., Any]]]) -> Iterator[None]:
    """`module.forward = forward` for each pair inside this block; on exit the instance attribute is removed, or a
    `forward` another extension had put on the instance is put back."""
    patched: list[tuple[nn.Module, Any]] = []
    try:
        for module, forward in forwards:
            patched.append((module, module.__dict__.get("forward")))
            module.forward = forward
        yield
    finally:
        for module, previous in reversed(patched):
            if previous is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = previous


@contextlib.contextmanager
def lean_backward(capture: AttentionCapture, size: tuple[int, int], self_attention: bool, recompute: bool
                  ) -> Iterator[None]:
    """The backward of a recomputed pass: the capture's hooks repeat their operations while blocks are recomputed."""
    if not recompute:
        yield
        return
    with capture.replaying(*size, self_attention=self_attention):
        yield


def _recomputed(forward: Callable[..., Any]) -> Callable[..., Any]:
    """`forward` of a transformer block under non-reentrant checkpointing. The capture's early stop
    (`ForwardComplete`) is caught inside the checkpointed function and raised again outside it: torch releases a
    checkpoint's saved-tensor hooks only when its function returns (before torch 2.4, an exception left them
    installed)."""

    def body(*args: Any, **kwargs: Any) -> tuple[Any, bool]:
        try:
            return forward(*args, **kwargs), False
        except ForwardComplete:
            return None, True

    def run(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        output, completed = checkpoint(body, *args, use_reentrant=False, preserve_rng_state=False, **kwargs)
        if completed:
            raise ForwardComplete()
        return output

    return run


def _given(value: Any) -> bool:
    """An extra argument of an attention forward that changes its result (sgm's `additional_tokens`, a `value`
    tensor): anything but None and sgm's default `n_times_crossframe_attn_in_self=0`. A tensor is never compared
    by value (its truth value is ambiguous)."""
    return value is not None and not (isinstance(value, int) and not isinstance(value, bool) and value == 0)


def _own_attention(
    module: nn.Module, host_forward: Callable[..., Any], attention: PassAttention
) -> Callable[..., torch.Tensor]:
    """A1111's SDP attention (`sd_hijack_optimizations.scaled_dot_product_attention_forward`) for one ldm/sgm
    attention layer; calls the host's own forward for what it does not cover (a mask, sgm's extra tokens)."""
    heads, to_q, to_k, to_v, to_out = attention_parts(module)

    def forward(x: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                **extra: Any) -> torch.Tensor:
        if mask is not None or any(_given(value) for value in extra.values()):
            return host_forward(x, context=context, mask=mask, **extra)  # type: ignore[no-any-return]
        q_in = to_q(x)
        context = x if context is None else context
        context_k, context_v = (context, context) if attention.context_for_kv is None \
            else attention.context_for_kv(context)
        k_in, v_in = to_k(context_k), to_v(context_v)
        return to_out(multi_head_sdpa(q_in, k_in, v_in, heads, upcast=attention.upcast))

    return forward


Projection = Callable[[torch.Tensor], torch.Tensor]


def attention_parts(module: nn.Module) -> tuple[int, Projection, Projection, Projection, Projection]:
    """An ldm/sgm/Forge attention layer's head count and its q, k, v and output projections."""
    parts: tuple[Any, ...] = (module.to_q, module.to_k, module.to_v, module.to_out)
    return (int(module.heads), *parts)  # type: ignore[arg-type]


def multi_head_sdpa(
    q_in: torch.Tensor, k_in: torch.Tensor, v_in: torch.Tensor, heads: int, *, upcast: bool = False,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Projected queries, keys and values (B, N, heads * d) -> SDPA's attention output in that layout, the heads
    split from the last dimension as ldm, sgm and Forge split them; one context serves every row. `upcast`: computed
    in float32 at least (A1111's `.float()` would lower a float64 model), returned in the queries' dtype."""
    batch = q_in.shape[0]
    head_dim = q_in.shape[-1] // heads
    q, k, v = (t.view(t.shape[0], -1, heads, head_dim).transpose(1, 2) for t in (q_in, k_in, v_in))
    if k.shape[0] != batch:  # one context for every row
        k, v = k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)
    dtype = q.dtype
    if upcast:
        wide = torch.promote_types(dtype, torch.float32)
        q, k, v = q.to(wide), k.to(wide), v.to(wide)
    hidden = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False)
    return hidden.transpose(1, 2).reshape(batch, -1, heads * head_dim).to(dtype)
