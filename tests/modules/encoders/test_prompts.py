"""The prompt encoder (A1111's weights, long prompts, embeddings) on the tiny SD2 text tower.

* Fidelity: a prompt without syntax of at most 75 tokens gives the original
  ``get_learned_conditioning`` output bit for bit, under either syntax.
* Weights and chunks against A1111's rule computed here independently, on transformers'
  CLIPTextModel holding the same tower (diffusers' SD2 layout: all blocks but the last, so its last
  hidden state is SD2's penultimate layer), from token ids written out by hand with transformers'
  tokenizer: each chunk ``<start> tokens <end>`` padded with 0 to 77 and encoded alone, outputs
  multiplied by the weights, then scaled back to the unweighted chunk's mean. Tolerance: 1e-5
  relative (float32 rounding of two implementations; observed 0: equal bit for bit on this CPU).
* Chunking rules (BREAK, the comma backtrack, embeddings that do not fit) on token lists.
"""

from __future__ import annotations

import pytest
import torch

from conftest import rel_err, transformers_text_twin, transformers_tokenizer
from ldm.modules.encoders.embeddings import Embedding, EmbeddingError
from ldm.modules.encoders.prompts import CHUNK_TOKENS, PROMPT_SYNTAXES, PromptEncoder, literal_prompt

RTOL = 1e-5
PLAIN = [
    "a professional photograph of an astronaut riding a horse",
    "",
    "Déjà vu!!  two   spaces, UPPER case, punctuation... & émojis 🤖 it's 3.14: colons too",
    "word " * 75,  # exactly one full chunk
]


@pytest.fixture(scope="module")
def embedder(tiny_eps_model):
    return tiny_eps_model.cond_stage_model


@pytest.fixture(scope="module")
def hf(embedder):
    """transformers' tokenizer and text model holding the tiny tower (SD2's penultimate layer last)."""
    return transformers_tokenizer(embedder, pad_with_zero=False), transformers_text_twin(embedder, layers=len(embedder.model.transformer.resblocks) - 1)


