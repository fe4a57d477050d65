"""Attend-and-Excite (Chefer et al., SIGGRAPH 2023) and the methods after it, as a small host-agnostic torch library.

    capture = AttentionCapture(unet)                      # per-instance hooks on the cross-attention modules
    engine = AttendAndExcite(capture, Excite())           # an objective (lib_ae.objectives), official defaults
    plan = engine.plan(steps)                             # step sizes, steps to alter, refinement steps
    latent, report = engine.step(latent, i, plan, selections, run_unet)   # one sampler step's update
    capture.remove()

A method is an objective (`lib_ae.objectives`: `Excite`, `Bind`, `ExciteBind`; `objective_for(params)` picks the
user's). The engine (`lib_ae.engine`) runs Algorithm 1 for any of them; `lib_ae.evaluator` computes an objective and
its gradient on the device, eagerly or replayed as a CUDA graph (`lib_ae.graphs`, with `cuda_graphs=True`, unless a
`graph_guard` such as `find_graph_hazards` finds what a graph cannot hold).

A step without refinement never waits for the GPU: the report's loss, maxima and skipped images stay on the device
until first read (`read_reports(reports)` reads many at once, after sampling; both live in `lib_ae.step_report`).

`TokenSelection` says which conditioning columns are subjects (`lib_ae.tokens` finds them in a prompt);
`InSamplerExcitation` applies the update in place on the tensor a sampler hands to its first model call of a step
(k-diffusion sigma space or VP space). Hosts: `lib_ae.webui` (AUTOMATIC1111).
"""

from .capture import AttentionCapture, CaptureError, attention_probabilities, cross_attention_modules
from .config import OFFICIAL_THRESHOLDS, REFERENCE_STEPS, BindingConfig, ConfigError, ExciteConfig, StepPlan
from .engine import AttendAndExcite, UNetRunner
from .evaluator import frozen_parameters
from .graphs import GraphableRunner, find_graph_hazards
from .in_sampler import InSamplerExcitation, LatentSpace, StepClock, sigma_space_gradient_scale
from .initno import InitnoConfig, NoiseOptimisation
from .loss import TokenSelection, excite_loss, official_gaussian_kernel, smooth, subject_maps, subject_maxima
from .objectives import Bind, Conform, Excite, ExciteBind, Initno, InitnoSelfCross, Objective, objective_for
from .step_report import StepReport, read_reports

__all__ = [
    "AttendAndExcite",
    "AttentionCapture",
    "Bind",
    "BindingConfig",
    "CaptureError",
    "ConfigError",
    "Conform",
    "Excite",
    "ExciteBind",
    "ExciteConfig",
    "GraphableRunner",
    "InSamplerExcitation",
    "Initno",
    "InitnoConfig",
    "InitnoSelfCross",
    "LatentSpace",
    "NoiseOptimisation",
    "OFFICIAL_THRESHOLDS",
    "Objective",
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
    "objective_for",
    "official_gaussian_kernel",
    "read_reports",
    "sigma_space_gradient_scale",
    "smooth",
    "subject_maps",
    "subject_maxima",
]
