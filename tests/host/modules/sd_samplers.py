"""Stand-in for modules/sd_samplers.py: the sampler registry and `create_sampler`."""

from __future__ import annotations

from typing import Any

from modules import sd_samplers_common, sd_samplers_kdiffusion, sd_samplers_timesteps

all_samplers = [*sd_samplers_kdiffusion.samplers_data_k_diffusion, *sd_samplers_timesteps.samplers_data_timesteps]
all_samplers_map = {x.name: x for x in all_samplers}  # L10-15


def find_sampler_config(name: str | None) -> sd_samplers_common.SamplerData | None:
    return all_samplers_map.get(name) if name is not None else all_samplers[0]  # L24-30


def create_sampler(name: str, model: Any) -> Any:
    """L33-44: a new sampler (and CFG denoiser) per call, with `config` set after construction."""
    config = find_sampler_config(name)
    assert config is not None, f"bad sampler name: {name}"
    sampler = config.constructor(model)
    sampler.config = config
    return sampler
