"""The extension in a Forge-shaped host: the same script and stand-in WebUI as tests/test_extension.py, with the model
Forge loads instead of ldm's (`forge_objects.unet` -> `KModel` -> the stand-in of Forge's UNet from
tests/support/forge_standin.py, weights made under inference mode), `lib_ae.webui.host.FORGE` on, and every generation
run inside `torch.inference_mode()`, as Forge's `process_images` runs it.

The reference is the A1111 path on the ldm UNet with the same weights: A&E must change the latent the same way through
Forge's UNet call (`lib_ae.forge.model.ForgeUnet`) as through A1111's.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from support.forge_standin import make_forge_standin
from support.models import SD1_LIKE
from support.thirdparty import import_k_diffusion
from support.webui_host import DEFAULT_FIELDS, WebUI, ae_keys
from torch import nn

_, k_external = import_k_diffusion()


class _EpsModel(nn.Module):
    """What k-diffusion's CompVisDenoiser calls: `apply_model(x, t, **kwargs)` -> eps, here Forge's UNet."""

    def __init__(self, unet: nn.Module, alphas_cumprod: torch.Tensor) -> None:
        super().__init__()
        self.unet = unet
        self.alphas_cumprod = alphas_cumprod

    def apply_model(self, x: torch.Tensor, t: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        out: torch.Tensor = self.unet(x, t, **kwargs)
        return out


class StandInKModel(nn.Module):
    """backend.modules.k_model.KModel: `diffusion_model`, and `apply_model(x, sigma, c_crossattn=, control=,
    transformer_options=, **kwargs)` -> the denoised latent. Its sigma -> timestep map is the sampler's (k-diffusion's
    CompVisDenoiser), so that the pass and A1111's stand-in see the same timesteps."""

    def __init__(self, unet: nn.Module, alphas_cumprod: torch.Tensor) -> None:
        super().__init__()
        self.diffusion_model = unet
        self.denoiser = k_external.CompVisDenoiser(_EpsModel(unet, alphas_cumprod))
        self.calls: list[dict[str, Any]] = []

    def apply_model(self, x: torch.Tensor, sigma: torch.Tensor, c_concat: torch.Tensor | None = None,
                    c_crossattn: torch.Tensor | None = None, control: Any = None,
                    transformer_options: dict[str, Any] | None = None, **kwargs: Any) -> torch.Tensor:
        self.calls.append({"rows": x.shape[0], "options": dict(transformer_options or {}), "control": control})
        out: torch.Tensor = self.denoiser(x, sigma, context=c_crossattn, control=control,
                                          transformer_options=transformer_options or {})
        return out


class StandInPatcher:
    """backend.patcher.unet.UnetPatcher: the fields the adapter reads."""

    def __init__(self, model: StandInKModel) -> None:
        self.model = model
        self.model_options: dict[str, Any] = {"transformer_options": {}}
        self.controlnet_linked_list: Any = None


class ForgeStandInSdModel(nn.Module):
    """A Forge `StableDiffusion` engine for the stand-in host: no `model` attribute (A1111's path to the UNet does not
    exist in Forge), `forge_objects.unet`, `text_processing_engine`; `apply_model` serves the stand-in sampler's plain
    CFG calls through the same Forge UNet."""

    is_sd1 = True
    is_sd2 = False
    is_sdxl = False
    is_ssd = False
    is_sd3 = False
    is_inpaint = False
    cond_stage_key = "txt"
    latent_channels = 4
    parameterization = "eps"

    def __init__(self, a1111_model: Any) -> None:
        super().__init__()
        dtype = next(a1111_model.model.diffusion_model.parameters()).dtype
        self.unet = make_forge_standin(SD1_LIKE, a1111_model.model.diffusion_model.state_dict(), dtype=dtype)
        self.alphas_cumprod: torch.Tensor
        self.register_buffer("alphas_cumprod", a1111_model.alphas_cumprod.clone())
        self.cond_stage_model = a1111_model.cond_stage_model
        self.text_processing_engine = a1111_model.cond_stage_model
        self.forge_objects = SimpleNamespace(unet=StandInPatcher(StandInKModel(self.unet, self.alphas_cumprod)))

    def get_learned_conditioning(self, texts: list[str]) -> torch.Tensor:
        out: torch.Tensor = self.cond_stage_model(texts)
        return out

    def apply_model(self, x: torch.Tensor, t: torch.Tensor, cond: dict[str, Any]) -> torch.Tensor:
        out: torch.Tensor = self.unet(x, t, context=cond["c_crossattn"][0])
        return out


