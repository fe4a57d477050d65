"""Stand-in for modules/processing.py: a txt2img processing object and `process_images`, calling the script hooks in
A1111's order around a real sampler (no VAE: the "images" are the final latents)."""

from __future__ import annotations

import logging
from typing import Any

import torch
from PIL import Image

from modules import infotext_utils, prompt_parser, sd_samplers, shared
from modules.scripts import PostprocessImageArgs, PostSampleArgs, ScriptRunner

logger = logging.getLogger("host.processing")

opt_C = 4  # L39: latent channels
opt_f = 8  # L40: latent downscale


class StableDiffusionProcessingTxt2Img:
    """The fields of StableDiffusionProcessing (L137-252) and Txt2Img (L1166-) the extension or the driver read."""

    def __init__(
        self,
        *,
        prompt: str | list[str],
        negative_prompt: str = "",
        seed: int = 1,
        steps: int = 6,
        cfg_scale: float = 7.0,
        width: int = 128,
        height: int = 128,
        batch_size: int = 1,
        n_iter: int = 1,
        sampler_name: str = "Euler",
        scripts: ScriptRunner | None = None,
        script_args: Any = None,
        is_api: bool = False,
    ) -> None:
        self.prompt = prompt
        self.negative_prompt = negative_prompt
        self.seed = seed
        self.steps = steps
        self.cfg_scale = cfg_scale
        self.width = width
        self.height = height
        self.batch_size = batch_size
        self.n_iter = n_iter
        self.sampler_name = sampler_name
        self.is_api = is_api
        self.extra_generation_params: dict[str, Any] = {}  # L239
        self.is_hr_pass = False  # L196
        self.outpath_samples = "outputs/txt2img-images"  # txt2img.py L20 (opts.outdir_txt2img_samples)
        self.do_not_save_samples = False  # L161
        self.batch_index = 0  # L1032, set per image
        self.enable_hr = False
        self.hr_second_pass_steps = 0
        self.sampler: Any = None
        self.scripts_value: ScriptRunner | None = None
        self.script_args_value: Any = None
        self.scripts_setup_complete = False
        self.c: Any = None
        self.uc: Any = None
        self.all_prompts: list[str] = []
        self.all_negative_prompts: list[str] = []
        self.all_seeds: list[int] = []
        self.prompts: list[str] = []
        self.negative_prompts: list[str] = []
        self.hr_prompts: list[str] = []
        self.seeds: list[int] = []
        self.iteration = 0
        self.scripts = scripts
        self.script_args = script_args

    @property
    def sd_model(self) -> Any:
        return shared.sd_model  # L261-263

    @property
    def scripts(self) -> ScriptRunner | None:
        return self.scripts_value

    @scripts.setter
    def scripts(self, value: ScriptRunner | None) -> None:
        self.scripts_value = value  # L274-278: setup() runs once both scripts and args are set
        if self.scripts_value and self.script_args_value and not self.scripts_setup_complete:
            self.setup_scripts()

    @property
    def script_args(self) -> Any:
        return self.script_args_value

    @script_args.setter
    def script_args(self, value: Any) -> None:
        self.script_args_value = value  # L284-289
        if self.scripts_value and self.script_args_value and not self.scripts_setup_complete:
            self.setup_scripts()

    def setup_scripts(self) -> None:
        self.scripts_setup_complete = True  # L291-294
        assert self.scripts is not None
        self.scripts.setup_scrips(self, is_ui=not self.is_api)

    def setup_prompts(self) -> None:
        """L418-437 without styles."""
        if isinstance(self.prompt, list):
            self.all_prompts = self.prompt
        else:
            self.all_prompts = self.batch_size * self.n_iter * [self.prompt]
        self.all_negative_prompts = [self.negative_prompt] * len(self.all_prompts)

    def setup_conds(self) -> None:
        """L493-503: conds for `total_steps` model calls (x2 for second-order samplers)."""
        config = sd_samplers.find_sampler_config(self.sampler_name)
        total_steps = config.total_steps(self.steps) if config else self.steps
        self.step_multiplier = total_steps // self.steps
        self.firstpass_steps = total_steps
        prompts = prompt_parser.SdConditioning(self.prompts, width=self.width, height=self.height)
        negative = prompt_parser.SdConditioning(
            self.negative_prompts, width=self.width, height=self.height, is_negative_prompt=True
        )
        use_old = shared.opts.use_old_scheduling
        self.uc = prompt_parser.get_learned_conditioning(shared.sd_model, negative, total_steps, None, use_old)
        self.c = prompt_parser.get_multicond_learned_conditioning(shared.sd_model, prompts, total_steps, None, use_old)

    def init(self, all_prompts: list[str], all_seeds: list[int], all_subseeds: list[int]) -> None:
        """Txt2Img.init (L1252-1305): nothing needed without hires fix."""

    def sample(self, conditioning: Any, unconditional_conditioning: Any, seeds: list[int]) -> torch.Tensor:
        """Txt2Img.sample L1307-1350 (first pass only): a new sampler, the seeded noise, the hook, the sampler."""
        self.sampler = sd_samplers.create_sampler(self.sampler_name, self.sd_model)
        x = self.rng_next()
        if self.scripts is not None:
            self.scripts.process_before_every_sampling(
                p=self, x=x, noise=x, c=conditioning, uc=unconditional_conditioning
            )
        image_conditioning = x.new_zeros(x.shape[0], 5, 1, 1)  # L100-129 txt2img_image_conditioning, plain model
        return self.sampler.sample(
            self, x, conditioning, unconditional_conditioning, image_conditioning=image_conditioning
        )

    def rng_next(self) -> torch.Tensor:
        """rng.ImageRNG.next (rng.py L100-130, CPU source): one N(0, 1) latent per image from its own seed."""
        shape = (getattr(shared.sd_model, "latent_channels", opt_C), self.height // opt_f, self.width // opt_f)
        return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed)) for seed in self.seeds])


