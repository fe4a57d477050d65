"""Tiny random-weight UNets built from the real CompVis code (`ldm...openaimodel.UNetModel`, as A1111 loads SD1/SD2).

The tests need the exact module tree the WebUI runs (names such as `input_blocks.7.1.transformer_blocks.0.attn2`,
ldm's `CrossAttention` called with `context=`), at the same relative resolutions (cross-attention at 1/4 of the
latent, 16x16 for a 64x64 latent), but small enough to run many forwards and backwards on a CPU. The three configs
keep each family's structural choices (conv vs linear projections, fixed head count vs fixed head width, depth,
levels with attention) and shrink only the widths.

float64: ldm hard-codes a few float32 casts that a float32/float16 model never notices but that break or degrade a
float64 model (sinusoidal timestep embedding, `GroupNorm32`, the "fp32" attention-score upcast). `make_unet(...,
dtype=torch.float64)` neutralises `GroupNorm32` on that instance only, the score upcast process-wide through ldm's own
`ATTN_PRECISION` switch (read at every call; for float32 models both settings compute the same thing), and computes
the timestep embedding of float64 timesteps in float64 (`float64_timestep_embedding`; float32 timesteps keep ldm's
own function).

Why float64 end to end, timestep embedding and schedule included: a float32 intermediate is rounded by whichever
vector kernel torch picks for the CPU (ATen's `default`, `avx2` or `avx512` builds of exp, sin, cos, linspace), so
its last bit, amplified over a sampling run, moved recorded figures by up to 4.9e-7 (avx512) and 3.5e-5 (default).
In float64 the kernels still differ by an ulp (1e-16), which is the rounding every float64 comparison here allows
for anyway. `float64_ddim_scheduler` and `sd_alphas_cumprod_float64` are the schedule in that form.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from ldm.modules import attention as ldm_attention
from ldm.modules.attention import SpatialTransformer
from ldm.modules.diffusionmodules import openaimodel
from ldm.modules.diffusionmodules.openaimodel import UNetModel
from ldm.modules.diffusionmodules.util import GroupNorm32
from torch import nn

if TYPE_CHECKING:
    from diffusers import UNet2DConditionModel

logger = logging.getLogger(__name__)

LDM_UNET_PREFIX = "model.diffusion_model."
"""Where a full SD checkpoint keeps the UNet; diffusers' converter reads only keys with this prefix."""

SD_BETA_START = 0.00085
SD_BETA_END = 0.012
SD_TRAIN_TIMESTEPS = 1000

Family = Literal["sd1", "sd2", "sdxl"]


@dataclass(frozen=True)
class TinyUnetConfig:
    """A scaled-down `unet_config.params` of one SD family; same code paths in ldm's UNetModel as the real one.

    `num_heads` fixed (SD1) or `num_head_channels` fixed (SD2, SDXL); the other stays -1 (unset), as in the real yaml.
    `attention_resolutions` are downsampling factors (1 = full latent resolution).
    """

    name: str
    family: Family
    channel_mult: tuple[int, ...]
    attention_resolutions: tuple[int, ...]
    context_dim: int
    num_heads: int = -1
    num_head_channels: int = -1
    transformer_depth: int = 1
    use_linear_in_transformer: bool = False
    model_channels: int = 32  # ldm normalises with 32 groups, so every width must be a multiple of 32
    num_res_blocks: int = 2
    in_channels: int = 4
    out_channels: int = 4
    latent_size: int = 32  # UNetModel's `image_size`: metadata only, any latent size that is a multiple of 8 runs

    def unet_params(self) -> dict[str, Any]:
        """Keyword arguments of `UNetModel`, laid out like the `params` of an SD inference yaml (as A1111 sets them:
        no gradient checkpointing)."""
        depth = self.transformer_depth
        params: dict[str, Any] = {
            "image_size": self.latent_size,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "model_channels": self.model_channels,
            "attention_resolutions": list(self.attention_resolutions),
            "num_res_blocks": self.num_res_blocks,
            "channel_mult": list(self.channel_mult),
            "use_checkpoint": False,
            "use_spatial_transformer": True,
            "use_linear_in_transformer": self.use_linear_in_transformer,
            "transformer_depth": depth,
            # This ldm's SpatialTransformer takes one context width per transformer block (a list when depth > 1).
            "context_dim": self.context_dim if depth == 1 else [self.context_dim] * depth,
            "legacy": False,
        }
        # Only the one that is set, as in the real yamls: diffusers' config builder tests for the key "num_heads".
        if self.num_heads != -1:
            params["num_heads"] = self.num_heads
        if self.num_head_channels != -1:
            params["num_head_channels"] = self.num_head_channels
        return params

    def original_config(self) -> dict[str, Any]:
        """The parts of an LDM inference yaml that diffusers' `create_unet_diffusers_config_from_ldm` reads."""
        return _ldm_yaml(self.unet_params())

    def cross_attention_factors(self) -> tuple[int, ...]:
        """Downsampling factors that have cross-attention, input and output side (the middle block is at the deepest
        factor `2 ** (len(channel_mult) - 1)` and always has it)."""
        factors = [2**level for level in range(len(self.channel_mult))]
        return tuple(f for f in factors if f in self.attention_resolutions)

    @property
    def middle_factor(self) -> int:
        """Downsampling factor of the middle block (8 for SD1/SD2, 4 for SDXL)."""
        return 2 ** (len(self.channel_mult) - 1)