class ForgeWebUI(WebUI):
    """Every generation inside inference mode, as Forge's process_images."""

    def run(self, args: tuple[Any, ...] | None = None, **fields: Any) -> tuple[Any, Any]:
        with torch.inference_mode():
            return super().run(args, **fields)


@pytest.fixture
def forge(host: SimpleNamespace, monkeypatch: pytest.MonkeyPatch) -> Iterator[ForgeWebUI]:
    model = ForgeStandInSdModel(host.model)
    forge_host = SimpleNamespace(**{**vars(host), "model": model})
    ui = ForgeWebUI(forge_host)
    monkeypatch.setattr(importlib.import_module("lib_ae.webui.host"), "FORGE", True)
    try:
        yield ui
    finally:
        ui.unload()


def images(processed: Any) -> torch.Tensor:
    return torch.stack([image.clone() for image in processed.images])


@pytest.mark.parametrize("sampler", ["Euler", "DDIM"])
def test_forge_pass_changes_the_latent_as_a1111s_does(host: SimpleNamespace, forge: ForgeWebUI,
                                                      monkeypatch: pytest.MonkeyPatch, sampler: str) -> None:
    """k-diffusion's sigma space (Euler) and the VP latent with timesteps (DDIM, mapped as Forge's denoiser maps it)."""
    request = {"enabled": True, "subjects": "cat, dog"}
    _, plain = forge.run(forge.args(enabled=False), sampler_name=sampler)
    _, processed = forge.run(forge.args(**request), sampler_name=sampler)
    keys = ae_keys(processed.infotexts[0], forge.host)
    assert "AE error" not in keys, keys
    assert "AE trace" in keys
    forge_images = images(processed)
    assert not torch.equal(forge_images, images(plain))
    # The sampler's latent is an inference tensor: the update was written into it, not into a copy the sampler dropped.
    assert forge.host.model.forge_objects.unet.model.calls, "the pass never called KModel.apply_model"
    with monkeypatch.context() as m:
        m.setattr(importlib.import_module("lib_ae.webui.host"), "FORGE", False)
        a1111_plain, reference = a1111_runs(host, request, sampler)
    keys = ae_keys(reference.infotexts[0], host)
    assert "AE error" not in keys, keys
    # Same weights, same steps: the plain images agree to float32 rounding (ldm's UNet vs Forge's), and A&E moves both
    # alike, by far more than that.
    torch.testing.assert_close(images(plain), a1111_plain, rtol=0, atol=1e-3)
    torch.testing.assert_close(forge_images, images(reference), rtol=0, atol=1e-3)
    moved = (images(reference) - a1111_plain).abs().max()
    assert moved > 0.1, moved


def a1111_runs(host: SimpleNamespace, request: dict[str, Any], sampler: str) -> tuple[torch.Tensor, Any]:
    """The plain image and the A&E run of `request` in the A1111 stand-in, on the ldm UNet."""
    ui = WebUI(host)
    try:
        _, plain = ui.run(ui.args(enabled=False), sampler_name=sampler)
        _, processed = ui.run(ui.args(**request), sampler_name=sampler)
    finally:
        ui.unload()
    return images(plain), processed


def test_forge_disabled_is_bit_identical(forge: ForgeWebUI) -> None:
    with torch.inference_mode():
        _, absent = forge.host.standin.txt2img(None, None, **DEFAULT_FIELDS)
    _, disabled = forge.run(forge.args(enabled=False))
    assert torch.equal(images(disabled), images(absent))
    assert "AE" not in ae_keys(disabled.infotexts[0], forge.host)


def test_forge_run_is_reproducible(forge: ForgeWebUI) -> None:
    args = forge.args(enabled=True, subjects="cat, dog")
    _, first = forge.run(args)
    _, second = forge.run(args)
    assert torch.equal(images(first), images(second))


