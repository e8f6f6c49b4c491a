"""ControlNets in a run: which files, hint images and weights (``--control FILE[:WEIGHT[:START[:END]]]``,
``--hint IMAGE``), the hints' preprocessing, and the ``c_control`` entries they add to any task's
conditioning (see ldm.modules.diffusionmodules.controlnet for the network)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from ldm.generation.errors import GenerationError, UsageError
from ldm.generation.images import open_image
from ldm.modules.diffusionmodules.controlnet import Control
from ldm.modules.midas.api import MiDaSInference, normalized_depth


def canny(hint: torch.Tensor, low: float = 0.1, high: float = 0.2) -> torch.Tensor:
    """White Canny edges on black (what the canny ControlNets read) of an RGB hint in [0, 1], by
    kornia's Canny with its hysteresis thresholds on the gradient magnitude (0-1 images: OpenCV's
    100/200 on 0-255 are about 0.1/0.2 here)."""
    try:
        from kornia.filters import canny as kornia_canny
    except ImportError:
        raise GenerationError("--preprocess canny needs kornia (pip install kornia)") from None
    _, edges = kornia_canny(hint.float(), low_threshold=low, high_threshold=high)
    return edges.expand(-1, 3, -1, -1).contiguous()


def scribble(hint: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """A drawing's dark strokes as white lines on black (what the scribble ControlNets read)."""
    grey = hint.mean(dim=1, keepdim=True)
    return (grey < threshold).float().expand(-1, 3, -1, -1).contiguous()


def midas_depth(hint: torch.Tensor, estimator: MiDaSInference) -> torch.Tensor:
    """MiDaS's relative inverse depth of an RGB hint in [0, 1] (brighter: nearer; what the depth
    ControlNets read): the depth model's MiDaS input and output, resized to the hint's size and
    stretched per image to [0, 1], rounded to 8 bits as the annotators' depth images are."""
    depth = estimator(estimator.prepare(hint * 2.0 - 1.0))
    try:
        depth = (normalized_depth(depth, tuple(hint.shape[-2:])) + 1.0) / 2.0
    except ValueError as e:
        raise GenerationError(f"--preprocess depth: {e}") from None
    return (torch.round(depth * 255.0) / 255.0).expand(-1, 3, -1, -1).contiguous()


Preprocessor = Callable[[torch.Tensor], torch.Tensor]
# Each makes the preprocessor of a ControlNet's settings for a model (None: the hint as it is);
# depth needs the MiDaS estimator of --midas, loaded once by the model.
PREPROCESSORS: dict[str, Callable[[Any, ControlSettings], Preprocessor | None]] = {
    "none": lambda model, settings: None,
    "canny": lambda model, settings: canny,
    "scribble": lambda model, settings: scribble,
    "depth": lambda model, settings: partial(midas_depth, estimator=model.depth_estimator(settings.midas, settings.midas_config)),
}
NEEDS_MIDAS = ("depth",)


@dataclass(frozen=True)
class ControlSettings:
    """One ControlNet of a run: its file, the hint image, its weight and the part of sampling it acts
    on (``start``/``end``: fractions of the timestep range, 0 the noisiest end, as ComfyUI's
    start/end percent), and how the hint is preprocessed."""

    path: Path
    hint: Path
    weight: float = 1.0
    start: float = 0.0
    end: float = 1.0
    preprocess: str = "none"
    guess_mode: bool = False
    midas: Path | None = None  # the depth preprocessor's MiDaS: the depth checkpoint, or MiDaS's own file
    midas_config: Path | None = None  # the depth config giving its sizes (None: v2-midas-inference.yaml)

    def __post_init__(self) -> None:
        if not 0.0 <= self.start < self.end <= 1.0:
            raise UsageError(f"--control {self.path}: start {self.start} and end {self.end} must satisfy 0 <= start < end <= 1")
        if self.preprocess not in PREPROCESSORS:
            raise UsageError(f"--preprocess {self.preprocess}: choose one of {', '.join(PREPROCESSORS)}")
        if self.preprocess in NEEDS_MIDAS and self.midas is None:
            raise UsageError(f"--preprocess {self.preprocess} estimates depth with MiDaS: give --midas, the SD2 depth checkpoint "
                             "(512-depth-ema.ckpt) or dpt_hybrid-midas-501f0c75.pt")


def parse_control(text: str) -> tuple[str, list[float]]:
    """``FILE[:WEIGHT[:START[:END]]]`` as the file and its numbers (a Windows drive's colon is kept)."""
    parts = text.split(":")
    numbers: list[float] = []
    while len(parts) > 1 and len(numbers) < 3:
        try:
            value = float(parts[-1])
        except ValueError:
            break
        numbers.insert(0, value)
        parts.pop()
    return ":".join(parts), numbers


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("ControlNet (docs/controlnet.md)")
    group.add_argument("--control", action="append", default=[], metavar="FILE[:WEIGHT[:START[:END]]]",
                       help="an SD2.1 ControlNet (e.g. control_v11p_sd21_canny.safetensors), its weight (default 1) and "
                            "the fractions of sampling it acts on (default 0 to 1); repeat for several")
    group.add_argument("--hint", action="append", default=[], metavar="IMAGE",
                       help="the control image of each --control, in the same order (one for all if given once)")
    group.add_argument("--preprocess", action="append", default=[], choices=list(PREPROCESSORS),
                       help="make the hint from the image first: canny edges, scribble (dark strokes) or MiDaS depth (needs --midas); "
                            "once for all or per --control (default: none)")
    group.add_argument("--guess_mode", action="store_true",
                       help="the ControlNets act on the conditional half only, shallow layers weighted down (the original's guess mode)")
    add_midas_arguments(group)


