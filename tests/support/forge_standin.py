"""A stand-in for Forge's UNet call path (`backend.nn.unet.IntegratedUNet2DConditionModel`), written for these tests, so
that CI, which has no Forge checkout, tests `lib_ae.forge` against the traits of Forge's UNet that stop autograd:

* weights created and loaded under `torch.inference_mode()` (Forge's model loader is decorated with it), frozen;
* `BasicTransformerBlock.forward` adds the attention outputs in place (`x += n`) into the tensor its LayerNorm saved;
* `apply_control` is a module global, looked up by the UNet's forward at every call, that adds ControlNet residuals in
  place (`h += ctrl`), also into the skip tensors of the output side;
* the attention kernel (`attention_function`, a module global bound when the module is defined, as Forge binds the
  kernel it picks at import) has no backward, like SageAttention or Forge's flash-attention custom op;
* `CrossAttention.forward(x, context=None, value=None, mask=None, transformer_options={})` with `heads`, `dim_head`,
  `to_q`/`to_k`/`to_v`/`to_out`; the blocks call it with `transformer_options` (so an attention `forward` that
  passes unknown keywords to the host always sees one);
* the UNet's `forward(x, timesteps, context, y=None, control=None, transformer_options={}, **kwargs)` writes
  `original_shape`, `transformer_index`, `block`, `block_index` into `transformer_options`, and honours the block
  patches (`attn1_patch`, `attn1_output_patch`, `middle_patch`, `attn2_patch`, `attn2_output_patch`) and attention
  replacements (`patches_replace["attn1"/"attn2"]` keyed by (block, id) or (block, id, index));
* the sinusoidal timestep embedding in float32, cast to the input's dtype.

The module tree is the ldm/Forge layout with the same state_dict names as `support.models.make_unet`'s ldm UNets (all
three tiny configs), so weights copy between the two (`make_forge_standin(config, ldm_unet.state_dict())`), and the
ldm UNet with the same weights is the reference. Not modelled: SDXL's ADM vector (`y`), block modifiers,
input/output block patches, the group-norm wrapper, ResBlocks with scale-shift norm or up/down sampling.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:  # only its fields are read: the stand-in imports without ldm (e.g. on a GPU machine)
    from support.models import TinyUnetConfig

NO_BACKWARD_MESSAGE = "the stand-in attention kernel has no backward (like SageAttention or Forge's flash attention)"


class _AttentionWithoutBackward(torch.autograd.Function):
    """Scaled dot-product attention whose backward refuses, as an inference-only kernel does."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,  # type: ignore[override]
                mask: torch.Tensor | None) -> torch.Tensor:
        batch, _, inner = q.shape
        dim_head = inner // heads
        q4, k4, v4 = (t.reshape(t.shape[0], -1, heads, dim_head).transpose(1, 2) for t in (q, k, v))
        out = torch.nn.functional.scaled_dot_product_attention(q4, k4, v4, attn_mask=mask)
        return out.transpose(1, 2).reshape(batch, -1, inner)

    @staticmethod
    def backward(ctx: Any, *grad_outputs: torch.Tensor) -> Any:
        raise RuntimeError(NO_BACKWARD_MESSAGE)


def _inference_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                      mask: torch.Tensor | None = None) -> torch.Tensor:
    return _AttentionWithoutBackward.apply(q, k, v, heads, mask)  # type: ignore[no-any-return]


attention_function: Callable[..., torch.Tensor] = _inference_kernel
"""The kernel every `CrossAttention` calls; tests may rebind it (the module global is read at each call)."""


def apply_control(h: torch.Tensor, control: Mapping[str, list[Any]] | None, name: str) -> torch.Tensor:
    """Adds the next residual of `control[name]` (popped from the end) to `h`, in place; one that does not fit is
    skipped with a message, as Forge does."""
    if control is not None and name in control and len(control[name]) > 0:
        ctrl = control[name].pop()
        if ctrl is not None:
            try:
                h += ctrl
            except RuntimeError:
                print("warning control could not be applied", h.shape, ctrl.shape)
    return h


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
    """[cos | sin] of t * max_period^(-i/half), in float32 whatever the timesteps' dtype (as ldm and Forge compute
    it)."""
    half = dim // 2
    frequencies = torch.exp(-math.log(max_period) * torch.arange(0, half, dtype=torch.float32) / half)
    angles = timesteps[:, None].float() * frequencies.to(timesteps.device)[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class CrossAttention(nn.Module):
    def __init__(self, query_dim: int, context_dim: int | None, heads: int, dim_head: int) -> None:
        super().__init__()
        inner = heads * dim_head
        source = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.dim_head = dim_head
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(source, inner, bias=False)
        self.to_v = nn.Linear(source, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(0.0))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, value: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, transformer_options: dict[str, Any] = {}  # noqa: B006 (Forge's)
                ) -> torch.Tensor:
        source = x if context is None else context
        q = self.to_q(x)
        k = self.to_k(source)
        v = self.to_v(source if value is None else value)
        out: torch.Tensor = self.to_out(attention_function(q, k, v, self.heads, mask))
        return out


class GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * torch.nn.functional.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * 4), nn.Dropout(0.0), nn.Linear(dim * 4, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(x)
        return out


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int) -> None:
        super().__init__()
        self.ff_in = False  # Forge: a FeedForward module only for video models
        self.is_res = True
        self.disable_self_attn = False
        self.n_heads = heads
        self.d_head = dim_head
        self.attn1 = CrossAttention(dim, None, heads, dim_head)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                transformer_options: dict[str, Any] = {}) -> torch.Tensor:  # noqa: B006 (Forge's signature)
        return self._forward(x, context, transformer_options)

    def _attend(self, attention: CrossAttention, kind: str, n: torch.Tensor, context: torch.Tensor | None,
                value: torch.Tensor | None, options: dict[str, Any]) -> torch.Tensor:
        """One attention layer, or the extension's replacement registered for this block."""
        replacements = options.get("patches_replace", {}).get(kind, {})
        block = options.get("block")
        keys = [] if block is None else [(block[0], block[1], options.get("block_index", 0)), block]
        replacement = next((replacements[key] for key in keys if key in replacements), None)
        extra = options["extra"]
        if replacement is None:
            return attention(n, context=context, value=value, transformer_options=extra)  # type: ignore[no-any-return]
        source = n if context is None else context
        out = replacement(attention.to_q(n), attention.to_k(source),
                          attention.to_v(source if value is None else value), extra)
        return attention.to_out(out)  # type: ignore[no-any-return]

    def _forward(self, x: torch.Tensor, context: torch.Tensor | None, transformer_options: dict[str, Any]
                 ) -> torch.Tensor:
        patches = transformer_options.get("patches", {})
        extra = {k: v for k, v in transformer_options.items() if k not in ("patches", "patches_replace")}
        extra.update(n_heads=self.n_heads, dim_head=self.d_head)
        options = {**transformer_options, "extra": extra}

        n = self.norm1(x)
        context_1, value_1 = None, None
        if "attn1_patch" in patches:
            context_1 = value_1 = n
            for patch in patches["attn1_patch"]:
                n, context_1, value_1 = patch(n, context_1, value_1, extra)
        n = self._attend(self.attn1, "attn1", n, context_1, value_1, options)
        for patch in patches.get("attn1_output_patch", []):
            n = patch(n, extra)
        x += n  # in place, into the tensor norm1 saved for its backward
        for patch in patches.get("middle_patch", []):
            x = patch(x, extra)

        n = self.norm2(x)
        context_2, value_2 = context, None
        if "attn2_patch" in patches:
            value_2 = context_2
            for patch in patches["attn2_patch"]:
                n, context_2, value_2 = patch(n, context_2, value_2, extra)
        n = self._attend(self.attn2, "attn2", n, context_2, value_2, options)
        for patch in patches.get("attn2_output_patch", []):
            n = patch(n, extra)
        x += n
        skip = x
        x = self.ff(self.norm3(x))
        x += skip
        return x


class SpatialTransformer(nn.Module):
    def __init__(self, channels: int, heads: int, dim_head: int, depth: int, context_dim: int, linear: bool) -> None:
        super().__init__()
        inner = heads * dim_head
        self.use_linear = linear
        self.norm = nn.GroupNorm(32, channels, eps=1e-6)
        self.proj_in: nn.Module = nn.Linear(channels, inner) if linear else nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(inner, heads, dim_head, context_dim) for _ in range(depth)]
        )
        # ldm and Forge declare the linear projection out as (channels -> inner); equal widths in every SD model.
        self.proj_out: nn.Module = nn.Linear(channels, inner) if linear else nn.Conv2d(inner, channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None, transformer_options: dict[str, Any]
                ) -> torch.Tensor:
        b, c, h, w = x.shape
        hidden = self.norm(x)
        if not self.use_linear:
            hidden = self.proj_in(hidden)
        hidden = hidden.flatten(2).transpose(1, 2).contiguous()
        if self.use_linear:
            hidden = self.proj_in(hidden)
        for index, block in enumerate(self.transformer_blocks):
            transformer_options["block_index"] = index
            hidden = block(hidden, context=context, transformer_options=transformer_options)
        if self.use_linear:
            hidden = self.proj_out(hidden)
        hidden = hidden.transpose(1, 2).reshape(b, -1, h, w).contiguous()
        if not self.use_linear:
            hidden = self.proj_out(hidden)
        return hidden + x


