"""scripts/webui.py on the tiny model, served on 127.0.0.1 and a free port. A real Chromium drives
the page: it types a prompt, clicks Generate, sees the progress and reads the image's pixels; it
paints an inpainting mask on the tiny inpainting model; it sees a refused input's message; the page
asks nothing of other hosts (these browser tests are marked slow). gradio_client calls every endpoint:
the same images, PNG file and metadata as the scripts for the same seed, progress per sampler step.
8 requests at once all complete. A full queue and bad inputs are messages, and the server keeps
serving. The command line starts a server on 127.0.0.1 (a process: marked slow), the demo model
without --config/--ckpt."""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from conftest import ROOT, child_env, free_port, load_script, tiny_family_config, wait_for
from ldm.checkpoint import save_state_dict
from ldm.generation import main, pipeline, serving
from ldm.generation.errors import GenerationError, UsageError
from ldm.generation.model import Model
from ldm.generation.options import model_settings_from_args
from ldm.generation.settings import ModelSettings
from ldm.generation.tasks import InpaintPipeline

gr = pytest.importorskip("gradio", reason="the web UI needs gradio: pip install -e '.[webui]'")
pytest.importorskip("gradio_client", reason="the web UI tests need gradio_client: pip install -e '.[test]'")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

webui = load_script("scripts/webui.py")
SIZE = 64  # the tiny model's images
FAST = {"steps": 2, "scale": 9.0}
QUEUE_SIZE = 8
BROWSER_ENV = "LDM_CHROMIUM"  # a Chromium or Chrome executable for the browser test


def start(tiny_files, outdir: Path, *flags: str) -> SimpleNamespace:
    """A web UI on the tiny model, in this process, on 127.0.0.1 and a free port."""
    model = ["--config", str(tiny_files["config"]), "--ckpt", str(tiny_files["safetensors"]), "--device", "cpu", "--precision", "full"]
    args = webui.build_parser().parse_args([*model, "--port", str(free_port()), "--queue_size", str(QUEUE_SIZE),
                                            "--outdir", str(outdir), *flags])
    app = webui.build_app(args)
    webui.launch(app, args)
    return SimpleNamespace(app=app, url=app.local_url, args=args)


@pytest.fixture(scope="module")
def server(tiny_files, tmp_path_factory):
    ui = start(tiny_files, tmp_path_factory.mktemp("webui-out"))
    try:
        yield ui
    finally:
        ui.app.close()


@pytest.fixture(scope="module")
def client(server) -> Client:
    return Client(server.url, verbose=False, download_files=True)


def png(path: str | Path) -> tuple[np.ndarray, dict[str, str]]:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")), dict(image.text)


def script_samples(task: str, outdir: Path, tiny_files, *flags: str) -> list[Path]:
    """The PNG files scripts/<task>.py writes for these flags."""
    model = ["--config", str(tiny_files["config"]), "--ckpt", str(tiny_files["safetensors"]), "--precision", "full"]
    assert main([*model, "--outdir", str(outdir), "--n_iter", "1", "--steps", "2", *flags], task) == 0
    return sorted((outdir / "samples").glob("*.png"))


@pytest.fixture(scope="module")
def init_image(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("webui") / "init.png"
    Image.fromarray((np.random.RandomState(0).rand(SIZE, SIZE, 3) * 255).astype(np.uint8)).save(path)
    return path


# -- the page in a real browser ----------------------------------------------------------------

def chromium() -> str:
    """The browser for Playwright: $LDM_CHROMIUM, else chromium (Debian) or Chrome on the PATH."""
    candidates = [os.environ.get(BROWSER_ENV), *map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))]
    found = next((c for c in candidates if c and os.access(c, os.X_OK)), None)
    if found is None:
        pytest.skip(f"no Chromium to drive: install one (apt-get install -y chromium) or set {BROWSER_ENV}")
    return found


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="the browser test needs playwright: pip install -e '.[test]'")
    executable = chromium()
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable)
        try:
            yield browser
        finally:
            browser.close()


def open_page(browser, url: str):
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    page.set_default_timeout(120_000)
    page.goto(url)
    return page


@pytest.fixture(scope="module")
def page(browser, server):
    page = open_page(browser, server.url)
    yield page
    page.close()


def slow_steps(monkeypatch, seconds: float) -> None:
    """Each sampler step takes ``seconds`` longer, so that its progress can be watched."""
    step_done = pipeline.Pipeline._step_done

    def slow(self, i: int) -> None:
        step_done(self, i)
        time.sleep(seconds)

    monkeypatch.setattr(pipeline.Pipeline, "_step_done", slow)


