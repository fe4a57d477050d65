"""Cost of Attend-and-Excite: plain sampling vs lib_ae vs the diffusers reference, on the same random-weight UNet.

One process, one run, same weights / latent / prompt embedding / sampler for every row of a configuration:
  plain        k-diffusion Euler (50 steps, CFG 7.5, batched cond+uncond) over the CompVis ldm UNet (what A1111 runs),
               attention through torch SDPA (A1111's default "sdp" optimisation, a class-level forward swap)
  ae_norefine  the same plus lib_ae's update, refinement disabled (thresholds={})
  ae           the same plus lib_ae's update with the official defaults. Random weights never reach the refinement
               thresholds, so all three refinement steps run their 20 iterations: the WORST case of refinement
  bind         (with --binding) lib_ae's `bind` method: SynGen's loss and schedule (25 updates of step 20, no
               refinement) on two modifier-noun groups
  excite_bind_norefine, excite_bind
               (with --binding) `excite+bind`: the ae_norefine / ae rows with SynGen's loss added to the same evaluation
               (no extra UNet call); ratios over the matching excite row (target: at most 1.02)
  ref_plain    diffusers StableDiffusionPipeline (DDIM, same steps and CFG) on the same UNet converted to diffusers
  ref_ae       diffusers StableDiffusionAttendAndExcitePipeline (DDIM, its defaults) on that converted UNet
SD1.5 runs all five rows at 512x512; SDXL (diffusers' SDXL UNet layout, the real config, random weights) runs the
three lib_ae rows at 1024x1024 (the reference pipeline is SD1-only).

On CUDA the UNet has fp16 weights and runs under fp16 autocast (lib_ae's attention probabilities and loss in float32);
on CPU everything is float32. Prints a table and writes JSON: seconds per image (median of --repeats after a warm-up,
synchronized), UNet calls (CFG-batched call = 1; grad-enabled ones; ones lib_ae cut short after the last needed
layer), backward passes (torch.autograd.grad calls), peak allocated GPU memory, ratios A&E/plain for both
implementations, device name, library versions and the exact command.

    python tests/benchmark.py --out tests/benchmark-h100.json        # on a GPU: SD1.5 512x512 and SDXL 1024x1024
    python tests/benchmark.py --tiny --out /tmp/bench.json           # small CPU configuration (CI smoke test)
    python tests/benchmark.py --profile --only sd15                  # where one A&E evaluation spends its time
    python tests/benchmark.py --binding --rows ae_norefine,ae_norefine_graph,bind,bind_graph,excite_bind_norefine,excite_bind_norefine_graph --no-reference
                                                                     # the binding rows beside their excite rows
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import platform
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

# Runnable as `python tests/benchmark.py` from the repository root and importable as `benchmark` by pytest (which puts
# tests/ on sys.path): the same imports (`lib_ae`, `support.*`) work both ways.
TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
for _path in (str(ROOT), str(TESTS)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from lib_ae import (  # noqa: E402
    AttendAndExcite,
    AttentionCapture,
    ExciteConfig,
    InSamplerExcitation,
    StepClock,
    TokenSelection,
    frozen_parameters,
)
from lib_ae.binding import BindingConfig, BindingGroup, BindingSelection  # noqa: E402
from lib_ae.engine import GraphableRunner  # noqa: E402
from support.thirdparty import import_k_diffusion  # noqa: E402

logger = logging.getLogger("benchmark")

SUBJECT_COLUMNS = ((2,), (5,))  # "a cat and a dog": cat = 2, dog = 5
CFG_SCALE = 7.5
AE_ROWS = ("ae_norefine", "ae_norefine_graph", "ae", "ae_graph")
BINDING_ROWS = ("bind", "bind_graph", "excite_bind_norefine", "excite_bind_norefine_graph", "excite_bind", "excite_bind_graph")
"""Rows of the binding methods, run with --binding (or named in --rows)."""
BINDING = BindingSelection.official(7, [BindingGroup(2, (1,)), BindingGroup(5, (4,))])
"""Two modifier-noun groups whose nouns are the subjects (columns 2 and 5) among 7 word pieces: "red cat and a blue
dog ." with the subjects of SUBJECT_COLUMNS."""
TOKENS = 77
TEXT_SCALE = 0.25
"""Standard deviation of the random prompt embeddings. It sets the spread of the cross-attention logits of random
weights (to_k has no bias): at 0.25 the aggregated maps stay flat enough that no refinement step reaches its threshold,
so every run does the full 3 x 20 refinement iterations, the deterministic worst case, in both implementations."""

SD15 = dict(
    image_size=64, in_channels=4, out_channels=4, model_channels=320, attention_resolutions=[4, 2, 1], num_res_blocks=2,
    channel_mult=[1, 2, 4, 4], num_heads=8, use_spatial_transformer=True, transformer_depth=1, context_dim=768,
    use_checkpoint=False, legacy=False,
)  # configs/stable-diffusion/v1-inference.yaml unet_config.params

SDXL = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)  # stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (attention_head_dim is diffusers' name for head count)

