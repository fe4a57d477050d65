"""Cost of Attend-and-Excite: plain sampling vs lib_ae vs the diffusers reference, on the same random-weight UNet.

One process, one run, same weights / latent / prompt embedding / sampler for every row of a configuration:
  plain        k-diffusion Euler (50 steps, CFG 7.5, batched cond+uncond) over the CompVis ldm UNet (what A1111 runs),
               attention through torch SDPA (A1111's default "sdp" optimisation, a class-level forward swap)
  ae_norefine  the same plus lib_ae's update, refinement disabled (thresholds={})
  ae           the same plus lib_ae's update with the official defaults. Random weights never reach the refinement
               thresholds, so all three refinement steps run their 20 iterations: the WORST case of refinement
  bind         (with --binding) lib_ae's `bind` method: SynGen's loss and schedule (round(0.5 * steps) updates of step
               20, no refinement) on two modifier-noun groups
  excite_bind_norefine, excite_bind
               (with --binding) `excite+bind`: the ae_norefine / ae rows with SynGen's loss added to the same evaluation
               (no extra UNet call); ratios `ours_excite_bind*_over_ae*` over the matching excite row (target <= 1.02)
  conform_norefine, conform
               (with --conform) `conform`: CONFORM's contrastive loss on the same maps of the same evaluation, with the
               subjects' modifier groups of `bind`; ratios `ours_conform*_over_ae*` over the matching excite row
               (target <= 1.03). With refinement CONFORM runs every iteration, like A&E's worst case here
  initno, initno_selfcross
               (with --initno) InitNO / Self-Cross on InitNO at the official settings: the noise optimisation before the
               first step (its seconds per image and x plain in `noise_optimisation`), then the sampling updates;
               ratio `ours_initno_selfcross_over_initno`
  ref_plain    diffusers StableDiffusionPipeline (DDIM, same steps and CFG) on the same UNet converted to diffusers
  ref_ae       diffusers StableDiffusionAttendAndExcitePipeline (DDIM, its defaults) on that converted UNet
Each lib_ae row exists with CUDA-graph evaluation (`_graph`) and eager. The reference rows run for SD1.5 at batch 1
only; SDXL uses diffusers' SDXL UNet layout (the real config, random weights; the reference pipeline is SD1-only).

On CUDA the UNet has fp16 weights and runs under fp16 autocast (lib_ae's attention probabilities and loss in float32);
on CPU everything is float32. Configurations: SD1.5 512x512 at --batch 1 (all rows) and 4 (graph rows), SDXL
1024x1024 at batch 1 (graph rows); --all-rows adds the rest.

Timing: every row once as a warm-up (--warmup-steps, which captures the same graphs; it also measures each row's peak
memory over what was allocated before it, and counts the host synchronisations of each A&E step after the first: CUDA
sync-debug mode; on the CPU the value reads that would wait), then --trials interleaved rounds
(plain, A&E rows, plain, A&E rows, ...). Ratios: median over rounds of (row / plain of the same round). The JSON has
per configuration the rows (seconds per image, UNet calls, backward passes, evaluations, memory, syncs per step), the
ratios, the profile numbers (GPU busy ms of one plain CFG step and of one A&E evaluation, eager and graph) and, with
--determinism, whether the same inputs give bit-identical latents (eager, graph) and which operations warn under
torch.use_deterministic_algorithms(True, warn_only=True); at the top, the `ratios` block keyed
<scenario>_b<batch>_<norefine|worst>_<graph|eager> (+ reference_worst) and the memory rows.

    python tests/benchmark.py --determinism --deadline-s 330 --out /tmp/bench.json    # on a GPU, one device call
    python tests/benchmark.py --tiny --out /tmp/bench.json           # small CPU configuration (CI smoke test)
    python tests/benchmark.py --profile --only sd15                  # where one A&E evaluation spends its time
    python tests/benchmark.py --count-ops --binding --only sd15 --batch 1 --steps 4 --no-reference \
        --rows ae_norefine,bind,excite_bind_norefine                 # operations binding adds per evaluation (CPU too)
    python tests/benchmark.py --binding --only sd15 --batch 1 --no-reference --no-profile-numbers \
        --rows ae_norefine_graph,bind_graph,excite_bind_norefine_graph --out /tmp/bind.json   # binding beside excite
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
from torch.utils._python_dispatch import TorchDispatchMode

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
from lib_ae.binding import BindingGroup, BindingSelection  # noqa: E402
from lib_ae.config import BindingConfig  # noqa: E402
from lib_ae.objectives import (  # noqa: E402
    Bind, Conform, ConformSelfCross, Excite, ExciteBind, Initno, InitnoSelfCross, Objective,
)
from lib_ae.graphs import GraphableRunner  # noqa: E402
from lib_ae.pass_memory import PassMemory  # noqa: E402
from support.thirdparty import import_k_diffusion  # noqa: E402

logger = logging.getLogger("benchmark")

SUBJECT_COLUMNS = ((2,), (5,))  # "a cat and a dog": cat = 2, dog = 5
CFG_SCALE = 7.5
AE_ROWS = ("ae_norefine", "ae_norefine_graph", "ae", "ae_graph")
BINDING_ROWS = ("bind", "bind_graph", "excite_bind_norefine", "excite_bind_norefine_graph", "excite_bind",
                "excite_bind_graph")
"""Rows of the binding methods: with --binding (or named in --rows)."""
CONFORM_ROWS = ("conform_norefine", "conform_norefine_graph", "conform", "conform_graph")
"""Rows of CONFORM: with --conform (or named in --rows)."""
INITNO_ROWS = ("initno", "initno_selfcross", "conform_selfcross")
MEMORY_ROWS = ("ae_norefine_lowmem", "ae_norefine_lowmem_graph", "ae_lowmem", "ae_lowmem_graph")
"""The A&E rows with the pass's activations recomputed in its backward (`PassMemory("recompute")`): with --memory (or
named in --rows). Every other lib_ae row keeps them (`PassMemory("keep")`); both run the pass's own attention."""
"""Rows of InitNO and Self-Cross on InitNO (eager: their evaluations read the maps on the host): with --initno (or
named in --rows). Random weights never meet InitNO's targets, so every image makes all 5 rounds of 10 noise steps and
the 50-step run: the worst case, 100 evaluations before the first step. `conform_selfcross` (Self-Cross on CONFORM,
also eager) has no noise optimisation; its ratio over `conform` is `ours_conform_selfcross_over_conform`."""
BINDING = BindingSelection.official(7, [BindingGroup(2, (1,)), BindingGroup(5, (4,))])
"""Two modifier-noun groups whose nouns are the subjects of SUBJECT_COLUMNS (2 and 5), among 7 word pieces."""
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
    peak_bytes: int = 0  # peak allocated during one run, over what was allocated when it started (+ the resident)
    peak_reserved_bytes: int = 0
    resident_bytes: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def past(deadline: float | None) -> bool:
    return deadline is not None and time.monotonic() > deadline