@pytest.mark.slow
def test_browser_types_a_prompt_generates_and_shows_the_image(page, monkeypatch):
    slow_steps(monkeypatch, 0.1)
    page.locator("#txt2img-prompt textarea").fill("a red circle")
    page.locator("#txt2img-generate").click()
    page.get_by_text(re.compile(r"Sampling")).first.wait_for()  # the progress, while it samples
    shown = page.locator("#txt2img-images img").first
    shown.wait_for()
    response = page.request.get(shown.get_attribute("src"))
    assert response.ok
    image = Image.open(io.BytesIO(response.body()))
    pixels = np.asarray(image.convert("RGB"))
    assert pixels.shape == (SIZE, SIZE, 3)
    assert pixels.std() > 1.0  # not blank
    assert image.text["prompt"] == "a red circle" and image.text["software"] == "ldm-sd2 txt2img"
    assert image.text["seed"] in page.locator("#txt2img-settings").inner_text()


@pytest.mark.slow
def test_page_asks_nothing_of_other_hosts(browser, server):
    page = browser.new_page()
    urls: list[str] = []
    page.on("request", lambda request: urls.append(request.url))
    page.goto(server.url, wait_until="networkidle")
    page.close()
    assert urls and all(url.startswith((server.url, "data:", "blob:")) for url in urls), [u for u in urls if not u.startswith(server.url)]


@pytest.mark.slow
def test_browser_shows_a_refused_input_as_a_message(page):
    page.locator("#txt2img-prompt textarea").fill("")
    page.locator("#txt2img-generate").click()
    page.get_by_text("Enter a prompt.").first.wait_for(state="visible")


# -- the API -----------------------------------------------------------------------------------

def test_every_served_task_is_an_endpoint_of_its_name_with_defaults(client, server):
    api = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert set(api) == {"/txt2img", "/img2img"}  # the tiny model is a base model: no inpaint tab
    for name, endpoint in api.items():
        parameters = endpoint["parameters"]
        assert parameters[0]["parameter_name"] == "prompt"
        assert all(p["parameter_has_default"] for p in parameters[1:]), name
    names = {p["parameter_name"] for p in api["/img2img"]["parameters"]}
    assert {"prompt", "image", "seed", "steps", "scale", "n_samples", "strength"} <= names


def test_txt2img_endpoint_gives_the_scripts_images_and_metadata(client, tiny_files, tmp_path):
    gallery, settings = client.predict(prompt="a red circle", seed=7, n_samples=2, api_name="/txt2img", **FAST)
    expected = script_samples("txt2img", tmp_path, tiny_files, "--prompt", "a red circle", "--seed", "7", "--n_samples", "2")
    assert len(gallery) == len(expected) == 2
    for item, path in zip(gallery, expected):
        (served, served_text), (pixels, text) = png(item["image"]), png(path)
        assert served.shape == (SIZE, SIZE, 3)
        np.testing.assert_array_equal(served, pixels)
        assert served_text == text  # seed, settings, prompt, batch index: what the script writes
        assert Path(item["image"]).read_bytes() == path.read_bytes()  # the very same file
        assert item["caption"] == f"{Path(item['image']).name}, seed 7"  # the file name on the server
    assert settings["seed"] == "7" and settings["size"] == f"{SIZE}x{SIZE}"


def test_txt2img_endpoint_defaults_and_random_seed(client):
    gallery, settings = client.predict(prompt="a red circle", steps=2, api_name="/txt2img")
    assert len(gallery) == 1 and 0 <= int(settings["seed"]) < 2**32
    assert settings["steps"] == "2" and settings["scale"] == "9.0" and settings["size"] == f"{SIZE}x{SIZE}"


def test_img2img_endpoint_gives_the_scripts_images_and_metadata(client, tiny_files, init_image, tmp_path):
    gallery, settings = client.predict(prompt="a green square", image=handle_file(str(init_image)), seed=3, strength=0.5,
                                       api_name="/img2img", **FAST)
    expected = script_samples("img2img", tmp_path, tiny_files, "--prompt", "a green square", "--init-img", str(init_image),
                              "--seed", "3", "--strength", "0.5", "--n_samples", "1")
    assert Path(gallery[0]["image"]).read_bytes() == expected[0].read_bytes()
    assert settings["strength"] == "0.5" and settings["init_image"] == init_image.name


