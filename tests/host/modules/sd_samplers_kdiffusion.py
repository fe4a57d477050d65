"""Stand-in for modules/sd_samplers_kdiffusion.py: k-diffusion samplers driven through the CFG denoiser.

The sampler table and sigma schedules come from tests/support/thirdparty.py (`A1111_KDIFFUSION_SAMPLERS`, read from
L11-27 and `get_sigmas` L79-132 with default settings), plus "DPM fast" / "DPM adaptive", which that table leaves out
because A&E does not support them (the extension must refuse them cleanly).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from modules import sd_samplers_cfg_denoiser, sd_samplers_common, shared
from support.thirdparty import A1111_KDIFFUSION_SAMPLERS, A1111Sampler, import_k_diffusion

k_sampling, k_external = import_k_diffusion()


class CFGDenoiserKDiffusion(sd_samplers_cfg_denoiser.CFGDenoiser):
    """L52-64: the inner model is k-diffusion's CompVisDenoiser over the loaded model (eps parameterization)."""

    @property
    def inner_model(self) -> Any:
        if self.model_wrap is None:
            denoiser = (
                k_external.CompVisVDenoiser if shared.sd_model.parameterization == "v" else k_external.CompVisDenoiser
            )
            self.model_wrap = denoiser(shared.sd_model, quantize=shared.opts.enable_quantization)
        return self.model_wrap


_UNSUPPORTED_BY_AE = {
    # L24-25: functions that choose their own model calls.
    "DPM fast": A1111Sampler("DPM fast", "sample_dpm_fast", uses_ensd=True),
    "DPM adaptive": A1111Sampler("DPM adaptive", "sample_dpm_adaptive", uses_ensd=True),
}


class KDiffusionSampler(sd_samplers_common.Sampler):
    """L67-234 (`sample` only: txt2img)."""

    def __init__(self, entry: A1111Sampler, sd_model: Any) -> None:
        super().__init__(entry.function_name)
        self.entry = entry
        self.func = entry.function()
        self.model_wrap_cfg = CFGDenoiserKDiffusion(self)
        self.model_wrap = self.model_wrap_cfg.inner_model

    def sample(
        self,
        p: Any,
        x: torch.Tensor,
        conditioning: Any,
        unconditional_conditioning: Any,
        steps: int | None = None,
        image_conditioning: torch.Tensor | None = None,
    ) -> torch.Tensor:
        steps = steps or p.steps
        sigmas = self.entry.sigmas(self.model_wrap, steps).to(x.device)
        x = x * sigmas[0]  # L199 (opts.sgm_noise_multiplier off)
        extra_params_kwargs = self.initialize(p)
        parameters = inspect.signature(self.func).parameters
        if "n" in parameters:  # L204-212
            extra_params_kwargs["n"] = steps
        if "sigma_min" in parameters:
            extra_params_kwargs["sigma_min"] = self.model_wrap.sigmas[0].item()
            extra_params_kwargs["sigma_max"] = self.model_wrap.sigmas[-1].item()
        if "sigmas" in parameters:
            extra_params_kwargs["sigmas"] = sigmas
        extra_params_kwargs.update(self.entry.extra_kwargs(x, sigmas, p.seeds))  # L214-216 brownian noise sampler
        self.last_latent = x
        self.sampler_extra_args = {
            "cond": conditioning,
            "image_cond": image_conditioning,
            "uncond": unconditional_conditioning,
            "cond_scale": p.cfg_scale,
            "s_min_uncond": self.s_min_uncond,
        }
        # L230; disable=True only silences k-diffusion's tqdm bar in the test output.
        return self.launch_sampling(
            steps,
            lambda: self.func(
                self.model_wrap_cfg,
                x,
                extra_args=self.sampler_extra_args,
                disable=True,
                callback=self.callback_state,
                **extra_params_kwargs,
            ),
        )


samplers_data_k_diffusion = [
    sd_samplers_common.SamplerData(
        entry.label, lambda model, entry=entry: KDiffusionSampler(entry, model), [], entry.options
    )
    for entry in [*A1111_KDIFFUSION_SAMPLERS.values(), *_UNSUPPORTED_BY_AE.values()]
]
"""L30-34."""
