"""The tasks by name: one pipeline module each over the shared core (``ldm.generation.pipeline``)."""

from __future__ import annotations

from ldm.generation.pipeline import Pipeline
from ldm.generation.tasks.depth2img import Depth2ImgPipeline
from ldm.generation.tasks.img2img import Img2ImgPipeline
from ldm.generation.tasks.inpaint import InpaintPipeline
from ldm.generation.tasks.txt2img import Txt2ImgPipeline
from ldm.generation.tasks.upscale import UpscalePipeline
from ldm.generation.tasks.variations import VariationsPipeline

TASKS: dict[str, type[Pipeline]] = {
    p.task: p for p in (Txt2ImgPipeline, Img2ImgPipeline, InpaintPipeline, Depth2ImgPipeline, UpscalePipeline, VariationsPipeline)
}

__all__ = ["TASKS", "Depth2ImgPipeline", "Img2ImgPipeline", "InpaintPipeline", "Txt2ImgPipeline", "UpscalePipeline", "VariationsPipeline"]
