"""The extension in the stand-in A1111 host of tests/host: constants, the `WebUI` "process" and helpers shared by
the end-to-end test modules (tests/test_extension.py, tests/test_hostile.py). The fixtures that put the stand-in on
sys.path and build a `WebUI` per test are in tests/conftest.py."""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import torch

from lib_ae.params import PARAMS

ROOT = Path(__file__).resolve().parents[2]
HOST = ROOT / "tests" / "host"
TITLE = "Attend and Excite"
PROMPT = "a cat and a dog"
FAST = {"max_refinement_steps": 2}
"""Keeps each run to a handful of UNet passes: 4 steps, refinement capped at 2 iterations."""
DEFAULT_FIELDS: dict[str, Any] = {"prompt": PROMPT, "steps": 4, "seed": 7, "width": 128, "height": 128}


class WebUI:
    """One WebUI "process": the model loaded, the scripts loaded, the txt2img tab's script UI built."""

    def __init__(self, host: SimpleNamespace, *, with_xyz: bool = False) -> None:
        self.host = host
        host.standin.reset_host(host.model)
        self.runner = host.standin.load_extension(ROOT, with_xyz=with_xyz)
        self.script = self.runner.script(TITLE)
        self.callbacks_at_load = callback_counts(host)

    @property
    def module(self) -> ModuleType:
        """The loaded scripts/attend_and_excite.py (not in sys.modules, as in A1111)."""
        return next(
            d.module for d in self.host.scripts.scripts_data if d.script_class.__name__ == "AttendAndExciteScript"
        )

    def adapter(self, name: str) -> ModuleType:
        """A module of the host adapter `lib_ae.webui` as the loaded script uses it (imported with the stand-in)."""
        return importlib.import_module(f"lib_ae.webui.{name}")

    def args(self, ae: dict[str, Any] | None = None, **named: Any) -> tuple[Any, ...]:
        """The request's script args: named values over the UI defaults (positional), or `ae` in the API dict form."""
        if ae is None:
            values = {spec.name: spec.default for spec in PARAMS} | FAST | named
            slot: list[Any] = [values[spec.name] for spec in PARAMS]
        else:
            slot = [ae]
        return self.host.standin.script_args(self.runner, {TITLE: slot})

    def run(self, args: tuple[Any, ...] | None = None, **fields: Any) -> tuple[Any, Any]:
        return self.host.standin.txt2img(
            self.runner, args if args is not None else self.args(), **(DEFAULT_FIELDS | fields)
        )

    def unload(self) -> None:
        self.host.script_callbacks.script_unloaded_callback()


def callback_counts(host: SimpleNamespace) -> dict[str, int]:
    return {name: len(callbacks) for name, callbacks in host.script_callbacks.callback_map.items()}


def hooks_on(module: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


def ae_keys(infotext: str, host: SimpleNamespace) -> dict[str, str]:
    fields = host.infotext_utils.parse_generation_parameters(infotext)
    return {k: v for k, v in fields.items() if k.startswith("AE")}


def embedding(host: SimpleNamespace, name: str, vectors: int) -> Any:
    """Register a textual-inversion embedding `name` of `vectors` random vectors with the loaded model."""
    from modules.textual_inversion.textual_inversion import Embedding

    context = host.shared.sd_model.cond_stage_model.token_embedding.shape[1]
    vec = torch.randn(vectors, context, generator=torch.Generator().manual_seed(3))
    emb = Embedding(vec, name)
    import modules.sd_hijack

    modules.sd_hijack.model_hijack.embedding_db.register_embedding(emb, host.shared.sd_model)
    return emb


def emulated_hires_pass(webui: WebUI, p: Any) -> torch.Tensor:
    """The hires fix pass on a finished first pass, as processing.py runs it (p.is_hr_pass set, the hires prompts, a
    fresh sampler, process_before_every_sampling then sample), with the first pass's conds: its sampled latent."""
    host = webui.host
    p.is_hr_pass = True
    p.hr_prompts = list(p.prompts)
    p.sampler = host.processing.sd_samplers.create_sampler("Euler", p.sd_model)
    noise = p.rng_next()
    p.scripts.process_before_every_sampling(p=p, x=noise, noise=noise, c=p.c, uc=p.uc)
    with torch.no_grad():
        return p.sampler.sample(p, noise, p.c, p.uc, image_conditioning=noise.new_zeros(1, 5, 1, 1))
