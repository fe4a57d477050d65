"""The two loops the official pipelines' trajectories are compared through, with the engine inside: DDIM in VP space
(the update before each step's CFG evaluation, as A&E's, SynGen's and CONFORM's pipelines do) and k-diffusion's real
`sample_euler` over DDIM's sigmas (DDIM with eta 0 is Euler in sigma space; the final sigma is DDIM's
sigma(alphas_cumprod[0])), float64, batch-first inputs."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from lib_ae import AttendAndExcite, InSamplerExcitation, TokenSelection
from lib_ae.binding import BindingSelection
from support.models import LdmDenoiserModel, float64_ddim_scheduler
from support.thirdparty import import_k_diffusion


def ddim_vp(
    unet: torch.nn.Module, engine: AttendAndExcite, z: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor,
    steps: int, cfg: float, selections: Sequence[TokenSelection | None], bindings: Sequence[BindingSelection | None],
    fresh_noise: Callable[[int, int], torch.Tensor] | None = None,
) -> tuple[InSamplerExcitation, list[list[float]], torch.Tensor]:
    """(the excitation with its reports, each image's latent norm after each step, the final latent). `fresh_noise`:
    InitNO's rounds' standard noise (the VP latent starts from standard noise itself)."""
    sched = float64_ddim_scheduler()
    sched.set_timesteps(steps)
    excitation = InSamplerExcitation(engine, engine.plan(steps), "vp", fresh_noise=fresh_noise)
    norms: list[list[float]] = [[] for _ in range(z.shape[0])]
    with torch.no_grad():
        for i, t in enumerate(sched.timesteps):
            timestep = torch.full((z.shape[0],), float(t), dtype=z.dtype)

            def run_unet(latent_rows: torch.Tensor, rows: torch.Tensor) -> None:
                unet(latent_rows, timestep[rows], context=cond[rows])

            excitation.before_model_call(i, z, timestep, list(selections), run_unet, bindings=list(bindings))
            both = torch.cat([timestep, timestep])
            eps_u, eps_c = unet(torch.cat([z, z]), both, context=torch.cat([uncond, cond])).chunk(2)
            z = sched.step(eps_u + cfg * (eps_c - eps_u), t, z).prev_sample
            for b in range(z.shape[0]):
                norms[b].append(float(z[b].norm()))
    return excitation, norms, z


def ddim_sigma_euler(
    unet: torch.nn.Module, engine: AttendAndExcite, z: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor,
    steps: int, cfg: float, selections: Sequence[TokenSelection | None], bindings: Sequence[BindingSelection | None],
    fresh_noise: Callable[[int, int], torch.Tensor] | None = None,
) -> tuple[InSamplerExcitation, torch.Tensor]:
    """(the excitation with its reports, the final latent mapped back to VP space). The sampler starts from the VP
    latent times sqrt(1 + sigma_0^2), so InitNO's rounds' noise is scaled the same way."""
    sampling, external = import_k_diffusion()
    model = LdmDenoiserModel(unet)
    denoiser = external.CompVisDenoiser(model, quantize=False)
    sched = float64_ddim_scheduler()
    sched.set_timesteps(steps)
    sigmas = denoiser.sigmas[sched.timesteps.long()]
    final = ((1 - model.alphas_cumprod[0]) / model.alphas_cumprod[0]) ** 0.5
    sigmas = torch.cat([sigmas, final[None]])
    excitation = InSamplerExcitation(engine, engine.plan(steps), "sigma", fresh_noise=fresh_noise,
                                     noise_scale=lambda s: (1 + s * s) ** 0.5, timestep_of=denoiser.sigma_to_t)
    calls = 0

    def cfg_model(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        nonlocal calls

        def run_unet(latent_rows: torch.Tensor, rows: torch.Tensor) -> None:
            denoiser(latent_rows, sigma[rows], cond=cond[rows])

        excitation.before_model_call(calls, x, sigma, list(selections), run_unet, bindings=list(bindings))
        calls += 1
        both = torch.cat([sigma, sigma])
        uncond_out, cond_out = denoiser(torch.cat([x, x]), both, cond=torch.cat([uncond, cond])).chunk(2)
        return uncond_out + cfg * (cond_out - uncond_out)

    x = z * (1 + sigmas[0] ** 2) ** 0.5
    with torch.no_grad():
        x = sampling.sample_euler(cfg_model, x, sigmas, disable=True)
    return excitation, x / (1 + sigmas[-1] ** 2) ** 0.5
