"""TAESD's decoder (ldm/models/taesd.py) against diffusers' AutoencoderTiny decoder on the same
random weights, its two file layouts, refusals of other files, and the pipelines decoding with it
(``--taesd``). Tolerance: 1e-5 relative (two implementations of the same float32 convolutions)."""

from __future__ import annotations

import pytest
import torch

from conftest import randomize_, rel_err
from ldm.checkpoint import CheckpointError, save_state_dict
from ldm.generation import main
from ldm.models.taesd import TinyDecoder, load_tiny_decoder


@pytest.fixture(scope="module")
def decoder() -> TinyDecoder:
    return randomize_(TinyDecoder(), seed=9).eval()


def diffusers_tiny(decoder: TinyDecoder):
    """diffusers' AutoencoderTiny (TAESD's configuration) holding ``decoder``'s weights."""
    from diffusers import AutoencoderTiny

    tiny = AutoencoderTiny(latent_channels=4, scaling_factor=1.0).eval()
    state = {f"decoder.layers.{int(k.split('.', 1)[0]) - 1}.{k.split('.', 1)[1]}": v for k, v in decoder.state_dict().items()}
    missing, unexpected = tiny.load_state_dict(state, strict=False)
    assert not unexpected and all(k.startswith("encoder.") for k in missing)
    return tiny


def test_decoder_equals_diffusers_autoencoder_tiny(decoder):
    z = torch.randn(2, 4, 8, 6, generator=torch.Generator().manual_seed(0)) * 2
    with torch.no_grad():
        ours = decoder(z)
        ref = diffusers_tiny(decoder).decode(z).sample
    assert ours.shape == (2, 3, 64, 48)
    assert rel_err(ours, ref) <= 1e-5


def test_both_file_layouts_load_strictly(decoder, tmp_path):
    save_state_dict(decoder.state_dict(), tmp_path / "taesd_decoder.safetensors")
    save_state_dict(diffusers_tiny(decoder).state_dict(), tmp_path / "diffusion_pytorch_model.safetensors")
    z = torch.randn(1, 4, 4, 4)
    with torch.no_grad():
        for name in ("taesd_decoder.safetensors", "diffusion_pytorch_model.safetensors"):
            assert torch.equal(load_tiny_decoder(tmp_path / name)(z), decoder(z)), name


def test_another_file_is_refused(tiny_files, tmp_path):
    with pytest.raises(CheckpointError, match="is not TAESD's decoder") as e:
        load_tiny_decoder(tiny_files["safetensors"])
    assert "missing keys" in str(e.value) and "unexpected keys" in str(e.value)


def test_the_pipelines_decode_with_it(tiny_files, decoder, tmp_path, capsys):
    """txt2img with --taesd: the images are TAESD's decoding of the latents DDIM produced; the PNGs say so."""
    from PIL import Image

    path = tmp_path / "taesd_decoder.safetensors"
    save_state_dict(decoder.state_dict(), path)
    flags = ["--config", str(tiny_files["config"]), "--ckpt", str(tiny_files["safetensors"]), "--H", "64", "--W", "64",
             "--steps", "2", "--n_samples", "1", "--n_iter", "1", "--precision", "full", "--no_watermark"]
    assert main([*flags, "--outdir", str(tmp_path / "vae")], "txt2img") == 0
    assert main([*flags, "--outdir", str(tmp_path / "taesd"), "--taesd", str(path)], "txt2img") == 0
    with Image.open(next((tmp_path / "taesd" / "samples").glob("*.png"))) as image:
        assert image.text["decoder"] == "taesd_decoder.safetensors"
        taesd = torch.tensor(list(image.getdata()), dtype=torch.float32)
    with Image.open(next((tmp_path / "vae" / "samples").glob("*.png"))) as image:
        assert "decoder" not in image.text
        vae = torch.tensor(list(image.getdata()), dtype=torch.float32)
    assert (taesd - vae).abs().mean() > 1  # another decoder: other pixels from the same latents
    assert main([*flags, "--outdir", str(tmp_path / "x"), "--taesd", str(tiny_files["safetensors"])], "txt2img") == 1
    assert "--taesd: " in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_decode_first_stage_switches_and_back(tiny_eps_model, decoder):
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        vae = tiny_eps_model.decode_first_stage(z)
        tiny_eps_model.use_latent_decoder(decoder)
        try:
            assert torch.equal(tiny_eps_model.decode_first_stage(z), decoder(z))
            assert not any(k.startswith("_latent_decoder") for k in tiny_eps_model.state_dict())
        finally:
            tiny_eps_model.use_latent_decoder(None)
        assert torch.equal(tiny_eps_model.decode_first_stage(z), vae)