def warm_up(fns: dict[str, Callable[[int], Any]], steps: int, device: torch.device, counts: Counts) -> dict[str, Run]:
    """Each row once, one after the other (kernel selection, allocator, lib_ae learning its last layer, CUDA-graph
    capture), measuring its memory: the peak allocated during its run over what was allocated when it started. A
    graph's private pool is allocated while it is captured, i.e. in this run, so it is counted; other rows' pools,
    alive at the same time, are not (they were allocated before)."""
    runs: dict[str, Run] = {}
    for name, fn in fns.items():
        run = Run()
        synchronize(device)
        if device.type == "cuda":
            run.resident_bytes = torch.cuda.memory_allocated()
            reserved = torch.cuda.memory_reserved()
            torch.cuda.reset_peak_memory_stats()
        fn(steps)
        synchronize(device)
        if device.type == "cuda":
            run.peak_bytes = torch.cuda.max_memory_allocated() - run.resident_bytes
            run.peak_reserved_bytes = torch.cuda.max_memory_reserved() - reserved
        runs[name] = run
    return runs


def interleave(
    fns: dict[str, Callable[[int], Any]], runs: dict[str, Run], steps: int, trials: int, device: torch.device,
    counts: Counts, deadline: float | None,
) -> None:
    """`trials` rounds of every row in turn (plain, A&E, plain, A&E, ...): a machine that speeds up or slows down
    during the run moves all rows alike, and each round gives one paired ratio per row. The counts are the last run's."""
    with counting_backward(counts):
        for trial in range(trials):
            if trial and past(deadline):
                logger.warning("deadline reached: %d of %d trials", trial, trials)
                break
            for name, fn in fns.items():
                synchronize(device)
                counts.reset()
                start = time.perf_counter()
                fn(steps)
                synchronize(device)
                runs[name].seconds.append(time.perf_counter() - start)
                runs[name].counts = Counts(**vars(counts))


def summarize(run: Run, batch: int = 1) -> dict[str, Any]:
    c = run.counts
    return {
        "seconds_per_image": statistics.median(run.seconds) / batch,
        "seconds_all": [round(v, 4) for v in run.seconds],
        "unet_calls": c.calls,
        "unet_grad_calls": c.grad_calls,
        "unet_calls_cut_short": c.calls - c.completed,
        "unet_rows": c.rows,
        "backward_passes": c.backward,
        "ae_evaluations": c.evaluations,
        "peak_allocated_gib": (run.peak_bytes + run.resident_bytes) / 2**30,
        "peak_over_resident_gib": run.peak_bytes / 2**30,
        "peak_reserved_growth_gib": run.peak_reserved_bytes / 2**30,
        "resident_gib": run.resident_bytes / 2**30,
        **run.extra,
    }