def test_eight_concurrent_requests_all_complete_with_their_own_images(client):
    seeds = [11, 12] * 4
    jobs = [client.submit(prompt="a blue triangle", seed=seed, api_name="/txt2img", **FAST) for seed in seeds]
    results = [job.result(timeout=600) for job in jobs]
    assert [r[1]["seed"] for r in results] == [str(s) for s in seeds]
    first = {seed: png(result[0][0]["image"])[0] for seed, result in zip(seeds[:2], results[:2])}
    assert not np.array_equal(first[11], first[12])
    for seed, result in zip(seeds, results):  # one at a time: no request changed another's images
        np.testing.assert_array_equal(png(result[0][0]["image"])[0], first[seed])


def test_progress_reports_the_sampler_steps(client, monkeypatch):
    slow_steps(monkeypatch, 0.2)
    job = client.submit(prompt="a red circle", steps=4, api_name="/txt2img")
    seen = set()

    def done() -> bool:
        seen.update((unit.index, unit.length, unit.desc) for unit in job.status().progress_data or [])
        return job.done()

    wait_for(done, timeout=120, what="the end of the request")
    job.result(timeout=60)
    assert {(done, 4, "Sampling") for done in range(1, 5)} & seen, seen


# -- refusals: messages, and the server keeps serving ------------------------------------------

def refused(client: Client, **inputs) -> str:
    with pytest.raises(AppError) as e:
        client.predict(**inputs)
    return str(e.value)


def test_bad_inputs_are_messages(client, tmp_path, monkeypatch):
    assert "Enter a prompt" in refused(client, prompt="  ", api_name="/txt2img", **FAST)
    assert "multiples of 16" in refused(client, prompt="a red circle", height=56, api_name="/txt2img", **FAST)
    assert "Upload an image" in refused(client, prompt="a red circle", api_name="/img2img", **FAST)
    small = tmp_path / "small.png"
    Image.new("RGB", (8, 8)).save(small)
    assert "too small" in refused(client, prompt="a red circle", image=handle_file(str(small)), api_name="/img2img", **FAST)
    assert "greater than maximum value 4" in refused(client, prompt="a red circle", n_samples=9, api_name="/txt2img", **FAST)

    def nan_latents(self, c, uc, batch_size, watch):
        return torch.full((batch_size, *self.latent_shape), float("nan"))

    with monkeypatch.context() as m:
        m.setattr(pipeline.Pipeline, "sample", nan_latents)
        assert "NaN or inf" in refused(client, prompt="a red circle", api_name="/txt2img", **FAST)
    with monkeypatch.context() as m:
        m.setenv("LDM_MEMORY_CHECK", "1")
        m.setattr("ldm.generation.memory.available_memory", lambda device: 1024)
        assert "GiB is available" in refused(client, prompt="a red circle", api_name="/txt2img", **FAST)
    gallery, _ = client.predict(prompt="a red circle", api_name="/txt2img", **FAST)  # still serving
    assert len(gallery) == 1


def test_a_full_queue_is_a_clear_message(client, monkeypatch):
    release = threading.Event()
    render = serving.render

    def held(pipeline, prompts):
        release.wait(timeout=300)
        return render(pipeline, prompts)

    monkeypatch.setattr(serving, "render", held)
    request = {"prompt": "a red circle", "api_name": "/txt2img", **FAST}
    running = client.submit(**request)
    waiting = []
    try:
        wait_for(lambda: running.status().code.name == "PROCESSING", timeout=60, what="the first request running")
        for _ in range(QUEUE_SIZE):
            waiting.append(client.submit(**request))
            wait_for(lambda: waiting[-1].status().code.name in ("IN_QUEUE", "QUEUE_FULL"), timeout=60, what="a queued request")
        with pytest.raises(Exception, match="Queue is full"):
            client.submit(**request).result(timeout=60)
    finally:
        release.set()
    assert all(len(job.result(timeout=600)[0]) == 1 for job in [running, *waiting])


# -- the inpaint tab, on the tiny inpainting model ---------------------------------------------

def test_editor_value_gives_the_image_and_the_painted_mask():
    background = Image.new("RGBA", (32, 16), "blue")
    layer = Image.new("RGBA", (32, 16), (0, 0, 0, 0))
    layer.paste((255, 0, 255, 150), (4, 4, 10, 8))
    image, mask = webui.editor_image_and_mask({"background": background, "layers": [layer], "composite": None})
    assert image.mode == "RGB" and image.size == mask.size == (32, 16)
    assert mask.getbbox() == (4, 4, 10, 8) and set(np.unique(np.asarray(mask))) == {0, 255}
    with pytest.raises(gr.Error, match="Upload an image"):
        webui.editor_image_and_mask({"background": None, "layers": [], "composite": None})
    with pytest.raises(gr.Error, match="mask is empty"):
        webui.editor_image_and_mask({"background": background, "layers": [], "composite": None})