class ResBlock(nn.Module):
    def __init__(self, channels: int, emb_channels: int, out_channels: int) -> None:
        super().__init__()
        self.in_layers = nn.Sequential(nn.GroupNorm(32, channels), nn.SiLU(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(nn.GroupNorm(32, out_channels), nn.SiLU(), nn.Dropout(0.0),
                                        nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip_connection: nn.Module = nn.Identity() if out_channels == channels \
            else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).type(h.dtype)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)  # type: ignore[no-any-return]


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)  # type: ignore[no-any-return]


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, output_shape: torch.Size | None = None) -> torch.Tensor:
        size = (x.shape[2] * 2, x.shape[3] * 2) if output_shape is None else (output_shape[2], output_shape[3])
        return self.conv(torch.nn.functional.interpolate(x, size=size, mode="nearest"))  # type: ignore[no-any-return]


class TimestepEmbedSequential(nn.Sequential):
    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None = None,  # type: ignore[override]
                transformer_options: dict[str, Any] = {},  # noqa: B006 (Forge's signature)
                output_shape: torch.Size | None = None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context, transformer_options)
                if "transformer_index" in transformer_options:
                    transformer_options["transformer_index"] += 1
            elif isinstance(layer, Upsample):
                x = layer(x, output_shape=output_shape)
            else:
                x = layer(x)
        return x


class IntegratedUNet2DConditionModel(nn.Module):
    """The ldm layout of `config` (same module names and shapes as `support.models.make_unet(config)`), with Forge's
    forward."""

    def __init__(self, config: TinyUnetConfig) -> None:
        super().__init__()
        mc = config.model_channels
        self.model_channels = mc
        emb_channels = mc * 4
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_channels), nn.SiLU(), nn.Linear(emb_channels, emb_channels))

        def attention(channels: int) -> list[nn.Module]:
            if config.num_head_channels == -1:
                heads, dim_head = config.num_heads, channels // config.num_heads
            else:
                heads, dim_head = channels // config.num_head_channels, config.num_head_channels
            return [SpatialTransformer(channels, heads, dim_head, config.transformer_depth, config.context_dim,
                                       config.use_linear_in_transformer)]

        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(config.in_channels, mc, 3, padding=1))])
        skips = [mc]
        ch = mc
        levels = len(config.channel_mult)
        for level, mult in enumerate(config.channel_mult):
            for _ in range(config.num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, emb_channels, mult * mc)]
                ch = mult * mc
                if 2**level in config.attention_resolutions:
                    layers += attention(ch)
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skips.append(ch)
            if level != levels - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                skips.append(ch)
        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, emb_channels, ch), *attention(ch), ResBlock(ch, emb_channels, ch)
        )
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(config.channel_mult))):
            for i in range(config.num_res_blocks + 1):
                layers = [ResBlock(ch + skips.pop(), emb_channels, mc * mult)]
                ch = mc * mult
                if 2**level in config.attention_resolutions:
                    layers += attention(ch)
                if level and i == config.num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        self.out = nn.Sequential(nn.GroupNorm(32, ch), nn.SiLU(), nn.Conv2d(mc, config.out_channels, 3, padding=1))

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None,
                y: torch.Tensor | None = None, control: Mapping[str, list[Any]] | None = None,
                transformer_options: dict[str, Any] = {},  # noqa: B006 (Forge's signature: a shared mutable default)
                **kwargs: Any) -> torch.Tensor:
        transformer_options["original_shape"] = list(x.shape)
        transformer_options["transformer_index"] = 0
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(x.dtype))
        skips = []
        h = x
        for index, module in enumerate(self.input_blocks):
            transformer_options["block"] = ("input", index)
            h = module(h, emb, context, transformer_options)
            h = apply_control(h, control, "input")
            skips.append(h)
        transformer_options["block"] = ("middle", 0)
        h = self.middle_block(h, emb, context, transformer_options)
        h = apply_control(h, control, "middle")
        for index, module in enumerate(self.output_blocks):
            transformer_options["block"] = ("output", index)
            skip = apply_control(skips.pop(), control, "output")
            h = torch.cat([h, skip], dim=1)
            h = module(h, emb, context, transformer_options, skips[-1].shape if skips else None)
        transformer_options["block"] = ("last", 0)
        return self.out(h).type(x.dtype)  # type: ignore[no-any-return]


def make_forge_standin(config: TinyUnetConfig, state_dict: Mapping[str, torch.Tensor] | None,
                       dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu"
                       ) -> IntegratedUNet2DConditionModel:
    """The stand-in with `state_dict`'s weights (an ldm UNet's, same names; None: N(0, 0.02^2) weights, for sizes
    without an ldm twin), built and loaded under inference mode as Forge's loader does it: every parameter an inference
    tensor, none requiring grad, eval mode."""
    with torch.inference_mode():
        with torch.device("meta"):
            unet = IntegratedUNet2DConditionModel(config)
        unet.to_empty(device=device)
        unet.to(dtype)
        if state_dict is None:
            for parameter in unet.parameters():
                parameter.normal_(0.0, 0.02)
        else:
            unet.load_state_dict(dict(state_dict), strict=True)
        unet.requires_grad_(False)
    unet.eval()
    return unet
