"""Every sampler by name, behind the one interface of :class:`~ldm.models.diffusion.sampling.Sampler`:
the original DDIM, PLMS and DPM-Solver++ classes, and the k-diffusion samplers
(:mod:`ldm.models.diffusion.k_samplers`) on any schedule of :mod:`ldm.models.diffusion.schedules`.

Names are k-diffusion's (``dpmpp_2m``); AUTOMATIC1111's spellings are accepted too, a schedule
included, as a user would paste them: ``"DPM++ 2M Karras"``, ``"Euler a"``, ``"k_dpmpp_2m"``.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from ldm.models.diffusion import k_samplers as k
from ldm.models.diffusion.ddim import DDIM
from ldm.models.diffusion.denoiser import Denoiser
from ldm.models.diffusion.dpm_solver import DPMSolver
from ldm.models.diffusion.plms import PLMS
from ldm.models.diffusion.sampling import GuidedModel, SampleRequest, Sampler
from ldm.models.diffusion.schedules import SCHEDULES, ModelSigmas, schedule_named


class KSampler(Sampler):
    """A k-diffusion sampler function run on a schedule's sigmas through the model's :class:`Denoiser`.

    A run from noise starts at ``noise * sqrt(1 + sigma_0^2)``: the original's standard-normal draw in
    the variance-preserving form, as DDIM starts (and generative-models and ComfyUI); img2img starts
    at ``init + sigma * noise``, sigma the schedule's at the strength, and runs the schedule's last steps.
    """

    starts_midway = True

    def __init__(self, name: str, title: str, function: Callable[..., torch.Tensor], schedule: str,
                 calls_per_step: int = 1, eta: float | None = None, **options: Any):
        self.name, self.title, self.function = name, title, function
        self.schedules = (schedule, *(s for s in SCHEDULES if s != schedule))
        self.calls_per_step, self.default_eta, self.options = calls_per_step, eta, options

    def sample(self, model, request: SampleRequest) -> torch.Tensor:
        r = request
        levels = ModelSigmas(model.alphas_cumprod)
        sigmas = schedule_named(r.schedule or self.schedules[0]).sigmas(levels, r.steps)
        if r.denoise_steps is not None:
            sigmas = sigmas[len(sigmas) - 1 - r.denoise_steps:]
        noise = r.noise if r.noise is not None else torch.randn(r.shape, device=model.device)
        x = r.init + sigmas[0] * noise if r.init is not None else noise * math.sqrt(1.0 + sigmas[0] ** 2)
        options = dict(self.options)
        if self.default_eta is not None:
            options["eta"] = self.default_eta if r.eta is None else r.eta
        denoiser = Denoiser(GuidedModel(model, r.cond, r.uncond, r.scale), levels)
        with tqdm(total=len(sigmas) - 1, desc=self.title) as bar:
            def callback(i: int, latents: torch.Tensor) -> None:
                bar.update()
                if r.callback is not None:
                    r.callback(i, latents)

            return self.function(denoiser, x, sigmas, callback=callback, **options)


SAMPLERS: dict[str, Sampler] = {
    s.name: s
    for s in (
        DDIM(),
        PLMS(),
        DPMSolver(),
        KSampler("euler", "Euler", k.sample_euler, "normal"),
        KSampler("euler_ancestral", "Euler a", k.sample_euler_ancestral, "normal", eta=1.0),
        KSampler("heun", "Heun", k.sample_heun, "normal", calls_per_step=2),
        KSampler("lms", "LMS", k.sample_lms, "normal"),
        KSampler("dpm_2", "DPM2", k.sample_dpm_2, "karras", calls_per_step=2),
        KSampler("dpm_2_ancestral", "DPM2 a", k.sample_dpm_2_ancestral, "karras", calls_per_step=2, eta=1.0),
        KSampler("dpmpp_2s_ancestral", "DPM++ 2S a", k.sample_dpmpp_2s_ancestral, "karras", calls_per_step=2, eta=1.0),
        KSampler("dpmpp_2m", "DPM++ 2M", k.sample_dpmpp_2m, "karras"),
        KSampler("dpmpp_sde", "DPM++ SDE", k.sample_dpmpp_sde, "karras", calls_per_step=2, eta=1.0),
        KSampler("dpmpp_2m_sde", "DPM++ 2M SDE", k.sample_dpmpp_2m_sde, "exponential", eta=1.0),
        KSampler("dpmpp_3m_sde", "DPM++ 3M SDE", k.sample_dpmpp_3m_sde, "exponential", eta=1.0),
        KSampler("unipc", "UniPC", k.sample_unipc, "normal"),
        KSampler("ddpm", "DDPM", k.sample_ddpm, "normal"),
        KSampler("lcm", "LCM", k.sample_lcm, "normal"),
    )
}
# The original scripts' own flags for their samplers (DDIM is their default).
ORIGINAL_FLAGS = {"plms": "--plms", "dpm": "--dpm"}

# AUTOMATIC1111's short names (k_euler_a, ...) beside the titles and names.
_SPELLINGS = {s.title.lower(): n for n, s in SAMPLERS.items()} | {n: n for n in SAMPLERS} | {
    "euler_a": "euler_ancestral", "dpm_2_a": "dpm_2_ancestral", "dpmpp_2s_a": "dpmpp_2s_ancestral",
}
_SCHEDULE_TITLES = {s.title.lower(): n for n, s in SCHEDULES.items()} | {n: n for n in SCHEDULES}


def parse_sampler(spelled: str) -> tuple[str, str | None]:
    """The sampler's name and the schedule the spelling names, if any: ``"DPM++ 2M Karras"`` ->
    ``("dpmpp_2m", "karras")``, ``"euler_ancestral"`` -> ``("euler_ancestral", None)``."""
    text = " ".join(spelled.strip().lower().split())
    text = text[2:] if text.startswith("k_") else text
    if text in _SPELLINGS:
        return _SPELLINGS[text], None
    for title, schedule in sorted(_SCHEDULE_TITLES.items(), key=lambda item: -len(item[0])):
        if text.endswith(" " + title) and text[: -len(title) - 1] in _SPELLINGS:
            return _SPELLINGS[text[: -len(title) - 1]], schedule
    titles = ", ".join(f"{n} ({s.title})" if s.title.lower() != n else n for n, s in SAMPLERS.items())
    raise ValueError(f"unknown sampler {spelled!r}; choose one of {titles}, optionally followed by a schedule (\"DPM++ 2M Karras\")")


def sampler_named(name: str) -> Sampler:
    """The sampler called ``name`` (any spelling :func:`parse_sampler` takes)."""
    return SAMPLERS[parse_sampler(name)[0]]
