"""The web UI's ControlNet tab (--controlnet_dir) on the tiny model, through gradio_client: the
/controlnet endpoint gives the very image the script gives with --control and --hint for the same
seed, and the hint as the ControlNet read it (preprocessed, at the image size: scribble, and MiDaS
depth from --midas); a ControlNet the server does not offer is a message (the dropdown's own check)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from conftest import free_port, load_script, pixels, randomize_, samples, tiny_config, tiny_family_config
from ldm.checkpoint import save_state_dict
from ldm.generation import main
from ldm.modules.diffusionmodules.controlnet import ControlNet, controlnet_params

gr = pytest.importorskip("gradio", reason="the web UI needs gradio: pip install -e '.[webui]'")
pytest.importorskip("gradio_client", reason="the web UI tests need gradio_client: pip install -e '.[test]'")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

webui = load_script("scripts/webui.py")


@pytest.fixture(scope="module")
def files(tiny_files, tiny_depth_model, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("webui-controlnet")
    save_state_dict(tiny_depth_model.state_dict(), root / "depth.safetensors")  # the MiDaS of --preprocess depth
    OmegaConf.save(tiny_family_config("depth"), root / "depth.yaml")
    (root / "controlnets").mkdir()
    params = OmegaConf.to_container(tiny_config().model.params.unet_config.params)
    net = randomize_(ControlNet(**controlnet_params(params)), 8)
    save_state_dict(net.state_dict(), root / "controlnets" / "edges.safetensors")
    image = np.full((64, 64, 3), 255, np.uint8)
    image[16:48, 16:48] = 0
    Image.fromarray(image).save(root / "hint.png")
    return {**tiny_files, "dir": root / "controlnets", "hint": root / "hint.png", "out": root / "out",
            "midas": root / "depth.safetensors", "midas_config": root / "depth.yaml"}


@pytest.fixture(scope="module")
def client(files):
    model = ["--config", str(files["config"]), "--ckpt", str(files["safetensors"]), "--device", "cpu", "--precision", "full"]
    args = webui.build_parser().parse_args([*model, "--port", str(free_port()), "--outdir", str(files["out"]),
                                            "--controlnet_dir", str(files["dir"]), "--midas", str(files["midas"]),
                                            "--midas_config", str(files["midas_config"])])
    app = webui.build_app(args)
    webui.launch(app, args)
    try:
        yield Client(app.local_url, verbose=False, download_files=True)
    finally:
        app.close()


def test_the_controlnet_endpoint_gives_the_scripts_image_and_the_hint_it_read(client, files, tmp_path):
    gallery, settings, hint = client.predict(
        prompt="a box", hint=handle_file(str(files["hint"])), controlnet="edges.safetensors", seed=4, steps=4, scale=9.0,
        weight=0.8, preprocess="scribble", api_name="/controlnet")
    model = ["--config", str(files["config"]), "--ckpt", str(files["safetensors"]), "--precision", "full"]
    assert main([*model, "--outdir", str(tmp_path), "--n_iter", "1", "--n_samples", "1", "--steps", "4", "--seed", "4",
                 "--prompt", "a box", "--control", f"{files['dir'] / 'edges.safetensors'}:0.8", "--hint", str(files["hint"]),
                 "--preprocess", "scribble"], "txt2img") == 0
    [expected] = [pixels(p) for p in samples(tmp_path)]
    served = np.asarray(Image.open(gallery[0]["image"]).convert("RGB"))
    assert np.array_equal(served, expected)
    assert settings["controlnet"] == "edges.safetensors:0.8:0.0:1.0 hint " + Path(settings["controlnet"].split("hint ")[1]).name
    read = np.asarray(Image.open(hint).convert("L"))
    assert read.shape == (64, 64) and read[32, 32] == 255 and read[2, 2] == 0  # the dark square as a white stroke


def test_a_controlnet_the_server_does_not_offer_is_a_message(client, files):
    with pytest.raises(AppError, match="other.safetensors is not in the list of choices"):  # gradio checks the dropdown
        client.predict(prompt="a box", hint=handle_file(str(files["hint"])), controlnet="other.safetensors", steps=2,
                       api_name="/controlnet")
    gallery, _, _ = client.predict(prompt="a box", hint=handle_file(str(files["hint"])), steps=2, api_name="/controlnet")
    assert len(gallery) == 1


def test_the_depth_preprocessor_shows_midas_depth(client, files, tiny_depth_model):
    """With --midas the tab offers "depth": the hint shown is MiDaS's depth of the image (8-bit, as computed)."""
    import torch

    from ldm.generation.control import midas_depth

    _, settings, hint = client.predict(prompt="a box", hint=handle_file(str(files["hint"])), steps=2, preprocess="depth",
                                       api_name="/controlnet")
    image = torch.from_numpy(pixels(files["hint"]).transpose(2, 0, 1)[None].astype(np.float32) / 255)
    expected = (255 * midas_depth(image, tiny_depth_model.depth_model)[0, 0]).round().numpy().astype(np.uint8)
    assert settings["controlnet"].endswith("(depth)")
    assert np.abs(np.asarray(Image.open(hint).convert("L")).astype(int) - expected).max() <= 1
