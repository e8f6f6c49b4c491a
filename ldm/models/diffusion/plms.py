"""PLMS sampling (Liu et al. 2022, pseudo linear multistep) with the original ldm interface."""

from __future__ import annotations

from typing import Any

import torch

from ldm.models.diffusion.ddim import DDIMSampler, _step_callback, _unsupported
from ldm.models.diffusion.sampling import GuidedModel, SampleRequest, Sampler


def plms_combine(e_t: torch.Tensor, old_eps: list[torch.Tensor]) -> torch.Tensor:
    """Adams-Bashforth combination of the current and up to three previous noise estimates."""
    if len(old_eps) == 1:
        return (3 * e_t - old_eps[-1]) / 2
    if len(old_eps) == 2:
        return (23 * e_t - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
    return (55 * e_t - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24


class PLMSSampler(DDIMSampler):
    """PLMS: a pseudo improved-Euler first step, then 2nd-4th order Adams-Bashforth steps.

    For v-prediction models the output is converted to a noise estimate first (the
    original SD2 PLMS used v as if it were noise, which breaks 768-v images).
    """

    def make_schedule(self, ddim_num_steps: int, ddim_discretize: str = "uniform", ddim_eta: float = 0.0, verbose: bool = True) -> None:
        if ddim_eta != 0:
            raise ValueError("ddim_eta must be 0 for PLMS")
        super().make_schedule(ddim_num_steps, ddim_discretize, ddim_eta, verbose)

    @torch.no_grad()
    def sample(self, S, batch_size, shape, conditioning=None, callback=None, normals_sequence=None, img_callback=None,
               quantize_x0=False, eta=0.0, mask=None, x0=None, temperature=1.0, noise_dropout=0.0,
               score_corrector=None, corrector_kwargs=None, verbose=True, x_T=None, log_every_t=100,
               unconditional_guidance_scale=1.0, unconditional_conditioning=None, dynamic_threshold=None,
               **kwargs: Any):
        _unsupported(quantize_x0=quantize_x0, score_corrector=score_corrector, dynamic_threshold=dynamic_threshold,
                     normals_sequence=normals_sequence)
        self.make_schedule(S, ddim_eta=eta, verbose=verbose)
        img = torch.randn((batch_size, *shape), device=self.model.device) if x_T is None else x_T
        schedule = self.schedule
        old_eps: list[torch.Tensor] = []

        guided = GuidedModel(self.model, conditioning, unconditional_conditioning, unconditional_guidance_scale)

        def noise_estimate(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return guided.predict(x, t)[0]

        def step(x: torch.Tensor, ts: torch.Tensor, index: int) -> tuple[torch.Tensor, torch.Tensor]:
            nonlocal old_eps
            e_t = noise_estimate(x, ts)
            if not old_eps:
                ts_next = schedule.timestep_tensor[max(index - 1, 0)].expand(x.shape[0])
                x_next, _ = schedule.step(x, e_t, index, None, temperature, noise_dropout)
                e_t_prime = (e_t + noise_estimate(x_next, ts_next)) / 2
            else:
                e_t_prime = plms_combine(e_t, old_eps)
            old_eps = (old_eps + [e_t])[-3:]
            return schedule.step(x, e_t_prime, index, None, temperature, noise_dropout)

        return self.sampling_loop(img, step, callback, img_callback, mask, x0, log_every_t, "PLMS Sampler")


class PLMS(Sampler):
    """The original PLMS behind the sampler interface: the uniform grid, from noise only."""

    name = "plms"
    title = "PLMS"

    def unet_calls(self, run_steps: int) -> int:
        return run_steps + 1  # the first step's pseudo improved-Euler evaluation

    def sample(self, model, request: SampleRequest) -> torch.Tensor:
        r = request
        samples, _ = PLMSSampler(model).sample(
            S=r.steps, batch_size=r.shape[0], shape=tuple(r.shape[1:]), conditioning=r.cond, x_T=r.noise,
            unconditional_guidance_scale=r.scale, unconditional_conditioning=r.uncond, verbose=False,
            img_callback=_step_callback(r),
        )
        return samples