class _OperationCounter(TorchDispatchMode):
    """Counts the aten operations dispatched while active: on a GPU each is a kernel launch (eager) or a node of the
    replayed graph, so their number is the cost of small-tensor work that a noisy wall clock cannot resolve."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.count += 1
        return func(*args, **(kwargs or {}))


def operation_counts(fns: dict[str, Callable[[int], Any]], steps: int, counts: Counts) -> dict[str, Any]:
    """Each row run once more after its warm-up (the engine has learnt its last layer), counting operations: per row
    the total, its A&E evaluations, and the operations per evaluation beyond plain sampling."""
    found: dict[str, dict[str, Any]] = {}
    for name, fn in fns.items():
        before = counts.evaluations
        with _OperationCounter() as counter:
            fn(steps)
        found[name] = {"operations": counter.count, "evaluations": counts.evaluations - before}
    plain = found["plain"]["operations"]
    for row in found.values():
        row["per_evaluation_over_plain"] = (row["operations"] - plain) / row["evaluations"] if row["evaluations"] else None
    return found


def paired_ratio(runs: dict[str, Run], name: str, base: str) -> float:
    """Median over trials of (row / base) within the same trial."""
    return statistics.median(a / b for a, b in zip(runs[name].seconds, runs[base].seconds))


def make_inputs(s: Scenario, device: torch.device, batch: int = 1) -> tuple[torch.Tensor, Any, Any]:
    """One prompt for the whole batch (as an A1111 batch), a different starting noise per image."""
    g = torch.Generator().manual_seed(42)
    x_t = torch.randn(batch, 4, s.latent, s.latent, generator=g).to(device)
    cond_text = (TEXT_SCALE * torch.randn(1, TOKENS, s.context_dim, generator=g)).to(device)
    uncond_text = (TEXT_SCALE * torch.randn(1, TOKENS, s.context_dim, generator=g)).to(device)
    repeat_rows = lambda t: t.expand(batch, *t.shape[1:]).contiguous()  # noqa: E731
    if s.sdxl_kwargs is None:
        return x_t, repeat_rows(cond_text), repeat_rows(uncond_text)
    side = s.latent * 8.0
    time_ids = torch.tensor([[side, side, 0.0, 0.0, side, side]], device=device)
    pooled_cond = torch.randn(1, s.pooled_dim, generator=g).to(device)
    pooled_uncond = torch.randn(1, s.pooled_dim, generator=g).to(device)
    cond = {"crossattn": cond_text, "text_embeds": pooled_cond, "time_ids": time_ids}
    uncond = {"crossattn": uncond_text, "text_embeds": pooled_uncond, "time_ids": time_ids}
    return x_t, {k: repeat_rows(v) for k, v in cond.items()}, {k: repeat_rows(v) for k, v in uncond.items()}


@contextlib.contextmanager
def counting_syncs(device: torch.device) -> Iterator[list[int]]:
    """Host synchronisations inside the block: CUDA's sync-debug mode on a GPU (every call that waits for the GPU
    warns), `support.host_reads.HostReads` on the CPU (the calls that would wait)."""
    found = [0]
    if device.type == "cuda":
        import warnings

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                yield found
            finally:
                torch.cuda.set_sync_debug_mode("default")
        found[0] = sum("synchroniz" in str(w.message) for w in caught)
    else:
        from support.host_reads import HostReads

        with HostReads() as reads:
            yield found
        found[0] = reads.total


def sync_counts(excitation: InSamplerExcitation, device: torch.device, table: dict[int, int]) -> None:
    """Count the host synchronisations of each A&E step of this excitation into `table` (step -> count)."""
    hook = excitation.before_model_call

    def counted(call_index: int, *args: Any, **kwargs: Any) -> Any:
        with counting_syncs(device) as found:
            result = hook(call_index, *args, **kwargs)
        if result is not None:
            table[result.step] = found[0]
        return result

    excitation.before_model_call = counted  # type: ignore[method-assign]


def busy_ms(fn: Callable[[], None], device: torch.device, runs: int = 3) -> float:
    """Kernel time per call (the GPU's busy time; on the CPU the operators' own time)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    fn()
    synchronize(device)
    with profile(activities=activities) as prof:
        for _ in range(runs):
            fn()
        synchronize(device)
    if device.type == "cuda":
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        return sum(e.device_time_total for e in kernels) / runs / 1000
    return prof.key_averages().self_cpu_time_total / runs / 1000


ROW_CONFIGS: dict[str, tuple[dict[str, Any], bool]] = {
    "ae_norefine": ({"thresholds": {}}, False),
    "ae_norefine_graph": ({"thresholds": {}}, True),
    "ae": ({}, False),
    "ae_graph": ({}, True),
    "bind": ({}, False),
    "bind_graph": ({}, True),
    "excite_bind_norefine": ({"thresholds": {}}, False),
    "excite_bind_norefine_graph": ({"thresholds": {}}, True),
    "excite_bind": ({}, False),
    "excite_bind_graph": ({}, True),
    "conform_norefine": ({"thresholds": {}}, False),
    "conform_norefine_graph": ({"thresholds": {}}, True),
    "conform": ({}, False),
    "conform_graph": ({}, True),
    "initno": ({}, False),
    "initno_selfcross": ({}, False),
    "conform_selfcross": ({}, False),
    "ae_norefine_lowmem": ({"thresholds": {}}, False),
    "ae_norefine_lowmem_graph": ({"thresholds": {}}, True),
    "ae_lowmem": ({}, False),
    "ae_lowmem_graph": ({}, True),
}
ROW_METHODS: dict[str, type[Objective]] = {
    name: (
        (Bind if name.startswith("bind") else ExciteBind) if name in BINDING_ROWS
        else Conform if name in CONFORM_ROWS
        else Initno if name == "initno" else InitnoSelfCross if name == "initno_selfcross"
        else ConformSelfCross if name == "conform_selfcross" else Excite
    )
    for name in ROW_CONFIGS
}
"""Per row: the engine's objective (bind: SynGen alone; excite_bind: both)."""
ROW_KEYS = {"ae_norefine_graph": "norefine_graph", "ae_graph": "worst_graph", "ae_norefine": "norefine_eager", "ae": "worst_eager"}


