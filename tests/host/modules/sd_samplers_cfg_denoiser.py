"""Stand-in for modules/sd_samplers_cfg_denoiser.py: `CFGDenoiser.forward` for tensor (SD1/SD2) conditionings,
without inpainting masks, edit models, NGMS/skip-early-CFG, cond padding or live previews."""

from __future__ import annotations

from typing import Any

import torch

from modules import prompt_parser, sd_samplers_common, shared
from modules.script_callbacks import CFGDenoiserParams, cfg_denoiser_callback


class CFGDenoiser(torch.nn.Module):
    """L33-311. `step` counts model calls (reset by Sampler.initialize, +1 at the end of forward, L310);
    `steps` / `total_steps` are set by Sampler.launch_sampling (sd_samplers_common.py L266-267)."""

    def __init__(self, sampler: Any) -> None:
        super().__init__()
        self.model_wrap: Any = None
        self.steps: int | None = None
        self.total_steps: int | None = None
        self.step = 0
        self.sampler = sampler
        self.p: Any = None
        self.cond_scale_miltiplier = 1.0  # sic, L61

    @property
    def inner_model(self) -> Any:
        raise NotImplementedError()

    def combine_denoised(
        self, x_out: torch.Tensor, conds_list: list[list[tuple[int, float]]], uncond: torch.Tensor, cond_scale: float
    ) -> torch.Tensor:
        """L74-82: per image, the uncond output plus, sub-prompt after sub-prompt, weight * scale * (cond - uncond)
        (the same float operations in the same order)."""
        uncond_out = x_out[-uncond.shape[0] :]
        images = []
        for i, conds in enumerate(conds_list):
            value = uncond_out[i]
            for row, weight in conds:
                value = value + (x_out[row] - uncond_out[i]) * (weight * cond_scale)
            images.append(value)
        return torch.stack(images)

    def get_pred_x0(self, x_in: torch.Tensor, x_out: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return x_out  # L90-91 (k-diffusion: the output already is x0)

    def forward(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor,
        uncond: Any,
        cond: Any,
        cond_scale: float,
        s_min_uncond: float,
        image_cond: torch.Tensor,
    ) -> torch.Tensor:
        if shared.state.interrupted or shared.state.skipped:  # L157-158
            raise sd_samplers_common.InterruptedException

        # L168-169: the prompt-editing schedules are resolved by the model-call index.
        conds_list, tensor = prompt_parser.reconstruct_multicond_batch(cond, self.step)
        uncond = prompt_parser.reconstruct_cond_batch(uncond, self.step)
        batch_size = len(conds_list)
        repeats = [len(conds) for conds in conds_list]

        def make_condition_dict(c_crossattn: torch.Tensor, c_concat: torch.Tensor) -> dict[str, Any]:
            return {"c_crossattn": [c_crossattn], "c_concat": [c_concat]}  # L200

        # L203-205: image i's latent once per AND sub-prompt (cond rows, in `tensor` order), then the whole batch
        # again for the uncond rows.
        def cond_rows_then_batch(t: torch.Tensor) -> torch.Tensor:
            return torch.cat([t[i : i + 1].repeat_interleave(n, dim=0) for i, n in enumerate(repeats)] + [t])

        x_in = cond_rows_then_batch(x)
        sigma_in = cond_rows_then_batch(sigma)
        image_cond_in = cond_rows_then_batch(image_cond)

        # L211-217: callbacks may replace the UNet inputs (not the sampler's x).
        params = CFGDenoiserParams(
            x_in, image_cond_in, sigma_in, shared.state.sampling_step, shared.state.sampling_steps, tensor, uncond, self
        )
        cfg_denoiser_callback(params)
        x_in, image_cond_in, sigma_in = params.x, params.image_cond, params.sigma
        tensor, uncond = params.text_cond, params.text_uncond

        if tensor.shape[1] == uncond.shape[1]:
            # L240-249 with opts.batch_cond_uncond (default True): cond and uncond rows in one UNet call.
            cond_in = torch.cat([tensor, uncond])
            x_out = self.inner_model(x_in, sigma_in, cond=make_condition_dict(cond_in, image_cond_in))
        else:
            # L256-271: different token counts, cond rows in slices of 2*batch, then the uncond rows.
            x_out = torch.zeros_like(x_in)
            for a in range(0, tensor.shape[0], batch_size * 2):
                b = min(a + batch_size * 2, tensor.shape[0])
                x_out[a:b] = self.inner_model(
                    x_in[a:b], sigma_in[a:b], cond=make_condition_dict(tensor[a:b], image_cond_in[a:b])
                )
            n = uncond.shape[0]
            x_out[-n:] = self.inner_model(
                x_in[-n:], sigma_in[-n:], cond=make_condition_dict(uncond, image_cond_in[-n:])
            )

        denoised = self.combine_denoised(x_out, conds_list, uncond, cond_scale * self.cond_scale_miltiplier)  # L289
        first_rows = [conds[0][0] for conds in conds_list]  # L273, L295
        self.sampler.last_latent = self.get_pred_x0(x_in[first_rows], x_out[first_rows], sigma)
        self.step += 1  # L310
        return denoised
