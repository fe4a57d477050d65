"""Stand-in for modules/sd_hijack.py: only `model_hijack.embedding_db` (L168-182, L393), which the prompt chunker
(sd_hijack_clip.tokenize_line L156) asks for textual-inversion embeddings."""

from __future__ import annotations

from typing import Any

from modules.textual_inversion.textual_inversion import EmbeddingDatabase

__all__ = ["EmbeddingDatabase", "StableDiffusionModelHijack", "model_hijack"]


class StableDiffusionModelHijack:
    """L168-: the fields used here."""

    def __init__(self) -> None:
        self.embedding_db = EmbeddingDatabase()  # L181
        self.extra_generation_params: dict[str, object] = {}


model_hijack = StableDiffusionModelHijack()
"""L393."""

current_optimizer: Any = None
"""L39: the active attention optimisation (an SdOptimization with a `name`), set by apply_optimizations (L60-97)."""
