"""Typed settings of a generation run, separate from the command line: the CLI parses flags into
them, Python users build them directly. Every field has the original script's default."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ldm.generation.errors import UsageError

PRECISIONS = ("full", "autocast", "bf16")


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class ModelSettings:
    """Which model, on which device, computed how.

    ``config``/``ckpt`` both None: the embedded demo model; ``ckpt`` may be a diffusers folder, and
    then names its config when ``config`` is None. ``precision``: "full" (float32),
    "autocast" (the original's: fp16 on CUDA, bf16 on the CPU) or "bf16" (autocast to bfloat16).
    ``compile_backend``: what ``compile`` compiles with, "inductor" or "openvino" (CPU only; ldm.generation.openvino).
    ``cache_interval``/``cache_depth``: step caching (DeepCache, ldm.modules.diffusionmodules.deepcache;
    an interval of 1 is none).
    ``taesd``: decode with TAESD's decoder from this file instead of the VAE (approximate, fast).
    ``loras``: (file, weight) pairs merged into the weights at load; ``lora_dir``: the folder that
    prompts' ``<lora:NAME:WEIGHT>`` tags name files of.
    ``prompt_syntax``: "a1111" (weights such as ``(word:1.3)``, ``BREAK``) or "none" (brackets are
    text); prompts of any length either way. ``embeddings``: textual-inversion files, and every one
    under ``embeddings_dir``, each used where its file's stem appears in a prompt.
    """

    config: Path | None = None
    ckpt: Path | None = None
    random_weights: bool = False
    device: str = field(default_factory=default_device)
    precision: str = "autocast"
    attention: str = "sdpa"
    disable_flash: bool = False
    disable_mem_efficient: bool = False
    disable_math: bool = False
    compile: bool = False
    compile_mode: str | None = None
    compile_backend: str = "inductor"
    cache_interval: int = 1
    cache_depth: int = 1
    taesd: Path | None = None
    loras: tuple[tuple[Path, float], ...] = ()
    lora_dir: Path | None = None
    prompt_syntax: str = "a1111"
    embeddings: tuple[Path, ...] = ()
    embeddings_dir: Path | None = None

    def __post_init__(self) -> None:
        from ldm.modules.encoders.prompts import PROMPT_SYNTAXES

        self.config = Path(self.config) if self.config is not None else None
        self.ckpt = Path(self.ckpt) if self.ckpt is not None else None
        self.taesd = Path(self.taesd) if self.taesd is not None else None
        self.loras = tuple((Path(path), float(weight)) for path, weight in self.loras)
        self.lora_dir = Path(self.lora_dir) if self.lora_dir is not None else None
        for path, _ in self.loras:
            if not path.is_file():
                raise UsageError(f"--lora {path}: no such file")
        if self.lora_dir is not None and not self.lora_dir.is_dir():
            raise UsageError(f"--lora_dir {self.lora_dir}: no such folder")
        self.embeddings = tuple(Path(p) for p in self.embeddings)
        self.embeddings_dir = Path(self.embeddings_dir) if self.embeddings_dir is not None else None
        if self.precision not in PRECISIONS:
            raise UsageError(f"precision {self.precision!r}: choose one of {', '.join(PRECISIONS)}")
        if self.cache_interval < 1:
            raise UsageError(f"--cache_interval {self.cache_interval}: at least 1 (1: every UNet call is a full one)")
        if self.cache_depth < 0:
            raise UsageError(f"--cache_depth {self.cache_depth}: at least 0")
        if self.prompt_syntax not in PROMPT_SYNTAXES:
            raise UsageError(f"prompt syntax {self.prompt_syntax!r}: choose one of {', '.join(PROMPT_SYNTAXES)}")


@dataclass
class SamplingSettings:
    """The sampler and its parameters; ``seed`` makes a run reproducible.

    ``sampler`` takes any name or AUTOMATIC1111 spelling (``"DPM++ 2M Karras"`` also sets the
    schedule); ``schedule`` None is the sampler's default, ``eta`` None the task's or the sampler's
    (0 for DDIM, 1 for ancestral and SDE samplers; deterministic samplers take none). A scale of 1 is
    no guidance (the conditional prediction alone), as in the original formula. ``negative_prompt``
    is guidance's unconditional text (the original's: the empty prompt).
    """

    sampler: str = "ddim"
    steps: int = 50
    eta: float | None = None
    scale: float = 9.0
    seed: int = 42
    fixed_code: bool = False
    schedule: str | None = None
    negative_prompt: str = ""

    def __post_init__(self) -> None:
        from ldm.models.diffusion.samplers import SAMPLERS, parse_sampler
        from ldm.models.diffusion.schedules import schedule_named

        for name in ("eta", "scale"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise UsageError(f"{name} must be a finite number, got {value}")
        try:
            self.sampler, named = parse_sampler(self.sampler)
            if self.schedule is not None and self.schedule not in SAMPLERS[self.sampler].schedules:
                self.schedule = schedule_named(self.schedule).name
        except ValueError as e:
            raise UsageError(str(e)) from None
        if named is not None:
            if self.schedule not in (None, named):
                raise UsageError(f"the sampler {self.sampler} names the {named} schedule, and the schedule given is {self.schedule}")
            self.schedule = named


@dataclass
class OutputSettings:
    """Where and how results are written, and the benchmark's timing options."""

    outdir: Path = Path("outputs/txt2img-samples")
    n_samples: int = 3
    n_iter: int = 1
    n_rows: int = 0
    skip_first: bool = False
    time_file: Path | None = None
    stats_file: Path | None = None
    watermark: bool = True
    vae_slice_size: int | None = None

    def __post_init__(self) -> None:
        self.outdir = Path(self.outdir)
        self.time_file = Path(self.time_file) if self.time_file is not None else None
        self.stats_file = Path(self.stats_file) if self.stats_file is not None else None
