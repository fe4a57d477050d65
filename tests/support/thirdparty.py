"""The third-party code A1111 drives, loaded without the package `__init__` files the test venv cannot satisfy.

* k-diffusion: A1111 only uses `k_diffusion.sampling` and `k_diffusion.external`, but `k_diffusion/__init__.py` imports
  the training and evaluation modules too (skimage, torchvision, clean-fid, clip, wandb, ...). We register the package
  without running its `__init__` and import just those two submodules.
* open_clip: its `__init__` needs torchvision; we only want the CLIP BPE tokenizer (`open_clip/tokenizer.py`, with its
  bundled vocabulary), which is what SD1 and SD2 prompts are split with, to place subject tokens offline.
* `A1111_KDIFFUSION_SAMPLERS`: how A1111 v1.10.1 configures each k-diffusion sampler
  (`modules/sd_samplers_kdiffusion.py`, `samplers_k_diffusion`, commit 82a973c0), so tests can run a sampler the way
  the WebUI does without importing the WebUI.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import logging
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType, ModuleType
from typing import Any, Protocol

import torch

logger = logging.getLogger(__name__)

_TORCHVISION_STUB_NAMES = ("torchvision", "torchvision.transforms", "torchvision.transforms.functional")
_OPEN_CLIP_TOKENIZER_MODULE = "open_clip_tokenizer_standalone"


class _TorchvisionStub(ModuleType):
    """Stands in for torchvision while `k_diffusion.utils` is imported (it does `from torchvision.transforms import
    functional as TF`). Only `utils.from_pil_image` / `utils.to_pil_image` use TF, and neither sampling.py nor
    external.py calls them; any attribute access therefore fails loudly instead of computing something wrong."""

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(
            f"{self.__name__}.{name}: torchvision is not installed in the test environment; this stub only lets "
            "k_diffusion.utils import (k_diffusion.sampling/external never call torchvision)"
        )


def _torchvision_importable() -> bool:
    """True when a real torchvision can be imported (checked without importing it)."""
    if "torchvision" in sys.modules:
        return not isinstance(sys.modules["torchvision"], _TorchvisionStub)
    return importlib.util.find_spec("torchvision") is not None


@contextlib.contextmanager
def _torchvision_stub() -> Iterator[None]:
    """Register the stub modules only for the duration of an import, and only if torchvision is not importable.

    The stubs are removed again afterwards so that libraries probing for torchvision later (transformers, diffusers)
    still see it as absent; `k_diffusion.utils` keeps its own reference to the stub it imported.
    """
    if _torchvision_importable():
        yield
        return
    added: dict[str, ModuleType] = {}
    for name in _TORCHVISION_STUB_NAMES:
        if name in sys.modules:
            continue
        stub = _TorchvisionStub(name)
        if name != _TORCHVISION_STUB_NAMES[-1]:
            stub.__path__ = []  # a package, so the dotted import below it resolves
        added[name] = stub
        sys.modules[name] = stub
    for parent, child in zip(_TORCHVISION_STUB_NAMES[:-1], _TORCHVISION_STUB_NAMES[1:], strict=True):
        setattr(sys.modules[parent], child.rsplit(".", 1)[1], sys.modules[child])
    logger.debug("torchvision not importable: stubbed %s for this import", ", ".join(added))
    try:
        yield
    finally:
        for name, stub in added.items():
            if sys.modules.get(name) is stub:
                del sys.modules[name]


@functools.cache
def import_k_diffusion() -> tuple[ModuleType, ModuleType]:
    """(k_diffusion.sampling, k_diffusion.external), imported without executing `k_diffusion/__init__.py`.

    If `k_diffusion` is already in sys.modules (a real full import, or ours) it is reused as is.
    """
    registered = False
    if "k_diffusion" not in sys.modules:
        spec = importlib.util.find_spec("k_diffusion")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("k-diffusion is not installed (tests/requirements-nodeps.txt pins it)")
        # module_from_spec sets __path__ from submodule_search_locations but does not execute the package __init__.
        package = importlib.util.module_from_spec(spec)
        sys.modules["k_diffusion"] = package
        registered = True
        logger.debug("registered k_diffusion package at %s without its __init__", list(spec.submodule_search_locations))
    try:
        with _torchvision_stub():
            sampling = importlib.import_module("k_diffusion.sampling")
            external = importlib.import_module("k_diffusion.external")
    except BaseException:
        if registered:
            for name in [n for n in sys.modules if n == "k_diffusion" or n.startswith("k_diffusion.")]:
                del sys.modules[name]
        raise
    return sampling, external


@functools.cache
def import_open_clip_tokenizer() -> ModuleType:
    """`open_clip/tokenizer.py` loaded by file path as a standalone module (the open_clip package is not imported)."""
    spec = importlib.util.find_spec("open_clip")  # top-level: locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("open_clip_torch is not installed (tests/requirements-nodeps.txt pins it)")
    path = Path(next(iter(spec.submodule_search_locations))) / "tokenizer.py"
    file_spec = importlib.util.spec_from_file_location(_OPEN_CLIP_TOKENIZER_MODULE, path)
    if file_spec is None or file_spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(file_spec)
    sys.modules[_OPEN_CLIP_TOKENIZER_MODULE] = module
    try:
        file_spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[_OPEN_CLIP_TOKENIZER_MODULE]
        raise
    logger.debug("loaded the open_clip tokenizer standalone from %s", path)
    return module


class ClipTokenizer(Protocol):
    """The part of open_clip's `SimpleTokenizer` the tests use (its class is created at load time, hence a Protocol)."""

    encoder: dict[str, int]
    decoder: dict[int, str]
    sot_token_id: int
    eot_token_id: int
    context_length: int | None

    def encode(self, text: str) -> list[int]: ...

    def decode(self, tokens: Sequence[int]) -> str: ...

    def __call__(self, texts: str | list[str], context_length: int | None = None) -> torch.Tensor: ...


