"""Step plan and parameter validation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lib_ae import ConfigError, ExciteConfig


def test_official_plan_at_50_steps() -> None:
    plan = ExciteConfig().plan(50)
    assert plan.alter_steps == 25
    assert dict(plan.refinement_thresholds) == {0: 0.05, 10: 0.5, 20: 0.8}
    expected = 20 * np.sqrt(np.linspace(1.0, 0.5, 50))
    assert plan.step_sizes == tuple(float(v) for v in expected)
    assert plan.step_sizes[24] == pytest.approx(17.38, abs=0.01)  # 20*sqrt(1 - 0.5*24/49)
    assert plan.is_active(24) and not plan.is_active(25)


@pytest.mark.parametrize(
    ("steps", "alter", "thresholds"),
    [
        (20, 10, {0: 0.05, 4: 0.5, 8: 0.8}),
        (30, 15, {0: 0.05, 6: 0.5, 12: 0.8}),
        (100, 50, {0: 0.05, 20: 0.5, 40: 0.8}),
        (3, 2, {0: 0.05, 1: 0.8}),  # 10*3/50=0.6 -> 1 and 20*3/50=1.2 -> 1 collide: the higher threshold wins
        (1, 1, {0: 0.8}),
    ],
)
def test_plan_scales_with_step_count(steps: int, alter: int, thresholds: dict[int, float]) -> None:
    plan = ExciteConfig().plan(steps)
    assert plan.alter_steps == alter
    assert dict(plan.refinement_thresholds) == thresholds
    assert len(plan.step_sizes) == steps


def test_verbatim_thresholds_like_the_reference() -> None:
    plan = ExciteConfig(thresholds={0: 0.05, 5: 0.5, 10: 0.8}, scale_thresholds_with_steps=False, max_iter_to_alter=10).plan(20)
    assert dict(plan.refinement_thresholds) == {0: 0.05, 5: 0.5, 10: 0.8}
    assert plan.alter_steps == 10


@pytest.mark.parametrize(
    "kwargs",
    [
        {"step_size": -1.0},
        {"step_size": math.nan},
        {"step_size": 1e9},
        {"step_size": "20"},
        {"alter_fraction": 1.5},
        {"max_refinement_iterations": -1},
        {"max_refinement_iterations": True},
        {"thresholds": {0: 1.5}},
        {"thresholds": {-1: 0.5}},
        {"kernel_size": 4},
        {"sigma": 0.0},
        {"attention_res": (0, 16)},
        {"scale_range": (1.0,)},
    ],
)
def test_out_of_range_values_are_rejected_with_the_parameter_name(kwargs: dict) -> None:
    with pytest.raises(ConfigError) as error:
        ExciteConfig(**kwargs)
    assert next(iter(kwargs)).split("_")[0] in str(error.value)


def test_attention_size_is_one_32nd_of_the_image() -> None:
    config = ExciteConfig()
    assert config.attention_size(64, 64) == (16, 16)
    assert config.attention_size(128, 128) == (32, 32)
    assert config.attention_size(96, 64) == (24, 16)
    assert config.attention_size(90, 60) == (23, 15)
    assert ExciteConfig(attention_res=(8, 8)).attention_size(64, 64) == (8, 8)