def bench_scenario(
    s: Scenario, device: torch.device, steps: int, trials: int, rows: set[str], *, batch: int = 1,
    warmup_steps: int | None = None, reference_trials: int | None = None, determinism: bool = False,
    profile_numbers: bool = True, deadline: float | None = None, determinism_steps: int = 20,
    count_operations: bool = False,
) -> dict[str, Any]:
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    x_t, cond, uncond = make_inputs(s, device, batch)
    unet = build_unet(s, device, dtype)
    counts = Counts()
    handles = count_calls(unet, counts)
    model = LdmModel(unet, device)
    _, external = import_k_diffusion()
    # One denoiser for the whole configuration: a captured graph keeps reading its schedule buffers.
    denoiser = external.CompVisDenoiser(model)
    finals: dict[str, torch.Tensor] = {}
    capture = AttentionCapture(unet)
    engines: dict[str, AttendAndExcite] = {}
    reports: dict[str, list[Any]] = {}
    syncs: dict[str, dict[int, int]] = {}
    noise: dict[str, list[tuple[float, int]]] = {}
    first_finals: dict[str, torch.Tensor] = {}
    repeatable: dict[str, bool] = {}
    """Per InitNO row and run: (seconds of the noise optimisation, its evaluations), summed over the batch."""

    def plain(run_steps: int) -> torch.Tensor:
        with torch.no_grad():
            finals["plain"] = k_euler(denoiser, x_t, cond, uncond, run_steps, None)
        return finals["plain"]

    def make_engine(config: ExciteConfig, graphs: bool, kind: type[Objective] = Excite, recompute: bool = False
                    ) -> AttendAndExcite:
        objective = kind(config, BindingConfig()) if issubclass(kind, Bind) else kind(config)
        memory = PassMemory("recompute" if recompute else "keep")
        engine = AttendAndExcite(capture, objective, cuda_graphs=graphs, pass_memory=memory)
        evaluate = engine._evaluate

        def counted(*args: Any, **kwargs: Any) -> Any:
            counts.evaluations += 1
            return evaluate(*args, **kwargs)

        engine._evaluate = counted  # type: ignore[method-assign]
        return engine

    def ae_row(name: str, config: ExciteConfig, graphs: bool) -> Callable[[int], torch.Tensor]:
        # One engine per row, as a host keeps one per model: graphs are captured in the warm-up run and replayed after.
        kind = ROW_METHODS[name]
        engine = engines[name] = make_engine(config, graphs, kind, recompute=name in MEMORY_ROWS)

        def run(run_steps: int) -> torch.Tensor:
            excitation = InSamplerExcitation(engine, engine.plan(run_steps), "sigma", StepClock(1),
                                             timestep_of=denoiser.sigma_to_t)
            if name not in syncs:  # the warm-up run: count each A&E step's synchronisations (not timed)
                sync_counts(excitation, device, syncs.setdefault(name, {}))
            with torch.no_grad():
                out = k_euler(denoiser, x_t, cond, uncond, run_steps, excitation, graphable=graphs,
                              binds=kind is not Excite)
            reports[name] = excitation.reports
            finals[name] = out
            if excitation.noise_reports:
                done = [r for r in excitation.noise_reports if r is not None]
                noise.setdefault(name, []).append((sum(r.seconds for r in done), sum(r.evaluations for r in done)))
                if run_steps == steps:  # every timed run starts from the same inputs: the same bytes each time?
                    first = first_finals.setdefault(name, out.clone())
                    repeatable[name] = repeatable.get(name, True) and torch.equal(first, out)
            return out

        return run

    fns: dict[str, Callable[[int], Any]] = {"plain": plain}
    for name in ("ae_norefine_graph", "ae_graph", "ae_norefine", "ae", *BINDING_ROWS, *CONFORM_ROWS, *INITNO_ROWS,
                 *MEMORY_ROWS):
        if name in rows:
            overrides, graphs = ROW_CONFIGS[name]
            fns[name] = ae_row(name, ExciteConfig(**overrides), graphs)
    runs = warm_up(fns, warmup_steps or steps, device, counts)
    if count_operations:
        operations = operation_counts(fns, steps, counts)
        for engine in engines.values():
            engine.release_graphs()
        capture.remove()
        for handle in handles:
            handle.remove()
        return {"scenario": s.name, "image_side": s.latent * 8, "batch": batch, "steps": steps, "operations": operations}
    interleave(fns, runs, steps, trials, device, counts, deadline)

    results: dict[str, Any] = {}
    for name, run in runs.items():
        if name != "plain":
            plan = engines[name].plan(steps)
            refinement_steps = set(engines[name].plan(warmup_steps or steps).refinement_thresholds)
            # Step 0 of the warm-up also learns the last layer (a probe forward) and captures the graph: not counted.
            counted = {k: v for k, v in syncs.get(name, {}).items() if k > 0}
            plain_steps = [v for k, v in counted.items() if k not in refinement_steps]
            refine_steps = [v for k, v in counted.items() if k in refinement_steps]
            run.extra = {
                "cuda_graphs": ROW_CONFIGS[name][1] and device.type == "cuda",
                "graph_fallback_reason": engines[name].graph_fallback_reason,
                "alter_steps": plan.alter_steps,
                "refinement_steps": sorted(plan.refinement_thresholds),
                "refinement_iterations": {
                    r.step: r.refinement_iterations[0] for r in reports[name] if r.step in plan.refinement_thresholds
                },
                "host_syncs_per_step": statistics.mean(plain_steps) if plain_steps else None,
                "host_syncs_per_refinement_step": statistics.mean(refine_steps) if refine_steps else None,
            }
            if name in noise:
                timed = noise[name][1:] or noise[name]  # the first is the warm-up run's
                run.extra["noise_optimisation_seconds_per_image"] = statistics.median(t for t, _ in timed) / batch
                run.extra["noise_optimisation_evaluations_per_image"] = timed[-1][1] / batch
                run.extra["same_bytes_every_timed_run"] = repeatable.get(name)
            if name.endswith("_graph"):
                eager = name.removesuffix("_graph")
                if eager in finals:  # same arithmetic, so the same final latent, bit for bit
                    run.extra["final_latent_max_abs_diff_vs_eager"] = float((finals[name] - finals[eager]).abs().max())
        results[name] = summarize(run, batch)

    profile: dict[str, Any] = {}
    if profile_numbers:
        profile = profile_numbers_for(s, device, denoiser, capture, x_t, cond, uncond, batch, rows)
        profile["host_syncs_per_step"] = {name: results[name]["host_syncs_per_step"] for name in results if name != "plain"}
        profile["host_syncs_per_refinement_step"] = {
            name: results[name]["host_syncs_per_refinement_step"] for name in results if name != "plain"
        }
    checks: dict[str, Any] = {}
    if determinism:
        checks = determinism_checks(device, denoiser, capture, x_t, cond, uncond, make_engine, determinism_steps)
    for engine in engines.values():
        engine.release_graphs()
    capture.remove()
    for handle in handles:
        handle.remove()
    del model, denoiser, engines
    reference_runs: dict[str, Run] = {}
    if s.with_reference and batch == 1:
        assert s.ldm_kwargs is not None
        # Ours leaves the GPU before the converted copy arrives, so both implementations' peaks hold one UNet.
        unet_cpu = unet.to(device="cpu")
        del unet
        empty_cache(device)
        reference_runs = bench_reference(unet_cpu, s, x_t, cond, uncond, device, dtype, steps, counts,
                                         reference_trials or trials, warmup_steps, deadline)
        for name, run in reference_runs.items():
            results[name] = summarize(run)
    else:
        del unet
    empty_cache(device)

    base = results["plain"]
    ours = [name for name in results if name.startswith(("ae", "bind", "excite_bind", "conform", "initno"))]
    ratios = {f"ours_{name}_over_plain": results[name]["seconds_per_image"] / base["seconds_per_image"] for name in ours}
    paired = {f"ours_{name}_over_plain": paired_ratio(runs, name, "plain") for name in ours}
    memory = {f"ours_{name}_minus_plain_gib": results[name]["peak_over_resident_gib"] - base["peak_over_resident_gib"] for name in ours}
    memory.update({
        f"ours_{name}_minus_plain_reserved_gib": results[name]["peak_reserved_growth_gib"] - base["peak_reserved_growth_gib"]
        for name in ours
    })
    for name in ours:  # excite+bind at most 2% over excite alone at the same settings (issue 13), conform 3% (issue 20)
        prefix = "excite_bind" if name.startswith("excite_bind") else "conform" if name.startswith("conform") else None
        excite_row = "ae" + name.removeprefix(prefix) if prefix else ""
        if prefix and excite_row in results:
            key = f"ours_{name}_over_{excite_row}"
            ratios[key] = results[name]["seconds_per_image"] / results[excite_row]["seconds_per_image"]
            paired[key] = paired_ratio(runs, name, excite_row)
    for name in INITNO_ROWS:  # the noise optimisation alone, in seconds and as x plain sampling of the same image
        seconds = results.get(name, {}).get("noise_optimisation_seconds_per_image")
        if seconds is not None:
            ratios[f"ours_{name}_noise_optimisation_over_plain"] = seconds / base["seconds_per_image"]
    if "conform" in results and "conform_selfcross" in results:
        ratios["ours_conform_selfcross_over_conform"] = (
            results["conform_selfcross"]["seconds_per_image"] / results["conform"]["seconds_per_image"]
        )
        paired["ours_conform_selfcross_over_conform"] = paired_ratio(runs, "conform_selfcross", "conform")
    if "initno" in results and "initno_selfcross" in results:
        ratios["ours_initno_selfcross_over_initno"] = (
            results["initno_selfcross"]["seconds_per_image"] / results["initno"]["seconds_per_image"]
        )
        paired["ours_initno_selfcross_over_initno"] = paired_ratio(runs, "initno_selfcross", "initno")
    if reference_runs:
        ratios["reference_ae_over_plain"] = results["ref_ae"]["seconds_per_image"] / results["ref_plain"]["seconds_per_image"]
        paired["reference_ae_over_plain"] = paired_ratio(reference_runs, "ref_ae", "ref_plain")
        for name in ("ae", "ae_graph"):
            if name in results:
                ratios[f"ours_{name}_ratio_over_reference_ratio"] = ratios[f"ours_{name}_over_plain"] / ratios["reference_ae_over_plain"]
        memory["reference_ae_minus_plain_gib"] = (
            results["ref_ae"]["peak_over_resident_gib"] - results["ref_plain"]["peak_over_resident_gib"]
        )
        memory["reference_ae_minus_plain_reserved_gib"] = (
            results["ref_ae"]["peak_reserved_growth_gib"] - results["ref_plain"]["peak_reserved_growth_gib"]
        )
    return {
        "scenario": s.name,
        "image_side": s.latent * 8,
        "batch": batch,
        "steps": steps,
        "trials": len(runs["plain"].seconds),
        "results": results,
        "ratios": ratios,
        "paired_ratios": paired,
        "memory": memory,
        "profile": profile,
        "determinism": checks,
    }


