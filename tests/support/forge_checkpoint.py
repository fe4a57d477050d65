"""A random-weight SD1.5 checkpoint in the original (CompVis/ldm) single-file layout, made on the CPU.

Forge and Forge Neo (huggingface_guess) recognise a checkpoint as SD1.5 by its state-dict keys and shapes:
`model.diffusion_model.*` (ldm UNetModel with model_channels 320, context_dim 768, conv projections, 8 heads),
`first_stage_model.*` (ldm's KL autoencoder: Encoder, Decoder, quant convs) and
`cond_stage_model.transformer.text_model.*` (transformers' CLIPTextModel, ViT-L/14 text tower). No weights are
downloaded: the modules are built from their classes (ldm from stable-diffusion-sdkit, transformers' CLIP) on the
meta device and filled from one seeded generator, N(0, 1/fan_in) for matrices and convolutions, norm gains
1 + N(0, 0.1^2), biases N(0, 0.1^2) (tests/support/models.py `_randomize_parameters`), so that images are finite
and depend on the seed only. Full SD1.5 sizes (about 1.07e9 parameters): the detection needs the real widths.

`controlnet_state_dict` makes a random ControlNet for SD1.5 the same way, in the diffusers layout
(`controlnet_cond_embedding.*`, `controlnet_down_blocks.*`, ...), which Forge's ControlNet loader
(modules_forge/supported_controlnet.py `ControlNetPatcher.try_build_from_state_dict`) converts to its own `cldm`
layout: built from diffusers' ControlNetModel class (about 3.6e8 parameters), nothing downloaded.

Usable as a script: `python tests/support/forge_checkpoint.py OUT.safetensors [--seed N] [--dtype fp16|fp32]
[--controlnet]` (with the test venv's python: it needs stable-diffusion-sdkit's `ldm`, transformers, diffusers and
safetensors).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

SD15_UNET: dict[str, Any] = {
    "image_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 320,
    "attention_resolutions": [4, 2, 1],
    "num_res_blocks": 2,
    "channel_mult": [1, 2, 4, 4],
    "num_heads": 8,
    "use_spatial_transformer": True,
    "transformer_depth": 1,
    "context_dim": 768,
    "use_checkpoint": False,
    "legacy": False,
}
SD15_VAE: dict[str, Any] = {
    "double_z": True,
    "z_channels": 4,
    "resolution": 256,
    "in_channels": 3,
    "out_ch": 3,
    "ch": 128,
    "ch_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "attn_resolutions": [],
    "dropout": 0.0,
}
CLIP_L_TEXT: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "projection_dim": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}


class _KLAutoencoder(nn.Module):
    """ldm's AutoencoderKL without its pytorch_lightning base: the same submodule names and shapes."""

    def __init__(self) -> None:
        super().__init__()
        from ldm.modules.diffusionmodules.model import Decoder, Encoder

        self.encoder = Encoder(**SD15_VAE)
        self.decoder = Decoder(**SD15_VAE)
        self.quant_conv = nn.Conv2d(2 * SD15_VAE["z_channels"], 2 * SD15_VAE["z_channels"], 1)
        self.post_quant_conv = nn.Conv2d(SD15_VAE["z_channels"], SD15_VAE["z_channels"], 1)


def _sd15_unet() -> nn.Module:
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    return UNetModel(**SD15_UNET)


def _built(factory: Callable[..., nn.Module], seed: int, *args: object) -> nn.Module:
    """`factory(*args)` built on the meta device, then materialised on the CPU with seeded random parameters (its
    buffers zeroed: the only one that reaches the file, CLIP's position_ids, is written explicitly)."""
    from support.models import _randomize_parameters

    with torch.device("meta"):
        module = factory(*args)
    module.to_empty(device="cpu")
    with torch.no_grad():
        for buffer in module.buffers():
            buffer.zero_()
    _randomize_parameters(module, seed)
    return module


def sd15_state_dict(seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors (contiguous, `dtype`), keyed as in an original SD1.5 .safetensors file."""
    from transformers import CLIPTextConfig, CLIPTextModel

    state: dict[str, torch.Tensor] = {}

    def add(prefix: str, module: nn.Module) -> None:
        for key, value in module.state_dict().items():
            state[prefix + key] = value.detach().to(dtype if value.is_floating_point() else value.dtype).contiguous()

    add("model.diffusion_model.", _built(_sd15_unet, seed))
    add("first_stage_model.", _built(_KLAutoencoder, seed + 1))
    clip = _built(CLIPTextModel, seed + 2, CLIPTextConfig(**CLIP_L_TEXT))
    add("cond_stage_model.transformer.", clip)
    position_ids = "cond_stage_model.transformer.text_model.embeddings.position_ids"
    state[position_ids] = torch.arange(CLIP_L_TEXT["max_position_embeddings"], dtype=torch.int64)[None]
    return state


def _sd15_controlnet() -> nn.Module:
    from diffusers import ControlNetModel

    # SD1.5's widths (ControlNetModel's defaults, but for the text width and the heads of the SD1.5 UNet).
    return ControlNetModel(cross_attention_dim=SD15_UNET["context_dim"], attention_head_dim=SD15_UNET["num_heads"])


def controlnet_state_dict(seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A random ControlNet for SD1.5, keyed as a diffusers ControlNet .safetensors file."""
    module = _built(_sd15_controlnet, seed)
    return {k: v.detach().to(dtype).contiguous() for k, v in module.state_dict().items()}


def make_checkpoint(
    path: str | os.PathLike[str], seed: int = 0, dtype: torch.dtype = torch.float32, controlnet: bool = False
) -> Path:
    """Write the checkpoint (or with `controlnet`, the ControlNet) to `path` (atomically: a temporary file renamed)
    unless it exists; its path."""
    from safetensors.torch import save_file

    target = Path(path)
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    state = controlnet_state_dict(seed, dtype) if controlnet else sd15_state_dict(seed, dtype)
    kind = "controlnet-sd15" if controlnet else "sd15"
    partial = target.with_name(target.name + f".partial{os.getpid()}")
    save_file(state, str(partial), metadata={"format": "pt", "ae_random_checkpoint": f"{kind} seed={seed}"})
    partial.replace(target)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("out")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=("fp16", "fp32"), default="fp32")
    parser.add_argument("--controlnet", action="store_true", help="a ControlNet for SD1.5 instead of a checkpoint")
    args = parser.parse_args(argv)
    dtype = torch.float16 if args.dtype == "fp16" else torch.float32
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger(__name__).info("%s", make_checkpoint(args.out, args.seed, dtype, args.controlnet))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, where `support` is
    sys.exit(main())
