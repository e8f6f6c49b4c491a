"""Textual-inversion files as people hold them: A1111's ``.pt`` (``string_to_param``, its vectors a
Parameter as A1111 saves them), kohya-ss' safetensors (``emb_params``), diffusers'
``learned_embeds`` (one token to its vectors), a bare tensor; one vector or several. And every
wrong file as one clear error: an SD1 (768-wide) or SDXL embedding, a pickle that would run code,
bytes that are no checkpoint, a dict of something else."""

from __future__ import annotations


import pytest
import torch
from safetensors.torch import save_file

from ldm.modules.encoders.embeddings import EmbeddingError, load_embedding, load_embeddings, read_vectors

WIDTH = 48  # the tiny text tower's


def vectors(n: int = 2, width: int = WIDTH, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed))


def a1111_dict(v: torch.Tensor, name: str = "style") -> dict:
    """What A1111's textual-inversion tab saves (modules/textual_inversion/textual_inversion.py)."""
    return {"string_to_token": {"*": 265}, "string_to_param": {"*": torch.nn.Parameter(v.clone())}, "name": name,
            "step": 1500, "sd_checkpoint": "c6bbc15e32", "sd_checkpoint_name": "v2-1_512-ema-pruned"}


def write(path, kind: str, v: torch.Tensor):
    """An embedding file of ``kind``: a1111, kohya, diffusers, tensor."""
    if kind == "a1111":
        torch.save(a1111_dict(v), path)
    elif kind == "kohya":
        save_file({"emb_params": v.contiguous()}, path)
    elif kind == "diffusers":
        torch.save({"<style>": v}, path)
    else:
        torch.save(v, path)
    return path


FORMATS = {"a1111": "style.pt", "kohya": "style.safetensors", "diffusers": "learned_embeds.bin", "tensor": "style.pt"}


@pytest.mark.parametrize("kind", list(FORMATS))
@pytest.mark.parametrize("n", [1, 3])
def test_every_format_reads_its_vectors(tmp_path, kind, n):
    v = vectors(n)
    path = write(tmp_path / FORMATS[kind], kind, v)
    embedding = load_embedding(path, WIDTH)
    assert embedding.name == path.stem and embedding.path == path
    assert embedding.vectors.dtype == torch.float32 and torch.equal(embedding.vectors, v)


def test_one_vector_may_be_stored_flat_and_in_half_precision(tmp_path):
    v = vectors(1)[0].half()
    save_file({"emb_params": v}, tmp_path / "flat.safetensors")
    assert torch.equal(read_vectors(tmp_path / "flat.safetensors"), v.float()[None])


def test_an_sd1_embedding_is_an_error_naming_sd1(tmp_path):
    path = write(tmp_path / "sd1.pt", "a1111", vectors(2, 768))
    with pytest.raises(EmbeddingError, match=r"sd1\.pt: an embedding for SD1\.x \(CLIP ViT-L/14, 768-wide\); this model's text encoder is 48-wide"):
        load_embedding(path, WIDTH)
    with pytest.raises(EmbeddingError, match=r"SD1\.x.*SD2\.x \(OpenCLIP ViT-H/14, 1024-wide\)"):
        load_embedding(path, 1024)


def test_an_sdxl_embedding_is_an_error_naming_sdxl(tmp_path):
    save_file({"clip_l": vectors(2, 768), "clip_g": vectors(2, 1280)}, tmp_path / "xl.safetensors")
    with pytest.raises(EmbeddingError, match="SDXL"):
        load_embedding(tmp_path / "xl.safetensors", 1024)


class Payload:
    def __reduce__(self):
        return (print, ("this pickle runs code",))


WRONG = {
    "code": "refused: it is not a plain-tensor checkpoint",
    "bytes": "not a PyTorch checkpoint",
    "other dict": "not a textual-inversion embedding .*keys a, b",
    "two placeholders": "string_to_param should map one placeholder",
    "integers": "not floating point",
    "nan": "NaN",
    "3-d": r"shape \(1, 2, 48\)",
    "too many": r"shape \(76, 48\).*1 to 75",
    "string": "holds a str",
}


@pytest.mark.parametrize("content, message", list(WRONG.items()), ids=list(WRONG))
def test_wrong_files_are_clear_errors(tmp_path, content, message):
    path = tmp_path / "bad.pt"
    if content == "code":
        torch.save({"string_to_param": {"*": Payload()}}, path)
    elif content == "bytes":
        path.write_bytes(b"GIF89a not an embedding")
    else:
        torch.save({
            "other dict": {"a": torch.zeros(2), "b": torch.zeros(2)},
            "two placeholders": {"string_to_param": {"*": vectors(1), "+": vectors(1)}},
            "integers": torch.zeros(1, WIDTH, dtype=torch.long),
            "nan": torch.full((1, WIDTH), float("nan")),
            "3-d": torch.zeros(1, 2, WIDTH),
            "too many": torch.zeros(76, WIDTH),
            "string": "a prompt",
        }[content], path)
    with pytest.raises(EmbeddingError, match=message):
        load_embedding(path, WIDTH)


def test_other_suffixes_and_missing_files_are_errors(tmp_path):
    (tmp_path / "style.png").write_bytes(b"\x89PNG")
    with pytest.raises(EmbeddingError, match="embeddings inside images are not supported"):
        load_embedding(tmp_path / "style.png", WIDTH)
    with pytest.raises(EmbeddingError, match="no such file"):
        load_embedding(tmp_path / "absent.pt", WIDTH)


def test_a_folder_gives_every_embedding_in_it_and_skips_those_of_other_models(tmp_path, caplog):
    folder = tmp_path / "embeddings"
    (folder / "sub").mkdir(parents=True)
    write(folder / "alpha.pt", "a1111", vectors(1))
    write(folder / "sub" / "beta.safetensors", "kohya", vectors(2, seed=1))
    write(folder / "for-sd1.pt", "a1111", vectors(1, 768))
    (folder / "alpha.preview.png").write_bytes(b"\x89PNG")  # A1111 keeps previews beside: not read
    extra = write(tmp_path / "gamma.bin", "tensor", vectors(3, seed=2))
    with caplog.at_level("WARNING"):
        loaded = load_embeddings([extra], folder, WIDTH)
    assert [(e.name, len(e.vectors)) for e in loaded] == [("gamma", 3), ("alpha", 1), ("beta", 2)]
    assert "skipped" in caplog.text and "for-sd1.pt" in caplog.text and "SD1.x" in caplog.text
    with pytest.raises(EmbeddingError, match="not a folder"):
        load_embeddings([], tmp_path / "absent", WIDTH)


def test_an_explicit_file_of_another_model_is_an_error_not_a_skip(tmp_path):
    with pytest.raises(EmbeddingError, match="SD1.x"):
        load_embeddings([write(tmp_path / "sd1.pt", "tensor", vectors(1, 768))], None, WIDTH)


def test_two_embeddings_of_one_name_are_an_error(tmp_path):
    (tmp_path / "a").mkdir()
    first, second = write(tmp_path / "style.pt", "tensor", vectors(1)), write(tmp_path / "a" / "style.safetensors", "kohya", vectors(1))
    with pytest.raises(EmbeddingError, match=f"two embeddings are named 'style': {first} and {second}"):
        load_embeddings([first], tmp_path / "a", WIDTH)