def profile_numbers_for(
    s: Scenario, device: torch.device, denoiser: nn.Module, capture: AttentionCapture, x_t: torch.Tensor, cond: Any,
    uncond: Any, batch: int, rows: set[str],
) -> dict[str, Any]:
    """GPU busy time of one plain CFG step and of one A&E evaluation (a step without refinement: one cond-only
    forward to the last needed layer, the loss, the input-only backward, the update), eager and from a graph."""
    sigma = denoiser.get_sigmas(50)[5:6].expand(batch).contiguous()
    x = x_t * denoiser.get_sigmas(50)[0]
    selections = [TokenSelection.official(TOKENS, SUBJECT_COLUMNS)] * batch

    def cfg_step() -> None:
        with torch.no_grad():
            denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), cond=concat(uncond, cond))

    def run_unet(latent_rows: torch.Tensor, index: torch.Tensor) -> None:
        denoiser(latent_rows, sigma.index_select(0, index), cond=select_rows(cond, index))

    def ae_step(graphs: bool, kind: type[Objective] = Excite) -> Callable[[], None]:
        engine = AttendAndExcite(capture, kind(ExciteConfig(thresholds={})), cuda_graphs=graphs)
        plan = engine.plan(50)
        runner = graphable_runner(denoiser, sigma, cond) if graphs else run_unet
        bindings = [BINDING if kind is not Excite else None] * batch

        def fn() -> None:
            with torch.no_grad():
                engine.step(x, 1, plan, selections, runner, bindings=bindings)

        fn.engine = engine  # type: ignore[attr-defined]
        return fn

    numbers: dict[str, Any] = {"plain_cfg_step_busy_ms": busy_ms(cfg_step, device)}
    kinds: list[tuple[str, type[Objective]]] = [("ae", Excite)]
    if any(r.startswith("conform") for r in rows):  # CONFORM beside A&E: the same evaluation plus its loss
        kinds.append(("conform", Conform))
    for prefix, kind in kinds:
        eager = ae_step(False, kind)
        numbers[f"{prefix}_evaluation_busy_ms"] = busy_ms(eager, device)
        if any(r.endswith("_graph") for r in rows):
            graph = ae_step(True, kind)
            numbers[f"{prefix}_evaluation_graph_busy_ms"] = busy_ms(graph, device)
            graph.engine.release_graphs()  # type: ignore[attr-defined]
    return numbers