@functools.cache
def clip_tokenizer() -> ClipTokenizer:
    """One shared `SimpleTokenizer` over the bundled `bpe_simple_vocab_16e6.txt.gz` (no network, ~0.15 s to build)."""
    tokenizer: ClipTokenizer = import_open_clip_tokenizer().SimpleTokenizer()
    return tokenizer


@dataclass(frozen=True)
class A1111Sampler:
    """One entry of A1111 v1.10.1's `samplers_k_diffusion` table and what its options mean for the sampling run.

    `scheduler` None is A1111's 'Automatic' with no sampler preference: the model's own discrete sigmas
    (`CompVisDenoiser.get_sigmas`). `second_order` samplers call the model twice per step, except on the last step
    (the step to sigma 0 is a plain Euler step). `brownian_noise` samplers get a seeded `BrownianTreeNoiseSampler`.
    `uses_ensd` only matters with a non-zero 'Eta noise seed delta' setting (default 0).
    """

    label: str
    function_name: str
    scheduler: str | None = None
    second_order: bool = False
    brownian_noise: bool = False
    discard_next_to_last_sigma: bool = False
    uses_ensd: bool = False

    @property
    def options(self) -> dict[str, Any]:
        """The options dict as written in A1111's table (flags that are False are absent there)."""
        options: dict[str, Any] = {} if self.scheduler is None else {"scheduler": self.scheduler}
        for flag in ("discard_next_to_last_sigma", "uses_ensd", "second_order", "brownian_noise"):
            if getattr(self, flag):
                options[flag] = True
        return options

    def function(self) -> Callable[..., torch.Tensor]:
        """The k_diffusion.sampling function."""
        sampling, _ = import_k_diffusion()
        fn: Callable[..., torch.Tensor] = getattr(sampling, self.function_name)
        return fn

    def model_calls(self, steps: int) -> int:
        """Model (denoiser) calls for `steps` steps; A1111's progress bar counts 2 * steps for second-order ones."""
        return 2 * steps - 1 if self.second_order else steps

    def sigmas(self, denoiser: Any, steps: int) -> torch.Tensor:
        """`KDiffusionSampler.get_sigmas` with default settings ('Automatic' schedule, no overrides), on the CPU."""
        sampling, _ = import_k_diffusion()
        n = steps + 1 if self.discard_next_to_last_sigma else steps
        sigma_min, sigma_max = denoiser.sigmas[0].item(), denoiser.sigmas[-1].item()
        if self.scheduler is None:
            sigmas = denoiser.get_sigmas(n)
        elif self.scheduler == "karras":
            sigmas = sampling.get_sigmas_karras(n=n, sigma_min=sigma_min, sigma_max=sigma_max, device="cpu")
        elif self.scheduler == "exponential":
            sigmas = sampling.get_sigmas_exponential(n=n, sigma_min=sigma_min, sigma_max=sigma_max, device="cpu")
        else:
            raise ValueError(f"scheduler {self.scheduler!r} is not used by any sampler of this table")
        if self.discard_next_to_last_sigma:
            sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
        return sigmas.cpu()

    def extra_kwargs(self, x: torch.Tensor, sigmas: torch.Tensor, seeds: Sequence[int]) -> dict[str, Any]:
        """Keyword arguments A1111 adds to the sampling call besides model, x, sigmas, extra_args, callback, disable.

        Only the Brownian-tree noise sampler for the SDE samplers ('solver_type' is for 'DPM++ 2M SDE Heun', which
        this table leaves out). `seeds` are the per-image seeds of the batch, as A1111 passes them.
        """
        if not self.brownian_noise:
            return {}
        sampling, _ = import_k_diffusion()
        sigma_min, sigma_max = sigmas[sigmas > 0].min(), sigmas.max()
        return {"noise_sampler": sampling.BrownianTreeNoiseSampler(x, sigma_min, sigma_max, seed=list(seeds))}


def _sampler_table(*entries: A1111Sampler) -> Mapping[str, A1111Sampler]:
    return MappingProxyType({entry.label: entry for entry in entries})


A1111_KDIFFUSION_SAMPLERS: Mapping[str, A1111Sampler] = _sampler_table(
    A1111Sampler("Euler", "sample_euler"),
    A1111Sampler("Euler a", "sample_euler_ancestral", uses_ensd=True),
    A1111Sampler("LMS", "sample_lms"),
    A1111Sampler("Heun", "sample_heun", second_order=True),
    A1111Sampler("DPM2", "sample_dpm_2", "karras", second_order=True, discard_next_to_last_sigma=True),
    A1111Sampler(
        "DPM2 a", "sample_dpm_2_ancestral", "karras", second_order=True, discard_next_to_last_sigma=True, uses_ensd=True
    ),
    A1111Sampler("DPM++ 2S a", "sample_dpmpp_2s_ancestral", "karras", second_order=True, uses_ensd=True),
    A1111Sampler("DPM++ 2M", "sample_dpmpp_2m", "karras"),
    A1111Sampler("DPM++ SDE", "sample_dpmpp_sde", "karras", second_order=True, brownian_noise=True),
    A1111Sampler("DPM++ 2M SDE", "sample_dpmpp_2m_sde", "exponential", brownian_noise=True),
    A1111Sampler(
        "DPM++ 3M SDE", "sample_dpmpp_3m_sde", "exponential", brownian_noise=True, discard_next_to_last_sigma=True
    ),
)
"""A1111 v1.10.1 label -> how the WebUI runs that k-diffusion sampler (read from commit 82a973c0)."""