@pytest.fixture(scope="module")
def inpaint_server(tiny_inpaint_model, tmp_path_factory):
    """A web UI on the tiny inpainting model, and its config and checkpoint files."""
    folder = tmp_path_factory.mktemp("tiny-inpaint")
    files = {"config": folder / "config.yaml", "safetensors": folder / "model.safetensors"}
    OmegaConf.save(tiny_family_config("inpainting"), files["config"])
    save_state_dict(tiny_inpaint_model.state_dict(), files["safetensors"])
    ui = start(files, folder / "out")
    ui.files = files
    try:
        yield ui
    finally:
        ui.app.close()


def test_inpaint_endpoint_gives_the_scripts_images_and_checks_the_mask(inpaint_server, init_image, tmp_path):
    client = Client(inpaint_server.url, verbose=False)
    assert set(client.view_api(print_info=False, return_format="dict")["named_endpoints"]) == {"/inpaint"}
    image, mask = handle_file(str(init_image)), tmp_path / "mask.png"
    Image.new("L", (SIZE, SIZE), 0).save(mask)
    assert "black everywhere" in refused(client, prompt="a red circle", image=image, mask=handle_file(str(mask)),
                                         api_name="/inpaint", **FAST)
    Image.new("L", (SIZE, SIZE // 2), 255).save(mask)
    assert "same size" in refused(client, prompt="a red circle", image=image, mask=handle_file(str(mask)),
                                  api_name="/inpaint", **FAST)
    assert "needs an image and a mask" in refused(client, prompt="a red circle", image=image, api_name="/inpaint", **FAST)
    square = Image.new("L", (SIZE, SIZE), 0)
    square.paste(255, (16, 16, 48, 40))
    square.save(mask)
    gallery, settings = client.predict(prompt="a red circle", image=image, mask=handle_file(str(mask)), seed=5,
                                       api_name="/inpaint", **FAST)
    expected = script_samples("inpaint", tmp_path / "script", inpaint_server.files, "--prompt", "a red circle",
                              "--image", str(init_image), "--mask", str(mask), "--seed", "5", "--scale", "9.0", "--n_samples", "1")
    assert len(gallery) == len(expected) == 1
    assert Path(gallery[0]["image"]).read_bytes() == expected[0].read_bytes()  # pixels and metadata, the mask's name
    assert settings["software"] == "ldm-sd2 inpaint" and settings["seed"] == "5"


@pytest.mark.slow
def test_browser_paints_a_mask_in_the_page_and_inpaints(browser, inpaint_server, init_image, monkeypatch):
    masks = []
    init = InpaintPipeline.__init__

    def keeping_the_mask(self, model, sampling, image, mask, *args, **kwargs):
        with Image.open(mask) as m:
            masks.append(np.asarray(m.convert("L")))
        init(self, model, sampling, image, mask, *args, **kwargs)

    monkeypatch.setattr(InpaintPipeline, "__init__", keeping_the_mask)
    page = open_page(browser, inpaint_server.url)
    page.locator("#inpaint-prompt textarea").fill("a red circle")
    page.locator("#inpaint-editor input[type=file]").first.set_input_files(init_image)
    canvas = page.locator("#inpaint-editor canvas").first
    canvas.wait_for()
    page.wait_for_timeout(1000)  # the image settles into the canvas
    box = canvas.bounding_box()
    page.mouse.move(box["x"] + 0.45 * box["width"], box["y"] + 0.45 * box["height"])
    page.mouse.down()
    page.mouse.move(box["x"] + 0.55 * box["width"], box["y"] + 0.55 * box["height"], steps=10)
    page.mouse.up()
    page.locator("#inpaint-generate").click()
    shown = page.locator("#inpaint-images img").first
    shown.or_(page.get_by_text("the mask is empty")).first.wait_for()
    assert shown.is_visible(), "the page saw no stroke: the mask is empty"
    with Image.open(io.BytesIO(page.request.get(shown.get_attribute("src")).body())) as result:
        assert result.size == (SIZE, SIZE) and result.text["software"] == "ldm-sd2 inpaint"
    page.close()
    (mask,) = masks
    assert mask.shape == (SIZE, SIZE) and set(np.unique(mask)) == {0, 255}
    assert 0.0 < (mask > 0).mean() < 0.5  # the stroke, not the whole image


def test_served_tasks_follow_the_model_family():
    expected = [("LatentDiffusion", ["txt2img", "img2img"]), ("SGMLatentDiffusion", ["txt2img", "img2img"]),
                ("LatentInpaintDiffusion", ["inpaint"]),
                ("LatentDepth2ImageDiffusion", ["depth2img"]), ("LatentUpscaleDiffusion", ["upscale"]),
                ("ImageEmbeddingConditionedLatentDiffusion", ["variations"]), ("Unknown", [])]
    for target, tasks in expected:
        assert serving.served_tasks(SimpleNamespace(target=target)) == tasks
    assert set(webui.WebUI.__init__.__code__.co_names) >= {"depth2img_tab", "upscale_tab", "variations_tab"}


def test_a_model_with_no_served_task_is_refused_at_start():
    model = SimpleNamespace(target="LatentSomethingElse", files=SimpleNamespace(config=Path("other.yaml")))
    with pytest.raises(GenerationError, match="no task serves this model family"):
        serving.ModelServer(model, Path("unused"))


# -- the command line --------------------------------------------------------------------------

def test_without_config_or_ckpt_it_serves_the_demo_model():
    args = webui.build_parser().parse_args([])
    assert (args.port, args.listen, args.share, args.config, args.ckpt) == (7860, False, False, None, None)
    model = Model(model_settings_from_args(args))
    assert model.files.demo and serving.served_tasks(model) == ["txt2img", "img2img"]


def test_bad_model_flags_are_one_error_line(tiny_files, capsys):
    assert webui.main(["--config", str(tiny_files["config"]), "--ckpt", "missing.ckpt"]) == 1
    assert "webui.py: error: --ckpt missing.ckpt: no such file" in capsys.readouterr().err
    assert webui.main(["--config", str(tiny_files["config"]), "--ckpt", str(tiny_files["safetensors"]),
                       "--device", "cpu", "--disable_flash", "--disable_math"]) == 2


@pytest.mark.slow
def test_command_line_serves_on_localhost(tiny_files, tmp_path):
    port = free_port()
    flags = ["--config", str(tiny_files["config"]), "--ckpt", str(tiny_files["safetensors"]), "--device", "cpu",
             "--port", str(port), "--outdir", str(tmp_path / "out")]
    log = tmp_path / "webui.log"
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "webui.py"), *flags], env=child_env(),
                                   stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        wait_for(lambda: "web UI on" in log.read_text(), timeout=120, alive=lambda: process.poll() is None,
                 what="the server's address in its output")
        assert f"http://127.0.0.1:{port}" in log.read_text(), log.read_text()
        gallery, _ = Client(f"http://127.0.0.1:{port}/", verbose=False).predict(prompt="a red circle", api_name="/txt2img", **FAST)
        assert len(gallery) == 1 and (tmp_path / "out" / "samples" / Path(gallery[0]["image"]).name).is_file()
    finally:
        process.terminate()
        process.wait(timeout=60)


