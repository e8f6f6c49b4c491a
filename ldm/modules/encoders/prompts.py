"""Prompts as AUTOMATIC1111 encodes them for SD2's OpenCLIP text encoder: weighted runs (see
:mod:`ldm.modules.encoders.prompt_parser`), any length, and textual-inversion embeddings.

* Chunks. The tokens go in chunks of 75, each encoded on its own as ``<start> tokens <end>``
  padded to 77, and the chunks' outputs are concatenated along the sequence (77 * n positions for
  the UNet's cross-attention, which takes any length). ``BREAK`` ends a chunk early; a chunk that
  fills up within 20 tokens of a comma moves the words after the comma to the next chunk (A1111's
  default "comma padding backtrack"). Prompts of a batch with fewer chunks get empty-prompt chunks.
* Weights: A1111's rule. The encoder's output at each token is multiplied by the token's weight,
  then the chunk's output is rescaled so that its mean over positions and channels equals the
  unweighted output's mean. (ComfyUI instead interpolates each token from the empty prompt's
  output towards its own.) Start, end and padding weigh 1.
  The means are taken per prompt and chunk, in float32; A1111 takes them over the whole batch.
* Embeddings: wherever the tokens of an embedding's name appear, its vectors take the place of
  those tokens' embeddings (before the positional embedding), as A1111 does; the tokenizer is not
  changed.

A prompt without syntax of at most 75 tokens and no embedding gives the token ids of the original
``FrozenOpenCLIPEmbedder.tokenize`` and, through the same calls, exactly its output.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ldm.modules.encoders.embeddings import Embedding, EmbeddingError
from ldm.modules.encoders.modules import FrozenOpenCLIPEmbedder
from ldm.modules.encoders.prompt_parser import Run, parse_prompt

logger = logging.getLogger(__name__)

CHUNK_TOKENS = 75  # a chunk's tokens besides <start> and <end>
COMMA_BACKTRACK = 20  # A1111's default "prompt word wrap length limit"
PAD_ID = 0  # what SD2's tokenizer pads with ("!"), after the end token
Parse = Callable[[str], list[list[Run]]]


def literal_prompt(text: str) -> list[list[Run]]:
    """The prompt as plain text: brackets and BREAK are words, every token weighs 1."""
    return [[(text, 1.0)]]


PROMPT_SYNTAXES: dict[str, Parse] = {"a1111": parse_prompt, "none": literal_prompt}
"""How prompts are read, by the name ``--prompt_syntax`` takes."""


@dataclass
class Chunk:
    """Up to 75 tokens of a prompt with their weights, and where embeddings' vectors go in them."""

    tokens: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    vectors: list[tuple[int, Embedding]] = field(default_factory=list)  # (first token position, embedding)