def determinism_checks(
    device: torch.device, denoiser: nn.Module, capture: AttentionCapture, x_t: torch.Tensor, cond: Any, uncond: Any,
    make_engine: Callable[[ExciteConfig, bool], AttendAndExcite], steps: int = 20,
) -> dict[str, Any]:
    """Same inputs twice -> bit-identical final latents? (eager, graph, and graph vs eager), with refinement on; then
    once more under torch.use_deterministic_algorithms(True, warn_only=True), logging which operations warn (they have
    no deterministic kernel: atomics that may reorder sums from run to run)."""
    import warnings

    def run(graphs: bool) -> torch.Tensor:
        engine = make_engine(ExciteConfig(), graphs)
        excitation = InSamplerExcitation(engine, engine.plan(steps), "sigma", StepClock(1))
        try:
            with torch.no_grad():
                out = k_euler(denoiser, x_t, cond, uncond, steps, excitation, graphable=graphs)
        finally:
            engine.release_graphs()
        synchronize(device)
        return out.cpu()

    def diff(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a.double() - b.double()).abs().max())

    eager = [run(False), run(False)]
    graph = [run(True), run(True)]
    result: dict[str, Any] = {
        "steps": steps,
        "eager_repeatable": torch.equal(eager[0], eager[1]),
        "eager_max_abs_diff": diff(eager[0], eager[1]),
        "graph_repeatable": torch.equal(graph[0], graph[1]),
        "graph_max_abs_diff": diff(graph[0], graph[1]),
        "graph_equals_eager": torch.equal(graph[0], eager[0]),
        "graph_vs_eager_max_abs_diff": diff(graph[0], eager[0]),
    }
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.use_deterministic_algorithms(True, warn_only=True)
        try:
            deterministic_eager = run(False)
            deterministic_graph = run(True)
        except Exception as error:  # noqa: BLE001 - reported, not fatal: the timing rows are already measured
            result["deterministic_mode_error"] = repr(error)
            deterministic_eager = deterministic_graph = None
        finally:
            torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
    messages = sorted({str(w.message).split("\n")[0][:300] for w in caught if "determinis" in str(w.message)})
    result["deterministic_mode_warnings"] = messages
    for message in messages:
        logger.info("deterministic mode: %s", message)
    if deterministic_eager is not None and deterministic_graph is not None:
        result["deterministic_mode_eager_equals_default"] = torch.equal(deterministic_eager, eager[0])
        result["deterministic_mode_graph_equals_default"] = torch.equal(deterministic_graph, graph[0])
    return result


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
    trials: int,
    warmup_steps: int | None = None,
    deadline: float | None = None,
) -> dict[str, Run]:
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
    attn = math.ceil(s.latent / 4)

    def call_args(run_steps: int) -> dict[str, Any]:
        return dict(
            prompt_embeds=cond_text.to(dtype), negative_prompt_embeds=uncond_text.to(dtype), latents=x_t.to(dtype),
            num_inference_steps=run_steps, guidance_scale=CFG_SCALE, height=s.latent * 8, width=s.latent * 8,
            output_type="latent",
        )

    def plan_args(run_steps: int) -> dict[str, Any]:
        return {} if run_steps == 50 else reference_plan(run_steps)

    def ref_plain(run_steps: int) -> Any:
        ref_unet.set_attn_processor(AttnProcessor2_0())  # diffusers' default (SDPA); the A&E pipeline restores it too
        return plain_pipe(**call_args(run_steps))

    def ref_ae(run_steps: int) -> Any:
        return ae_pipe(prompt=None, token_indices=[c[0] for c in SUBJECT_COLUMNS], attn_res=(attn, attn),
                       **plan_args(run_steps), **call_args(run_steps))

    # The A&E pipeline logs one line per step at INFO; keep the benchmark's output readable.
    pipe_logger = logging.getLogger(StableDiffusionAttendAndExcitePipeline.__module__)
    level = pipe_logger.level
    pipe_logger.setLevel(logging.WARNING)
    fns: dict[str, Callable[[int], Any]] = {"ref_plain": ref_plain, "ref_ae": ref_ae}
    try:
        runs = warm_up(fns, warmup_steps or steps, device, counts)
        interleave(fns, runs, steps, trials, device, counts, deadline)
    finally:
        pipe_logger.setLevel(level)
        for handle in handles:
            handle.remove()
    runs["ref_ae"].extra = {
        "reference_arguments": {"token_indices": [c[0] for c in SUBJECT_COLUMNS], "attn_res": [attn, attn], **plan_args(steps)}
    }
    del ref_unet, ae_pipe, plain_pipe
    return runs


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
            Scenario("sdxl-1024", None, SDXL, 128, 2048, pooled_dim=1280, skip_by_default=("ae_norefine", "ae")),
        ]
    if args.only:
        found = [sc for sc in found if sc.family == args.only]
    return found


