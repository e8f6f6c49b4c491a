"""A web UI for every task the model serves, on the pipeline layer the scripts use: one tab per task
of the model's family (base models: text to image and image to image; inpainting, depth, x4 upscaler
and unCLIP models: their task), each tab's generate button also an API endpoint for gradio_client
(/txt2img, /img2img, /inpaint, /depth2img, /upscale, /variations).

    python scripts/webui.py                       # the embedded demo model, on http://127.0.0.1:7860
    python scripts/webui.py --config configs/stable-diffusion/v2-inference.yaml --ckpt v2-1_512-ema-pruned.safetensors

The model loads once; requests queue and run one at a time. See docs/webui.md.
"""

from __future__ import annotations

import argparse
import html
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

import gradio as gr
from PIL import Image, ImageChops

from ldm.generation.argtypes import int_at_least, positive
from ldm.generation.control import NEEDS_MIDAS, PREPROCESSORS, ControlSettings, add_midas_arguments
from ldm.generation.errors import GenerationError, UsageError
from ldm.generation.images import to_uint8
from ldm.generation.model import Model
from ldm.generation.options import DEMO_PROMPT, add_model_arguments, default_schedule, model_settings_from_args, sampling_defaults
from ldm.generation.run import cli_logging, report_error
from ldm.generation.serving import SEED_LIMIT, ModelServer, check_mask, resolve_seed
from ldm.generation.settings import SamplingSettings
from ldm.generation.tasks import TASKS
from ldm.lora import lora_names
from ldm.models.diffusion.samplers import SAMPLERS
from ldm.models.diffusion.schedules import SCHEDULES

logger = logging.getLogger("ldm.webui")

DEFAULTS = {"seed": -1, "n_samples": 1}  # the rest: the task's and the model's (options.sampling_defaults)
DEFAULT_SCHEDULE = "default"  # the model config's schedule where the sampler runs on it, else the sampler's own
DEMO_EXAMPLES = [DEMO_PROMPT, "a green square", "a blue triangle", "a yellow circle"]
MAX_STEPS = 200
MAX_UPLOAD = "20mb"
# Every task's requests share one queue slot: the model runs one request at a time.
ONE_AT_A_TIME = {"concurrency_id": "model", "concurrency_limit": 1}
# No web fonts: the page asks nothing of other hosts.
THEME = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])


def refuse(error: Exception | str) -> gr.Error:
    """A refused request as the message the page (or the API client) shows."""
    return gr.Error(html.escape(str(error)), print_exception=False)


def editor_image_and_mask(value: dict[str, Any] | None) -> tuple[Image.Image, Image.Image]:
    """The image editor's picture and a mask of what was painted over it (white: repaint)."""
    background = (value or {}).get("background")
    if background is None:
        raise refuse("Upload an image, then paint over the area to repaint.")
    mask = Image.new("L", background.size, 0)
    for layer in (value or {}).get("layers") or []:
        if layer is not None and layer.mode == "RGBA":
            painted = layer.getchannel("A").resize(background.size, Image.NEAREST).point(lambda a: 255 if a else 0)
            mask = ImageChops.lighter(mask, painted)
    if mask.getbbox() is None:
        raise refuse("Paint over the area to repaint: the mask is empty.")
    return background.convert("RGB"), mask


