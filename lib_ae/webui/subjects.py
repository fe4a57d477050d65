"""The subject pipeline of `lib_ae.targeting` on A1111: its text encoder (the CLIP wrapper that cuts prompts into
77-token chunks), its prompt-editing schedule and its prompt syntax. Used by generation (sampling_pass.py) and by
the token view (token_view.py) alike, so the view shows what A&E will use."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lib_ae.targeting import SubjectFinder, TextEncoder

from . import host
from .prompt_syntax import first_step_text


class UnsupportedModel(Exception):
    """The loaded model lacks something A&E needs; the message says what."""


def text_encoder(sd_model: Any) -> TextEncoder:
    """The CLIP wrapper whose chunks make the conditioning columns. SD1/SD2: `cond_stage_model` itself. SDXL: the
    conditioner, whose `process_texts`/`tokenize` delegate to its first embedder that has them, CLIP-L
    (sd_models_xl.py `tokenize`); the token ids BOS/EOS/pad live on that embedder (sd_hijack_clip.py
    `FrozenCLIPEmbedderWithCustomWords.__init__`)."""
    if host.FORGE:
        from lib_ae.forge.model import text_encoder as forge_text_encoder

        engine = forge_text_encoder(sd_model)
        if engine is None:
            raise UnsupportedModel("this model has no text engine that cuts prompts into A1111 chunks")
        return engine
    model = sd_model.cond_stage_model
    if hasattr(model, "id_start"):
        encoder: TextEncoder = model
        return encoder
    for embedder in getattr(model, "embedders", []):
        if hasattr(embedder, "process_texts") and hasattr(embedder, "id_start"):
            found: TextEncoder = embedder
            return found
    raise UnsupportedModel("its text encoder does not cut prompts into A1111 chunks, so subjects cannot be located")


def subject_finder(encoder: TextEncoder, subjects: Sequence[str], normalize_eot: bool = False) -> SubjectFinder:
    """A `SubjectFinder` with A1111's prompt editing (`host.prompt_schedule`) and prompt syntax."""
    return SubjectFinder(encoder, tuple(subjects), host.prompt_schedule, first_step_text, normalize_eot)