def ids_of(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def reference(hf, chunks: list[list[tuple[str, float]]]) -> torch.Tensor:
    """A1111's rule, written out: ``chunks`` of (text, weight) pieces, each piece tokenized alone."""
    tokenizer, model = hf
    outputs = []
    for pieces in chunks:
        ids, weights = [tokenizer.bos_token_id], [1.0]
        for text, weight in pieces:
            piece = ids_of(tokenizer, text)
            ids += piece
            weights += [weight] * len(piece)
        assert len(ids) <= 76
        ids += [tokenizer.eos_token_id] + [0] * (76 - len(ids))
        weights += [1.0] * (77 - len(weights))
        with torch.no_grad():
            z = model(torch.tensor([ids])).last_hidden_state[0]
        weighted = z * torch.tensor(weights)[:, None]
        outputs.append(weighted * (z.mean() / weighted.mean()))
    return torch.cat(outputs)[None]


@pytest.mark.parametrize("syntax", ["a1111", "none"])
def test_plain_prompts_give_the_originals_conditioning_bit_for_bit(tiny_eps_model, embedder, syntax):
    encoder = PromptEncoder(embedder, parse=PROMPT_SYNTAXES[syntax])
    with torch.no_grad():
        for prompt in PLAIN:
            assert torch.equal(encoder.encode([prompt]), tiny_eps_model.get_learned_conditioning([prompt])), prompt
        assert torch.equal(encoder.encode(PLAIN), tiny_eps_model.get_learned_conditioning(PLAIN))
    for prompt in PLAIN:
        (chunk,) = encoder.chunks(prompt)
        assert torch.equal(torch.tensor([encoder._ids(chunk)]), embedder.tokenize([prompt]))


def test_the_encoding_matches_transformers_for_plain_prompts(embedder, hf):
    with torch.no_grad():
        for prompt in PLAIN:
            assert rel_err(PromptEncoder(embedder).encode([prompt]), reference(hf, [[(prompt, 1.0)]])) <= RTOL


WEIGHTED = {
    "a (red:1.3) cube on [a table]": [[("a ", 1.0), ("red", 1.3), (" cube on ", 1.0), ("a table", 1 / 1.1)]],
    "((a lighthouse)) at dusk, (stormy sea:0.6)": [[("a lighthouse", 1.21), (" at dusk, ", 1.0), ("stormy sea", 0.6)]],
    "a red cube BREAK (on a table)": [[("a red cube", 1.0)], [("on a table", 1.1)]],
    "a photo BREAK": [[("a photo", 1.0)]],
    "BREAK a photo": [[], [("a photo", 1.0)]],
}


@pytest.mark.parametrize("prompt", list(WEIGHTED))
def test_weights_and_break_follow_a1111s_rule(embedder, hf, prompt):
    with torch.no_grad():
        ours = PromptEncoder(embedder).encode([prompt])
    expected = reference(hf, WEIGHTED[prompt])
    assert ours.shape == expected.shape == (1, 77 * len(WEIGHTED[prompt]), 48)
    assert rel_err(ours, expected) <= RTOL


def test_weights_are_applied_per_prompt_in_a_batch(embedder):
    """Each prompt's chunk keeps its own mean (A1111 rescales by the batch's mean): a batch gives
    each prompt's own conditioning."""
    encoder = PromptEncoder(embedder)
    prompts = ["a (red:1.5) cube", "a [[blue]] ball, (shiny)"]
    with torch.no_grad():
        batch = encoder.encode(prompts)
        alone = torch.cat([encoder.encode([p]) for p in prompts])
    assert rel_err(batch, alone) <= RTOL


def test_a_long_prompt_is_encoded_in_chunks_of_75_tokens(embedder, hf):
    words = [f"w{i}" for i in range(40)]  # each word two tokens ("w", digits) or more: over 75 in all
    tokenizer = hf[0]
    prompt = " ".join(words)
    ids = ids_of(tokenizer, prompt)
    assert 75 < len(ids) <= 150
    first, second = tokenizer.decode(ids[:CHUNK_TOKENS]), tokenizer.decode(ids[CHUNK_TOKENS:])
    assert ids_of(tokenizer, first) + ids_of(tokenizer, second) == ids
    with torch.no_grad():
        ours = PromptEncoder(embedder).encode([prompt])
    expected = reference(hf, [[(first, 1.0)], [(second, 1.0)]])
    assert ours.shape == (1, 154, 48)
    assert rel_err(ours, expected) <= RTOL


def test_shorter_prompts_and_a_minimum_are_padded_with_empty_prompt_chunks(embedder):
    encoder = PromptEncoder(embedder)
    with torch.no_grad():
        empty = encoder.encode([""])
        batch = encoder.encode(["word " * 80, "a cube"])
        padded = encoder.encode(["a cube"], chunks=3)
    assert batch.shape == (2, 154, 48) and padded.shape == (1, 231, 48)
    assert rel_err(batch[1:, 77:], empty) <= RTOL
    assert torch.equal(padded[:, :77], encoder.encode(["a cube"]))
    assert torch.equal(padded[:, 77:154], empty) and torch.equal(padded[:, 154:], empty)


# -- chunking rules, on token lists ----------------------------------------------------------
def test_break_chunks_and_counts(embedder):
    encoder = PromptEncoder(embedder)
    assert [len(c.tokens) for c in encoder.chunks("a BREAK b c BREAK d")] == [1, 2, 1]
    assert encoder.count("") == encoder.count("a") == encoder.count("word " * 75) == 1
    assert encoder.count("word " * 76) == encoder.count("word " * 150) == 2
    assert encoder.count("word " * 151) == 3
    literal = PromptEncoder(embedder, parse=literal_prompt)
    assert literal.count("a BREAK b") == 1 and literal.chunks("(a)")[0].weights == [1.0, 1.0, 1.0]


def test_a_full_chunk_moves_the_words_after_a_recent_comma_to_the_next(embedder):
    """A1111's comma backtrack: the comma within 20 tokens of the chunk's end ends the chunk."""
    encoder = PromptEncoder(embedder)
    word = encoder.encode_text("word")[0]
    comma = encoder.comma
    chunks = encoder.chunks("word " * 60 + ", " + "word " * 20)  # the comma is token 61 of 81
    assert [len(c.tokens) for c in chunks] == [61, 20]
    assert chunks[0].tokens == [word] * 60 + [comma] and chunks[1].tokens == [word] * 20
    far = encoder.chunks("word " * 50 + ", " + "word " * 30)  # 24 tokens back: too far, cut at 75
    assert [len(c.tokens) for c in far] == [75, 6]


def embedding(name: str, n: int, seed: int = 0) -> Embedding:
    return Embedding(name, torch.randn(n, 48, generator=torch.Generator().manual_seed(seed)), f"{name}.pt")


def test_embedding_vectors_take_the_place_of_the_names_tokens(embedder):
    style = embedding("mystyle", 3)
    encoder = PromptEncoder(embedder, [style])
    (chunk,) = encoder.chunks("a (mystyle:1.2) photo, MyStyle")
    assert chunk.vectors == [(1, style), (6, style)] and len(chunk.tokens) == 9
    assert chunk.weights == [1.0, 1.2, 1.2, 1.2, 1.0, 1.0, 1.0, 1.0, 1.0]
    x = embedder.model.token_embedding(torch.tensor([encoder._ids(chunk)]))
    x[0, 2:5] = x[0, 7:10] = style.vectors
    with torch.no_grad():
        z = embedder.encode_token_embeddings(x)
        weights = torch.tensor([[1.0, *chunk.weights, 1.0] + [1.0] * (CHUNK_TOKENS - 9)])
        weighted = z * weights[..., None]
        expected = weighted * (z.mean() / weighted.mean())
        assert rel_err(encoder.encode(["a (mystyle:1.2) photo, MyStyle"]), expected) <= RTOL
        # A prompt not naming it is untouched.
        plain = PromptEncoder(embedder).encode(["a photo"])
        assert torch.equal(encoder.encode(["a photo"]), plain)


def test_an_embedding_that_does_not_fit_goes_to_the_next_chunk_and_moves_with_its_words(embedder):
    long = embedding("long", 10)
    encoder = PromptEncoder(embedder, [long])
    chunks = encoder.chunks("word " * 70 + "long")
    assert [len(c.tokens) for c in chunks] == [70, 10] and chunks[1].vectors == [(0, long)]
    # The comma is token 61; the embedding and 4 words fill the chunk, 15 tokens after the comma: they move on.
    moved = encoder.chunks("word " * 60 + ", long " + "word " * 10)
    assert [len(c.tokens) for c in moved] == [61, 20]
    assert moved[0].vectors == [] and moved[1].vectors == [(0, long)]


def test_the_longest_matching_name_wins(embedder):
    short, longer = embedding("cat", 1), embedding("cat toy", 2, seed=1)
    encoder = PromptEncoder(embedder, [short, longer])
    (chunk,) = encoder.chunks("a cat toy and a cat")
    assert chunk.vectors == [(1, longer), (5, short)]


def test_names_the_tokenizer_cannot_tell_apart_are_an_error(embedder):
    with pytest.raises(EmbeddingError, match="same word to the tokenizer"):
        PromptEncoder(embedder, [embedding("Style", 1), embedding("style", 1)])