SD1_LIKE = TinyUnetConfig(
    name="sd1-like",
    family="sd1",
    channel_mult=(1, 2, 4, 4),
    attention_resolutions=(4, 2, 1),
    context_dim=32,
    num_heads=2,  # SD1: 8 heads at every level, head width grows with the channels
)
"""SD1.x: conv 1x1 proj_in/proj_out, fixed head count, attention at 1, 1/2, 1/4 and in the middle block (1/8)."""

SD2_LIKE = TinyUnetConfig(
    name="sd2-like",
    family="sd2",
    channel_mult=(1, 2, 4, 4),
    attention_resolutions=(4, 2, 1),
    context_dim=48,
    num_head_channels=16,  # SD2: 64-wide heads, head count grows with the channels (here 2, 4, 8, 8)
    use_linear_in_transformer=True,
)
"""SD2.x: linear proj_in/proj_out, fixed head width, a different context width than SD1, same levels as SD1."""

SDXL_LIKE = TinyUnetConfig(
    name="sdxl-like",
    family="sdxl",
    channel_mult=(1, 2, 4),
    attention_resolutions=(4, 2),
    context_dim=64,
    num_head_channels=16,
    transformer_depth=2,
    use_linear_in_transformer=True,
)
"""SDXL: three levels, no attention at full resolution, 2 transformer blocks per attention (the real one has 2 at
1/2 and 10 at 1/4; ldm's UNetModel takes one depth), middle block at 1/4. `make_unet` lets every block of a
SpatialTransformer share the one context tensor, as sgm's UNet (A1111's SDXL code) does; this ldm version would
otherwise want a list of contexts. The ADM ('vector') conditioning of SDXL is not modelled: this UNetModel has no
'sequential' class embedding, and A&E never touches it."""

TINY_CONFIGS: tuple[TinyUnetConfig, ...] = (SD1_LIKE, SD2_LIKE, SDXL_LIKE)


def _ldm_yaml(unet_params: Mapping[str, Any]) -> dict[str, Any]:
    """A minimal LDM inference yaml (as a dict) around UNetModel keyword arguments."""
    return {
        "model": {
            "params": {
                "unet_config": {
                    "target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
                    "params": dict(unet_params),
                },
                # Only the VAE's ch_mult is read (latent scale factor 8, for the default sample_size).
                "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}},
            }
        }
    }


