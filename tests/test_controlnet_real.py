"""The A&E pass beside sd-webui-controlnet's own code (scripts/hook.py, scripts/cldm.py), gated like the real-webui
suite: it runs only when AE_CONTROLNET_DIR names a checkout of Mikubill/sd-webui-controlnet (tested with 56cec5b2,
v1.1.455; skipped otherwise, with the reason). A subprocess imports ControlNet's modules against the stand-in A1111
of tests/host, hooks a random UNet of SD1.5's block layout (tiny channels, float32 as ldm's embedding) with ControlNet's real
`UnetHook.hook`, a real cldm `ControlNet` and real `ControlParams`, and checks what lib_ae/webui/controlnet.py relies
on:

- the hook is found on the UNet, and a plain ControlNet unit is graph-safe;
- `step_state` changes exactly when ControlNet's own `guidance_schedule_handler` switches a unit, and equal states
  mean the same units applied (the control network's calls);
- with no unit active, ControlNet's forward leaves the latent without gradient (A&E's error in the GPU webui), and
  `pass_scope` gives the step the UNet gives without ControlNet, bit for bit; with a unit active the forward's
  values are the same with and without the scope;
- under a (simulated) capture, `capture_scope` answers `unmark_prompt_context` from the warm-up: the same output
  bit for bit, no host read.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONTROLNET_DIR = os.environ.get("AE_CONTROLNET_DIR", "")

pytestmark = pytest.mark.skipif(
    not CONTROLNET_DIR,
    reason="AE_CONTROLNET_DIR is not set: these tests need a checkout of sd-webui-controlnet "
    "(AE_CONTROLNET_DIR=/path/to/sd-webui-controlnet)",
)


def test_the_pass_beside_controlnets_own_forward() -> None:
    if not (Path(CONTROLNET_DIR) / "scripts" / "hook.py").is_file():
        pytest.fail(f"AE_CONTROLNET_DIR={CONTROLNET_DIR} is not an sd-webui-controlnet checkout (no scripts/hook.py)")
    done = subprocess.run(
        [sys.executable, __file__, CONTROLNET_DIR], cwd=ROOT, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-8000:]
    assert "ALL CHECKS PASSED" in done.stdout


def _worker(controlnet_dir: str) -> None:  # noqa: PLR0915 - one scenario, checked step by step
    import types
    from types import SimpleNamespace
    from typing import Any

    host = ROOT / "tests" / "host"
    sys.path[:0] = [controlnet_dir, str(host / "gradio_stub"), str(host), str(ROOT), str(ROOT / "tests")]
    import torch

    import modules  # the stand-in A1111
    from modules import devices, processing, prompt_parser, shared

    # What hook.py imports from A1111 beyond the stand-in (it only names these classes, or reads the flags).
    lowvram = types.ModuleType("modules.lowvram")
    lowvram.send_everything_to_cpu = lambda: None  # type: ignore[attr-defined]
    sys.modules["modules.lowvram"] = lowvram
    modules.lowvram = lowvram  # type: ignore[attr-defined]
    processing.StableDiffusionProcessing = type("StableDiffusionProcessing", (), {})  # type: ignore[attr-defined]
    for name in ("MulticondLearnedConditioning", "ComposableScheduledPromptConditioning"):
        setattr(prompt_parser, name, type(name, (), {}))
    devices.get_device_for = lambda task: torch.device("cpu")  # type: ignore[attr-defined]
    shared.cmd_opts = SimpleNamespace(lowvram=False, medvram=False, medvram_sdxl=False)  # type: ignore[attr-defined]
    # ldm's ddpm.py needs pytorch_lightning (not a test dependency); hook.py takes only a helper of its reference and
    # revision paths from it, which these checks never run.
    ddpm = types.ModuleType("ldm.models.diffusion.ddpm")

    def extract_into_tensor(*args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("ldm's ddpm is not loaded in this test")

    ddpm.extract_into_tensor = extract_into_tensor  # type: ignore[attr-defined]
    sys.modules["ldm.models.diffusion.ddpm"] = ddpm

    from ldm.modules.diffusionmodules import util as ldm_util
    from ldm.modules.diffusionmodules.openaimodel import UNetModel
    from scripts import hook as cn_hook  # ControlNet's own
    from scripts.cldm import PlugableControlModel
    from scripts.enums import ControlModelType, HiResFixOption

    from lib_ae import AttendAndExcite, AttentionCapture, ExciteConfig, TokenSelection
    from lib_ae.webui import controlnet

    layout = dict(
        model_channels=32, attention_resolutions=[4, 2, 1], num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_heads=2,
        use_spatial_transformer=True, transformer_depth=1, context_dim=32, use_checkpoint=False, legacy=False,
    )  # SD1.5's blocks (13 control residuals), tiny channels
    torch.manual_seed(0)
    unet = UNetModel(image_size=16, in_channels=4, out_channels=4, **layout).eval()
    network = PlugableControlModel(dict(in_channels=4, hint_channels=3, use_fp16=False, **layout))
    network = network.eval()
    for module in (unet, network):
        with torch.no_grad():  # random everything, zero-initialised output convolutions included
            for parameter in module.parameters():
                parameter.normal_(0.0, 0.5 / max(1, parameter[0].numel()) ** 0.5 if parameter.dim() > 1 else 0.02)
    side = 16
    hint = torch.rand(1, 3, side * 8, side * 8, dtype=torch.float32)
    param = cn_hook.ControlParams(
        control_model=network, preprocessor={"name": "canny"}, hint_cond=hint, weight=1.0, guidance_stopped=False,
        start_guidance_percent=0.0, stop_guidance_percent=0.3, advanced_weighting=None,
        control_model_type=ControlModelType.ControlNet, hr_hint_cond=None, global_average_pooling=False,
        soft_injection=False, cfg_injection=False, hr_option=HiResFixOption.BOTH,
    )
    g = torch.Generator().manual_seed(4)
    cond = torch.randn(1, 77, 32, generator=g, dtype=torch.float32)
    scheduled = [prompt_parser.ScheduledPromptConditioning(20, cond[0])]  # one prompt's (tokens, width)
    marked = cn_hook.mark_prompt_context(scheduled, positive=True)[0].cond[None]  # as reconstruct_cond_batch stacks
    assert marked.shape[1] == 78
    latent = torch.randn(1, 4, side, side, generator=g, dtype=torch.float32)
    timestep = torch.tensor([700.0], dtype=torch.float32)
    selections = [TokenSelection.official(77, [[2], [5]])]

    def a_and_e_step(scope: bool, context: torch.Tensor) -> torch.Tensor:
        capture = AttentionCapture(unet)
        try:
            engine = AttendAndExcite(capture, ExciteConfig(thresholds={}))

            def run(z: torch.Tensor, rows: torch.Tensor) -> Any:
                if scope:
                    with controlnet.pass_scope(unet, sys.modules.get):
                        return unet(z, timestep, context=context)
                return unet(z, timestep, context=context)

            moved, _ = engine.step(latent, 0, engine.plan(10), selections, run, gradient_scale=[3.0])
            return moved
        finally:
            capture.remove()

    without_controlnet = a_and_e_step(False, cond)
    hook_torch = cn_hook.th  # ControlNet's TorchHijackForUnet
    hook = cn_hook.UnetHook(lowvram=False)
    hook.hook(unet, SimpleNamespace(is_sdxl=False), [param], SimpleNamespace(sample=lambda *a, **k: None))

    # The hook, found; a plain ControlNet unit is graph-safe.
    assert controlnet.hook_on(unet) is hook and controlnet.is_hook_forward(hook, vars(unet)["forward"])
    assert controlnet.graph_blockers(hook, unet) == []
    print("hook found, graph-safe unit")

    # step_state follows ControlNet's own schedule handler; equal states, same units applied.
    calls: list[int] = []
    network.register_forward_hook(lambda *args: calls.append(1))
    states: dict[Any, set[bool]] = {}
    previous = None
    for step in range(20):
        hook.guidance_schedule_handler(SimpleNamespace(sampling_step=step, total_sampling_steps=20))
        state = controlnet.step_state(hook)
        if previous is not None:
            assert (state != previous) == (param.guidance_stopped != stopped_before), step
        previous, stopped_before = state, param.guidance_stopped
        calls.clear()
        with torch.no_grad():
            unet(latent, timestep, context=marked)
        states.setdefault(state, set()).add(bool(calls))
    assert len(states) == 2 and all(len(applied) == 1 for applied in states.values()), states
    print("step_state follows guidance_schedule_handler:", {k[0][1]: v for k, v in states.items()})

    # No unit active: no gradient without the scope, the plain UNet's step with it.
    param.guidance_stopped = True
    try:
        a_and_e_step(False, marked)
        raise AssertionError("expected ControlNet's no_grad encoder to leave no gradient")
    except RuntimeError as error:
        assert "does not require grad" in str(error), error
    assert torch.equal(a_and_e_step(True, marked), without_controlnet)
    assert cn_hook.th is hook_torch and cn_hook.timestep_embedding is ldm_util.timestep_embedding  # restored
    print("no unit active: the scope gives the plain UNet's step bit for bit")

    # A unit active: the same forward values within the scope; a fuller gradient.
    param.guidance_stopped = False
    with torch.no_grad():
        plain_values = unet(latent, timestep, context=marked)
        with controlnet.pass_scope(unet, sys.modules.get):
            assert cn_hook.timestep_embedding is not ldm_util.timestep_embedding
            scoped_values = unet(latent, timestep, context=marked)
    assert torch.equal(plain_values, scoped_values)
    with_scope, without_scope = a_and_e_step(True, marked), a_and_e_step(False, marked)
    assert torch.isfinite(with_scope).all() and not torch.equal(with_scope, without_scope)
    print("unit active: same values in the scope, the gradient through the encoder too")

    # A simulated capture: the mark answered from the warm-up, no host read, the same output.
    reads: list[int] = []
    real_unmark = cn_hook.unmark_prompt_context

    def counted(x: torch.Tensor) -> Any:
        reads.append(1)
        return real_unmark(x)

    cn_hook.unmark_prompt_context = counted
    with torch.no_grad(), controlnet.capture_scope(hook, unet):
        warm = unet(latent, timestep, context=marked)
        assert reads == [1]
        saved = controlnet.stream_capturing
        controlnet.stream_capturing = lambda: True  # type: ignore[assignment]
        try:
            captured = unet(latent, timestep, context=marked)
        finally:
            controlnet.stream_capturing = saved  # type: ignore[assignment]
    assert reads == [1] and torch.equal(warm, captured) and torch.equal(warm, plain_values)
    assert cn_hook.unmark_prompt_context is counted
    print("capture scope: no host read while capturing, same output")
    print("ALL CHECKS PASSED")


if __name__ == "__main__":
    _worker(sys.argv[1])