def rows_for(scenario: Scenario, batch: int, args: argparse.Namespace) -> set[str]:
    """The A&E rows of one configuration. By default: everything at batch 1 except the scenario's skipped rows (SDXL's
    eager rows), only the graph rows at batch > 1 and for SDXL only batch 1, to fit one device call."""
    rows = set(AE_ROWS) | (set(BINDING_ROWS) if args.binding or args.rows else set())
    rows |= set(CONFORM_ROWS) if args.conform or args.rows else set()
    rows |= set(INITNO_ROWS) if args.initno or args.rows else set()
    rows |= set(MEMORY_ROWS) if args.memory or args.rows else set()
    if not args.all_rows:
        rows -= set(scenario.skip_by_default)
        if batch > 1:
            rows = {r for r in rows if r.endswith("_graph")}
    if args.no_graphs:
        rows = {r for r in rows if not r.endswith("_graph")}
    if args.rows:
        rows &= set(args.rows)
    return rows


def configurations(args: argparse.Namespace) -> list[tuple[Scenario, int]]:
    found = []
    for scenario in scenarios_for(args):
        if args.no_reference:
            scenario = Scenario(**{**vars(scenario), "with_reference": False})
        for batch in args.batch:
            if batch > 1 and scenario.family == "sdxl" and not args.all_rows:
                continue
            found.append((scenario, batch))
    return found


def headline_ratios(scenarios: list[dict[str, Any]]) -> tuple[dict[str, float], dict[str, float]]:
    """The issue's `ratios` block (median over interleaved trials of A&E / plain) and the memory rows, keyed
    `<scenario>_b<batch>_<row>` (e.g. sd15_512_b1_worst_graph), plus `reference_worst`."""
    ratios: dict[str, float] = {}
    memory: dict[str, float] = {}
    for result in scenarios:
        if "paired_ratios" not in result:
            continue
        prefix = f"{result['scenario'].replace('-', '_')}_b{result['batch']}"
        for row, key in ROW_KEYS.items():
            value = result["paired_ratios"].get(f"ours_{row}_over_plain")
            if value is not None:
                ratios[f"{prefix}_{key}"] = value
                memory[f"{prefix}_{key}_minus_plain_gib"] = result["memory"][f"ours_{row}_minus_plain_gib"]
        if "reference_ae_over_plain" in result["paired_ratios"] and result["batch"] == 1:
            ratios["reference_worst"] = result["paired_ratios"]["reference_ae_over_plain"]
            memory["reference_worst_minus_plain_gib"] = result["memory"]["reference_ae_minus_plain_gib"]
        for name, row in result["results"].items():
            memory[f"{prefix}_{name}_peak_allocated_gib"] = row["peak_allocated_gib"]
    return ratios, memory


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="small CPU configuration (CI smoke run)")
    parser.add_argument("--trials", "--repeats", dest="trials", type=int, default=None,
                        help="interleaved timed rounds of every row after the warm-up (5; tiny: 1)")
    parser.add_argument("--reference-trials", type=int, default=None, help="rounds of the diffusers rows (--trials)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup-steps", type=int, default=None,
                        help="sampler steps of the warm-up run (10; tiny: --steps): it captures the same graphs")
    parser.add_argument("--batch", type=int, nargs="+", default=None, help="batch sizes (1 4; tiny: 1)")
    parser.add_argument("--only", choices=("sd15", "sdxl"), default=None)
    parser.add_argument("--rows", type=lambda v: [r for r in v.split(",") if r], default=None,
                        help="comma-separated A&E rows to keep, of "
                        f"{','.join(AE_ROWS + BINDING_ROWS + CONFORM_ROWS + INITNO_ROWS + MEMORY_ROWS)} "
                        "(plain always runs)")
    parser.add_argument("--conform", action="store_true", help=f"add the CONFORM rows ({', '.join(CONFORM_ROWS)})")
    parser.add_argument("--initno", action="store_true", help=f"add the InitNO rows ({', '.join(INITNO_ROWS)})")
    parser.add_argument("--memory", action="store_true",
                        help=f"add the rows with recomputed activations ({', '.join(MEMORY_ROWS)})")
    parser.add_argument("--binding", action="store_true",
                        help=f"add the binding rows ({', '.join(BINDING_ROWS)}) beside the excite rows")
    parser.add_argument("--no-reference", action="store_true", help="skip the diffusers rows")
    parser.add_argument("--all-rows", action="store_true", help="also the rows a configuration skips by default")
    parser.add_argument("--no-graphs", action="store_true", help="skip the rows with lib_ae's CUDA-graph evaluation")
    parser.add_argument("--no-profile-numbers", action="store_true", help="skip the GPU busy times per step/evaluation")
    parser.add_argument("--determinism", action="store_true",
                        help="also check bit-identical repeats (eager, graph) and log deterministic-mode warnings")
    parser.add_argument("--determinism-steps", type=int, default=20, help="sampler steps of each determinism run")
    parser.add_argument("--deadline-s", type=float, default=None,
                        help="stop starting new trials / configurations after this many seconds (keeps what is done)")
    parser.add_argument("--profile", action="store_true", help="time one A&E evaluation and its ablations instead")
    parser.add_argument("--count-ops", action="store_true",
                        help="count the operations each row dispatches per A&E evaluation instead of timing (any device)")
    parser.add_argument("--out", type=Path, default=None, help="where to write the JSON (after each configuration)")
    args = parser.parse_args(argv)
    started = time.monotonic()
    deadline = started + args.deadline_s if args.deadline_s else None
    trials = args.trials if args.trials is not None else (1 if args.tiny else 5)
    if args.batch is None:
        args.batch = [1] if args.tiny else [1, 4]
    warmup_steps = args.warmup_steps if args.warmup_steps is not None else (args.steps if args.tiny else min(10, args.steps))
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    argv_used = sys.argv[1:] if argv is None else list(argv)
    report: dict[str, Any] = {
        "command": "python tests/benchmark.py " + shlex.join(argv_used),
        "device": device_name(device),
        "precision": "fp16 weights + fp16 autocast (lib_ae loss in float32)" if device.type == "cuda" else "float32",
        "sampler": f"ours: k-diffusion Euler; reference: DDIM; {args.steps} steps, CFG {CFG_SCALE}",
        "repeats": trials,
        "trials": "interleaved rounds (plain, A&E rows, plain, ...) after a warm-up; ratios = median of per-round ratios",
        "versions": versions(),
        "scenarios": [],
        "ratios": {},
        "memory": {},
        "skipped": [],
    }
    with host_patches():
        if args.profile:
            for scenario in scenarios_for(args):
                logger.info("profiling %s ...", scenario.name)
                result = profile_scenario(scenario, device, iters=max(trials, 5))
                print_profile(result)
                report["scenarios"].append(result)
        else:
            for scenario, batch in configurations(args):
                name = f"{scenario.name} batch {batch}"
                if past(deadline):
                    logger.warning("deadline reached: %s skipped", name)
                    report["skipped"].append(name)
                    continue
                logger.info("running %s ...", name)
                result = bench_scenario(
                    scenario, device, args.steps, trials, rows_for(scenario, batch, args), batch=batch,
                    warmup_steps=warmup_steps, reference_trials=args.reference_trials,
                    determinism=args.determinism and batch == 1 and scenario.family == "sd15",
                    profile_numbers=not args.no_profile_numbers, deadline=deadline,
                    determinism_steps=args.determinism_steps, count_operations=args.count_ops,
                )
                if args.count_ops:
                    print_operations(result)
                    report["scenarios"].append(result)
                    continue
                print_table(result)
                report["scenarios"].append(result)
                report["ratios"], report["memory"] = headline_ratios(report["scenarios"])
                report["wall_seconds"] = round(time.monotonic() - started, 1)
                if args.out:  # written after each configuration, so a run cut short keeps what it measured
                    args.out.write_text(json.dumps(report, indent=2) + "\n")
    report["wall_seconds"] = round(time.monotonic() - started, 1)
    if not report["scenarios"]:
        raise SystemExit("no configuration selected")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        logger.info("wrote %s", args.out)
    for key, value in report["ratios"].items():
        print(f"  {key:36s} {value:7.3f}")
    return report


