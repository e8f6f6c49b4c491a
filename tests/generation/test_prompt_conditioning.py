"""The pipeline path of weighted and long prompts, the negative prompt and textual inversion
(ldm/generation: Pipeline.conditioning, Model.prompts, the metadata), and what a longer context
means for the UNet, eager and compiled."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_model
from ldm.generation.errors import GenerationError, UsageError
from ldm.generation.model import Model
from ldm.generation.run import image_metadata, render
from ldm.generation.settings import ModelSettings, SamplingSettings
from ldm.generation.tasks import Img2ImgPipeline, Txt2ImgPipeline

LONG = "a red circle on a blue square, " * 12  # 96 tokens: two chunks


@pytest.fixture(scope="module")
def model(tiny_files) -> Model:
    return Model(ModelSettings(config=tiny_files["config"], ckpt=tiny_files["safetensors"], device="cpu", precision="full"))


def conditioning(model: Model, prompts: list[str], **sampling) -> tuple[torch.Tensor, torch.Tensor | None]:
    with torch.no_grad():
        return Txt2ImgPipeline(model, SamplingSettings(**sampling)).conditioning(prompts)


def test_a_plain_prompt_gives_the_originals_conditioning_bit_for_bit(model):
    net = model.load()
    c, uc = conditioning(model, ["a red circle"])
    with torch.no_grad():
        assert torch.equal(c, net.get_learned_conditioning(["a red circle"]))
        assert torch.equal(uc, net.get_learned_conditioning([""]))


def test_the_negative_prompt_is_the_unconditional_text_encoded_once(model, monkeypatch):
    negative = "blurry, (low quality:1.3)"
    c, uc = conditioning(model, ["a red circle", "a red circle"], negative_prompt=negative)
    with torch.no_grad():
        expected = model.prompts.encode([negative])
    assert uc.shape == c.shape == (2, 77, 48)
    assert torch.equal(uc, expected.repeat(2, 1, 1))
    calls = []
    encode = model.prompts.encode
    monkeypatch.setattr(model.prompts, "encode", lambda texts, chunks=1: calls.append(list(texts)) or encode(texts, chunks))
    conditioning(model, ["a green square"], negative_prompt=negative)
    assert calls == [["a green square"]]  # the negative prompt's encoding is kept
    _, none = conditioning(model, ["a green square"], negative_prompt=negative, scale=1.0)
    assert none is None


@pytest.mark.parametrize("long_side", ["prompt", "negative"])
def test_prompt_and_negative_prompt_get_the_same_number_of_chunks(model, long_side):
    prompt, negative = (LONG, "blurry") if long_side == "prompt" else ("a red circle", LONG)
    c, uc = conditioning(model, [prompt], negative_prompt=negative)
    assert c.shape == uc.shape == (1, 154, 48)
    with torch.no_grad():
        empty = model.prompts.encode([""])
        short = model.prompts.encode([negative if long_side == "prompt" else prompt])
    padded = uc if long_side == "prompt" else c
    assert torch.equal(padded[:, :77], short)
    torch.testing.assert_close(padded[:, 77:], empty, rtol=0, atol=1e-5)  # one batch of two chunks: float rounding


def test_a_long_prompt_conditions_every_task_step(model):
    """The UNet's cross-attention takes the 154-token context; the second chunk changes the image."""
    sampling = SamplingSettings(steps=2, seed=3)
    pipeline = Txt2ImgPipeline(model, sampling, height=64, width=64)
    long = render(pipeline, [LONG + "in a dark forest"])
    first_chunk_only = render(pipeline, [LONG])
    assert long.shape == (1, 3, 64, 64) and torch.isfinite(long).all()
    assert not torch.equal(long, first_chunk_only)
    init = torch.rand(1, 3, 64, 64) * 2 - 1
    again = render(Img2ImgPipeline(model, sampling, init, strength=0.5), [LONG + "in a dark forest"])
    assert again.shape == (1, 3, 64, 64)


