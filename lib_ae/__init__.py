"""Attend-and-Excite (Chefer et al., SIGGRAPH 2023) as a small host-agnostic torch library.

    capture = AttentionCapture(unet)                      # per-instance hooks on the cross-attention modules
    engine = AttendAndExcite(capture, ExciteConfig())     # official defaults
    plan = engine.plan(steps)                             # step sizes, steps to alter, refinement steps
    latent, report = engine.step(latent, i, plan, selections, run_unet)   # one sampler step's update
    capture.remove()

A step without refinement never waits for the GPU: the report's loss, maxima and skipped images stay on the device
until first read (`read_reports(reports)` reads many at once, after sampling; both live in `lib_ae.step_report`).
With `cuda_graphs=True` the evaluation is replayed as a CUDA graph (`lib_ae.graphs`), unless a `graph_guard` (e.g.
`find_graph_hazards`) finds what a graph cannot hold.

`TokenSelection` says which conditioning columns are subjects; `InSamplerExcitation` applies the update in place on
the tensor a sampler hands to its first model call of a step (k-diffusion sigma space or VP space).
"""

from .capture import AttentionCapture, CaptureError, attention_probabilities, cross_attention_modules
from .config import OFFICIAL_THRESHOLDS, REFERENCE_STEPS, ConfigError, ExciteConfig, StepPlan
from .engine import AttendAndExcite, UNetRunner, frozen_parameters
from .graphs import GraphableRunner, find_graph_hazards
from .loss import TokenSelection, excite_loss, official_gaussian_kernel, smooth, subject_maps, subject_maxima
from .sampling import InSamplerExcitation, LatentSpace, StepClock, sigma_space_gradient_scale
from .step_report import StepReport, read_reports

__all__ = [
    "AttendAndExcite",
    "AttentionCapture",
    "CaptureError",
    "ConfigError",
    "ExciteConfig",
    "GraphableRunner",
    "InSamplerExcitation",
    "LatentSpace",
    "OFFICIAL_THRESHOLDS",
    "REFERENCE_STEPS",
    "StepClock",
    "StepPlan",
    "StepReport",
    "TokenSelection",
    "UNetRunner",
    "attention_probabilities",
    "cross_attention_modules",
    "excite_loss",
    "find_graph_hazards",
    "frozen_parameters",
    "official_gaussian_kernel",
    "read_reports",
    "sigma_space_gradient_scale",
    "smooth",
    "subject_maps",
    "subject_maxima",
]