StableDiffusionProcessing = StableDiffusionProcessingTxt2Img


class Processed:
    """L516-: what process_images returns (here the final latents instead of PIL images)."""

    def __init__(self, p: StableDiffusionProcessingTxt2Img, images: list[torch.Tensor], infotexts: list[str]) -> None:
        self.images = images
        self.infotexts = infotexts
        self.info = infotexts[0] if infotexts else ""
        self.index_of_first_image = 0  # L543: 1 when a grid leads the images (the stand-in makes none)
        self.extra_generation_params = p.extra_generation_params


def create_infotext(p: StableDiffusionProcessingTxt2Img, index: int) -> str:
    """L705-816, a subset of the built-in parameters. `extra_generation_params` values that are lists are indexed by
    the image's position in the batch, callables are called (L802-810); keys equal to their value are written bare."""
    generation_params: dict[str, Any] = {
        "Steps": p.steps,
        "Sampler": p.sampler_name,
        "CFG scale": p.cfg_scale,
        "Seed": p.seeds[index],
        "Size": f"{p.width}x{p.height}",
        **p.extra_generation_params,
    }
    for key, value in list(generation_params.items()):
        if isinstance(value, list):
            generation_params[key] = value[index]
        elif callable(value):
            generation_params[key] = value(p=p, index=index)
    text = ", ".join(
        k if k == v else f"{k}: {infotext_utils.quote(v)}" for k, v in generation_params.items() if v is not None
    )
    negative = f"\nNegative prompt: {p.negative_prompts[index]}" if p.negative_prompts[index] else ""
    return f"{p.prompts[index]}{negative}\n{text}".strip()


def latent_preview(latent: torch.Tensor) -> Image.Image:
    """What the VAE decode + conversion to PIL (L995-1047) hands postprocess_image: an RGB picture of the image's size,
    here the latent's first three channels upsampled 8x (no VAE in the stand-in)."""
    rgb = (latent[:3].float().clamp(-3, 3) / 6 + 0.5).mul(255).byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(rgb, "RGB").resize((latent.shape[-1] * 8, latent.shape[-2] * 8), Image.NEAREST)


def process_images(p: StableDiffusionProcessingTxt2Img) -> Processed:
    """L819-860 (before_process, then the inner loop) and L863-1150 (the hooks around each batch)."""
    if p.scripts is not None:
        p.scripts.before_process(p)
    p.setup_prompts()
    p.all_seeds = [int(p.seed) + x for x in range(len(p.all_prompts))]  # L904
    if p.scripts is not None:
        p.scripts.process(p)  # L914-915: after prompts and seeds, before no_grad and p.init
    images: list[torch.Tensor] = []
    infotexts: list[str] = []
    with torch.no_grad():  # L919
        p.init(p.all_prompts, p.all_seeds, p.all_seeds)
        for n in range(p.n_iter):  # L932-
            p.iteration = n
            if shared.state.skipped:
                shared.state.skipped = False
            if shared.state.interrupted or shared.state.stopping_generation:
                break
            p.prompts = p.all_prompts[n * p.batch_size : (n + 1) * p.batch_size]
            p.negative_prompts = p.all_negative_prompts[n * p.batch_size : (n + 1) * p.batch_size]
            p.seeds = p.all_seeds[n * p.batch_size : (n + 1) * p.batch_size]
            if p.scripts is not None:
                p.scripts.before_process_batch(p, batch_number=n, prompts=p.prompts, seeds=p.seeds, subseeds=p.seeds)
            if p.scripts is not None:
                p.scripts.process_batch(p, batch_number=n, prompts=p.prompts, seeds=p.seeds, subseeds=p.seeds)
            p.setup_conds()  # L966
            samples = p.sample(p.c, p.uc, p.seeds)  # L988
            if p.scripts is not None:
                ps = PostSampleArgs(samples)  # L990-993
                p.scripts.post_sample(p, ps)
                samples = ps.samples
            if p.scripts is not None:
                p.scripts.postprocess_batch(p, samples, batch_number=n)  # L1016-1017
            for i, sample in enumerate(samples):
                p.batch_index = i  # L1032
                if p.scripts is not None:  # L1049-1051, with the decoded image (here: the latent drawn as a picture)
                    p.scripts.postprocess_image(p, PostprocessImageArgs(latent_preview(sample)))
                images.append(sample.clone())
                infotexts.append(create_infotext(p, i))  # L1087
    res = Processed(p, images, infotexts)
    if p.scripts is not None:
        p.scripts.postprocess(p, res)  # L1147-1148
    return res