def add_midas_arguments(group: argparse._ActionsContainer) -> None:
    group.add_argument("--midas", type=Path, default=None, metavar="CKPT",
                       help="the MiDaS of --preprocess depth: the SD2 depth checkpoint (512-depth-ema.ckpt; only its depth_model.* "
                            "is read) or MiDaS's dpt_hybrid-midas-501f0c75.pt")
    group.add_argument("--midas_config", type=Path, default=None, metavar="YAML",
                       help="the depth config whose depth_stage_config sizes that MiDaS (default: configs/stable-diffusion/v2-midas-inference.yaml)")


def one_per_control(values: list[str], count: int, flag: str, default: str | None = None) -> list[str]:
    if not values and default is not None:
        return [default] * count
    if len(values) == 1:
        return values * count
    if len(values) != count:
        raise UsageError(f"{flag} is given {len(values)} times for {count} --control files: give it once, or once per --control")
    return values


def controls_from_args(args: argparse.Namespace) -> list[ControlSettings]:
    specs = getattr(args, "control", None) or []
    if not specs:
        if getattr(args, "hint", None):
            raise UsageError("--hint needs a --control ControlNet to read it")
        return []
    if not args.hint:
        raise UsageError("--control needs a --hint image")
    hints = one_per_control(args.hint, len(specs), "--hint")
    preprocess = one_per_control(args.preprocess, len(specs), "--preprocess", "none")
    controls = []
    for spec, hint, prep in zip(specs, hints, preprocess):
        path, numbers = parse_control(spec)
        weight, start, end = (numbers + [1.0, 0.0, 1.0][len(numbers):])[:3]
        controls.append(ControlSettings(Path(path), Path(hint), weight, start, end, prep, args.guess_mode,
                                        args.midas, args.midas_config))
    return controls


def load_hint(path: Path, size: tuple[int, int], prepare: Preprocessor | None = None) -> torch.Tensor:
    """The hint image as (1, 3, H, W) in [0, 1], resized to the output's size (Lanczos, as diffusers'
    pipeline stretches it; keep the aspect ratio yourself), then preprocessed."""
    image = open_image(path, "--hint", "RGB")
    height, width = size
    if image.size != (width, height):
        image = image.resize((width, height), resample=Image.LANCZOS)
    hint = torch.from_numpy(np.asarray(image).astype(np.float32).transpose(2, 0, 1)[None].copy()) / 255.0
    return hint if prepare is None else prepare(hint)


class Controller:
    """The ControlNets of a pipeline, loaded from its model, with their hints for the image size;
    :meth:`add_to` puts them into a batch's conditioning."""

    def __init__(self, model: Any, settings: list[ControlSettings], size: tuple[int, int]):
        self.settings = settings
        self.hints = [load_hint(s.hint, size, PREPROCESSORS[s.preprocess](model, s)) for s in settings]
        self.model = model
        self.num_timesteps = model.num_timesteps

    def controls(self, batch: int) -> tuple[list[Control], list[Control]]:
        """The conditional and unconditional ``c_control`` lists for ``batch`` rows."""
        device = self.model.device
        top = self.num_timesteps - 1
        cond = []
        for s, hint in zip(self.settings, self.hints):
            net = self.model.controlnet(s.path)
            cond.append(Control(net, hint.to(device).expand(batch, -1, -1, -1), torch.full((batch,), s.weight, device=device),
                                t_low=(1.0 - s.end) * top, t_high=(1.0 - s.start) * top, guess_mode=s.guess_mode))
        return cond, [c.without_guidance() if c.guess_mode else c for c in cond]

    def add_to(self, c: Any, uc: Any, batch: int) -> tuple[Any, Any]:
        """``c`` and ``uc`` (tensors or conditioning dicts) with the controls under ``c_control``."""
        cond, uncond = self.controls(batch)
        c = {**as_dict(c), "c_control": cond}
        return c, None if uc is None else {**as_dict(uc), "c_control": uncond}

    def metadata(self) -> dict[str, str]:
        """What a PNG records of the controls: file:weight:start:end and hint of each."""
        meta = {"controlnet": "; ".join(
            f"{s.path.name}:{s.weight}:{s.start}:{s.end} hint {s.hint.name}" + ("" if s.preprocess == "none" else f" ({s.preprocess})")
            for s in self.settings)}
        if any(s.guess_mode for s in self.settings):
            meta["guess_mode"] = "True"
        return meta


def as_dict(c: Any) -> dict[str, Any]:
    """A task's conditioning as a dict (text-only tasks give the context tensor itself)."""
    return c if isinstance(c, dict) else {"c_crossattn": [c]}