def test_other_model_families_are_refused_and_the_image_is_made(forge: ForgeWebUI) -> None:
    model = forge.host.model
    patcher = model.forge_objects.unet
    _, plain = forge.run(forge.args(enabled=False))
    original = patcher.model.diffusion_model
    patcher.model.diffusion_model = nn.Linear(2, 2)  # a transformer family's model: not Forge's UNet class
    try:
        _, processed = forge.run(forge.args(enabled=True, subjects="cat, dog"))
    finally:
        patcher.model.diffusion_model = original
    error = ae_keys(processed.infotexts[0], forge.host).get("AE error", "")
    assert "ForgeStandInSdModel models are not supported" in error, error
    assert torch.equal(images(processed), images(plain))


def test_attention_replacements_are_refused(forge: ForgeWebUI) -> None:
    patcher = forge.host.model.forge_objects.unet
    patcher.model_options["transformer_options"] = {"patches_replace": {"attn2": {("input", 1): lambda *a: a[0]}}}
    try:
        _, processed = forge.run(forge.args(enabled=True, subjects="cat, dog"))
    finally:
        patcher.model_options["transformer_options"] = {}
    error = ae_keys(processed.infotexts[0], forge.host).get("AE error", "")
    assert "replaces attention layers" in error, error


def test_forge_refuses_samplers_without_regular_steps() -> None:
    from lib_ae.forge.model import UNSUPPORTED_SAMPLERS, ForgeUnet
    from lib_ae.pass_memory import PassMemory

    assert "Kohaku LoNyu Yog" in UNSUPPORTED_SAMPLERS
    unet = make_forge_standin(SD1_LIKE, None, dtype=torch.float32)
    patcher = SimpleNamespace(model=SimpleNamespace(diffusion_model=unet), model_options={})
    p = SimpleNamespace(sd_model=SimpleNamespace(forge_objects=SimpleNamespace(unet=patcher)))
    host = ForgeUnet(PassMemory(), graphs_asked=False)
    assert host.unsupported_reason(p, "Euler") is None
    reason = host.unsupported_reason(p, "Kohaku LoNyu Yog")
    assert reason is not None and "Kohaku LoNyu Yog is not supported" in reason



class StandInControlNet:
    """backend.patcher.controlnet.ControlNet, the end of the patcher's chain: `get_control(x, sigma, cond, batched)`
    gives residuals for the UNet's middle block (a constant times `x`'s mean, so that they depend on the rows asked
    for), and records how it was called."""

    previous_controlnet = None

    def __init__(self, middle_shape: torch.Size) -> None:
        self.middle_shape = middle_shape
        self.transformer_options: dict[str, Any] | None = None
        self.calls: list[tuple[int, int, bool, list[int]]] = []

    def get_control(self, x: torch.Tensor, sigma: torch.Tensor, cond: dict[str, Any], batched: int) -> Any:
        assert self.transformer_options is not None
        marks = list(self.transformer_options["cond_or_uncond"])
        self.calls.append((x.shape[0], batched, torch.is_grad_enabled(), marks))
        shape = (x.shape[0], *self.middle_shape[1:])
        return {"middle": [torch.full(shape, 0.5, dtype=x.dtype) * x.mean()]}


def test_forge_controlnet_residuals_enter_the_pass(forge: ForgeWebUI) -> None:
    unet = forge.host.model.unet
    shapes: list[torch.Size] = []
    handle = unet.middle_block.register_forward_hook(lambda module, args, out: shapes.append(out.shape))
    try:
        _, without = forge.run(forge.args(enabled=True, subjects="cat, dog"))
    finally:
        handle.remove()
    control = StandInControlNet(shapes[0])
    patcher = forge.host.model.forge_objects.unet
    patcher.controlnet_linked_list = control
    try:
        _, processed = forge.run(forge.args(enabled=True, subjects="cat, dog"))
    finally:
        patcher.controlnet_linked_list = None
    assert "AE error" not in ae_keys(processed.infotexts[0], forge.host)
    # Only the pass reads this chain (the stand-in's plain CFG calls do not): the residuals changed its updates.
    assert not torch.equal(images(processed), images(without))
    assert control.calls and all(call == (1, 1, False, [0]) for call in control.calls), control.calls


def test_token_view_reads_forges_text_engine(forge: ForgeWebUI) -> None:
    """The token view finds subjects with the same engine generation uses: Forge's `text_processing_engine` (here the
    stand-in CLIP wrapper under that name; `cond_stage_model` is made unusable to prove it is not read)."""
    from test_webui_adapter import legend, token_view

    model = forge.host.model
    saved = model.cond_stage_model
    model.cond_stage_model = None  # type: ignore[assignment]
    try:
        html = token_view(forge, "a cat and a (red car:1.3) <lora:thing:0.8>", "cat, red car, zebra")
    finally:
        model.cond_stage_model = saved
    assert legend(html) == ["cat: column 2", "red car: columns 5-6", "zebra: not found"]