def _randomize_parameters(module: nn.Module, seed: int) -> None:
    """Fill every parameter from one seeded generator, in `named_parameters` order, drawn in float32.

    ldm zero-initialises the last layer of every residual branch (ResBlock out conv, transformer proj_out, final conv),
    which would make the fresh UNet output 0 and its attention invisible to gradients. Weights get N(0, 1/fan_in)
    (unit-variance activations through each layer), norm gains 1 + N(0, 0.1^2), biases N(0, 0.1^2). Values are
    rounded to float32, so a float64 model is the exact upcast of the float32 model with the same seed.

    The draw itself is float64: torch's float32 `randn` takes a vectorised path (its own log/sin/cos) on avx2 and
    avx512 CPUs and a scalar one under ATEN_CPU_CAPABILITY=default, which give weights a last bit apart, and figures
    recorded from these models then depend on the CPU. float64 `randn` is the same on every capability, and so is
    its rounding to float32.
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)
    norm_gains = {
        id(m.weight)
        for m in module.modules()
        if isinstance(m, nn.GroupNorm | nn.LayerNorm) and getattr(m, "weight", None) is not None
    }
    with torch.no_grad():
        for parameter in module.parameters():
            noise = torch.randn(parameter.shape, generator=generator, dtype=torch.float64).to(torch.float32)
            if id(parameter) in norm_gains:
                value = 1.0 + 0.1 * noise
            elif parameter.ndim == 1:
                value = 0.1 * noise
            else:
                value = noise / math.sqrt(parameter[0].numel())
            parameter.copy_(value)


def _embedding_to_weight_dtype(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    """Forward pre-hook of `time_embed`: ldm builds the sinusoidal embedding in float32 whatever the model dtype (as
    diffusers does); A1111 casts it to the UNet dtype the same way (sd_hijack_unet.timestep_embedding_cast_result)."""
    weight = next(module.parameters())
    return (args[0].to(weight.dtype), *args[1:])


def _broadcast_context(module: SpatialTransformer, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Forward pre-hook of a SpatialTransformer with several blocks: one context tensor -> one per block.

    This ldm version indexes `context[i]` for block i, so depth > 1 would need a list of contexts; sgm's UNet (what
    A1111 runs SDXL with) reuses a single context for every block, which this reproduces.
    """
    depth = len(module.transformer_blocks)
    if len(args) > 1 and isinstance(args[1], torch.Tensor):
        return (args[0], [args[1]] * depth, *args[2:]), kwargs
    if isinstance(kwargs.get("context"), torch.Tensor):
        return args, {**kwargs, "context": [kwargs["context"]] * depth}
    return None


def float64_timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
    """SD's sinusoidal timestep embedding, [cos | sin] of t * max_period^(-i/half), computed in float64.

    The operations and their order are ldm's `timestep_embedding` and diffusers' `get_timestep_embedding` (with SD's
    flip_sin_to_cos=True, downscale_freq_shift=0), which both compute it in float32; so an ldm UNet and its
    diffusers twin still see the same embedding.
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(0, half, dtype=torch.float64, device=timesteps.device) / half
    args = timesteps[:, None].to(torch.float64) * torch.exp(exponent)[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


def _ldm_timestep_embedding_float64_aware(original: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """ldm's `timestep_embedding`, in float64 for float64 timesteps (what float64 runs pass), else ldm's own."""

    @functools.wraps(original)
    def timestep_embedding(
        timesteps: torch.Tensor, dim: int, max_period: int = 10000, repeat_only: bool = False
    ) -> torch.Tensor:
        if timesteps.dtype == torch.float64 and not repeat_only:
            return float64_timestep_embedding(timesteps, dim, max_period)
        return original(timesteps, dim, max_period=max_period, repeat_only=repeat_only)

    timestep_embedding.float64_aware = True  # type: ignore[attr-defined]
    return timestep_embedding


class Float64Timesteps(nn.Module):
    """diffusers' `Timesteps` projection (SD's: flip_sin_to_cos, no shift) computed in float64; it returns float64,
    which `UNet2DConditionModel.get_time_embed` casts to the model's dtype."""

    def __init__(self, num_channels: int) -> None:
        super().__init__()
        self.num_channels = num_channels

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        return float64_timestep_embedding(timesteps, self.num_channels)


def _keep_model_dtype(unet: UNetModel) -> None:
    """Make the float32 casts in ldm's code dtype-preserving for this (non-float32) UNet instance."""
    unet.time_embed.register_forward_pre_hook(_embedding_to_weight_dtype)
    if not getattr(openaimodel.timestep_embedding, "float64_aware", False):
        # UNetModel.forward calls the module-level name; float32 timesteps still reach ldm's own function unchanged.
        openaimodel.timestep_embedding = _ldm_timestep_embedding_float64_aware(openaimodel.timestep_embedding)
    for m in unet.modules():
        if type(m) is GroupNorm32:
            # GroupNorm32.forward is `super().forward(x.float()).type(x.dtype)`: with float64 weights that fails.
            # It has no state of its own, so the plain GroupNorm it derives from is the same layer without the cast.
            m.__class__ = nn.GroupNorm
    if ldm_attention._ATTN_PRECISION == "fp32":
        # CrossAttention.forward upcasts q, k to float32 when ATTN_PRECISION == "fp32" (ldm's default, read at import),
        # then multiplies float32 scores with float64 values. Any other value computes the scores in the input
        # dtype, which for float32 models is the same computation. (A1111 replaces this forward anyway.)
        ldm_attention._ATTN_PRECISION = "native"
        logger.info("ldm ATTN_PRECISION set to 'native' so that float64 UNets keep float64 attention scores")


