"""Cost of Attend-and-Excite: plain sampling vs lib_ae vs the diffusers reference, on the same random-weight UNet.

One process, one run, same weights / latent / prompt embedding for every row:
  plain        k-diffusion Euler through a CFG denoiser over the CompVis ldm UNet (what A1111 runs)
  ae_norefine  the same plus lib_ae's update, refinement disabled
  ae           the same plus lib_ae's update with the default refinement (random weights never reach the
               thresholds, so every refinement step runs its 20 iterations: the worst case)
  ref_plain    diffusers StableDiffusionPipeline (DDIM) on the same UNet converted to diffusers
  ref_ae       diffusers StableDiffusionAttendAndExcitePipeline (DDIM, its defaults) on that UNet
and an SDXL-size configuration (diffusers' SDXL UNet layout, maps at 32x32 for 1024x1024): plain vs lib_ae.

Prints a table and writes JSON (seconds per image = median of --repeats after a warm-up, synchronized; UNet forward
calls (partial A&E forwards included) and backward passes; peak allocated GPU memory; ratios A&E/plain for both
implementations), with device name and library versions. On CPU, `--tiny` runs a small configuration for CI's smoke test.

    python tests/benchmark.py --out tests/benchmark-h100.json          # on a GPU: SD1.5 512x512 and SDXL 1024x1024
    python tests/benchmark.py --tiny --out /tmp/bench.json             # CPU smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lib_ae import AttendAndExcite, AttentionCapture, ExciteConfig, InSamplerExcitation, StepClock, TokenSelection  # noqa: E402
from tests.support.thirdparty import import_k_diffusion  # noqa: E402

logger = logging.getLogger("benchmark")

SUBJECT_COLUMNS = ((2,), (5,))  # "a cat and a dog": cat = 2, dog = 5


@dataclass(frozen=True)
class Scenario:
    name: str
    ldm_kwargs: dict[str, Any] | None  # CompVis ldm UNetModel arguments (SD1.x family)
    diffusers_sdxl: dict[str, Any] | None  # diffusers UNet2DConditionModel config (SDXL family)
    latent: int  # latent side (image side / 8)
    context_dim: int
    steps: int
    with_reference: bool


SD15 = dict(
    image_size=32, in_channels=4, out_channels=4, model_channels=320, attention_resolutions=[4, 2, 1], num_res_blocks=2,
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
)  # stabilityai/stable-diffusion-xl-base-1.0 unet/config.json

TINY = dict(
    image_size=8, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[4, 2, 1], num_res_blocks=1,
    channel_mult=[1, 2, 2, 2], num_heads=2, use_spatial_transformer=True, transformer_depth=1, context_dim=32,
    use_checkpoint=False, legacy=False,
)


# --------------------------------------------------------------------------------------------------- accounting


@dataclass
class Counts:
    forwards: int = 0
    grad_forwards: int = 0

    def reset(self) -> None:
        self.forwards = self.grad_forwards = 0


def count_forwards(unet: nn.Module, counts: Counts) -> None:
    def pre_hook(_module: nn.Module, _args: Any) -> None:
        counts.forwards += 1
        counts.grad_forwards += int(torch.is_grad_enabled())

    unet.register_forward_pre_hook(pre_hook)


def sdpa_forward(self: nn.Module, x: torch.Tensor, context: torch.Tensor | None = None, mask: Any = None, **_: Any) -> torch.Tensor:
    """ldm CrossAttention through torch SDPA: A1111's default attention optimisation ("sdp") does the same math."""
    heads = self.heads
    context = x if context is None else context
    q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
    b = q.shape[0]
    q, k, v = (t.reshape(b, -1, heads, t.shape[-1] // heads).transpose(1, 2) for t in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    return self.to_out(out.transpose(1, 2).reshape(b, -1, heads * out.shape[-1]))


# --------------------------------------------------------------------------------------------------- models


def build_ldm(kwargs: dict[str, Any], device: torch.device, dtype: torch.dtype) -> nn.Module:
    from ldm.modules import attention as ldm_attention
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    ldm_attention.CrossAttention.forward = sdpa_forward  # class-level swap, as A1111's sd_hijack does
    torch.manual_seed(0)
    unet = UNetModel(**kwargs)
    randomize(unet)
    return unet.to(device=device, dtype=dtype).eval()


def randomize(unet: nn.Module) -> None:
    """ldm zero-initialises its output convolutions; give every parameter small random values so maps are non-trivial."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in unet.parameters():
            fan_in = p[0].numel() if p.dim() > 1 else p.numel()
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(max(fan_in, 1)))


def alphas_cumprod(device: torch.device) -> torch.Tensor:
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).to(device=device, dtype=torch.float32)


class LdmModel(nn.Module):
    """What k-diffusion's CompVisDenoiser wraps in A1111: `apply_model(x, t, cond)` + `alphas_cumprod`."""

    def __init__(self, unet: nn.Module, device: torch.device) -> None:
        super().__init__()
        self.diffusion_model = unet
        self.register_buffer("alphas_cumprod", alphas_cumprod(device))

    def apply_model(self, x: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        dtype = next(self.diffusion_model.parameters()).dtype
        with torch.autocast(x.device.type, dtype=torch.float16, enabled=x.device.type == "cuda"):
            if isinstance(cond, dict):  # SDXL (diffusers layout)
                out = self.diffusion_model(
                    x.to(dtype), t, encoder_hidden_states=cond["crossattn"].to(dtype),
                    added_cond_kwargs={"text_embeds": cond["text_embeds"].to(dtype), "time_ids": cond["time_ids"].to(dtype)},
                ).sample
            else:
                self.diffusion_model.dtype = dtype  # ldm casts its input to .dtype
                out = self.diffusion_model(x.to(dtype), t, context=cond.to(dtype))
        return out.float()


# --------------------------------------------------------------------------------------------------- samplers


@dataclass
class Run:
    seconds: list[float] = field(default_factory=list)
    forwards: int = 0
    grad_forwards: int = 0
    peak_bytes: int = 0


def select_rows(cond: Any, rows: torch.Tensor) -> Any:
    if isinstance(cond, dict):
        return {k: v.index_select(0, rows) for k, v in cond.items()}
    return cond.index_select(0, rows)


def concat(a: Any, b: Any) -> Any:
    if isinstance(a, dict):
        return {k: torch.cat([a[k], b[k]]) for k in a}
    return torch.cat([a, b])


def k_euler(
    model: LdmModel,
    x_t: torch.Tensor,
    cond: Any,
    uncond: Any,
    steps: int,
    cfg: float,
    excitation: InSamplerExcitation | None,
) -> torch.Tensor:
    sampling, external = import_k_diffusion()
    denoiser = external.CompVisDenoiser(model)
    sigmas = denoiser.get_sigmas(steps)
    calls = 0
    selections = [TokenSelection.official(77, SUBJECT_COLUMNS)] * x_t.shape[0]

    def cfg_denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        if excitation is not None:
            def run_unet(latent_rows: torch.Tensor, rows: torch.Tensor) -> None:
                denoiser(latent_rows, sigma.index_select(0, rows), cond=select_rows(cond, rows))

            excitation.before_model_call(calls, x, sigma, selections, run_unet)
        calls += 1
        x_in, sigma_in = torch.cat([x, x]), torch.cat([sigma, sigma])
        uncond_out, cond_out = denoiser(x_in, sigma_in, cond=concat(uncond, cond)).chunk(2)
        return uncond_out + (cond_out - uncond_out) * cfg

    return sampling.sample_euler(cfg_denoiser, x_t * sigmas[0], sigmas, disable=True)


# --------------------------------------------------------------------------------------------------- measurement


@contextlib.contextmanager
def measured(run: Run, counts: Counts, device: torch.device) -> Iterator[None]:
    counts.reset()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    yield
    if device.type == "cuda":
        torch.cuda.synchronize()
        run.peak_bytes = max(run.peak_bytes, torch.cuda.max_memory_allocated())
    run.seconds.append(time.perf_counter() - start)
    run.forwards, run.grad_forwards = counts.forwards, counts.grad_forwards


def repeat(fn: Callable[[], Any], counts: Counts, device: torch.device, repeats: int) -> Run:
    fn()  # warm-up (cuDNN autotune, allocator)
    run = Run()
    for _ in range(repeats):
        with measured(run, counts, device):
            fn()
    return run


def summarize(run: Run) -> dict[str, Any]:
    return {
        "seconds_per_image": statistics.median(run.seconds),
        "seconds_all": run.seconds,
        "unet_forward_calls": run.forwards,
        "unet_grad_forward_calls": run.grad_forwards,
        "peak_allocated_gib": run.peak_bytes / 2**30,
    }


def bench_scenario(s: Scenario, device: torch.device, repeats: int) -> dict[str, Any]:
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    g = torch.Generator().manual_seed(42)
    x_t = torch.randn(1, 4, s.latent, s.latent, generator=g).to(device)
    cond_text = torch.randn(1, 77, s.context_dim, generator=g).to(device)
    uncond_text = torch.randn(1, 77, s.context_dim, generator=g).to(device)
    if s.ldm_kwargs is not None:
        unet = build_ldm(s.ldm_kwargs, device, dtype)
        cond, uncond = cond_text, uncond_text
    else:
        from diffusers import UNet2DConditionModel

        torch.manual_seed(0)
        unet = UNet2DConditionModel(**s.diffusers_sdxl).to(device=device, dtype=dtype).eval()
        unet.set_default_attn_processor() if device.type != "cuda" else None
        side = s.latent * 8.0
        time_ids = torch.tensor([[side, side, 0, 0, side, side]], device=device)
        cond = {"crossattn": cond_text, "text_embeds": torch.randn(1, 1280, generator=g).to(device), "time_ids": time_ids}
        uncond = {"crossattn": uncond_text, "text_embeds": torch.randn(1, 1280, generator=g).to(device), "time_ids": time_ids}
    counts = Counts()
    count_forwards(unet, counts)
    model = LdmModel(unet, device)
    results: dict[str, Any] = {}

    def plain() -> torch.Tensor:
        with torch.no_grad():
            return k_euler(model, x_t, cond, uncond, s.steps, 7.5, None)

    capture = AttentionCapture(unet)

    def with_ae(config: ExciteConfig) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            engine = AttendAndExcite(capture, config)
            excitation = InSamplerExcitation(engine, engine.plan(s.steps), "sigma", StepClock(1))
            with torch.no_grad():
                return k_euler(model, x_t, cond, uncond, s.steps, 7.5, excitation)

        return run

    results["plain"] = summarize(repeat(plain, counts, device, repeats))
    results["ae_norefine"] = summarize(repeat(with_ae(ExciteConfig(thresholds={})), counts, device, repeats))
    results["ae"] = summarize(repeat(with_ae(ExciteConfig()), counts, device, repeats))
    capture.remove()
    if s.with_reference:
        results.update(bench_reference(unet, s, x_t, cond_text, uncond_text, device, dtype, counts, repeats))
    base = results["plain"]["seconds_per_image"]
    ratios = {
        "ours_ae_norefine_over_plain": results["ae_norefine"]["seconds_per_image"] / base,
        "ours_ae_over_plain": results["ae"]["seconds_per_image"] / base,
    }
    if s.with_reference:
        ratios["reference_ae_over_plain"] = results["ref_ae"]["seconds_per_image"] / results["ref_plain"]["seconds_per_image"]
        ratios["ours_ratio_over_reference_ratio"] = ratios["ours_ae_over_plain"] / ratios["reference_ae_over_plain"]
    memory = {"ae_minus_plain_gib": results["ae"]["peak_allocated_gib"] - results["plain"]["peak_allocated_gib"]}
    del unet, model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"scenario": s.name, "steps": s.steps, "image_side": s.latent * 8, "results": results, "ratios": ratios, "memory": memory}


def bench_reference(
    unet: nn.Module,
    s: Scenario,
    x_t: torch.Tensor,
    cond_text: torch.Tensor,
    uncond_text: torch.Tensor,
    device: torch.device,
    dtype: torch.dtype,
    counts: Counts,
    repeats: int,
) -> dict[str, Any]:
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from diffusers.pipelines.deprecated.stable_diffusion_attend_and_excite.pipeline_stable_diffusion_attend_and_excite import (
        StableDiffusionAttendAndExcitePipeline,
    )

    from tests.support.models import ldm_to_diffusers_unet

    ref_unet = ldm_to_diffusers_unet(unet.float(), s.ldm_kwargs).to(device=device, dtype=dtype).eval()
    unet.to(dtype)
    count_forwards(ref_unet, counts)

    def scheduler() -> DDIMScheduler:
        return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                             set_alpha_to_one=False, steps_offset=1)

    common = dict(vae=None, text_encoder=None, tokenizer=None, unet=ref_unet, safety_checker=None,
                  feature_extractor=None, requires_safety_checker=False)
    ae_pipe = StableDiffusionAttendAndExcitePipeline(scheduler=scheduler(), **common)
    plain_pipe = StableDiffusionPipeline(scheduler=scheduler(), **common)
    for pipe in (ae_pipe, plain_pipe):
        pipe.set_progress_bar_config(disable=True)
    args = dict(prompt_embeds=cond_text.to(dtype), negative_prompt_embeds=uncond_text.to(dtype), latents=x_t.to(dtype),
                num_inference_steps=s.steps, guidance_scale=7.5, height=s.latent * 8, width=s.latent * 8, output_type="latent")
    attn = math.ceil(s.latent / 4)
    out = {
        "ref_plain": summarize(repeat(lambda: plain_pipe(**args), counts, device, repeats)),
        "ref_ae": summarize(repeat(lambda: ae_pipe(token_indices=[c[0] for c in SUBJECT_COLUMNS], attn_res=(attn, attn), **args),
                                   counts, device, repeats)),
    }
    return out


def versions() -> dict[str, str]:
    found = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("diffusers", "k_diffusion", "ldm", "transformers"):
        with contextlib.suppress(Exception):
            from importlib import metadata

            dist = {"k_diffusion": "k-diffusion", "ldm": "stable-diffusion-sdkit"}.get(name, name)
            found[name] = metadata.version(dist)
    return found


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="small CPU configuration (CI smoke run)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--only", choices=("sd15", "sdxl"), default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    if args.tiny:
        scenarios = [Scenario("tiny-ldm", TINY, None, 16, 32, args.steps, True)]
    else:
        scenarios = [
            Scenario("sd15-512", SD15, None, 64, 768, args.steps, True),
            Scenario("sdxl-1024", None, SDXL, 128, 2048, args.steps, False),
        ]
        if args.only:
            scenarios = [sc for sc in scenarios if sc.name.startswith(args.only)]
    report: dict[str, Any] = {
        "command": "python tests/benchmark.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "precision": "fp16 weights + autocast" if device.type == "cuda" else "float32",
        "sampler": f"k-diffusion Euler, {args.steps} steps, CFG 7.5 (reference: DDIM, same steps)",
        "versions": versions(),
        "scenarios": [],
    }
    for scenario in scenarios:
        logger.info("running %s ...", scenario.name)
        result = bench_scenario(scenario, device, args.repeats)
        report["scenarios"].append(result)
        print_table(result)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        logger.info("wrote %s", args.out)
    return report


def print_table(result: dict[str, Any]) -> None:
    logger.info("%s (%d steps)", result["scenario"], result["steps"])
    logger.info("  %-12s %10s %9s %9s %10s", "row", "s/image", "forwards", "grad fwd", "peak GiB")
    for name, row in result["results"].items():
        logger.info("  %-12s %10.3f %9d %9d %10.2f", name, row["seconds_per_image"], row["unet_forward_calls"],
                    row["unet_grad_forward_calls"], row["peak_allocated_gib"])
    for name, value in result["ratios"].items():
        logger.info("  %-34s %6.2f", name, value)
    logger.info("  %-34s %6.2f", "ae_minus_plain_gib", result["memory"]["ae_minus_plain_gib"])


if __name__ == "__main__":
    main()
