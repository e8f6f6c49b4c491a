"""One loaded model serving many requests (the web UI, scripts/webui.py): which tasks the model's
family serves, and one request's run on the pipeline layer the scripts use, so a served image is
the scripts' image for the same settings, written as the scripts write it (PNG metadata, watermark)."""

from __future__ import annotations

import logging
import random
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from PIL import Image

from ldm.generation.control import ControlSettings
from ldm.generation.errors import GenerationError, UsageError
from ldm.generation.images import ImageWriter, Watermarker, to_uint8
from ldm.generation.memory import check_fits
from ldm.generation.model import Model
from ldm.generation.options import check_output_paths
from ldm.generation.pipeline import Pipeline
from ldm.generation.run import _out_of_memory, image_metadata, render
from ldm.generation.settings import OutputSettings, SamplingSettings
from ldm.generation.tasks import TASKS

logger = logging.getLogger(__name__)

# The tasks each model family (the config's ``model.target`` class) can run, in the order shown.
# A task appears once ``TASKS`` has it: a new task is one name here and its pipeline in tasks/.
FAMILY_TASKS: dict[str, tuple[str, ...]] = {
    "LatentDiffusion": ("txt2img", "img2img"),
    "SGMLatentDiffusion": ("txt2img", "img2img"),
    "LatentInpaintDiffusion": ("inpaint",),
    "LatentDepth2ImageDiffusion": ("depth2img",),
    "LatentUpscaleDiffusion": ("upscale",),
    "ImageEmbeddingConditionedLatentDiffusion": ("variations",),
}
SEED_LIMIT = 2**32  # NumPy's seeds are below this


def served_tasks(model: Model) -> list[str]:
    """The tasks of ``model``'s family that this version has."""
    return [task for task in FAMILY_TASKS.get(model.target, ()) if task in TASKS]


def resolve_seed(seed: int | float | None) -> int:
    """``seed`` as an int, or a fresh random one for None or a negative value (a UI's "random")."""
    if seed is None or seed < 0:
        return random.SystemRandom().randrange(SEED_LIMIT)
    if seed != int(seed) or seed >= SEED_LIMIT:
        raise UsageError(f"seed {seed}: must be a whole number below 2**32, or -1 for a random one")
    return int(seed)


def check_mask(image: str | Path, mask: str | Path) -> None:
    """An inpainting mask that can work: the image's size, with something to repaint (white)."""
    try:
        with Image.open(image) as i, Image.open(mask) as m:
            image_size, mask_size, painted = i.size, m.size, m.convert("L").getbbox() is not None
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise GenerationError(f"the image or the mask cannot be read: {e}") from None
    if image_size != mask_size:
        raise UsageError(f"the mask is {mask_size[0]}x{mask_size[1]}, the image {image_size[0]}x{image_size[1]}: they must be the same size")
    if not painted:
        raise UsageError("the mask is black everywhere: nothing to repaint (white marks the area to repaint)")


@dataclass
class Generated:
    """A request's images (PNG files) and the settings they share (seed, sampler, prompt, ...)."""

    paths: list[Path]
    settings: dict[str, str]


CONTROLNET_SUFFIXES = (".safetensors", ".pth", ".ckpt", ".pt")


def controlnet_files(folder: str | Path | None) -> dict[str, Path]:
    """The ControlNet files of ``folder`` by name (none without one)."""
    if folder is None:
        return {}
    folder = Path(folder)
    if not folder.is_dir():
        raise GenerationError(f"--controlnet_dir {folder}: no such folder")
    files = {p.name: p for p in sorted(folder.iterdir()) if p.suffix in CONTROLNET_SUFFIXES and p.is_file()}
    if not files:
        raise GenerationError(f"--controlnet_dir {folder}: holds no ControlNet files ({', '.join(CONTROLNET_SUFFIXES)})")
    return files