TINY_SD = dict(
    image_size=16, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[4, 2, 1], num_res_blocks=1,
    channel_mult=[1, 2, 2, 2], num_heads=2, use_spatial_transformer=True, transformer_depth=1, context_dim=32,
    use_checkpoint=False, legacy=False,
)  # SD1.5's structure, narrow: cross-attention at 16, 8, 4 (the A&E maps) and 2 for a 16x16 latent

TINY_XL = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64, 64),
    down_block_types=SDXL["down_block_types"], up_block_types=SDXL["up_block_types"],
    transformer_layers_per_block=(1, 1, 2), attention_head_dim=(1, 2, 2), cross_attention_dim=32,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=32 + 6 * 8,
)  # SDXL's structure, narrow


@dataclass(frozen=True)
class Scenario:
    name: str
    ldm_kwargs: dict[str, Any] | None  # CompVis ldm UNetModel arguments (SD1.x family)
    sdxl_kwargs: dict[str, Any] | None  # diffusers UNet2DConditionModel config (SDXL family)
    latent: int  # latent side (image side / 8)
    context_dim: int
    pooled_dim: int = 0  # SDXL's pooled text embedding width
    with_reference: bool = False
    skip_by_default: tuple[str, ...] = ()  # lib_ae rows left out unless --all-rows (to fit one 10-minute device call)

    @property
    def family(self) -> str:
        return "sd15" if self.ldm_kwargs is not None else "sdxl"


# --------------------------------------------------------------------------------------------------- accounting


@dataclass
class Counts:
    calls: int = 0
    grad_calls: int = 0
    completed: int = 0
    backward: int = 0
    rows: int = 0
    evaluations: int = 0  # lib_ae evaluations (gradient passes), replayed graphs included

    def reset(self) -> None:
        self.calls = self.grad_calls = self.completed = self.backward = self.rows = self.evaluations = 0


def count_calls(unet: nn.Module, counts: Counts) -> list[Any]:
    """Count every UNet invocation (pre-hook) and every one that reached its end (post-hook)."""

    def pre_hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        counts.calls += 1
        counts.grad_calls += int(torch.is_grad_enabled())
        sample = args[0] if args else kwargs.get("sample", kwargs.get("x"))
        counts.rows += int(sample.shape[0]) if isinstance(sample, torch.Tensor) else 0

    def post_hook(*_: Any) -> None:
        counts.completed += 1

    return [unet.register_forward_pre_hook(pre_hook, with_kwargs=True), unet.register_forward_hook(post_hook)]


@contextlib.contextmanager
def counting_backward(counts: Counts) -> Iterator[None]:
    """Count torch.autograd.grad calls: lib_ae and the reference both differentiate through it, looked up at call time."""
    original = torch.autograd.grad

    def grad(*args: Any, **kwargs: Any) -> Any:
        counts.backward += 1
        return original(*args, **kwargs)

    torch.autograd.grad = grad
    try:
        yield
    finally:
        torch.autograd.grad = original