class WebUI:
    """The page: a tab per served task, each a form, a generate button (an API endpoint of the
    task's name) and the images with their seed and settings."""

    def __init__(self, server: ModelServer):
        self.server = server
        self.model = server.model
        # task -> (tab title, tab builder); a task is shown when the model serves it (see serving.FAMILY_TASKS)
        self.tabs: dict[str, tuple[str, Callable[[], None]]] = {
            "txt2img": ("Text to image", self.txt2img_tab),
            "img2img": ("Image to image", self.img2img_tab),
            "inpaint": ("Inpaint", self.inpaint_tab),
            "depth2img": ("Depth to image", self.depth2img_tab),
            "upscale": ("Upscale x4", self.upscale_tab),
            "variations": ("Variations", self.variations_tab),
        }
        if server.controlnets and "txt2img" in server.tasks:
            self.tabs["controlnet"] = ("ControlNet", self.controlnet_tab)

    def build(self) -> gr.Blocks:
        shown = [task for task in [*self.server.tasks, "controlnet"] if task in self.tabs]
        for task in set(self.server.tasks) - set(shown):
            logger.warning("the model serves %s, but this web UI has no tab for it yet", task)
        if not shown:
            raise GenerationError(f"this web UI has no tab for the tasks of a {self.model.target} model ({', '.join(self.server.tasks)})")
        # Cached copies of the images are deleted after a day.
        with gr.Blocks(title="ldm-sd2", analytics_enabled=False, delete_cache=(3600, 86400)) as app:
            gr.Markdown(self.header())
            with gr.Tabs():
                for task in shown:
                    title, build = self.tabs[task]
                    with gr.Tab(title, id=task):
                        build()
        return app

    def header(self) -> str:
        files, s = self.model.files, self.model.settings
        which = f"the demo model (32x32 shapes: try {DEMO_PROMPT!r})" if files.demo else f"`{files.config.name}`, `{files.ckpt.name if files.ckpt else 'random weights'}`"
        line = f"### ldm-sd2\nModel: {which}; {self.model.target} on {s.device}, precision {self.model.computes_in}."
        if s.loras:
            line += " LoRA merged: " + ", ".join(f"`{p.name}` x{w}" for p, w in s.loras) + "."
        if s.lora_dir is not None:
            names = ", ".join(f"`{name}`" for name in lora_names(s.lora_dir)) or "none"
            line += f" LoRAs for a prompt's `<lora:NAME:WEIGHT>`: {names}."
        return f"{line}\n\n{self.prompt_note()}"

    def prompt_note(self) -> str:
        """How prompts are read, and the textual-inversion embeddings a prompt may name."""
        syntax = ("Prompts: AUTOMATIC1111's syntax, `(word:1.3)`, `(word)`, `[word]`, `BREAK`; any length."
                  if self.model.settings.prompt_syntax == "a1111" else "Prompts: plain text (--prompt_syntax none); any length.")
        embeddings = self.model.embeddings
        if not embeddings:
            return f"{syntax} No textual-inversion embeddings loaded (--embedding, --embeddings_dir)."
        listed = ", ".join(f"`{e.name}` ({len(e.vectors)} vector{'s' * (len(e.vectors) != 1)})" for e in embeddings)
        return f"{syntax} Textual-inversion embeddings, used where a prompt names them: {listed}."

    # -- form parts shared by the tabs ---------------------------------------------------------
    def prompt_row(self, task: str) -> tuple[gr.Textbox, gr.Textbox, gr.Button]:
        """The prompt, the negative prompt and the generate button."""
        example = DEMO_PROMPT if self.model.files.demo else TASKS[task].default_prompt
        with gr.Row(equal_height=True):
            with gr.Column(scale=5):
                prompt = gr.Textbox(label="Prompt", placeholder=example, lines=2, elem_id=f"{task}-prompt")
                negative = gr.Textbox("", label="Negative prompt (what guidance steers away from)", lines=1,
                                      elem_id=f"{task}-negative-prompt")
            button = gr.Button("Generate", variant="primary", scale=1, elem_id=f"{task}-generate")
        if self.model.files.demo:
            gr.Examples([[p] for p in DEMO_EXAMPLES], [prompt], label="Prompts the demo model knows")
        return prompt, negative, button

    def defaults(self, task: str) -> dict[str, Any]:
        return sampling_defaults(task, self.model)

    def sampling_controls(self, task: str) -> list[gr.components.Component]:
        """seed, steps, scale, n_samples, sampler and schedule, at the task's and the model's defaults."""
        d = self.defaults(task)
        samplers = TASKS[task].samplers()
        return [
            gr.Number(DEFAULTS["seed"], label="Seed (-1: a random one, shown with the images)", precision=0,
                      minimum=-1, maximum=SEED_LIMIT - 1),
            gr.Slider(1, MAX_STEPS, d["steps"], step=1, label="Steps"),
            gr.Slider(1.0, 30.0, d["scale"], step=0.5, label="Guidance scale (1: none)"),
            gr.Slider(1, self.server.max_samples, DEFAULTS["n_samples"], step=1, label="Images"),
            gr.Dropdown([(SAMPLERS[n].title, n) for n in samplers], value=d["sampler"], label="Sampler", elem_id=f"{task}-sampler"),
            gr.Dropdown([("default (the model's, else the sampler's own)", DEFAULT_SCHEDULE), *((s.title, n) for n, s in SCHEDULES.items())],
                        value=DEFAULT_SCHEDULE, label="Schedule", elem_id=f"{task}-schedule"),
        ]

    def outputs(self, task: str) -> list[gr.components.Component]:
        # The PNG files as the scripts write them, seed and settings in text chunks; downloads keep them.
        gallery = gr.Gallery(label="images", columns=2, height=480, object_fit="contain",
                             buttons=["download", "fullscreen"], elem_id=f"{task}-images")
        return [gallery, gr.JSON(label="settings", elem_id=f"{task}-settings")]

    # -- tabs ------------------------------------------------------------------------------------
    def txt2img_tab(self) -> None:
        g = self.model.geometry
        prompt, negative, button = self.prompt_row("txt2img")
        with gr.Row():
            with gr.Column():
                controls = self.sampling_controls("txt2img")
                size = dict(minimum=g.multiple, maximum=max(2 * g.native_size, g.multiple), value=g.native_size, step=g.multiple)
                controls += [gr.Slider(label="Height", **size), gr.Slider(label="Width", **size)]
            with gr.Column():
                outputs = self.outputs("txt2img")
        button.click(self.txt2img, [prompt, *controls, negative], outputs, api_name="txt2img", **ONE_AT_A_TIME)
        prompt.submit(self.txt2img, [prompt, *controls, negative], outputs, api_visibility="private", **ONE_AT_A_TIME)

    def img2img_tab(self) -> None:
        prompt, negative, button = self.prompt_row("img2img")
        with gr.Row():
            with gr.Column():
                image = gr.Image(label="Image to start from", type="filepath", image_mode=None, sources=["upload", "clipboard"])
                strength = gr.Slider(0.0, 1.0, self.defaults("img2img")["strength"], step=0.05,
                                     label="Strength (1.0: the image is noised entirely)")
                controls = self.sampling_controls("img2img")
            with gr.Column():
                outputs = self.outputs("img2img")
        button.click(self.img2img, [prompt, image, *controls, strength, negative], outputs, api_name="img2img", **ONE_AT_A_TIME)

    def inpaint_tab(self) -> None:
        brush = max(2, self.model.geometry.native_size // 16)  # pixels: the automatic size covers small images
        prompt, negative, button = self.prompt_row("inpaint")
        with gr.Row():
            with gr.Column():
                editor = gr.ImageEditor(label="Image: upload it, then paint over the area to repaint", type="pil",
                                        image_mode="RGBA", sources=["upload", "clipboard"], layers=False, transforms=[],
                                        brush=gr.Brush(default_size=brush, colors=[("#ff00ff", 0.6)], color_mode="fixed"),
                                        elem_id="inpaint-editor")
                # What the editor holds, as the API takes it: the image and a mask (white: repaint).
                image = gr.Image(label="image", type="filepath", image_mode=None, format="png", visible=False)
                mask = gr.Image(label="mask", type="filepath", image_mode=None, format="png", visible=False)
                controls = self.sampling_controls("inpaint")
            with gr.Column():
                outputs = self.outputs("inpaint")
        split = button.click(editor_image_and_mask, [editor], [image, mask], api_visibility="private", queue=False)
        split.success(self.inpaint, [prompt, image, mask, *controls, negative], outputs, api_name="inpaint", **ONE_AT_A_TIME)

    def image_input(self, label: str) -> gr.Image:
        return gr.Image(label=label, type="filepath", image_mode=None, sources=["upload", "clipboard"])

    def depth2img_tab(self) -> None:
        prompt, negative, button = self.prompt_row("depth2img")
        with gr.Row():
            with gr.Column():
                image = self.image_input("Image whose depth the result keeps")
                depth = self.image_input("Depth map (optional: greyscale, brighter = nearer; default: MiDaS' estimate)")
                strength = gr.Slider(0.0, 1.0, self.defaults("depth2img")["strength"], step=0.05,
                                     label="Strength (1.0: only the depth is kept)")
                controls = self.sampling_controls("depth2img")
            with gr.Column():
                outputs = self.outputs("depth2img")
        button.click(self.depth2img, [prompt, image, *controls, strength, depth, negative], outputs, api_name="depth2img",
                     **ONE_AT_A_TIME)

    def upscale_tab(self) -> None:
        prompt, negative, button = self.prompt_row("upscale")
        with gr.Row():
            with gr.Column():
                image = self.image_input("Low-resolution image (the result is four times its size)")
                noise = gr.Slider(0, 350, 20, step=1, label="Noise level (more: the model invents more detail)")
                controls = self.sampling_controls("upscale")
            with gr.Column():
                outputs = self.outputs("upscale")
        button.click(self.upscale, [prompt, image, *controls, noise, negative], outputs, api_name="upscale", **ONE_AT_A_TIME)

    def variations_tab(self) -> None:
        prompt, negative, button = self.prompt_row("variations")
        with gr.Row():
            with gr.Column():
                image = self.image_input("Image to make variations of")
                noise = gr.Slider(0, 999, 0, step=1, label="Noise level of its CLIP embedding (more: further from it)")
                controls = self.sampling_controls("variations")
            with gr.Column():
                outputs = self.outputs("variations")
        button.click(self.variations, [prompt, image, *controls, noise, negative], outputs, api_name="variations", **ONE_AT_A_TIME)

    def controlnet_tab(self) -> None:
        g = self.model.geometry
        prompt, negative, button = self.prompt_row("txt2img")
        with gr.Row():
            with gr.Column():
                with gr.Row():
                    net = gr.Dropdown(list(self.server.controlnets), value=next(iter(self.server.controlnets)), label="ControlNet")
                    offered = [p for p in PREPROCESSORS if p not in NEEDS_MIDAS or self.server.midas is not None]
                    preprocess = gr.Dropdown(offered, value="none", label="Make the hint from the image")
                hint = self.image_input("Control image (the hint)")
                with gr.Row():
                    weight = gr.Slider(0.0, 2.0, 1.0, step=0.05, label="Weight")
                    start = gr.Slider(0.0, 1.0, 0.0, step=0.05, label="Start (fraction of sampling)")
                    end = gr.Slider(0.0, 1.0, 1.0, step=0.05, label="End")
                guess = gr.Checkbox(False, label="Guess mode (the prompt may be empty; shallow layers weighted down)")
                controls = self.sampling_controls("txt2img")
                size = dict(minimum=g.multiple, maximum=max(2 * g.native_size, g.multiple), value=g.native_size, step=g.multiple)
                controls += [gr.Slider(label="Height", **size), gr.Slider(label="Width", **size)]
            with gr.Column():
                outputs = self.outputs("controlnet")
                used = gr.Image(label="the hint the ControlNet read", type="pil", format="png", interactive=False,
                                elem_id="controlnet-hint")  # PNG: the exact hint, not a lossy WebP of it
        inputs = [prompt, hint, net, *controls, weight, start, end, preprocess, guess, negative]
        button.click(self.controlnet, inputs, [*outputs, used], api_name="controlnet", **ONE_AT_A_TIME)

    # -- the endpoints: one per task, named inputs, all but the prompt with defaults -----------
    # Steps, scale, sampler, schedule and strength left out (None) take the task's and the model's defaults;
    # negative_prompt, guidance's unconditional text, is empty by default (the original's).
    def txt2img(self, prompt: str, seed: int = -1, steps: int | None = None, scale: float | None = None, n_samples: int = 1,
                sampler: str | None = None, schedule: str | None = None, height: int | None = None, width: int | None = None,
                negative_prompt: str = "", progress: gr.Progress = gr.Progress()):
        """Text to image; height and width default to the model's size."""
        return self.generate("txt2img", prompt, seed, steps, scale, n_samples, sampler, schedule, progress, negative_prompt=negative_prompt,
                             height=int(height) if height else None, width=int(width) if width else None)

    def img2img(self, prompt: str, image: str | None = None, seed: int = -1, steps: int | None = None, scale: float | None = None,
                n_samples: int = 1, sampler: str | None = None, schedule: str | None = None, strength: float | None = None,
                negative_prompt: str = "", progress: gr.Progress = gr.Progress()):
        """Image to image: ``image`` noised by ``strength`` of the steps, then denoised under the prompt."""
        if image is None:
            raise refuse("Upload an image to start from.")
        strength = self.defaults("img2img")["strength"] if strength is None else strength
        return self.generate("img2img", prompt, seed, steps, scale, n_samples, sampler, schedule, progress, image, float(strength),
                             negative_prompt=negative_prompt)

    def inpaint(self, prompt: str, image: str | None = None, mask: str | None = None, seed: int = -1, steps: int | None = None,
                scale: float | None = None, n_samples: int = 1, sampler: str | None = None, schedule: str | None = None,
                negative_prompt: str = "", progress: gr.Progress = gr.Progress()):
        """Inpainting: the white area of ``mask`` repainted under the prompt, the rest of ``image`` kept."""
        if image is None or mask is None:
            raise refuse("Inpainting needs an image and a mask (white: the area to repaint).")
        try:
            check_mask(image, mask)
        except (UsageError, GenerationError) as e:
            raise refuse(e) from None
        return self.generate("inpaint", prompt, seed, steps, scale, n_samples, sampler, schedule, progress, image, mask,
                             negative_prompt=negative_prompt)

    def depth2img(self, prompt: str, image: str | None = None, seed: int = -1, steps: int | None = None, scale: float | None = None,
                  n_samples: int = 1, sampler: str | None = None, schedule: str | None = None, strength: float | None = None,
                  depth_map: str | None = None, negative_prompt: str = "", progress: gr.Progress = gr.Progress()):
        """Depth to image: a new image under the prompt with ``image``'s depth (or ``depth_map``'s)."""
        if image is None:
            raise refuse("Upload an image whose depth to keep.")
        strength = self.defaults("depth2img")["strength"] if strength is None else strength
        return self.generate("depth2img", prompt, seed, steps, scale, n_samples, sampler, schedule, progress, image,
                             float(strength), depth_map=depth_map, negative_prompt=negative_prompt)

    def upscale(self, prompt: str, image: str | None = None, seed: int = -1, steps: int | None = None, scale: float | None = None,
                n_samples: int = 1, sampler: str | None = None, schedule: str | None = None, noise_level: int = 20,
                negative_prompt: str = "", progress: gr.Progress = gr.Progress()):
        """x4 upscaling of ``image``, guided by the prompt."""
        if image is None:
            raise refuse("Upload the image to upscale.")
        return self.generate("upscale", prompt, seed, steps, scale, n_samples, sampler, schedule, progress, image, int(noise_level),
                             negative_prompt=negative_prompt)

    def variations(self, prompt: str, image: str | None = None, seed: int = -1, steps: int | None = None, scale: float | None = None,
                   n_samples: int = 1, sampler: str | None = None, schedule: str | None = None, noise_level: int = 0,
                   negative_prompt: str = "", progress: gr.Progress = gr.Progress()):
        """Variations of ``image`` (stable unCLIP), guided by the prompt."""
        if image is None:
            raise refuse("Upload the image to make variations of.")
        return self.generate("variations", prompt, seed, steps, scale, n_samples, sampler, schedule, progress, image,
                             int(noise_level), clip_stats=self.server.clip_stats, negative_prompt=negative_prompt)

    def controlnet(self, prompt: str, hint: str | None = None, controlnet: str | None = None, seed: int = -1,
                   steps: int | None = None, scale: float | None = None, n_samples: int = 1, sampler: str | None = None,
                   schedule: str | None = None, height: int | None = None, width: int | None = None, weight: float = 1.0,
                   start: float = 0.0, end: float = 1.0, preprocess: str = "none", guess_mode: bool = False,
                   negative_prompt: str = "", progress: gr.Progress = gr.Progress()):
        """Text to image guided by a ControlNet of the server's (by file name) reading ``hint``;
        also returns the hint as the ControlNet saw it (preprocessed, at the image size)."""
        if hint is None:
            raise refuse("Upload a control image.")
        name = controlnet or next(iter(self.server.controlnets))
        if name not in self.server.controlnets:
            raise refuse(f"ControlNet {name}: not one this server offers ({', '.join(self.server.controlnets)})")
        try:
            control = ControlSettings(self.server.controlnets[name], Path(hint), float(weight), float(start), float(end),
                                      preprocess, bool(guess_mode), self.server.midas, self.server.midas_config)
        except UsageError as e:
            raise refuse(e) from None
        used: list[Image.Image] = []
        gallery, settings = self.generate("txt2img", prompt, seed, steps, scale, n_samples, sampler, schedule, progress,
                                          height=int(height) if height else None, width=int(width) if width else None,
                                          controls=[control], seen=used, negative_prompt=negative_prompt)
        return gallery, settings, used[0]

    def generate(self, task: str, prompt: str | None, seed: Any, steps: Any, scale: Any, n_samples: Any, sampler: str | None,
                 schedule: str | None, progress: gr.Progress, *inputs: Any, negative_prompt: str | None = "",
                 **options: Any) -> tuple[list, dict[str, str]]:
        """Run ``task`` on the pipeline layer; every refusal (bad input, non-finite images, memory) is a message."""
        if not (prompt or "").strip():
            raise refuse("Enter a prompt.")
        d = self.defaults(task)
        sampler = sampler or d["sampler"]
        try:
            if schedule in (None, DEFAULT_SCHEDULE):
                schedule = default_schedule(sampler, d["schedule"])
            sampling = SamplingSettings(sampler=sampler, steps=int(d["steps"] if steps is None else steps),
                                        scale=float(d["scale"] if scale is None else scale), seed=resolve_seed(seed),
                                        schedule=schedule, negative_prompt=negative_prompt or "")
        except (TypeError, ValueError, UsageError) as e:
            raise refuse(f"bad sampling settings: {e}") from None
        seen = options.pop("seen", None)
        try:
            pipeline = self.server.pipeline(task, sampling, *inputs, n_samples=int(n_samples), **options)
            result = self.server.run(pipeline, prompt, lambda done, total: progress((done, total), desc="Sampling"))
        except (UsageError, GenerationError) as e:  # NonFiniteError and the memory refusal among them
            logger.warning("%s refused: %s", task, e)
            raise refuse(e) from None
        gallery = [(str(path), f"{path.name}, seed {sampling.seed}") for path in result.paths]
        if seen is not None and pipeline.controller is not None:  # the hints as the ControlNets read them
            seen += [Image.fromarray(to_uint8(hint[0])) for hint in pipeline.controller.hints]
        return gallery, result.settings


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="webui.py", description="A web UI for every task the model serves. See docs/webui.md.")
    add_model_arguments(p)
    p.add_argument("--port", type=int_at_least(1), default=7860, help="port to listen on (default: %(default)s)")
    p.add_argument("--listen", action="store_true",
                   help="listen on every network interface, not only 127.0.0.1: anyone who can reach the port can use the model")
    p.add_argument("--share", action="store_true",
                   help="also publish the UI through a public gradio.live link: anyone with the link can use the model")
    p.add_argument("--queue_size", type=positive, default=16,
                   help="requests that may wait; more are refused with 'queue is full' (default: %(default)s)")
    p.add_argument("--max_samples", type=positive, default=4, help="most images per request (default: %(default)s)")
    p.add_argument("--outdir", type=str, default="outputs/webui-samples",
                   help="folder the images are written to, as the scripts write them (default: %(default)s)")
    p.add_argument("--no_watermark", action="store_true", help="do not add the invisible watermark")
    p.add_argument("--clip_stats", type=str, default=None,
                   help="unCLIP-L only: Karlo's CLIP embedding statistics, ViT-L-14_stats.th (not part of the checkpoint)")
    p.add_argument("--controlnet_dir", type=str, default=None,
                   help="a folder of SD2.1 ControlNets (e.g. control_v11p_sd21_*.safetensors): adds a ControlNet tab offering them")
    add_midas_arguments(p)
    return p


