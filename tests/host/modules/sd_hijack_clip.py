"""Stand-in for modules/sd_hijack_clip.py: A1111's chunked prompt encoding, with a random embedding table instead of
the CLIP text transformer.

Token ids are real CLIP BPE ids (open_clip's SimpleTokenizer, the same vocabulary as SD1's HF CLIPTokenizer), so
subject words are located exactly as in the WebUI. Chunking follows `tokenize_line` (L81-174) for plain prompts:
75 prompt tokens per chunk, `BREAK` starts a new chunk, every chunk is `[BOS] + tokens + EOS padding + [EOS]`;
no emphasis parsing, comma back-tracking or textual inversion. Conditioning: `forward` (L199-251) encodes chunk i of
all texts together, empty chunks for texts with fewer chunks, and concatenates the chunks along the token axis.
"""

from __future__ import annotations

import re

import torch

from support.thirdparty import clip_tokenizer


class PromptChunk:
    """L10-21: 77 token ids (BOS, 75 prompt tokens, EOS), their emphasis multipliers, textual-inversion fixes."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.multipliers: list[float] = []
        self.fixes: list[object] = []


class FrozenCLIPEmbedderWithCustomWords(torch.nn.Module):
    """`cond_stage_model` of an SD1 model (sd_hijack.py L237-240 wraps ldm's FrozenCLIPEmbedder in this class)."""

    chunk_length = 75  # TextConditionalModel.__init__

    def __init__(self, context_dim: int, seed: int) -> None:
        super().__init__()
        self.tokenizer = clip_tokenizer()
        self.id_start = self.tokenizer.sot_token_id  # L342-344: BOS/EOS of the tokenizer; SD1 pads with EOS
        self.id_end = self.tokenizer.eot_token_id
        self.id_pad = self.id_end
        generator = torch.Generator().manual_seed(seed)
        vocabulary = len(self.tokenizer.encoder)
        self.token_embedding = torch.nn.Parameter(
            torch.randn(vocabulary, context_dim, generator=generator), requires_grad=False
        )
        self.position_embedding = torch.nn.Parameter(
            0.1 * torch.randn(self.chunk_length + 2, context_dim, generator=generator), requires_grad=False
        )

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """L346-349: ids without BOS/EOS."""
        return [self.tokenizer.encode(text) for text in texts]

    def empty_chunk(self) -> PromptChunk:
        """L46-52."""
        chunk = PromptChunk()
        chunk.tokens = [self.id_start] + [self.id_end] * (self.chunk_length + 1)
        chunk.multipliers = [1.0] * (self.chunk_length + 2)
        return chunk

    def _close(self, tokens: list[int]) -> PromptChunk:
        chunk = PromptChunk()
        padded = tokens + [self.id_end] * (self.chunk_length - len(tokens))
        chunk.tokens = [self.id_start] + padded + [self.id_end]
        chunk.multipliers = [1.0] * len(chunk.tokens)
        return chunk

    def tokenize_line(self, line: str) -> tuple[list[PromptChunk], int]:
        chunks: list[PromptChunk] = []
        current: list[int] = []
        token_count = 0
        for part_index, part in enumerate(re.split(r"\s*\bBREAK\b\s*", line)):  # BREAK: prompt_parser.re_break L368
            if part_index > 0:
                chunks.append(self._close(current))
                token_count += self.chunk_length
                current = []
            for token in self.tokenize([part])[0] if part else []:
                if len(current) == self.chunk_length:
                    chunks.append(self._close(current))
                    token_count += self.chunk_length
                    current = []
                current.append(token)
        if current or not chunks:
            chunks.append(self._close(current))
            token_count += len(current)
        return chunks, token_count

    def process_texts(self, texts: list[str]) -> tuple[list[list[PromptChunk]], int]:
        """L176-197."""
        batch_chunks = []
        token_count = 0
        for line in texts:
            chunks, count = self.tokenize_line(line)
            token_count = max(token_count, count)
            batch_chunks.append(chunks)
        return batch_chunks, token_count

    def forward(self, texts: list[str]) -> torch.Tensor:
        batch_chunks, _ = self.process_texts(texts)
        chunk_count = max(len(chunks) for chunks in batch_chunks)
        outputs = []
        for i in range(chunk_count):
            tokens = [chunks[i].tokens if i < len(chunks) else self.empty_chunk().tokens for chunks in batch_chunks]
            ids = torch.tensor(tokens)
            outputs.append(self.token_embedding[ids] + self.position_embedding)
        return torch.hstack(outputs)