def sdpa_forward(self: nn.Module, x: torch.Tensor, context: torch.Tensor | None = None, mask: Any = None, **_: Any) -> torch.Tensor:
    """ldm CrossAttention through torch SDPA: A1111's default attention optimisation ("sdp") does the same math."""
    heads = self.heads
    context = x if context is None else context
    q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
    b = q.shape[0]
    q, k, v = (t.reshape(b, -1, heads, t.shape[-1] // heads).transpose(1, 2) for t in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    return self.to_out(out.transpose(1, 2).reshape(b, -1, heads * out.shape[-1]))


def device_timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: int = 10000, repeat_only: bool = False) -> torch.Tensor:
    """ldm's sinusoidal timestep embedding with its frequencies built on the timesteps' device (as diffusers does), not
    on the CPU and copied over at every call: a host-to-device copy cannot be captured in a CUDA graph."""
    if repeat_only:
        return timesteps[:, None].expand(-1, dim)
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(start=0, end=half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


@contextlib.contextmanager
def host_patches() -> Iterator[None]:
    """What the benchmark's host changes in ldm, for every row alike: attention through SDPA (a class-level swap of
    CrossAttention.forward, as A1111's sd_hijack does) and a device-side timestep embedding. Both are restored
    afterwards, so that an in-process smoke test leaves ldm as it found it."""
    from ldm.modules import attention as ldm_attention
    from ldm.modules.diffusionmodules import openaimodel

    originals = ldm_attention.CrossAttention.forward, openaimodel.timestep_embedding
    ldm_attention.CrossAttention.forward = sdpa_forward
    openaimodel.timestep_embedding = device_timestep_embedding
    try:
        yield
    finally:
        ldm_attention.CrossAttention.forward, openaimodel.timestep_embedding = originals


# --------------------------------------------------------------------------------------------------- models


def randomize(module: nn.Module, seed: int) -> None:
    """The tests' scheme (support.models): weights N(0, 1/fan_in), norm gains 1 + N(0, 0.01), biases N(0, 0.01).

    ldm zero-initialises its residual output layers, which would hide the attention from the gradient. Drawn on the
    module's device so that multi-GB UNets initialise in a second on a GPU.
    """
    device = next(module.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    norm_gains = {id(m.weight) for m in module.modules() if isinstance(m, (nn.GroupNorm, nn.LayerNorm)) and m.weight is not None}
    with torch.no_grad():
        for p in module.parameters():
            noise = torch.randn(p.shape, generator=generator, device=device, dtype=torch.float32)
            if id(p) in norm_gains:
                noise = 1.0 + 0.1 * noise
            elif p.ndim == 1:
                noise = 0.1 * noise
            else:
                noise = noise / math.sqrt(p[0].numel())
            p.copy_(noise)


def build_unet(s: Scenario, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """Real architecture, built on the meta device (no init cost), materialised on `device`, random weights."""
    if s.ldm_kwargs is not None:
        from ldm.modules.diffusionmodules.openaimodel import UNetModel

        with torch.device("meta"):
            unet: nn.Module = UNetModel(**s.ldm_kwargs)
    else:
        from diffusers import UNet2DConditionModel

        assert s.sdxl_kwargs is not None
        with torch.device("meta"):
            unet = UNet2DConditionModel(**s.sdxl_kwargs)
    if any(True for _ in unet.buffers()):
        raise RuntimeError("this UNet has buffers; the meta-device build would leave them uninitialised")
    unet.to_empty(device=device)
    randomize(unet, seed=1)
    # nn.Module.to: diffusers' own `to` warns about dtype casts meant for pretrained checkpoints; nothing to keep here.
    nn.Module.to(unet, dtype=dtype).eval()
    if s.ldm_kwargs is not None:
        unet.dtype = dtype  # ldm's UNetModel casts its input to this attribute (float32 unless use_fp16)
    return unet


def alphas_cumprod(device: torch.device) -> torch.Tensor:
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float32) ** 2
    return torch.cumprod(1 - betas, 0).to(device)


class LdmModel(nn.Module):
    """What k-diffusion's CompVisDenoiser wraps in A1111: `apply_model(x, t, cond)` + `alphas_cumprod`."""

    def __init__(self, unet: nn.Module, device: torch.device) -> None:
        super().__init__()
        self.diffusion_model = unet
        self.dtype = next(unet.parameters()).dtype
        self.register_buffer("alphas_cumprod", alphas_cumprod(device))

    def apply_model(self, x: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        dtype = self.dtype
        # fp16 autocast on CUDA, as A1111 runs the UNet; lib_ae computes its probabilities and loss in float32 itself.
        with torch.autocast(x.device.type, dtype=torch.float16, enabled=x.device.type == "cuda"):
            if isinstance(cond, dict):  # SDXL (diffusers layout)
                out = self.diffusion_model(
                    x.to(dtype), t, encoder_hidden_states=cond["crossattn"].to(dtype),
                    added_cond_kwargs={"text_embeds": cond["text_embeds"].to(dtype), "time_ids": cond["time_ids"].to(dtype)},
                ).sample
            else:
                out = self.diffusion_model(x.to(dtype), t, context=cond.to(dtype))
        return out.float()


# --------------------------------------------------------------------------------------------------- samplers


def select_rows(cond: Any, rows: torch.Tensor) -> Any:
    if isinstance(cond, dict):
        return {k: v.index_select(0, rows) for k, v in cond.items()}
    return cond.index_select(0, rows)


def concat(a: Any, b: Any) -> Any:
    if isinstance(a, dict):
        return {k: torch.cat([a[k], b[k]]) for k in a}
    return torch.cat([a, b])


def graphable_runner(denoiser: nn.Module, sigma: torch.Tensor, cond: Any) -> GraphableRunner:
    """The cond-only denoiser call as a `GraphableRunner`: the step's sigma and the conditioning tensors are its inputs;
    the function itself is the same for every step (one `key`), so one captured graph serves the whole run."""
    names = sorted(cond) if isinstance(cond, dict) else None
    flat = tuple(cond[n] for n in names) if names else (cond,)

    def cond_forward(latent_rows: torch.Tensor, sigma_rows: torch.Tensor, *cond_rows: torch.Tensor) -> None:
        denoiser(latent_rows, sigma_rows, cond=dict(zip(names, cond_rows)) if names else cond_rows[0])

    return GraphableRunner(cond_forward, (sigma, *flat), key=("benchmark-cond-denoiser", id(denoiser)))


def k_euler(
    denoiser: nn.Module,
    x_t: torch.Tensor,
    cond: Any,
    uncond: Any,
    steps: int,
    excitation: InSamplerExcitation | None,
    graphable: bool = False,
    binds: bool = False,
) -> torch.Tensor:
    """A1111's txt2img core: a CFG denoiser (uncond and cond in one batch) around k-diffusion's CompVisDenoiser, driven
    by sample_euler. `graphable`: hand lib_ae a `GraphableRunner` (the step's sigma and the conditioning as inputs)."""
    sampling, _ = import_k_diffusion()
    sigmas = denoiser.get_sigmas(steps)
    calls = 0
    selections = [TokenSelection.official(TOKENS, SUBJECT_COLUMNS)] * x_t.shape[0]
    bindings = [BINDING if binds else None] * x_t.shape[0]

    def cfg_denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        if excitation is not None:
            if graphable:
                run_unet: Any = graphable_runner(denoiser, sigma, cond)
            else:

                def run_unet(latent_rows: torch.Tensor, rows: torch.Tensor) -> None:
                    denoiser(latent_rows, sigma.index_select(0, rows), cond=select_rows(cond, rows))

            excitation.before_model_call(calls, x, sigma, selections, run_unet, bindings=bindings)
        calls += 1
        x_in, sigma_in = torch.cat([x, x]), torch.cat([sigma, sigma])
        uncond_out, cond_out = denoiser(x_in, sigma_in, cond=concat(uncond, cond)).chunk(2)
        return uncond_out + (cond_out - uncond_out) * CFG_SCALE

    return sampling.sample_euler(cfg_denoiser, x_t * sigmas[0], sigmas, disable=True)


# --------------------------------------------------------------------------------------------------- measurement


@dataclass
class Run:
    seconds: list[float] = field(default_factory=list)
    counts: Counts = field(default_factory=Counts)
    peak_bytes: int = 0
    peak_reserved_bytes: int = 0
    resident_bytes: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def repeat(fn: Callable[[], Any], counts: Counts, device: torch.device, repeats: int) -> Run:
    """One warm-up (kernel selection, allocator, lib_ae learning its last layer, CUDA-graph capture), then `repeats`
    timed runs. Memory peaks cover the warm-up too: a replayed graph allocates nothing, its tensors live in the private
    pool allocated while it was captured, so a peak taken over the replays alone would miss them."""
    with counting_backward(counts):
        if device.type == "cuda":
            synchronize(device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        fn()
        run = Run()
        for _ in range(repeats):
            synchronize(device)
            if device.type == "cuda":
                run.resident_bytes = torch.cuda.memory_allocated()
            counts.reset()
            start = time.perf_counter()
            fn()
            synchronize(device)
            run.seconds.append(time.perf_counter() - start)
            run.counts = Counts(**vars(counts))
        if device.type == "cuda":
            run.peak_bytes = torch.cuda.max_memory_allocated()
            run.peak_reserved_bytes = torch.cuda.max_memory_reserved()
    return run


def summarize(run: Run) -> dict[str, Any]:
    c = run.counts
    return {
        "seconds_per_image": statistics.median(run.seconds),
        "seconds_all": [round(v, 4) for v in run.seconds],
        "unet_calls": c.calls,
        "unet_grad_calls": c.grad_calls,
        "unet_calls_cut_short": c.calls - c.completed,
        "unet_rows": c.rows,
        "backward_passes": c.backward,
        "ae_evaluations": c.evaluations,
        "peak_allocated_gib": run.peak_bytes / 2**30,
        "peak_reserved_gib": run.peak_reserved_bytes / 2**30,
        "resident_gib": run.resident_bytes / 2**30,
        **run.extra,
    }


def make_inputs(s: Scenario, device: torch.device) -> tuple[torch.Tensor, Any, Any]:
    g = torch.Generator().manual_seed(42)
    x_t = torch.randn(1, 4, s.latent, s.latent, generator=g).to(device)
    cond_text = (TEXT_SCALE * torch.randn(1, TOKENS, s.context_dim, generator=g)).to(device)
    uncond_text = (TEXT_SCALE * torch.randn(1, TOKENS, s.context_dim, generator=g)).to(device)
    if s.sdxl_kwargs is None:
        return x_t, cond_text, uncond_text
    side = s.latent * 8.0
    time_ids = torch.tensor([[side, side, 0.0, 0.0, side, side]], device=device)
    cond = {"crossattn": cond_text, "text_embeds": torch.randn(1, s.pooled_dim, generator=g).to(device), "time_ids": time_ids}
    uncond = {"crossattn": uncond_text, "text_embeds": torch.randn(1, s.pooled_dim, generator=g).to(device), "time_ids": time_ids}
    return x_t, cond, uncond


def bench_scenario(s: Scenario, device: torch.device, steps: int, repeats: int, rows: set[str]) -> dict[str, Any]:
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    x_t, cond, uncond = make_inputs(s, device)
    unet = build_unet(s, device, dtype)
    counts = Counts()
    handles = count_calls(unet, counts)
    model = LdmModel(unet, device)
    _, external = import_k_diffusion()
    # One denoiser for the whole configuration: a captured graph keeps reading its schedule buffers.
    denoiser = external.CompVisDenoiser(model)
    results: dict[str, Any] = {}
    finals: dict[str, torch.Tensor] = {}

    def plain() -> torch.Tensor:
        with torch.no_grad():
            return k_euler(denoiser, x_t, cond, uncond, steps, None)

    capture = AttentionCapture(unet)

    def ae_row(
        name: str, config: ExciteConfig, graphs: bool, binding: BindingConfig | None = None, excite: bool = True
    ) -> dict[str, Any]:
        # One engine per row, as a host keeps one per model: graphs are captured in the warm-up run and replayed after.
        engine = AttendAndExcite(capture, config, cuda_graphs=graphs, binding=binding, excite=excite)
        evaluate = engine._evaluate

        def counted(*args: Any, **kwargs: Any) -> Any:
            counts.evaluations += 1
            return evaluate(*args, **kwargs)

        engine._evaluate = counted  # type: ignore[method-assign]
        reports: list[Any] = []

        def run() -> torch.Tensor:
            excitation = InSamplerExcitation(engine, engine.plan(steps), "sigma", StepClock(1))
            with torch.no_grad():
                out = k_euler(denoiser, x_t, cond, uncond, steps, excitation, graphable=graphs, binds=binding is not None)
            reports[:] = excitation.reports
            finals[name] = out
            return out

        measured = repeat(run, counts, device, repeats)
        engine.release_graphs()
        plan = engine.plan(steps)
        measured.extra = {
            "cuda_graphs": graphs and device.type == "cuda",
            "alter_steps": plan.alter_steps,
            "refinement_steps": sorted(plan.refinement_thresholds),
            "refinement_iterations": {r.step: r.refinement_iterations[0] for r in reports if r.step in plan.refinement_thresholds},
        }
        if graphs:
            eager = name.removesuffix("_graph")
            if eager in finals:  # same arithmetic, so the same final latent, bit for bit
                measured.extra["final_latent_max_abs_diff_vs_eager"] = float((finals[name] - finals[eager]).abs().max())
        return summarize(measured)

    results["plain"] = summarize(repeat(plain, counts, device, repeats))
    binding = BindingConfig()
    methods: tuple[tuple[str, ExciteConfig, BindingConfig | None, bool], ...] = (
        ("ae_norefine", ExciteConfig(thresholds={}), None, True),
        ("ae", ExciteConfig(), None, True),
        ("bind", ExciteConfig(), binding, False),
        ("excite_bind_norefine", ExciteConfig(thresholds={}), binding, True),
        ("excite_bind", ExciteConfig(), binding, True),
    )
    for name, config, with_binding, excite in methods:
        if name in rows:
            results[name] = ae_row(name, config, False, with_binding, excite)
        if name + "_graph" in rows:
            results[name + "_graph"] = ae_row(name + "_graph", config, True, with_binding, excite)
    capture.remove()
    for handle in handles:
        handle.remove()
    del model, denoiser
    if s.with_reference:
        assert s.ldm_kwargs is not None
        # Ours leaves the GPU before the converted copy arrives, so both implementations' peaks hold one UNet.
        unet_cpu = unet.to(device="cpu")
        del unet
        empty_cache(device)
        results.update(bench_reference(unet_cpu, s, x_t, cond, uncond, device, dtype, steps, counts, repeats))
    else:
        del unet
    empty_cache(device)

    base = results["plain"]
    ours = ("ae", "bind", "excite_bind")
    ratios = {
        f"ours_{name}_over_plain": row["seconds_per_image"] / base["seconds_per_image"]
        for name, row in results.items()
        if name.startswith(ours)
    }
    for name in results:  # the target for binding: at most 2% over excite alone at the same settings
        if name.startswith("excite_bind"):
            excite_row = "ae" + name.removeprefix("excite_bind")
            if excite_row in results:
                ratios[f"ours_{name}_over_{excite_row}"] = (
                    results[name]["seconds_per_image"] / results[excite_row]["seconds_per_image"]
                )
    memory = {
        f"ours_{name}_minus_plain_gib": row["peak_allocated_gib"] - base["peak_allocated_gib"]
        for name, row in results.items()
        if name.startswith(ours)
    }
    memory.update({
        f"ours_{name}_minus_plain_reserved_gib": row["peak_reserved_gib"] - base["peak_reserved_gib"]
        for name, row in results.items()
        if name.startswith(ours)
    })
    if s.with_reference:
        ratios["reference_ae_over_plain"] = results["ref_ae"]["seconds_per_image"] / results["ref_plain"]["seconds_per_image"]
        for name in ("ae", "ae_graph"):
            if name in results:
                ratios[f"ours_{name}_ratio_over_reference_ratio"] = ratios[f"ours_{name}_over_plain"] / ratios["reference_ae_over_plain"]
        memory["reference_ae_minus_plain_gib"] = results["ref_ae"]["peak_allocated_gib"] - results["ref_plain"]["peak_allocated_gib"]
        memory["reference_ae_minus_plain_reserved_gib"] = (
            results["ref_ae"]["peak_reserved_gib"] - results["ref_plain"]["peak_reserved_gib"]
        )
    return {
        "scenario": s.name,
        "image_side": s.latent * 8,
        "batch": 1,
        "steps": steps,
        "results": results,
        "ratios": ratios,
        "memory": memory,
    }


def empty_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def reference_plan(steps: int) -> dict[str, Any]:
    """The reference's own defaults (defined for 50 steps), mapped like lib_ae maps them when `steps` != 50 (tiny
    runs), so both implementations do the same schedule of work."""
    plan = ExciteConfig().plan(steps)
    return {"max_iter_to_alter": plan.alter_steps, "thresholds": dict(plan.refinement_thresholds)}


def bench_reference(
    unet_cpu: nn.Module,
    s: Scenario,
    x_t: torch.Tensor,
    cond_text: torch.Tensor,
    uncond_text: torch.Tensor,
    device: torch.device,
    dtype: torch.dtype,
    steps: int,
    counts: Counts,
    repeats: int,
) -> dict[str, Any]:
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from diffusers.models.attention_processor import AttnProcessor2_0
    from diffusers.pipelines.deprecated.stable_diffusion_attend_and_excite.pipeline_stable_diffusion_attend_and_excite import (
        StableDiffusionAttendAndExcitePipeline,
    )

    from support.models import ldm_to_diffusers_unet

    assert s.ldm_kwargs is not None
    # Converted in the target dtype (the converter copies tensors as they are), so only a device move follows.
    ref_unet = ldm_to_diffusers_unet(unet_cpu.to(dtype), s.ldm_kwargs)
    del unet_cpu
    ref_unet = ref_unet.to(device=device).eval()
    handles = count_calls(ref_unet, counts)

    def scheduler() -> DDIMScheduler:
        return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                             set_alpha_to_one=False, steps_offset=1)  # SD1.5's scheduler_config.json

    common: dict[str, Any] = dict(vae=None, text_encoder=None, tokenizer=None, unet=ref_unet, safety_checker=None,
                                  feature_extractor=None, requires_safety_checker=False)
    ae_pipe = StableDiffusionAttendAndExcitePipeline(scheduler=scheduler(), **common)
    plain_pipe = StableDiffusionPipeline(scheduler=scheduler(), **common)
    for pipe in (ae_pipe, plain_pipe):
        pipe.set_progress_bar_config(disable=True)
    args: dict[str, Any] = dict(
        prompt_embeds=cond_text.to(dtype), negative_prompt_embeds=uncond_text.to(dtype), latents=x_t.to(dtype),
        num_inference_steps=steps, guidance_scale=CFG_SCALE, height=s.latent * 8, width=s.latent * 8,
        output_type="latent",
    )
    attn = math.ceil(s.latent / 4)
    ref_plan = {} if steps == 50 else reference_plan(steps)

    def ref_plain() -> Any:
        ref_unet.set_attn_processor(AttnProcessor2_0())  # diffusers' default (SDPA); the A&E pipeline restores it too
        return plain_pipe(**args)

    def ref_ae() -> Any:
        return ae_pipe(prompt=None, token_indices=[c[0] for c in SUBJECT_COLUMNS], attn_res=(attn, attn), **ref_plan, **args)

    # The A&E pipeline logs one line per step at INFO; keep the benchmark's output readable.
    pipe_logger = logging.getLogger(StableDiffusionAttendAndExcitePipeline.__module__)
    level = pipe_logger.level
    pipe_logger.setLevel(logging.WARNING)
    try:
        out = {
            "ref_plain": summarize(repeat(ref_plain, counts, device, repeats)),
            "ref_ae": summarize(repeat(ref_ae, counts, device, repeats)),
        }
    finally:
        pipe_logger.setLevel(level)
        for handle in handles:
            handle.remove()
    out["ref_ae"]["reference_arguments"] = {"token_indices": [c[0] for c in SUBJECT_COLUMNS], "attn_res": [attn, attn], **ref_plan}
    del ref_unet, ae_pipe, plain_pipe
    return out


# --------------------------------------------------------------------------------------------------- profile


def profile_scenario(s: Scenario, device: torch.device, iters: int) -> dict[str, Any]:
    """Where one A&E evaluation (grad forward + loss + backward) goes, against one plain CFG step, with ablations."""
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    x_t, cond, uncond = make_inputs(s, device)
    unet = build_unet(s, device, dtype)
    model = LdmModel(unet, device)
    _, external = import_k_diffusion()
    denoiser = external.CompVisDenoiser(model)
    sigma = denoiser.get_sigmas(50)[5:6].clone()
    x = x_t * denoiser.get_sigmas(50)[0]
    capture = AttentionCapture(unet)
    selections = [TokenSelection.official(TOKENS, SUBJECT_COLUMNS)]

    def run_unet(latent_rows: torch.Tensor, rows: torch.Tensor) -> None:
        denoiser(latent_rows, sigma.index_select(0, rows), cond=select_rows(cond, rows))

    def timed(fn: Callable[[], Any]) -> float:
        for _ in range(2):
            fn()
        values = []
        for _ in range(iters):
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            values.append(time.perf_counter() - start)
        return statistics.median(values) * 1000

    def cfg_step() -> None:
        with torch.no_grad():
            denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), cond=concat(uncond, cond))

    def single() -> None:
        with torch.no_grad():
            denoiser(x, sigma, cond=cond)

    def ae_step(config: ExciteConfig, graphs: bool = False) -> Callable[[], None]:
        engine = AttendAndExcite(capture, config, cuda_graphs=graphs)
        plan = engine.plan(50)
        runner = graphable_runner(denoiser, sigma, cond) if graphs else run_unet

        def fn() -> None:
            with torch.no_grad():
                engine.step(x, 1, plan, selections, runner, gradient_scale=[1.0])

        return fn

    rows: dict[str, float] = {}
    rows["plain_cfg_step_ms"] = timed(cfg_step)
    rows["plain_single_forward_ms"] = timed(single)
    rows["ae_eval_ms"] = timed(ae_step(ExciteConfig(thresholds={})))
    rows["ae_eval_cuda_graph_ms"] = timed(ae_step(ExciteConfig(thresholds={}), graphs=True))
    size = ExciteConfig().attention_size(s.latent, s.latent)
    index = torch.zeros(1, dtype=torch.long, device=device)

    def partial_forward(grad: bool) -> Callable[[], None]:
        """The cut-short cond forward alone (with or without the autograd graph), no loss and no backward."""

        def fn() -> None:
            with torch.set_grad_enabled(grad), frozen_parameters(unet):
                leaf = x.detach().requires_grad_(grad)
                with capture.record(*size) as recording:
                    run_unet(leaf, index)
                recording.maps()

        return fn

    rows["partial_forward_grad_ms"] = timed(partial_forward(True))
    rows["partial_forward_nograd_ms"] = timed(partial_forward(False))
    rows["ae_eval_no_early_stop_ms"] = timed(ae_step(ExciteConfig(thresholds={}, early_stop=False)))
    capture.early_stop = True
    # Weight gradients: what autograd costs when the parameters keep requires_grad (the reference's situation).
    from lib_ae import engine as engine_module

    original_frozen = engine_module.frozen_parameters
    engine_module.frozen_parameters = lambda _m: contextlib.nullcontext()  # type: ignore[assignment]
    try:
        rows["ae_eval_weights_require_grad_ms"] = timed(ae_step(ExciteConfig(thresholds={})))
    finally:
        engine_module.frozen_parameters = original_frozen
    if s.ldm_kwargs is not None:
        # Explicit softmax attention in every layer during the grad pass (as the reference's processor does).
        from ldm.modules import attention as ldm_attention

        swapped = ldm_attention.CrossAttention.forward
        ldm_attention.CrossAttention.forward = _explicit_forward
        try:
            rows["ae_eval_explicit_attention_everywhere_ms"] = timed(ae_step(ExciteConfig(thresholds={})))
        finally:
            ldm_attention.CrossAttention.forward = swapped
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])

    def device_ms(fn: Callable[[], None], runs: int = 3) -> tuple[float, str, str]:
        """Kernel time per run (the GPU's busy time; on the CPU the operators' own time), and the top operators by
        device time and by CPU time."""
        fn()
        with profile(activities=activities) as prof:
            for _ in range(runs):
                fn()
            synchronize(device)
        if device.type == "cuda":
            kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
            busy = sum(e.device_time_total for e in kernels) / runs / 1000
        else:
            busy = prof.key_averages().self_cpu_time_total / runs / 1000
        averages = prof.key_averages()
        key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
        by_device = averages.table(sort_by=key, row_limit=25, max_name_column_width=70)
        by_cpu = averages.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=70)
        return busy, by_device, by_cpu

    rows["ae_eval_busy_ms"], table, cpu_table = device_ms(ae_step(ExciteConfig(thresholds={})))
    rows["plain_cfg_step_busy_ms"], plain_table, _ = device_ms(cfg_step)

    # The same evaluations inside a real sampling run: synchronized time spent in the A&E hook vs the rest.
    def sampler_split(config: ExciteConfig) -> tuple[float, float]:
        engine = AttendAndExcite(capture, config)
        excitation = InSamplerExcitation(engine, engine.plan(50), "sigma", StepClock(1))
        hook = excitation.before_model_call
        spent = [0.0]

        def timed_hook(*args: Any, **kwargs: Any) -> Any:
            synchronize(device)
            start = time.perf_counter()
            result = hook(*args, **kwargs)
            synchronize(device)
            spent[0] += time.perf_counter() - start
            return result

        excitation.before_model_call = timed_hook  # type: ignore[method-assign]
        with torch.no_grad():
            k_euler(denoiser, x_t, cond, uncond, 50, excitation)
        spent[0] = 0.0
        synchronize(device)
        start = time.perf_counter()
        with torch.no_grad():
            k_euler(denoiser, x_t, cond, uncond, 50, excitation)
        synchronize(device)
        return (time.perf_counter() - start) * 1000, spent[0] * 1000

    total, hooked = sampler_split(ExciteConfig(thresholds={}))
    rows["sampler_ae_norefine_total_ms"] = total
    rows["sampler_ae_norefine_per_eval_ms"] = hooked / 25
    rows["sampler_ae_norefine_rest_per_step_ms"] = (total - hooked) / 50
    synchronize(device)
    start = time.perf_counter()
    with torch.no_grad():
        k_euler(denoiser, x_t, cond, uncond, 50, None)
    synchronize(device)
    rows["sampler_plain_per_step_ms"] = (time.perf_counter() - start) * 1000 / 50
    table = "A&E evaluation, by device time\n" + table + "\nA&E evaluation, by CPU time\n" + cpu_table
    table += "\nplain CFG step, by device time\n" + plain_table
    capture.remove()
    del unet, model, denoiser
    empty_cache(device)
    return {"scenario": s.name, "milliseconds": rows, "profile_table": table}