def build_app(args: argparse.Namespace) -> gr.Blocks:
    """Check the flags, load the model (once) and build the page with its bounded queue."""
    model = Model(model_settings_from_args(args))
    server = ModelServer(model, Path(args.outdir), watermark=not args.no_watermark, max_samples=args.max_samples,
                         clip_stats=args.clip_stats, controlnet_dir=args.controlnet_dir, midas=args.midas,
                         midas_config=args.midas_config)
    app = WebUI(server).build()
    model.load()
    if server.midas is not None:  # a wrong --midas is refused now, not at the first depth request
        model.depth_estimator(server.midas, server.midas_config)
    logger.info("serving %s with %s", ", ".join(server.tasks), model.files.config)
    # One request at a time per model; at most --queue_size wait.
    return app.queue(max_size=args.queue_size, default_concurrency_limit=1)


def launch(app: gr.Blocks, args: argparse.Namespace) -> None:
    """Start serving (returns once the server listens); a line says where."""
    if args.listen:
        logger.warning("--listen: the UI listens on every interface, with no login: anyone who can reach port %d can use it", args.port)
    if args.share:
        logger.warning("--share: the UI is published on a public gradio.live link: anyone with the link can use it")
    # Gradio hands out files from the working and temporary folders; a --outdir elsewhere must be allowed.
    outdir = Path(args.outdir).resolve()
    allowed = [] if any(outdir.is_relative_to(p) for p in (Path.cwd(), Path(tempfile.gettempdir()).resolve())) else [str(outdir)]
    app.launch(server_name="0.0.0.0" if args.listen else "127.0.0.1", server_port=args.port, share=args.share,
               prevent_thread_lock=True, max_file_size=MAX_UPLOAD, allowed_paths=allowed, ssr_mode=False, theme=THEME, quiet=True)
    logger.info("web UI on %s%s (Ctrl-C stops it)", app.local_url, f" and {app.share_url}" if app.share_url else "")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    with cli_logging():
        try:
            app = build_app(args)
        except (UsageError, GenerationError) as e:
            return report_error(parser.prog, e)
        launch(app, args)
        app.block_thread()  # until Ctrl-C, which closes the server
    return 0


if __name__ == "__main__":
    sys.exit(main())