def emphasize(z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A1111's weighting of encoder outputs ``z`` (chunks, 77, width) by per-token ``weights``
    (chunks, 77): ``z * weight``, rescaled so that each chunk keeps its unweighted mean; computed
    in float32 (a weight of 1.1 is 1.1015625 in bfloat16), returned in ``z``'s dtype."""
    z32 = z.float()
    weighted = z32 * weights[..., None]
    return (weighted * (z32.mean(dim=(1, 2), keepdim=True) / weighted.mean(dim=(1, 2), keepdim=True))).to(z.dtype)


class PromptEncoder:
    """A1111-style prompt encoding on a :class:`FrozenOpenCLIPEmbedder` (see the module's notes)."""

    def __init__(self, embedder: FrozenOpenCLIPEmbedder, embeddings: Sequence[Embedding] = (), parse: Parse = parse_prompt):
        self.embedder = embedder
        self.parse = parse
        self.embeddings = list(embeddings)
        tokenizer = embedder.tokenizer
        self.encode_text: Callable[[str], list[int]] = tokenizer.encode
        self.start, self.end = tokenizer.sot_token_id, tokenizer.eot_token_id
        self.comma = tokenizer.encoder[",</w>"]
        self.context = embedder.max_length
        if self.context != CHUNK_TOKENS + 2:
            raise ValueError(f"chunks of {CHUNK_TOKENS} tokens need a text encoder of context 77, not {self.context}")
        self._told: set[str] = set()  # the long prompts logged
        self._by_first_token: dict[int, list[tuple[list[int], Embedding]]] = {}
        seen: dict[tuple[int, ...], Embedding] = {}
        for embedding in self.embeddings:
            ids = self.encode_text(embedding.name)
            if not ids:
                raise EmbeddingError(f"{embedding.path}: its name {embedding.name!r} is no word the tokenizer sees")
            other = seen.setdefault(tuple(ids), embedding)
            if other is not embedding:
                raise EmbeddingError(f"embeddings {other.name!r} and {embedding.name!r} are the same word to the tokenizer "
                                     f"(it ignores case): rename one of {other.path}, {embedding.path}")
            self._by_first_token.setdefault(ids[0], []).append((ids, embedding))
        for candidates in self._by_first_token.values():
            candidates.sort(key=lambda item: -len(item[0]))  # the longest name first

    def chunks(self, prompt: str) -> list[Chunk]:
        """``prompt``'s chunks, A1111's way: tokens and weights by chunk, embeddings placed."""
        chunks: list[Chunk] = []
        chunk = Chunk()
        last_comma = -1

        def flush() -> None:
            nonlocal chunk, last_comma
            chunks.append(chunk)
            chunk, last_comma = Chunk(), -1

        for index, section in enumerate(self.parse(prompt)):
            if index:
                flush()  # BREAK
            for text, weight in section:
                ids = self.encode_text(text)
                position = 0
                while position < len(ids):
                    if ids[position] == self.comma:
                        last_comma = len(chunk.tokens)
                    elif len(chunk.tokens) == CHUNK_TOKENS and last_comma != -1 and CHUNK_TOKENS - last_comma <= COMMA_BACKTRACK:
                        moved = self._split(chunk, last_comma + 1)
                        flush()
                        chunk = moved
                    if len(chunk.tokens) == CHUNK_TOKENS:
                        flush()
                    match = self._embedding_at(ids, position)
                    if match is None:
                        chunk.tokens.append(ids[position])
                        chunk.weights.append(weight)
                        position += 1
                        continue
                    name_length, embedding = match
                    n = len(embedding.vectors)
                    if len(chunk.tokens) + n > CHUNK_TOKENS:
                        flush()
                    chunk.vectors.append((len(chunk.tokens), embedding))
                    chunk.tokens += [PAD_ID] * n
                    chunk.weights += [weight] * n
                    position += name_length
        if chunk.tokens or not chunks:
            flush()
        return chunks

    @staticmethod
    def _split(chunk: Chunk, at: int) -> Chunk:
        """Cut ``chunk`` at token ``at``; returns the tail, embeddings included (A1111 leaves the
        vectors of a moved embedding behind, in the padding)."""
        tail = Chunk(chunk.tokens[at:], chunk.weights[at:], [(p - at, e) for p, e in chunk.vectors if p >= at])
        del chunk.tokens[at:], chunk.weights[at:]
        chunk.vectors = [(p, e) for p, e in chunk.vectors if p < at]
        return tail

    def _embedding_at(self, ids: list[int], position: int) -> tuple[int, Embedding] | None:
        for name, embedding in self._by_first_token.get(ids[position], ()):
            if ids[position : position + len(name)] == name:
                return len(name), embedding
        return None

    def count(self, prompt: str) -> int:
        """How many chunks ``prompt`` takes."""
        return len(self.chunks(prompt))

    def encode(self, prompts: Sequence[str], chunks: int = 1) -> torch.Tensor:
        """The conditioning of ``prompts``, (batch, 77 * n, width), n the most chunks any prompt
        takes and at least ``chunks``; shorter prompts are padded with empty-prompt chunks."""
        per_prompt = [self.chunks(p) for p in prompts]
        n = max([chunks, *(len(c) for c in per_prompt)])
        for prompt, c in zip(prompts, per_prompt):
            if len(c) > 1 and prompt not in self._told:
                self._told.add(prompt)
                logger.info("prompt encoded in %d chunks of %d tokens (%r)", len(c), CHUNK_TOKENS, prompt[:60])
        rows = [chunk for c in per_prompt for chunk in c + [Chunk() for _ in range(n - len(c))]]
        table = self.embedder.model.token_embedding
        tokens = torch.tensor([self._ids(chunk) for chunk in rows], device=table.weight.device)
        x = table(tokens)
        for row, chunk in enumerate(rows):
            for position, embedding in chunk.vectors:
                start = position + 1  # after <start>
                x[row, start : start + len(embedding.vectors)] = embedding.vectors.to(x)
        z = self.embedder.encode_token_embeddings(x)
        weights = [[1.0, *chunk.weights, 1.0] + [1.0] * (CHUNK_TOKENS - len(chunk.weights)) for chunk in rows]
        if any(w != 1.0 for row in weights for w in row):
            z = emphasize(z, torch.tensor(weights, dtype=torch.float32, device=z.device))
        return z.reshape(len(prompts), n * self.context, z.shape[-1])

    def _ids(self, chunk: Chunk) -> list[int]:
        return [self.start, *chunk.tokens, self.end] + [PAD_ID] * (CHUNK_TOKENS - len(chunk.tokens))