def make_unet(config: TinyUnetConfig, seed: int, dtype: torch.dtype = torch.float32) -> UNetModel:
    """A deterministic random-weight ldm UNetModel for `config`, in eval mode, on the CPU.

    Built on the meta device, so construction neither spends time on ldm's own init nor draws from the global RNG.
    Parameters keep `requires_grad=True`, as in the WebUI. Use `dtype` rather than `.double()` afterwards: only
    `make_unet` applies the float64 adjustments described in the module docstring.
    """
    with torch.device("meta"):
        unet = UNetModel(**config.unet_params())
    if any(True for _ in unet.buffers()):
        raise RuntimeError("ldm UNetModel has buffers now; initialise them before using the meta-device build")
    unet.to_empty(device="cpu")
    _randomize_parameters(unet, seed)
    if config.transformer_depth > 1:
        for m in unet.modules():
            if isinstance(m, SpatialTransformer):
                m.register_forward_pre_hook(_broadcast_context, with_kwargs=True)
    unet.to(dtype=dtype)
    unet.dtype = dtype  # UNetModel.forward casts its input to this attribute (float32 unless use_fp16)
    if dtype != torch.float32:
        _keep_model_dtype(unet)
    unet.eval()
    return unet


def sd_alphas_cumprod() -> torch.Tensor:
    """SD's 'scaled_linear' alphas_cumprod, computed in float32 exactly as diffusers' DDIMScheduler does."""
    betas = torch.linspace(SD_BETA_START**0.5, SD_BETA_END**0.5, SD_TRAIN_TIMESTEPS, dtype=torch.float32) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def sd_alphas_cumprod_float64() -> torch.Tensor:
    """The same schedule in float64, computed with Python floats (each operation correctly rounded, no vector
    kernel): the same bits on every CPU. linspace as torch defines it: start + i * step."""
    start, end, count = SD_BETA_START**0.5, SD_BETA_END**0.5, SD_TRAIN_TIMESTEPS
    step = (end - start) / (count - 1)
    product, values = 1.0, []
    for i in range(count):
        root = start + i * step
        product *= 1.0 - root * root
        values.append(product)
    return torch.tensor(values, dtype=torch.float64)


def float64_ddim_scheduler() -> Any:
    """diffusers' DDIMScheduler as the reference pipelines run SD (scaled_linear, steps_offset 1, no clipping, final
    alpha = alphas_cumprod[0]) with its alphas_cumprod in float64.

    diffusers always builds them in float32 (`trained_betas` too), and `step` multiplies the float64 latents by
    those float32 scalars' square roots: a float32 schedule whose last bit depends on the CPU's linspace kernel.
    """
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(
        beta_start=SD_BETA_START, beta_end=SD_BETA_END, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1,
    )
    scheduler.alphas_cumprod = sd_alphas_cumprod_float64()
    scheduler.final_alpha_cumprod = scheduler.alphas_cumprod[0]
    return scheduler


class _DiffusionWrapper(nn.Module):
    """ldm's `DiffusionWrapper` for conditioning_key 'crossattn': the UNet lives at `.diffusion_model`, so the wrapper
    chain has A1111's module path `sd_model.model.diffusion_model` and checkpoint keys `model.diffusion_model.*`."""

    conditioning_key = "crossattn"

    def __init__(self, unet: UNetModel) -> None:
        super().__init__()
        self.diffusion_model = unet

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        c_concat: list[torch.Tensor] | None = None,
        c_crossattn: list[torch.Tensor] | None = None,
        c_adm: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """c_concat/c_adm are accepted and ignored, as ldm does for a 'crossattn' model (A1111 sends c_concat)."""
        if c_crossattn is None:
            raise ValueError("a cross-attention UNet needs c_crossattn")
        return self.diffusion_model(x, t, context=torch.cat(c_crossattn, 1))


