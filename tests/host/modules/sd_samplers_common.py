"""Stand-in for modules/sd_samplers_common.py: sampler table entries, the interrupt exception, the Sampler base."""

from __future__ import annotations

from collections import namedtuple
from typing import Any, Callable

import torch

from modules import shared

SamplerDataTuple = namedtuple("SamplerDataTuple", ["name", "constructor", "aliases", "options"])


class SamplerData(SamplerDataTuple):
    """L11-18: `total_steps` = expected model calls, twice the steps for second-order samplers."""

    def total_steps(self, steps: int) -> int:
        return steps * 2 if self.options.get("second_order", False) else steps


class InterruptedException(BaseException):
    """L142-143: a BaseException, so `except Exception` around the model does not swallow it."""


class Sampler:
    """L236-300, the parts every sampler shares: `initialize` resets the denoiser's call counter, `launch_sampling`
    sets the step counts and turns an interruption into "return the last latent"."""

    def __init__(self, funcname: Any) -> None:
        self.funcname = funcname
        self.func: Any = None  # the sampling function, set by the subclass
        self.config: SamplerData | None = None  # L238: set by create_sampler
        self.last_latent: torch.Tensor | None = None
        self.model_wrap_cfg: Any = None
        self.sampler_extra_args: dict[str, Any] = {}
        self.s_min_uncond = 0.0

    def callback_state(self, d: dict[str, Any]) -> None:
        shared.state.sampling_step = d["i"]  # L256-263 (no stop_at support)
        shared.total_tqdm.update()

    def launch_sampling(self, steps: int, func: Callable[[], torch.Tensor]) -> torch.Tensor:
        """L265-281."""
        self.model_wrap_cfg.steps = steps
        assert self.config is not None
        self.model_wrap_cfg.total_steps = self.config.total_steps(steps)
        shared.state.sampling_steps = steps
        shared.state.sampling_step = 0
        try:
            return func()
        except InterruptedException:
            assert self.last_latent is not None
            return self.last_latent

    def initialize(self, p: Any) -> dict[str, Any]:
        """L286-296 (no eta/churn options: the stand-in samplers take none)."""
        self.p = p
        self.model_wrap_cfg.p = p
        self.model_wrap_cfg.step = 0
        self.s_min_uncond = getattr(p, "s_min_uncond", 0.0)
        return {}
