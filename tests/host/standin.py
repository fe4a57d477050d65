"""Test-side helpers for the stand-in host: the model A1111 would have loaded, loading the extension's scripts like
`scripts.load_scripts`, and building txt2img requests like the UI/API do."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from modules import processing, script_callbacks, scripts, sd_hijack, shared
from modules.sd_hijack_clip import FrozenCLIPEmbedderWithCustomWords
from support.models import SD1_LIKE, LdmDenoiserModel, TinyUnetConfig, make_unet

HOST_DIR = Path(__file__).resolve().parent
XYZ_SCRIPT = HOST_DIR / "scripts" / "xyz_grid.py"


class StandInSdModel(LdmDenoiserModel):
    """`shared.sd_model` for an SD1 checkpoint: ldm's LatentDiffusion surface used by A1111 and the extension
    (`model.diffusion_model`, `apply_model`, `alphas_cumprod`, `cond_stage_model`, `get_learned_conditioning`) and the
    flags sd_models.set_model_type sets (sd_models.py L379-398)."""

    is_sd1 = True
    is_sd2 = False
    is_sdxl = False
    is_ssd = False
    is_sd3 = False
    cond_stage_key = "txt"
    latent_channels = 4

    def __init__(self, config: TinyUnetConfig = SD1_LIKE, seed: int = 0) -> None:
        super().__init__(make_unet(config, seed=seed))
        self.cond_stage_model = FrozenCLIPEmbedderWithCustomWords(config.context_dim, seed=seed + 1)

    def get_learned_conditioning(self, texts: list[str]) -> torch.Tensor:
        return self.cond_stage_model(texts)


def load_extension(extension_dir: Path, *, with_xyz: bool = False, is_img2img: bool = False) -> scripts.ScriptRunner:
    """What the WebUI does at startup: load the scripts (extension last, like load order of scripts.py L493), register
    the settings (ui.py L262), run the before-UI callbacks (webui.py L61) and build the tab's script UI."""
    files = [(HOST_DIR, XYZ_SCRIPT)] if with_xyz else []
    files += [(extension_dir, path) for path in sorted((extension_dir / "scripts").glob("*.py"))]
    scripts.load_scripts(files)
    script_callbacks.ui_settings_callback()
    script_callbacks.before_ui_callback()
    runner = scripts.ScriptRunner()
    runner.initialize_scripts(is_img2img)
    runner.setup_ui()
    return runner


def script_args(
    runner: scripts.ScriptRunner,
    alwayson: dict[str, list[Any]] | None = None,
    selectable: tuple[str, list[Any]] | None = None,
) -> tuple[Any, ...]:
    """api.py L335-361 `init_script_args`: the UI defaults, the selectable script's args and index, then each
    alwayson script's args written over its slice (fewer values keep the remaining defaults)."""
    args = runner.default_args()
    if selectable is not None:
        title, values = selectable
        script = runner.script(title)
        assert script is not None and script in runner.selectable_scripts
        assert script.args_from is not None
        args[script.args_from : script.args_from + len(values)] = values
        args[0] = runner.selectable_scripts.index(script) + 1
    for title, values in (alwayson or {}).items():
        script = runner.script(title)
        assert script is not None and script.alwayson, f"Script '{title}' not found"
        assert script.args_from is not None and script.args_to is not None
        for i in range(min(script.args_to - script.args_from, len(values))):
            args[script.args_from + i] = values[i]
    return tuple(args)


def txt2img(
    runner: scripts.ScriptRunner | None, args: tuple[Any, ...] | None = None, **fields: Any
) -> tuple[processing.StableDiffusionProcessingTxt2Img, processing.Processed]:
    """txt2img.py `txt2img_create_processing` (L14-56) + `txt2img` (L102-108): the processing object gets the runner
    and the args, the selectable script runs if one is chosen, else process_images. Returns (p, processed)."""
    shared.state.begin(job="txt2img")  # call_queue.wrap_gradio_gpu_call L33 (UI) / api.py text2imgapi L475 (API)
    p = processing.StableDiffusionProcessingTxt2Img(**fields)
    p.scripts = runner
    p.script_args = args
    processed = runner.run(p, *args) if runner is not None and args is not None else None
    if processed is None:
        processed = processing.process_images(p)
    return p, processed


def reset_host(model: StandInSdModel | None) -> None:
    """A fresh process, in effect: new options/state, no scripts or callbacks, no embeddings, `model` loaded."""
    shared.reset()
    sd_hijack.model_hijack.embedding_db = sd_hijack.EmbeddingDatabase()
    shared.sd_model = model
    scripts.scripts_data.clear()
    script_callbacks.clear_callbacks()
