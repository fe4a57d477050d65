"""Stand-in for modules/textual_inversion/textual_inversion.py: the embedding database the prompt chunker consults.

Only what `sd_hijack_clip.tokenize_line` uses: `Embedding` (L39-52: `vec`, `name`, `vectors`) and
`EmbeddingDatabase.register_embedding` / `find_embedding_at_position` (L111-150, L245-256). Embeddings are registered
by a test directly (no files are loaded).
"""

from __future__ import annotations

from typing import Any

import torch


class Embedding:
    """L39-52; `vectors` is set from `vec` as create_embedding_from_data does (L295-316)."""

    def __init__(self, vec: torch.Tensor, name: str, step: int | None = None) -> None:
        self.vec = vec
        self.name = name
        self.step = step
        self.vectors = int(vec.shape[0])
        self.shorthash: str | None = None


class EmbeddingDatabase:
    """L111-118 (fields), L126-150 (registration), L245-256 (lookup)."""

    def __init__(self) -> None:
        self.ids_lookup: dict[int, list[tuple[list[int], Embedding]]] = {}
        self.word_embeddings: dict[str, Embedding] = {}

    def register_embedding(self, embedding: Embedding, model: Any) -> Embedding:
        return self.register_embedding_by_name(embedding, model, embedding.name)  # L126-127

    def register_embedding_by_name(self, embedding: Embedding, model: Any, name: str) -> Embedding:
        """L129-150 (registration only): indexed by the first token id of the name, longest names first."""
        ids = model.cond_stage_model.tokenize([name])[0]
        first_id = ids[0]
        if first_id not in self.ids_lookup:
            self.ids_lookup[first_id] = []
        if name in self.word_embeddings:
            lookup = [x for x in self.ids_lookup[first_id] if x[1].name != name]
        else:
            lookup = self.ids_lookup[first_id]
        lookup += [(ids, embedding)]
        self.ids_lookup[first_id] = sorted(lookup, key=lambda x: len(x[0]), reverse=True)
        self.word_embeddings[name] = embedding
        return embedding

    def find_embedding_at_position(self, tokens: list[int], offset: int) -> tuple[Embedding | None, int | None]:
        """L245-256."""
        token = tokens[offset]
        possible_matches = self.ids_lookup.get(token, None)
        if possible_matches is None:
            return None, None
        for ids, embedding in possible_matches:
            if tokens[offset : offset + len(ids)] == ids:
                return embedding, len(ids)
        return None, None