@pytest.mark.parametrize("native_mha", [False, True], ids=["original", "native-mha"])
def test_cross_attention_takes_a_longer_context(native_mha):
    """Padding a context with empty-prompt chunks changes the UNet's output (the keys are attended),
    for both attention layouts."""
    net = tiny_model(native_mha=native_mha)
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([10, 700])
    with torch.no_grad():
        c = net.get_learned_conditioning(["a red circle", "a blue square"])
        empty = net.get_learned_conditioning(["", ""])
        short, long = net.apply_model(x, t, c), net.apply_model(x, t, torch.cat([c, empty], 1))
    assert long.shape == short.shape and torch.isfinite(long).all()
    assert not torch.allclose(long, short)


@pytest.mark.slow  # dynamo traces the whole UNet
@pytest.mark.parametrize("dynamic, graphs", [(None, [1, 2, 2, 2]), (False, [1, 2, 2, 3])], ids=["automatic", "static"])
def test_a_new_context_length_recompiles_the_unet(dynamic, graphs):
    """What docs/adapters.md states: torch.compile's default (automatic dynamic shapes) compiles once
    more at the second context length, a graph for any length; static shapes one graph per length.
    Never a graph break. Dynamo alone (backend eager)."""
    from torch._dynamo.utils import counters

    unet = tiny_model().model.diffusion_model
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(unet, backend="eager", fullgraph=True, dynamic=dynamic)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([1, 500])
    seen = []
    with torch.no_grad():
        for length in (77, 154, 77, 231):
            context = torch.randn(2, length, 48)
            torch.testing.assert_close(compiled(x, t, context), unet(x, t, context), rtol=0, atol=1e-5)
            seen.append(counters["stats"]["unique_graphs"])
    assert seen == graphs and not counters["graph_break"]


def test_embeddings_are_checked_when_the_model_is_made(tiny_files, tmp_path):
    torch.save({"string_to_param": {"*": torch.randn(2, 768)}}, tmp_path / "sd1-style.pt")
    settings = dict(config=tiny_files["config"], ckpt=tiny_files["safetensors"], device="cpu")
    with pytest.raises(GenerationError, match=r"sd1-style\.pt: an embedding for SD1\.x"):
        Model(ModelSettings(**settings, embeddings=[tmp_path / "sd1-style.pt"]))
    torch.save(torch.randn(2, 48), tmp_path / "mystyle.pt")
    model = Model(ModelSettings(**settings, embeddings_dir=tmp_path))  # the SD1 file is skipped
    assert [e.name for e in model.embeddings] == ["mystyle"] and model._net is None  # nothing loaded yet
    c, _ = conditioning(model, ["a photo of mystyle"])
    plain, _ = conditioning(Model(ModelSettings(**settings)), ["a photo of mystyle"])
    assert not torch.allclose(c, plain)


def test_prompt_syntax_setting(tiny_files):
    settings = dict(config=tiny_files["config"], ckpt=tiny_files["safetensors"], device="cpu")
    with pytest.raises(UsageError, match="prompt syntax 'comfy'"):
        ModelSettings(**settings, prompt_syntax="comfy")
    weighted, literal = Model(ModelSettings(**settings)), Model(ModelSettings(**settings, prompt_syntax="none"))
    with pytest.raises(UsageError, match=r"'1\.2\.3'.*not a number"):
        weighted.check_prompts(["a red circle", "a (cube:1.2.3)"])
    literal.check_prompts(["a (cube:1.2.3)"])
    c, _ = conditioning(literal, ["(a red circle)"])
    assert not torch.equal(c, conditioning(weighted, ["(a red circle)"])[0])
    with torch.no_grad():
        assert torch.equal(c, literal.load().get_learned_conditioning(["(a red circle)"]))


def test_metadata_records_the_negative_prompt_syntax_and_embeddings(tiny_files, tmp_path):
    torch.save(torch.randn(1, 48), tmp_path / "mystyle.pt")
    model = Model(ModelSettings(config=tiny_files["config"], ckpt=tiny_files["safetensors"], device="cpu",
                                embeddings=[tmp_path / "mystyle.pt"], prompt_syntax="none"))
    meta = image_metadata(Txt2ImgPipeline(model, SamplingSettings(negative_prompt="blurry")))
    assert meta["negative_prompt"] == "blurry" and meta["prompt_syntax"] == "none" and meta["embeddings"] == "mystyle"
