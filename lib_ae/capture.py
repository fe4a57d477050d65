"""Differentiable capture of cross-attention probabilities from a UNet, through per-instance forward hooks.

Works on any attention module that carries `to_q`, `to_k` and `heads` and receives its text context as keyword
`context` (CompVis ldm / sgm `CrossAttention`, as called by their `BasicTransformerBlock`) or `encoder_hidden_states`
(diffusers `Attention`). Hooks live on module instances, so A1111's class-level `forward` swaps
(attention optimisations)
leave them in place; the layer's own output is untouched, whatever attention kernel produced it.

Only layers whose query length equals the requested map size are captured; for them the probabilities
softmax(q k^T * scale) are recomputed per head in float32 (float64 if the model runs in float64) on the autograd graph.

Self-attention (`attn1`, no context) is recorded only when asked (`record(..., self_attention=True)`, for InitNO and
Self-Cross guidance): its layers' queries and keys are kept, and `Recording.self_attention_rows(weights)` forms only
the weighted sums of rows the loss reads, one layer at a time under activation checkpointing, so the (N, N)
probabilities of a layer never stay alive for the backward (at SDXL's 32x32 maps they would be 4 MiB per head and
layer).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from torch.utils.hooks import RemovableHandle

logger = logging.getLogger(__name__)


class ForwardComplete(BaseException):
    """Raised from the last needed layer to abort the rest of a gradient forward; never escapes `record`.

    A BaseException so that host or third-party wrappers with `except Exception` around the UNet let it through.
    """


class CaptureError(RuntimeError):
    """The UNet has no cross-attention at the requested map size (e.g. 16x16 asked on a 1024x1024 SDXL latent)."""


def is_attention_module(module: nn.Module) -> bool:
    return all(hasattr(module, name) for name in ("to_q", "to_k", "heads"))


def cross_attention_modules(unet: nn.Module) -> list[tuple[str, nn.Module]]:
    """Attention modules that may receive a text context, in definition (= execution) order.

    Self-attention modules (`attn1`) carry the same attributes but never get a context; they are hooked out of the list
    by name where the naming is known and filtered at run time otherwise.
    """
    return [(name, m) for name, m in unet.named_modules() if is_attention_module(m) and not name.endswith("attn1")]


def self_attention_modules(unet: nn.Module) -> list[tuple[str, nn.Module]]:
    """The self-attention modules (`attn1` of every transformer block), in execution order."""
    return [(name, m) for name, m in unet.named_modules() if is_attention_module(m) and name.endswith("attn1")]


@dataclass
class _Accumulator:
    height: int
    width: int
    total: torch.Tensor | None = None
    maps_count: int = 0
    layers: list[str] | None = None
    names_only: bool = False  # a probe: note which layers match, compute nothing
    seen: set[int] | None = None  # query lengths of the cross-attention layers that ran (for the error message)
    self_attention: bool = False  # also keep the self-attention layers' (q, k) at this size
    self_layers: list[tuple[torch.Tensor, torch.Tensor, float]] | None = None  # (q, k, scale) per layer


class AttentionCapture:
    """Hooks on every cross-attention module of `unet`; records only inside `record()`.

    Usage:
        capture = AttentionCapture(unet)           # attaches hooks (idle: one flag test per attention call)
        with capture.record(16, 16) as rec:
            unet(latent, t, context=cond)          # may be cut short after the last 16x16 layer
        maps = rec.maps()                          # (B, 16, 16, T), mean over layers and heads, on the graph
        capture.remove()                           # detaches every hook, no trace left
    """

    def __init__(self, unet: nn.Module, *, early_stop: bool = True) -> None:
        self.unet = unet
        self.early_stop = early_stop
        self._names: dict[nn.Module, str] = {}
        self._handles: list[RemovableHandle] = []
        self._active: _Accumulator | None = None
        # Execution-ordered names of the layers that matched a given map size on a full forward, so later forwards
        # can stop right after the last of them.
        self._last_layer: dict[tuple[int, int], str] = {}
        for name, module in cross_attention_modules(unet):
            self._names[module] = name
            self._handles.append(module.register_forward_hook(self._on_forward, with_kwargs=True))
        if not self._handles:
            raise CaptureError("no attention modules with to_q/to_k/heads found in this UNet")
        self._self_hooked = False
        # While a recomputed pass's backward recomputes its blocks (`lib_ae.pass_memory`): the map size and whether
        # self-attention was recorded, so that the hooks repeat the forward's operations (and keep nothing).
        self._replay: tuple[int, int, bool] | None = None
        logger.debug("attention capture attached to %d modules", len(self._handles))

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    @property
    def module_names(self) -> list[str]:
        return list(self._names.values())

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._names.clear()
        self._self_hooked = False
        self._active = None

    def knows_last_layer(self, height: int, width: int) -> bool:
        return (height, width) in self._last_layer

    @contextlib.contextmanager
    def probe(self, height: int, width: int) -> Iterator[None]:
        """Learn which layer is the last one with height x width maps from the forward run inside this block (run it
        under no_grad: it is only looked at). Without this, the first recorded gradient forward would have to run to
        the end of the UNet to find out, holding the activations of every later block for its backward: on SDXL at
        1024x1024 that is the peak memory of the whole run (1.6 GiB above every later evaluation)."""
        if not self._handles:
            raise CaptureError("attention capture was removed")
        accumulator = _Accumulator(height, width, layers=[], names_only=True)
        self._active = accumulator
        try:
            yield
        finally:
            self._active = None
        if accumulator.layers:
            self._last_layer[(height, width)] = accumulator.layers[-1]

    @contextlib.contextmanager
    def record(self, height: int, width: int, self_attention: bool = False) -> Iterator[Recording]:
        """Capture the maps of size height x width during the forward run inside this block (`self_attention`: the
        self-attention layers' too, read through `Recording.self_attention_rows`)."""
        if not self._handles:
            raise CaptureError("attention capture was removed")
        if self_attention and not self._self_hooked:
            # Attached on first use only, so that a UNet whose objective never reads self-attention carries no hook
            # on it (and the idle cost stays one flag test per cross-attention call).
            for _name, module in self_attention_modules(self.unet):
                self._handles.append(module.register_forward_hook(self._on_self_forward, with_kwargs=True))
            self._self_hooked = True
        accumulator = _Accumulator(height, width, layers=[], seen=set(), self_attention=self_attention,
                                   self_layers=[] if self_attention else None)
        self._active = accumulator
        recording = Recording(accumulator)
        try:
            yield recording
        except ForwardComplete:
            pass
        finally:
            self._active = None
        if accumulator.layers and (height, width) not in self._last_layer:
            self._last_layer[(height, width)] = accumulator.layers[-1]
        if accumulator.total is None:
            raise CaptureError(
                f"no cross-attention layer with {height}x{width} maps ran; "
                + _available_sizes(accumulator.seen or set())
            )

    @contextlib.contextmanager
    def replaying(self, height: int, width: int, self_attention: bool = False) -> Iterator[None]:
        """While a backward recomputes checkpointed blocks of a pass recorded at height x width: each hook repeats the
        operations it made in the forward, so that the recomputation saves exactly the tensors the forward saved, and
        keeps nothing."""
        self._replay = (height, width, self_attention)
        try:
            yield
        finally:
            self._replay = None

    def _on_forward(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        acc = self._active
        if acc is None:
            if self._replay is not None:
                self._replay_cross(module, args, kwargs)
            return
        hidden, context = _hidden_and_context(args, kwargs)
        if context is None or hidden is None:
            return
        if acc.seen is not None:
            acc.seen.add(int(hidden.shape[1]))
        if hidden.shape[1] != acc.height * acc.width:
            return
        if acc.names_only:
            assert acc.layers is not None
            acc.layers.append(self._names.get(module, "?"))
            return
        probs = attention_probabilities(module, hidden, context)  # (B, heads, N, T)
        summed = probs.sum(dim=1)
        acc.total = summed if acc.total is None else acc.total + summed
        acc.maps_count += probs.shape[1]
        name = self._names.get(module, "?")
        assert acc.layers is not None
        acc.layers.append(name)
        if self.early_stop and self._last_layer.get((acc.height, acc.width)) == name:
            raise ForwardComplete()

    def _replay_cross(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        assert self._replay is not None
        height, width, _ = self._replay
        hidden, context = _hidden_and_context(args, kwargs)
        if context is not None and hidden is not None and hidden.shape[1] == height * width:
            attention_probabilities(module, hidden, context).sum(dim=1)

    def _on_self_forward(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> None:
        acc = self._active
        if acc is None and self._replay is not None and self._replay[2]:
            hidden, context = _hidden_and_context(args, kwargs)
            if hidden is not None and context is None and hidden.shape[1] == self._replay[0] * self._replay[1]:
                _queries_and_keys(module, hidden)
            return
        if acc is None or not acc.self_attention or acc.self_layers is None:
            return
        hidden, context = _hidden_and_context(args, kwargs)
        # An attn1 given a context (ldm's `disable_self_attn`) is not self-attention.
        if hidden is None or context is not None or hidden.shape[1] != acc.height * acc.width:
            return
        acc.self_layers.append(_queries_and_keys(module, hidden))


def _hidden_and_context(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any]:
    hidden = args[0] if args else kwargs.get("x", kwargs.get("hidden_states"))
    context = kwargs.get("context", kwargs.get("encoder_hidden_states"))
    if context is None and len(args) > 1:
        context = args[1]
    return hidden, context


def _queries_and_keys(module: nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(q, k) of a self-attention layer per head, (B, heads, N, d), in float32 at least, and its scale."""
    heads = int(module.heads)  # type: ignore[arg-type]
    to_q: Callable[[torch.Tensor], torch.Tensor] = module.to_q  # type: ignore[assignment]
    to_k: Callable[[torch.Tensor], torch.Tensor] = module.to_k  # type: ignore[assignment]
    q, k = to_q(hidden), to_k(hidden)
    dim_head = q.shape[-1] // heads
    scale = float(getattr(module, "scale", dim_head**-0.5))
    dtype = torch.promote_types(q.dtype, torch.float32)
    batch = q.shape[0]
    q = q.to(dtype).reshape(batch, -1, heads, dim_head).transpose(1, 2)
    k = k.to(dtype).reshape(batch, -1, heads, dim_head).transpose(1, 2)
    return q, k, scale


def _weighted_self_attention(weights: torch.Tensor, q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """(B, K, N): sum over heads of weights (B, K, N) @ softmax(q k^T * scale) (B, heads, N, N)."""
    with torch.autocast(device_type=q.device.type, enabled=False):
        probabilities = (torch.matmul(q, k.transpose(-1, -2)) * scale).softmax(dim=-1)
        return torch.matmul(weights.to(probabilities.dtype)[:, None], probabilities).sum(dim=1)


def _available_sizes(seen: set[int]) -> str:
    """What a user can choose instead: the map sizes that did run, largest first ("8x8, 4x4"), or their lengths."""
    if not seen:
        return "no cross-attention layer received a text context"
    sizes = []
    for length in sorted(seen, reverse=True):
        side = math.isqrt(length)
        sizes.append(f"{side}x{side}" if side * side == length else f"{length} positions")
    return "at this image size the model's cross-attention maps are " + ", ".join(sizes)


class Recording:
    """The maps of one recorded forward."""

    def __init__(self, accumulator: _Accumulator) -> None:
        self._acc = accumulator

    def maps(self) -> torch.Tensor:
        """(B, h, w, T): mean over all captured layers and heads, like the reference's `aggregate_attention`."""
        acc = self._acc
        if acc.total is None:
            raise CaptureError("nothing was captured")
        mean = acc.total / acc.maps_count
        return mean.reshape(mean.shape[0], acc.height, acc.width, mean.shape[-1])

    def self_attention_rows(self, weights: torch.Tensor) -> torch.Tensor:
        """(B, K, N): for each of the K weight vectors (B, K, N) over the query patches, the weighted sum of the rows
        of the self-attention probabilities averaged over layers and heads (the official `aggregate_attention(
        is_cross=False)`, (h, w, N), read at those rows). A one-hot weight reads one patch's row. Differentiable with
        respect to the weights and the UNet's activations; each layer's probabilities are recomputed in the backward
        instead of being kept."""
        acc = self._acc
        if not acc.self_layers:
            raise CaptureError(
                f"no self-attention layer with {acc.height}x{acc.width} maps was recorded (record with "
                "self_attention=True)"
            )
        total: torch.Tensor | None = None
        heads = 0
        for q, k, scale in acc.self_layers:
            if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or weights.requires_grad):
                part = checkpoint(_weighted_self_attention, weights, q, k, scale, use_reentrant=False)
            else:
                part = _weighted_self_attention(weights, q, k, scale)
            total = part if total is None else total + part
            heads += q.shape[1]
        assert total is not None
        return total / heads


def attention_probabilities(module: nn.Module, hidden: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T * scale) per head, (B, heads, N, T), in float32 at least, differentiable w.r.t. `hidden`."""
    heads = int(module.heads)  # type: ignore[arg-type]  # ldm/sgm CrossAttention: an int attribute
    to_q: Callable[[torch.Tensor], torch.Tensor] = module.to_q  # type: ignore[assignment]
    to_k: Callable[[torch.Tensor], torch.Tensor] = module.to_k  # type: ignore[assignment]
    q = to_q(hidden)
    k = to_k(context)
    dim_head = q.shape[-1] // heads
    scale = getattr(module, "scale", dim_head**-0.5)
    dtype = torch.promote_types(q.dtype, torch.float32)
    batch = q.shape[0]
    q = q.to(dtype).reshape(batch, -1, heads, dim_head).transpose(1, 2)
    k = k.to(dtype).reshape(k.shape[0], -1, heads, dim_head).transpose(1, 2)
    if k.shape[0] != batch:
        k = k.expand(batch, -1, -1, -1)
    with torch.autocast(device_type=q.device.type, enabled=False):
        scores = torch.matmul(q, k.transpose(-1, -2)) * scale
        return scores.softmax(dim=-1)