def test_a_models_sampling_defaults_are_the_pages_and_the_apis(tiny_files, tmp_path, monkeypatch):
    """SD-Turbo's config (its sampling: section) sets the web UI's defaults: a request that leaves
    steps, scale, sampler and schedule out samples as the scripts would, 1 step of Euler a, trailing,
    no guidance; given values win."""
    config = OmegaConf.load(tiny_files["config"])
    config.sampling = OmegaConf.load(ROOT / "configs" / "stable-diffusion" / "sd-turbo.yaml").sampling
    OmegaConf.save(config, tmp_path / "turbo.yaml")
    model = Model(ModelSettings(config=tmp_path / "turbo.yaml", ckpt=tiny_files["safetensors"], device="cpu"))
    ui = webui.WebUI(serving.ModelServer(model, tmp_path / "out"))
    asked = []

    def pipeline(task, sampling, *inputs, **options):
        asked.append((task, sampling, inputs))
        raise UsageError("enough")

    monkeypatch.setattr(ui.server, "pipeline", pipeline)
    for call in (lambda: ui.txt2img("a red circle"), lambda: ui.txt2img("a red circle", steps=3, sampler="DPM++ 2M Karras"),
                 lambda: ui.img2img("a red circle", image="in.png"), lambda: ui.txt2img("a red circle", sampler="plms"),
                 lambda: ui.txt2img("a red circle", sampler="euler", schedule="default")):
        with pytest.raises(gr.Error):
            call()
    (_, first, _), (_, second, _), (task, third, inputs), (_, plms, _), (_, euler, _) = asked
    assert (first.sampler, first.schedule, first.steps, first.scale) == ("euler_ancestral", "trailing", 1, 1.0)
    assert (second.sampler, second.schedule, second.steps) == ("dpmpp_2m", "karras", 3)  # named with the sampler
    assert (task, third.steps, inputs[-1]) == ("img2img", 2, 0.5)
    assert (plms.sampler, plms.schedule, euler.schedule) == ("plms", None, "trailing")  # PLMS runs on its own grid