# -- CUDA graphs in Forge (what can be checked without a GPU) ------------------------------------------------------


def test_the_device_timestep_table_gives_forges_bits_and_copies_once() -> None:
    import support.forge_standin as forge_module

    from lib_ae.forge.model import device_timestep_table

    namespace = vars(forge_module)
    original = namespace["timestep_embedding"]
    timesteps = torch.tensor([999.0, 501.5, 3.0])
    expected = original(timesteps, 320)
    with device_timestep_table(namespace):
        swapped = namespace["timestep_embedding"]
        assert swapped is not original
        first = swapped(timesteps, 320)
        copies: list[torch.Tensor] = []
        real_to = torch.Tensor.to
        with pytest.MonkeyPatch.context() as m:
            m.setattr(torch.Tensor, "to", lambda self, *a, **k: copies.append(self) or real_to(self, *a, **k))
            second = swapped(timesteps, 320)
        odd = swapped(timesteps, 7)
    assert namespace["timestep_embedding"] is original
    assert torch.equal(first, expected) and torch.equal(second, expected)
    assert copies == []  # the table stays where it was put: no host-to-device copy at later calls
    assert odd.shape == (3, 7) and torch.equal(odd[:, -1], torch.zeros(3))


def test_graph_blockers_name_what_decides_per_call() -> None:
    from lib_ae.forge.model import graph_blockers

    unet = make_forge_standin(SD1_LIKE, None, dtype=torch.float32)
    patcher = SimpleNamespace(model_options={"transformer_options": {}}, controlnet_linked_list=None)
    assert graph_blockers(patcher, unet) == []
    patcher.model_options = {"transformer_options": {"patches": {"attn2_patch": [print]}},
                             "model_function_wrapper": print}
    patcher.controlnet_linked_list = object()
    unet.input_blocks[0][0].parameters_manual_cast = True  # type: ignore[index,union-attr]
    reasons = " | ".join(graph_blockers(patcher, unet))
    for expected in ("(patches)", "model_function_wrapper", "ControlNet", "cast or patched at every call"):
        assert expected in reasons, reasons


def test_graph_replay_is_asked_for_only_where_switched_on(monkeypatch: pytest.MonkeyPatch) -> None:
    from lib_ae.forge import model as forge_model
    from lib_ae.pass_memory import PassMemory

    p = SimpleNamespace()
    assert forge_model.ForgeUnet(PassMemory(), graphs_asked=False).cuda_graphs(p) == (False, None)
    assert forge_model.GRAPH_REPLAY  # on since the GPU run (tests/forge-gpu-h200.json) showed graph == eager
    assert forge_model.ForgeUnet(PassMemory(), graphs_asked=True).cuda_graphs(p) == (True, None)
    monkeypatch.setattr(forge_model, "GRAPH_REPLAY", False)
    assert forge_model.ForgeUnet(PassMemory(), graphs_asked=True).cuda_graphs(p) == (False, forge_model.EAGER_REASON)


def test_the_graph_guard_accepts_the_pass_own_forwards_and_nothing_foreign() -> None:
    from lib_ae import AttentionCapture
    from lib_ae.comfy_unet import differentiable_unet
    from lib_ae.forge.model import ForgeUnet
    from lib_ae.pass_memory import PassMemory

    unet = make_forge_standin(SD1_LIKE, None, dtype=torch.float32)
    capture = AttentionCapture(unet)
    patcher = SimpleNamespace(model_options={"transformer_options": {}}, controlnet_linked_list=None)
    p = SimpleNamespace(sd_model=SimpleNamespace(forge_objects=SimpleNamespace(unet=patcher)))
    try:
        conditions = ForgeUnet(PassMemory(), graphs_asked=True).graph_conditions(capture, p)
        with differentiable_unet(unet):  # the guard is asked inside the pass, with its instance forwards set
            assert conditions.guard() is None
            handle = unet.middle_block.register_forward_hook(lambda *args: None)
            try:
                assert "forward hook" in " ".join(conditions.guard() or [])
            finally:
                handle.remove()
    finally:
        capture.remove()