def _explicit_forward(self: nn.Module, x: torch.Tensor, context: torch.Tensor | None = None, mask: Any = None, **_: Any) -> torch.Tensor:
    heads = self.heads
    context = x if context is None else context
    q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
    b = q.shape[0]
    q, k, v = (t.reshape(b, -1, heads, t.shape[-1] // heads).transpose(1, 2) for t in (q, k, v))
    probs = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(-1)
    out = probs @ v
    return self.to_out(out.transpose(1, 2).reshape(b, -1, heads * out.shape[-1]))


# --------------------------------------------------------------------------------------------------- report


def versions() -> dict[str, str]:
    from importlib import metadata

    found = {"python": platform.python_version(), "torch": torch.__version__}
    if torch.cuda.is_available():
        found["cuda"] = str(torch.version.cuda)
        found["cudnn"] = str(torch.backends.cudnn.version())
    for dist in ("diffusers", "k-diffusion", "stable-diffusion-sdkit", "transformers"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[dist] = metadata.version(dist)
    return found


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def scenarios_for(args: argparse.Namespace) -> list[Scenario]:
    if args.tiny:
        found = [
            Scenario("tiny-sd", TINY_SD, None, 16, 32, with_reference=True),
            Scenario("tiny-sdxl", None, TINY_XL, 16, 32, pooled_dim=32),
        ]
    else:
        found = [
            Scenario("sd15-512", SD15, None, 64, 768, with_reference=True),
            Scenario("sdxl-1024", None, SDXL, 128, 2048, pooled_dim=1280, skip_by_default=("ae",)),
        ]
    if args.only:
        found = [sc for sc in found if sc.family == args.only]
    return found


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="small CPU configuration (CI smoke run)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per row after one warm-up (3; tiny: 1)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--only", choices=("sd15", "sdxl"), default=None)
    parser.add_argument("--no-reference", action="store_true", help="skip the diffusers rows")
    parser.add_argument("--all-rows", action="store_true", help="also the rows a configuration skips by default")
    parser.add_argument("--no-graphs", action="store_true", help="skip the rows with lib_ae's CUDA-graph evaluation")
    parser.add_argument("--binding", action="store_true", help="add the binding rows (" + ", ".join(BINDING_ROWS) + ")")
    parser.add_argument("--rows", default=None,
                        help="comma-separated lib_ae rows to run instead of the defaults (" + ", ".join(AE_ROWS + BINDING_ROWS) + ")")
    parser.add_argument("--profile", action="store_true", help="time one A&E evaluation and its ablations instead")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    repeats = args.repeats if args.repeats is not None else (1 if args.tiny else 3)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    argv_used = sys.argv[1:] if argv is None else list(argv)
    report: dict[str, Any] = {
        "command": "python tests/benchmark.py " + shlex.join(argv_used),
        "device": device_name(device),
        "precision": "fp16 weights + fp16 autocast (lib_ae loss in float32)" if device.type == "cuda" else "float32",
        "sampler": f"ours: k-diffusion Euler; reference: DDIM; {args.steps} steps, CFG {CFG_SCALE}, batch 1",
        "repeats": repeats,
        "versions": versions(),
        "scenarios": [],
    }
    with host_patches():
        for scenario in scenarios_for(args):
            if args.no_reference:
                scenario = Scenario(**{**vars(scenario), "with_reference": False})
            logger.info("running %s ...", scenario.name)
            if args.profile:
                result = profile_scenario(scenario, device, iters=max(repeats, 5))
                print_profile(result)
            else:
                rows = set(AE_ROWS) if args.all_rows else set(AE_ROWS) - set(scenario.skip_by_default)
                if args.binding:
                    rows |= set(BINDING_ROWS) if args.all_rows else set(BINDING_ROWS) - {"excite_bind", "excite_bind_graph"}
                if args.rows:
                    rows = {r.strip() for r in args.rows.split(",") if r.strip()}
                    unknown = rows - set(AE_ROWS + BINDING_ROWS)
                    if unknown:
                        raise SystemExit(f"unknown rows: {', '.join(sorted(unknown))}")
                if args.no_graphs:
                    rows = {r for r in rows if not r.endswith("_graph")}
                result = bench_scenario(scenario, device, args.steps, repeats, rows)
                print_table(result)
            report["scenarios"].append(result)
            if args.out:  # written after each configuration, so a run cut short keeps what it measured
                args.out.write_text(json.dumps(report, indent=2) + "\n")
    if not report["scenarios"]:
        raise SystemExit("no configuration selected")
    if args.out:
        logger.info("wrote %s", args.out)
    return report


def print_profile(result: dict[str, Any]) -> None:
    print(result["profile_table"])
    print(f"{result['scenario']}: one A&E evaluation vs plain")
    for name, value in result["milliseconds"].items():
        print(f"  {name:45s} {value:9.2f}")


def print_table(result: dict[str, Any]) -> None:
    print(f"{result['scenario']} ({result['image_side']}x{result['image_side']}, {result['steps']} steps, batch 1)")
    print(f"  {'row':17s} {'s/image':>9s} {'calls':>6s} {'grad':>5s} {'cut':>5s} {'bwd':>5s} {'evals':>5s} {'peak GiB':>9s} {'reserved':>9s}")
    for name, row in result["results"].items():
        print(
            f"  {name:17s} {row['seconds_per_image']:9.3f} {row['unet_calls']:6d} {row['unet_grad_calls']:5d} "
            f"{row['unet_calls_cut_short']:5d} {row['backward_passes']:5d} {row['ae_evaluations']:5d} "
            f"{row['peak_allocated_gib']:9.2f} {row['peak_reserved_gib']:9.2f}"
        )
    for name, value in {**result["ratios"], **result["memory"]}.items():
        print(f"  {name:40s} {value:7.3f}")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main()
