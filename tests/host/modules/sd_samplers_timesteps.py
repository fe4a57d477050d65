"""Stand-in for modules/sd_samplers_timesteps.py with DDIM (eta 0) only: the sampler state is the VP latent z_t and
the denoiser's second argument is the integer timestep, its output the eps prediction."""

from __future__ import annotations

from typing import Any, Callable

import torch

from modules import sd_samplers_cfg_denoiser, sd_samplers_common, shared


class CompVisTimestepsDenoiser(torch.nn.Module):
    """L25-31: `apply_model(input, timesteps, **kwargs)`, no input scaling."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.inner_model = model

    def forward(self, input: torch.Tensor, timesteps: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return self.inner_model.apply_model(input, timesteps, **kwargs)


class CFGDenoiserTimesteps(sd_samplers_cfg_denoiser.CFGDenoiser):
    """L48-72."""

    @property
    def inner_model(self) -> Any:
        if self.model_wrap is None:
            self.model_wrap = CompVisTimestepsDenoiser(shared.sd_model)
        return self.model_wrap


def ddim(
    model: Any,
    x: torch.Tensor,
    timesteps: torch.Tensor,
    extra_args: dict[str, Any],
    callback: Callable[[dict[str, Any]], None],
    disable: bool = True,
) -> torch.Tensor:
    """The deterministic DDIM update of sd_samplers_timesteps_impl.ddim (L11-40, eta = 0), written from its equations:
    x0 = (z - sqrt(1 - a_t) eps) / sqrt(a_t);  z <- sqrt(a_prev) x0 + sqrt(1 - a_prev) eps,
    over the timesteps from the last down to the second (len(timesteps) - 1 model calls), a_prev = a[t_(index-1)]."""
    alphas_cumprod = model.inner_model.inner_model.alphas_cumprod
    previous = torch.cat([timesteps[:1], timesteps[:-1]])
    ones = x.new_ones(x.shape[0])
    for i in range(len(timesteps) - 1):
        index = len(timesteps) - 1 - i
        a_t = alphas_cumprod[timesteps[index]].item()
        a_prev = alphas_cumprod[previous[index]].item()
        eps = model(x, timesteps[index].item() * ones, **extra_args)
        pred_x0 = (x - (1 - a_t) ** 0.5 * eps) / a_t**0.5
        x = a_prev**0.5 * pred_x0 + (1 - a_prev) ** 0.5 * eps
        callback({"x": x, "i": i, "sigma": 0, "sigma_hat": 0, "denoised": pred_x0})
    return x


class CompVisSampler(sd_samplers_common.Sampler):
    """L75-160 (`sample` only)."""

    def __init__(self, funcname: Callable[..., torch.Tensor], sd_model: Any) -> None:
        super().__init__(funcname)
        self.func = funcname
        self.model_wrap_cfg = CFGDenoiserTimesteps(self)
        self.model_wrap = self.model_wrap_cfg.inner_model

    @staticmethod
    def get_timesteps(steps: int) -> torch.Tensor:
        # L86-96: every (1000 // steps)-th timestep, shifted by one, clipped to [0, 999].
        return torch.clip(torch.arange(0, 1000, 1000 // steps) + 1, 0, 999)

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
        timesteps = self.get_timesteps(steps)
        self.initialize(p)
        self.last_latent = x
        self.sampler_extra_args = {
            "cond": conditioning,
            "image_cond": image_conditioning,
            "uncond": unconditional_conditioning,
            "cond_scale": p.cfg_scale,
            "s_min_uncond": self.s_min_uncond,
        }
        return self.launch_sampling(
            steps,
            lambda: self.func(
                self.model_wrap_cfg,
                x,
                timesteps=timesteps,
                extra_args=self.sampler_extra_args,
                disable=True,
                callback=self.callback_state,
            ),
        )


samplers_data_timesteps = [
    sd_samplers_common.SamplerData("DDIM", lambda model: CompVisSampler(ddim, model), ["ddim"], {}),  # L11-22
]
