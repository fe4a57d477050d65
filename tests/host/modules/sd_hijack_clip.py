"""Stand-in for modules/sd_hijack_clip.py: A1111's chunked prompt encoding, with a random embedding table instead of
the CLIP text transformer.

Token ids are real CLIP BPE ids (open_clip's SimpleTokenizer, the same vocabulary as SD1's HF CLIPTokenizer), so
subject words are located exactly as in the WebUI. `tokenize_line` is A1111's (L81-174): emphasis parsed by
`prompt_parser.parse_prompt_attention` (unless `opts.emphasis == "None"`), each segment tokenized on its own, chunks of
75 tokens, `BREAK` starts a new chunk, the text after a comma within the last `opts.comma_padding_backtrack` tokens
moves to the next chunk, textual-inversion embeddings from `sd_hijack.model_hijack.embedding_db` become placeholder
ids 0 with a `PromptChunkFix`; every chunk is `[BOS] + tokens + EOS padding + [EOS]`. Conditioning: `forward`
(L199-251) encodes chunk i of all texts together, empty chunks for texts with fewer chunks, splices embedding vectors
at offset + 1 (sd_hijack.EmbeddingsWithFixes.forward L347-366), applies the "Original" emphasis (sd_emphasis.py
L36-46: z times the multipliers, mean restored) and concatenates the chunks along the token axis.
"""

from __future__ import annotations

from collections import namedtuple

import torch

from modules import prompt_parser, sd_hijack, shared
from support.thirdparty import clip_tokenizer


class PromptChunk:
    """L10-21: 77 token ids (BOS, 75 prompt tokens, EOS), their emphasis multipliers, textual-inversion fixes."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.multipliers: list[float] = []
        self.fixes: list[PromptChunkFix] = []


PromptChunkFix = namedtuple("PromptChunkFix", ["offset", "embedding"])
"""L24: the embedding's vectors go at `offset` (+1 for the BOS) of the chunk."""


class FrozenCLIPEmbedderWithCustomWords(torch.nn.Module):
    """`cond_stage_model` of an SD1 model (sd_hijack.py L237-240 wraps ldm's FrozenCLIPEmbedder in this class)."""

    chunk_length = 75  # TextConditionalModel.__init__

    def __init__(self, context_dim: int, seed: int) -> None:
        super().__init__()
        self.tokenizer = clip_tokenizer()
        self.id_start = self.tokenizer.sot_token_id  # L342-344: BOS/EOS of the tokenizer; SD1 pads with EOS
        self.id_end = self.tokenizer.eot_token_id
        self.id_pad = self.id_end
        self.comma_token = self.tokenizer.encoder.get(",</w>", None)  # L323
        self.hijack = sd_hijack.model_hijack  # TextConditionalModel.__init__ L34
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

    def tokenize_line(self, line: str) -> tuple[list[PromptChunk], int]:
        """L81-174, verbatim."""
        opts = shared.opts
        if opts.emphasis != "None":
            parsed = prompt_parser.parse_prompt_attention(line)
        else:
            parsed = [[line, 1.0]]

        tokenized = self.tokenize([text for text, _ in parsed])

        chunks: list[PromptChunk] = []
        chunk = PromptChunk()
        token_count = 0
        last_comma = -1

        def next_chunk(is_last: bool = False) -> None:
            nonlocal token_count
            nonlocal last_comma
            nonlocal chunk

            if is_last:
                token_count += len(chunk.tokens)
            else:
                token_count += self.chunk_length

            to_add = self.chunk_length - len(chunk.tokens)
            if to_add > 0:
                chunk.tokens += [self.id_end] * to_add
                chunk.multipliers += [1.0] * to_add

            chunk.tokens = [self.id_start] + chunk.tokens + [self.id_end]
            chunk.multipliers = [1.0] + chunk.multipliers + [1.0]

            last_comma = -1
            chunks.append(chunk)
            chunk = PromptChunk()

        for tokens, (text, weight) in zip(tokenized, parsed):
            if text == "BREAK" and weight == -1:
                next_chunk()
                continue

            position = 0
            while position < len(tokens):
                token = tokens[position]

                if token == self.comma_token:
                    last_comma = len(chunk.tokens)
                elif (
                    opts.comma_padding_backtrack != 0
                    and len(chunk.tokens) == self.chunk_length
                    and last_comma != -1
                    and len(chunk.tokens) - last_comma <= opts.comma_padding_backtrack
                ):
                    break_location = last_comma + 1

                    reloc_tokens = chunk.tokens[break_location:]
                    reloc_mults = chunk.multipliers[break_location:]

                    chunk.tokens = chunk.tokens[:break_location]
                    chunk.multipliers = chunk.multipliers[:break_location]

                    next_chunk()
                    chunk.tokens = reloc_tokens
                    chunk.multipliers = reloc_mults

                if len(chunk.tokens) == self.chunk_length:
                    next_chunk()

                embedding, embedding_length_in_tokens = self.hijack.embedding_db.find_embedding_at_position(
                    tokens, position
                )
                if embedding is None:
                    chunk.tokens.append(token)
                    chunk.multipliers.append(weight)
                    position += 1
                    continue

                emb_len = int(embedding.vectors)
                if len(chunk.tokens) + emb_len > self.chunk_length:
                    next_chunk()

                chunk.fixes.append(PromptChunkFix(len(chunk.tokens), embedding))

                chunk.tokens += [0] * emb_len
                chunk.multipliers += [weight] * emb_len
                assert embedding_length_in_tokens is not None
                position += embedding_length_in_tokens

        if chunk.tokens or not chunks:
            next_chunk(is_last=True)

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
            batch_chunk = [chunks[i] if i < len(chunks) else self.empty_chunk() for chunks in batch_chunks]
            ids = torch.tensor([chunk.tokens for chunk in batch_chunk])
            z = self.token_embedding[ids] + self.position_embedding
            for row, chunk in enumerate(batch_chunk):  # EmbeddingsWithFixes.forward L347-366
                for offset, embedding in chunk.fixes:
                    emb_len = min(z.shape[1] - offset - 1, embedding.vec.shape[0])
                    z[row, offset + 1 : offset + 1 + emb_len] = embedding.vec[:emb_len].to(z.dtype)
            if shared.opts.emphasis in ("Original", "No norm"):  # sd_emphasis.py L36-55
                multipliers = torch.tensor([chunk.multipliers for chunk in batch_chunk], dtype=z.dtype)
                original_mean = z.mean()
                z = z * multipliers[..., None]
                if shared.opts.emphasis == "Original":
                    z = z * (original_mean / z.mean())
            outputs.append(z)
        return torch.hstack(outputs)
