"""DDIM sampling (Song et al. 2020) with the original ldm interface."""

from __future__ import annotations

from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from ldm.models.diffusion.sampling import DDIMSchedule, GuidedModel, SampleRequest, Sampler


def _unsupported(**options: Any) -> None:
    used = [name for name, value in options.items() if value is not None and value is not False]
    if used:
        raise NotImplementedError(f"sampler options not supported by this implementation: {', '.join(used)}")


class DDIMSampler:
    """``DDIMSampler(model, device=...)``; ``sample`` returns ``(samples, intermediates)``."""

    def __init__(self, model, schedule: str = "linear", device: torch.device | str | None = None, **kwargs: Any):
        self.model = model
        self.ddpm_num_timesteps = model.num_timesteps
        self.device = torch.device(device) if device is not None else model.device
        self.schedule: DDIMSchedule | None = None

    def _require_schedule(self) -> None:
        if self.schedule is None:
            raise RuntimeError("call make_schedule(ddim_num_steps, ddim_eta=...) first")

    def make_schedule(self, ddim_num_steps: int, ddim_discretize: str = "uniform", ddim_eta: float = 0.0, verbose: bool = True) -> None:
        self.schedule = DDIMSchedule(self.model, ddim_num_steps, ddim_eta, ddim_discretize)
        self.ddim_timesteps = self.schedule.timesteps

    @torch.no_grad()
    def sample(
        self,
        S: int,
        batch_size: int,
        shape: tuple[int, int, int],
        conditioning: Any = None,
        callback: Callable[[int], None] | None = None,
        normals_sequence: Any = None,
        img_callback: Callable[[torch.Tensor, int], None] | None = None,
        quantize_x0: bool = False,
        eta: float = 0.0,
        mask: torch.Tensor | None = None,
        x0: torch.Tensor | None = None,
        temperature: float = 1.0,
        noise_dropout: float = 0.0,
        score_corrector: Any = None,
        corrector_kwargs: dict | None = None,
        verbose: bool = True,
        x_T: torch.Tensor | None = None,
        log_every_t: int = 100,
        unconditional_guidance_scale: float = 1.0,
        unconditional_conditioning: Any = None,
        dynamic_threshold: Any = None,
        ucg_schedule: Any = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, dict[str, list[torch.Tensor]]]:
        """Sample ``batch_size`` latents of ``shape`` in ``S`` steps, from ``x_T`` or fresh noise.
        ``ucg_schedule`` (a guidance scale per step, noisiest first) overrides
        ``unconditional_guidance_scale``."""
        _unsupported(quantize_x0=quantize_x0, score_corrector=score_corrector, dynamic_threshold=dynamic_threshold,
                     normals_sequence=normals_sequence)
        if ucg_schedule is not None and len(ucg_schedule) != S:
            raise ValueError(f"ucg_schedule holds {len(ucg_schedule)} guidance scales for {S} steps")
        self.make_schedule(S, ddim_eta=eta, verbose=verbose)
        size = (batch_size, *shape)
        img = torch.randn(size, device=self.model.device) if x_T is None else x_T
        scales = [unconditional_guidance_scale] * S if ucg_schedule is None else [float(s) for s in ucg_schedule]
        guided = {scale: GuidedModel(self.model, conditioning, unconditional_conditioning, scale) for scale in set(scales)}

        def step(x: torch.Tensor, ts: torch.Tensor, index: int) -> tuple[torch.Tensor, torch.Tensor]:
            return self.ddim_update(guided[scales[S - 1 - index]], x, ts, index, temperature, noise_dropout)

        return self.sampling_loop(img, step, callback, img_callback, mask, x0, log_every_t, "DDIM Sampler")

    def sampling_loop(
        self,
        img: torch.Tensor,
        step: Callable[[torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]],
        callback: Callable[[int], None] | None = None,
        img_callback: Callable[[torch.Tensor, int], None] | None = None,
        mask: torch.Tensor | None = None,
        x0: torch.Tensor | None = None,
        log_every_t: int = 100,
        desc: str = "DDIM Sampler",
    ) -> tuple[torch.Tensor, dict[str, list[torch.Tensor]]]:
        """The loop DDIM and PLMS share: ``step(x, ts, index)`` makes one update, from the
        noisiest schedule index down to 0; ``mask`` keeps the ``x0`` region (noised to ``ts``)."""
        total_steps = len(self.schedule)
        intermediates = {"x_inter": [img], "pred_x0": [img]}
        for i in tqdm(range(total_steps), desc=desc, total=total_steps):
            index = total_steps - i - 1
            ts = self.schedule.timestep_tensor[index].expand(img.shape[0])
            if mask is not None:
                img = self.model.q_sample(x0, ts) * mask + (1.0 - mask) * img
            img, pred_x0 = step(img, ts, index)
            if callback:
                callback(i)
            if img_callback:
                img_callback(pred_x0, i)
            if index % log_every_t == 0 or index == total_steps - 1:
                intermediates["x_inter"].append(img)
                intermediates["pred_x0"].append(pred_x0)
        return img, intermediates

    def ddim_update(
        self, guided: GuidedModel, x: torch.Tensor, t: torch.Tensor, index: int,
        temperature: float = 1.0, noise_dropout: float = 0.0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One DDIM step at schedule ``index``: returns the next latent and the predicted x0."""
        e_t, pred_x0 = guided.predict(x, t)
        return self.schedule.step(x, e_t, index, pred_x0, temperature, noise_dropout)

    @torch.no_grad()
    def stochastic_encode(self, x0: torch.Tensor, t: torch.Tensor, use_original_steps: bool = False, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Noise clean latents ``x0`` to DDIM step index ``t`` (img2img's forward process)."""
        self._require_schedule()
        if use_original_steps:
            return self.model.q_sample(x0, t, noise)
        noise = torch.randn_like(x0) if noise is None else noise
        shape = (-1,) + (1,) * (x0.dim() - 1)
        t = t.to(self.schedule.alphas.device)
        return self.schedule.alphas[t].sqrt().view(shape) * x0 + self.schedule.sqrt_one_minus_alphas[t].view(shape) * noise

    @torch.no_grad()
    def decode(
        self, x_latent: torch.Tensor, cond, t_start: int, unconditional_guidance_scale: float = 1.0,
        unconditional_conditioning=None, use_original_steps: bool = False, callback=None, img_callback=None,
    ) -> torch.Tensor:
        """Denoise ``x_latent`` from DDIM step ``t_start`` down to a clean latent; ``img_callback(x, i)``
        (not in the original) sees the latents after each step."""
        self._require_schedule()
        if use_original_steps:
            raise NotImplementedError("decode with use_original_steps is not supported")
        guided = GuidedModel(self.model, cond, unconditional_conditioning, unconditional_guidance_scale)
        x = x_latent
        for i in tqdm(range(t_start), desc="Decoding image", total=t_start):
            index = t_start - i - 1
            x, _ = self.ddim_update(guided, x, self.schedule.timestep_tensor[index].expand(x.shape[0]), index)
            if callback:
                callback(i)
            if img_callback:
                img_callback(x, i)
        return x


def _step_callback(request: SampleRequest):
    """The original samplers' ``img_callback(x, i)`` as a request's ``callback(i, x)``."""
    return None if request.callback is None else (lambda x, i: request.callback(i, x))


class DDIM(Sampler):
    """The original DDIM behind the sampler interface: the uniform grid, eta, and img2img as the
    original scripts run it (``stochastic_encode`` to step ``t_enc``, then ``decode``)."""

    name = "ddim"
    title = "DDIM"
    default_eta = 0.0
    starts_midway = True

    def denoise_steps(self, steps: int, strength: float) -> int:
        # The grid has no step ``steps``: the original fails at strength 1.0, this stops one short.
        return min(int(strength * steps), steps - 1)

    def sample(self, model, request: SampleRequest) -> torch.Tensor:
        r, sampler, eta = request, DDIMSampler(model), request.eta or 0.0
        if r.denoise_steps is None:
            samples, _ = sampler.sample(
                S=r.steps, batch_size=r.shape[0], shape=tuple(r.shape[1:]), conditioning=r.cond, eta=eta, x_T=r.noise,
                unconditional_guidance_scale=r.scale, unconditional_conditioning=r.uncond, verbose=False,
                img_callback=_step_callback(r),
            )
            return samples
        sampler.make_schedule(r.steps, ddim_eta=eta, verbose=False)
        if r.init is not None:
            t = torch.full((r.shape[0],), r.denoise_steps, dtype=torch.long, device=model.device)
            z = sampler.stochastic_encode(r.init, t, noise=r.noise)
        else:  # pure noise at step t_enc (the depth demo's full sample)
            z = r.noise if r.noise is not None else torch.randn(r.shape, device=model.device)
        return sampler.decode(z, r.cond, r.denoise_steps, unconditional_guidance_scale=r.scale,
                              unconditional_conditioning=r.uncond, img_callback=_step_callback(r))