class ModelServer:
    """A model, loaded once, running one request at a time (the sampler seeds the global generators,
    so two runs at once would change each other's images); images are written to ``outdir`` as the
    scripts write them."""

    def __init__(self, model: Model, outdir: Path, watermark: bool = True, max_samples: int = 4,
                 clip_stats: str | Path | None = None, controlnet_dir: str | Path | None = None,
                 midas: str | Path | None = None, midas_config: str | Path | None = None):
        self.model = model
        self.clip_stats = clip_stats  # unCLIP-L's embedding statistics file, for the variations task
        self.controlnets = controlnet_files(controlnet_dir)
        # The ControlNet tab's depth preprocessor: a MiDaS file and the depth config sizing it.
        self.midas = None if midas is None else Path(midas)
        self.midas_config = None if midas_config is None else Path(midas_config)
        self.tasks = served_tasks(model)
        if not self.tasks:
            known = FAMILY_TASKS.get(model.target)
            why = f"its tasks ({', '.join(known)}) are not in this version" if known else "no task serves this model family"
            raise GenerationError(f"--config {model.files.config}: {model.target} model: {why}")
        self.outdir = Path(outdir)
        check_output_paths(OutputSettings(outdir=self.outdir))
        self.max_samples = max_samples
        self.watermark = Watermarker(watermark)
        self._lock = threading.Lock()

    def pipeline(self, task: str, sampling: SamplingSettings, *inputs: Any, n_samples: int = 1,
                 controls: Sequence[ControlSettings] = (), **options: Any) -> Pipeline:
        """The task's pipeline (``TASKS[task](model, sampling, *inputs, n_samples=..., **options)``)
        guided by ``controls`` (ControlNets of :attr:`controlnets`), checked: a served task, a batch
        within ``max_samples``, a run that fits in memory."""
        if task not in self.tasks:
            raise UsageError(f"this {self.model.target} model serves {', '.join(self.tasks)}, not {task}")
        if not 1 <= n_samples <= self.max_samples:
            raise UsageError(f"n_samples {n_samples}: this server makes 1 to {self.max_samples} images per request")
        unknown = [c.path.name for c in controls if c.path not in self.controlnets.values()]
        if unknown:
            raise UsageError(f"ControlNet {', '.join(unknown)}: not one this server offers ({', '.join(self.controlnets) or 'none'})")
        try:
            pipeline = TASKS[task](self.model, sampling, *inputs, n_samples=n_samples, **options)
        except ValueError as e:  # a pipeline's own argument check
            raise UsageError(str(e)) from None
        pipeline.use_controls(list(controls))
        check_fits(pipeline, guided=pipeline.guided)
        return pipeline

    def run(self, pipeline: Pipeline, prompt: str, progress: Callable[[int, int], None] | None = None) -> Generated:
        """``pipeline.n_samples`` images of ``prompt``: the first batch the task's script makes with
        these settings, written as it writes them (watermark, PNG metadata, numbered names)."""
        self.model.check_prompts([prompt, pipeline.sampling.negative_prompt])
        with self._lock:
            pipeline.progress = progress
            try:
                images = render(pipeline, pipeline.n_samples * [prompt])
            except RuntimeError as e:
                if not _out_of_memory(e):
                    raise
                if self.model.device.type == "cuda":
                    torch.cuda.empty_cache()
                raise GenerationError(
                    f"out of {self.model.device.type.upper()} memory at {pipeline.width}x{pipeline.height} with "
                    f"{pipeline.n_samples} images: ask for fewer images or a smaller size"
                ) from None
            finally:
                pipeline.progress = None
        metadata = image_metadata(pipeline)
        writer = ImageWriter(self.outdir, self.watermark, metadata)
        try:
            paths = [writer.sample(to_uint8(image), prompt=prompt, iteration=0, batch_index=i) for i, image in enumerate(images)]
        except OSError as e:
            raise GenerationError(f"writing the images to {self.outdir} failed: {e}") from None
        return Generated(paths, {**metadata, "prompt": prompt})
