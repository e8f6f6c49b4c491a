"""The web UI's prompt features on the tiny model: the negative prompt field of every tab (an input
of each endpoint) gives the script's image and PNG for --negative_prompt; the page lists the
textual-inversion embeddings loaded with --embedding/--embeddings_dir and says how prompts are read;
a prompt the syntax cannot read is a message."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import free_port, load_script, samples
from ldm.generation import main
from ldm.generation.model import Model
from ldm.generation.options import model_settings_from_args
from ldm.generation.serving import ModelServer

gr = pytest.importorskip("gradio", reason="the web UI needs gradio: pip install -e '.[webui]'")
pytest.importorskip("gradio_client", reason="the web UI tests need gradio_client: pip install -e '.[test]'")
from gradio_client import Client  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

webui = load_script("scripts/webui.py")
FAST = {"steps": 2, "scale": 9.0}


@pytest.fixture(scope="module")
def embedding(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("embeddings") / "mystyle.pt"
    torch.save({"string_to_param": {"*": torch.randn(2, 48, generator=torch.Generator().manual_seed(0))}}, path)
    return path


@pytest.fixture(scope="module")
def server(tiny_files, embedding, tmp_path_factory):
    model = ["--config", str(tiny_files["config"]), "--ckpt", str(tiny_files["safetensors"]), "--device", "cpu", "--precision", "full"]
    args = webui.build_parser().parse_args([*model, "--embedding", str(embedding), "--port", str(free_port()),
                                            "--outdir", str(tmp_path_factory.mktemp("webui-prompts"))])
    app = webui.build_app(args)
    webui.launch(app, args)
    try:
        yield app
    finally:
        app.close()


@pytest.fixture(scope="module")
def client(server) -> Client:
    return Client(server.local_url, verbose=False, download_files=True)


def test_every_endpoint_takes_a_negative_prompt(client):
    api = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    for name, endpoint in api.items():
        negative = [p for p in endpoint["parameters"] if p["parameter_name"] == "negative_prompt"]
        assert negative and negative[0]["parameter_has_default"], name


def test_negative_prompt_gives_the_scripts_image_and_metadata(client, tiny_files, embedding, tmp_path):
    prompt, negative = "a red circle in mystyle", "a (green:1.2) square"
    gallery, settings = client.predict(prompt=prompt, negative_prompt=negative, seed=7, api_name="/txt2img", **FAST)
    model = ["--config", str(tiny_files["config"]), "--ckpt", str(tiny_files["safetensors"]), "--precision", "full"]
    assert main([*model, "--outdir", str(tmp_path), "--n_iter", "1", "--n_samples", "1", "--steps", "2", "--seed", "7",
                 "--prompt", prompt, "--negative_prompt", negative, "--embedding", str(embedding)], "txt2img") == 0
    (expected,) = samples(tmp_path)
    assert Path(gallery[0]["image"]).read_bytes() == expected.read_bytes()
    assert settings["negative_prompt"] == negative and settings["embeddings"] == "mystyle"


def test_the_page_lists_the_embeddings_and_says_how_prompts_are_read(server, tiny_files, embedding, tmp_path):
    texts = [str(c.get("props", {}).get("value")) for c in server.config["components"]]
    header = next(t for t in texts if "Textual-inversion embeddings" in t)
    assert "`mystyle` (2 vectors)" in header and "AUTOMATIC1111's syntax" in header
    args = webui.build_parser().parse_args(["--config", str(tiny_files["config"]), "--ckpt", str(tiny_files["safetensors"]),
                                            "--prompt_syntax", "none"])
    plain = webui.WebUI(ModelServer(Model(model_settings_from_args(args)), tmp_path)).header()
    assert "plain text" in plain and "No textual-inversion embeddings loaded" in plain


def test_a_prompt_the_syntax_cannot_read_is_a_message(client):
    with pytest.raises(AppError, match="not a number"):
        client.predict(prompt="a (red:1.2.3) circle", api_name="/txt2img", **FAST)
    gallery, _ = client.predict(prompt="a red circle", api_name="/txt2img", **FAST)  # still serving
    assert len(gallery) == 1