class LdmDenoiserModel(nn.Module):
    """The slice of ldm's `LatentDiffusion` that `k_diffusion.external.CompVisDenoiser` and A1111 use.

    `alphas_cumprod` (buffer; float32, or `sd_alphas_cumprod_float64` for a float64 UNet) and `apply_model(x, t, cond)`, where `cond` is the
    text context (B, T, C), a list of them, or A1111's dict {'c_crossattn': [context], 'c_concat': [...]}.
    `parameterization` 'eps' is what A1111 checks to pick CompVisDenoiser over CompVisVDenoiser.
    """

    parameterization = "eps"

    def __init__(self, unet: UNetModel) -> None:
        super().__init__()
        self.model = _DiffusionWrapper(unet)
        if next(unet.parameters()).dtype == torch.float64:
            alphas_cumprod = sd_alphas_cumprod_float64()
        else:
            alphas_cumprod = sd_alphas_cumprod()
        self.alphas_cumprod: torch.Tensor
        self.register_buffer("alphas_cumprod", alphas_cumprod)

    @property
    def diffusion_model(self) -> UNetModel:
        """The UNet (the same object as `self.model.diffusion_model`)."""
        unet: UNetModel = self.model.diffusion_model
        return unet

    def apply_model(
        self, x_noisy: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | list[torch.Tensor] | dict[str, Any]
    ) -> torch.Tensor:
        """eps prediction, routed like `LatentDiffusion.apply_model` -> `DiffusionWrapper` -> `UNetModel`."""
        if not isinstance(cond, dict):
            cond = {"c_crossattn": cond if isinstance(cond, list) else [cond]}
        out: torch.Tensor = self.model(x_noisy, t, **cond)
        return out


def ldm_unet_checkpoint(unet: UNetModel) -> dict[str, torch.Tensor]:
    """The UNet's state dict under the key prefix of a full SD checkpoint."""
    return {LDM_UNET_PREFIX + key: value for key, value in unet.state_dict().items()}


def ldm_to_diffusers_unet(ldm_unet: UNetModel, unet_params: Mapping[str, Any]) -> UNet2DConditionModel:
    """A diffusers UNet2DConditionModel with the same weights (copied, not shared), dtype, device and mode as
    `ldm_unet`, which was built with the UNetModel keyword arguments `unet_params` (any size, e.g. real SD1.5).

    Uses diffusers' own single-file converters, fed with a minimal LDM yaml, so the key mapping is the one diffusers
    applies to real SD checkpoints. `num_heads` must be absent (not -1) from `unet_params` when heads are set by
    `num_head_channels`, as in the real SD2 yaml: diffusers reads the key's presence.
    """
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, create_unet_diffusers_config_from_ldm

    params = dict(unet_params)
    if params.get("num_heads", 0) == -1:
        del params["num_heads"]
    checkpoint = ldm_unet_checkpoint(ldm_unet)
    unet_config = create_unet_diffusers_config_from_ldm(_ldm_yaml(params), checkpoint)
    # The converter guesses the SD version from marker keys only to size the default sample (metadata).
    unet_config["sample_size"] = params.get("image_size", unet_config["sample_size"])
    state_dict = convert_ldm_unet_checkpoint(checkpoint, unet_config)
    # Built on the meta device (no init work, no global RNG draws), then given copies of the converted tensors:
    # `assign=True` takes their dtype and device, so no `.to()` is needed (diffusers warns on `.to(dtype)`).
    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config)
    if any(True for _ in unet.buffers()):
        raise RuntimeError("UNet2DConditionModel has buffers now; the meta-device build would leave them empty")
    unet.load_state_dict({k: v.detach().clone() for k, v in state_dict.items()}, strict=True, assign=True)
    unet.train(ldm_unet.training)
    if next(ldm_unet.parameters()).dtype == torch.float64:
        projection = unet.time_proj
        if not (projection.flip_sin_to_cos and projection.downscale_freq_shift == 0 and projection.scale == 1):
            raise ValueError("Float64Timesteps computes SD's timestep projection only (flip_sin_to_cos, no shift)")
        unet.time_proj = Float64Timesteps(projection.num_channels)  # as make_unet does for the ldm twin
    logger.debug("converted an ldm UNet to diffusers with config %s", unet_config)
    return unet


def to_diffusers_unet(ldm_unet: UNetModel, config: TinyUnetConfig) -> UNet2DConditionModel:
    """`ldm_to_diffusers_unet` for a UNet from `make_unet(config, ...)` (all three tiny configs convert)."""
    return ldm_to_diffusers_unet(ldm_unet, config.unet_params())