def print_operations(result: dict[str, Any]) -> None:
    operations = result["operations"]
    print(f"{result['scenario']} ({result['image_side']}x{result['image_side']}, {result['steps']} steps, batch {result['batch']})")
    excite = operations.get("ae_norefine", operations.get("ae_norefine_graph", {})).get("per_evaluation_over_plain")
    for name, row in operations.items():
        per = row["per_evaluation_over_plain"]
        extra = f"   {per - excite:+.0f} vs excite ({(per - excite) / excite:+.1%})" if per is not None and excite else ""
        shown = f"{per:8.0f}" if per is not None else "       -"
        print(f"  {name:28s} {row['operations']:9d} ops  {row['evaluations']:3d} evaluations  {shown} per evaluation{extra}")


def print_profile(result: dict[str, Any]) -> None:
    print(result["profile_table"])
    print(f"{result['scenario']}: one A&E evaluation vs plain")
    for name, value in result["milliseconds"].items():
        print(f"  {name:45s} {value:9.2f}")


def print_table(result: dict[str, Any]) -> None:
    print(f"{result['scenario']} ({result['image_side']}x{result['image_side']}, {result['steps']} steps, batch {result['batch']}, {result['trials']} trials)")
    print(f"  {'row':17s} {'s/image':>9s} {'calls':>6s} {'grad':>5s} {'cut':>5s} {'bwd':>5s} {'evals':>5s} {'peak GiB':>9s} {'+reserv.':>9s}")
    for name, row in result["results"].items():
        print(
            f"  {name:17s} {row['seconds_per_image']:9.3f} {row['unet_calls']:6d} {row['unet_grad_calls']:5d} "
            f"{row['unet_calls_cut_short']:5d} {row['backward_passes']:5d} {row['ae_evaluations']:5d} "
            f"{row['peak_allocated_gib']:9.2f} {row['peak_reserved_growth_gib']:9.2f}"
        )
    for name, value in {**result["ratios"], **result["memory"]}.items():
        print(f"  {name:40s} {value:7.3f}")
    for name, value in result["paired_ratios"].items():
        print(f"  paired {name:33s} {value:7.3f}")
    for name, value in result["profile"].items():
        print(f"  {name:40s} {value}")
    for name, value in result["determinism"].items():
        print(f"  {name:40s} {value}")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    main()
