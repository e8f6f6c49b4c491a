"""The tasks by name: one pipeline module each over the shared core (``ldm.generation.pipeline``)."""

from __future__ import annotations

from ldm.generation.pipeline import Pipeline
from ldm.generation.tasks.img2img import Img2ImgPipeline
from ldm.generation.tasks.txt2img import Txt2ImgPipeline

TASKS: dict[str, type[Pipeline]] = {p.task: p for p in (Txt2ImgPipeline, Img2ImgPipeline)}

__all__ = ["TASKS", "Img2ImgPipeline", "Txt2ImgPipeline"]
