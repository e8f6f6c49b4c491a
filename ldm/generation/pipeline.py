"""The core every task shares: a pipeline turns a prompt batch into checked, decoded images on a
:class:`~ldm.generation.model.Model`. A task (``ldm.generation.tasks``) is a subclass that says
how big its images are, what conditions the UNet, and how sampling starts."""

from __future__ import annotations

from typing import Any, Callable, ClassVar

import numpy as np
import torch

from ldm.generation.control import Controller, ControlSettings
from ldm.generation.errors import GenerationError, UsageError
from ldm.generation.model import Model
from ldm.generation.settings import SamplingSettings
from ldm.generation.tiling import decode_tiled
from ldm.models.diffusion.samplers import SAMPLERS
from ldm.models.diffusion.sampling import SampleRequest, Sampler

VAE_SLICE_PIXELS = 4 * 512 * 512  # automatic slice size: about 1 Mpixel per decoder call
FP16_ADVICE = (
    "likely fixes: --precision full, or --bf16 (fp16 overflows in the 768-v model's attention), "
    "or float32 attention scores (--attention vanilla with ATTN_PRECISION=fp32)"
)


class NonFiniteError(GenerationError):
    """Sampling or decoding produced NaN or inf: never written as if it were an image."""


class FiniteWatch:
    """The first sampler step whose latents were not finite, recorded on the device (no host sync
    per step) and read once, only when a batch turned out non-finite."""

    def __init__(self, device: torch.device):
        self.first = torch.full((), -1, dtype=torch.long, device=device)

    def __call__(self, x: torch.Tensor, step: int) -> None:
        bad = (self.first < 0) & ~torch.isfinite(x).all()
        self.first = torch.where(bad, torch.full_like(self.first, step), self.first)

    def step(self) -> int | None:
        first = int(self.first)
        return first if first >= 0 else None


def all_finite(value: Any) -> bool:
    """Whether a tensor, or every tensor of a list or dict of them, is finite."""
    if isinstance(value, dict):
        return all(all_finite(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return all(all_finite(v) for v in value)
    return not isinstance(value, torch.Tensor) or bool(torch.isfinite(value).all())


class Pipeline:
    """One task on a model: ``pipeline(prompts)`` returns images in [0, 1], (b, 3, h, w), on the CPU.

    Construction checks every setting against the model's sizes and loads nothing; the first call
    loads the model. Call :meth:`start` right after seeding to draw the run's fixed random inputs.
    """

    task: ClassVar[str]
    script: ClassVar[str | None] = None  # the command's name, when not ``{task}.py``
    default_prompt: ClassVar[str]
    families: ClassVar[tuple[str, ...]] = ("LatentDiffusion",)  # the model classes that serve the task
    family_config: ClassVar[str] = "configs/stable-diffusion/v2-inference.yaml"
    step_flags: ClassVar[tuple[str, ...]] = ("--steps",)  # the CLI's names for SamplingSettings.steps
    cli_defaults: ClassVar[dict[str, Any]] = {}  # the original script's or demo's defaults, by flag destination
    # The original's demos for some tasks draw the starting noise from np.random.RandomState(seed).
    numpy_start_code: ClassVar[bool] = False
    default_eta: ClassVar[float | None] = None  # the original demo's eta, for samplers that take one
    controllable: ClassVar[bool] = True  # whether SD2.1 ControlNets fit the task's UNet

    @classmethod
    def accepts(cls, sampler: Sampler) -> bool:
        """Whether the task can run with ``sampler`` (every sampler starts from noise)."""
        return True

    @classmethod
    def samplers(cls) -> list[str]:
        """The names of the samplers the task runs with, the original's default (DDIM) first."""
        return [name for name, sampler in SAMPLERS.items() if cls.accepts(sampler)]

    def __new__(cls, model: Model, *args: Any, **kwargs: Any) -> "Pipeline":
        # Before any task's __init__ reads its inputs or its family's config entries.
        if model.target not in cls.families:
            raise UsageError(
                f"the {cls.task} task needs a {' or '.join(cls.families)} model (e.g. --config {cls.family_config}); "
                f"{model.files.config} describes a {model.target}"
            )
        return super().__new__(cls)

    def __init__(self, model: Model, sampling: SamplingSettings, n_samples: int = 1, vae_slice_size: int | None = None):
        self.model = model
        self.sampling = sampling
        self.n_samples = n_samples
        self.progress: Callable[[int, int], None] | None = None  # (steps done, steps in all), per step
        self.crop: tuple[int, int] | None = None  # output height and width, when the input was padded
        self.vae_tile_size: int | None = None  # decode in tiles of this many latent pixels (see ldm.generation.tiling)
        self.sampler: Sampler = SAMPLERS[sampling.sampler]
        self.schedule: str = sampling.schedule or self.sampler.schedules[0]
        self.eta: float | None = self._resolve_eta()
        self._check_sampling()
        self.height, self.width = self.image_size()
        self.vae_slice_size = vae_slice_size or max(1, VAE_SLICE_PIXELS // (self.height * self.width))
        self.start_code: torch.Tensor | None = None
        self._prng: np.random.RandomState | None = None
        self.controller: Controller | None = None

    # -- what a task defines ----------------------------------------------------------
    def image_size(self) -> tuple[int, int]:
        """Height and width of the images, checked against the model's sizes."""
        raise NotImplementedError

    def conditioning(self, prompts: list[str]) -> tuple[Any, Any]:
        """The UNet's conditioning and its unconditional twin, the negative prompt's (None without
        guidance), through the model's prompt encoder (:attr:`Model.prompts`: A1111's weights, any
        length, embeddings), both in as many 77-token chunks as the longest needs.

        Each distinct prompt is encoded once, and the negative prompt once per model and length
        (:meth:`Model.negative_prompt_conditioning`): n copies of a prompt cost the text encoder one
        sequence, not 2n as in the original scripts. The rows are the same up to float rounding (the
        encoder treats each sequence on its own), and bit for bit for a batch of one prompt (the
        original's two calls)."""
        distinct = list(dict.fromkeys(prompts))
        row = {prompt: i for i, prompt in enumerate(distinct)}
        encoder, negative = self.model.prompts, self.sampling.negative_prompt
        unconditional = [negative] if self.sampling.scale != 1.0 else []
        chunks = max(encoder.count(p) for p in distinct + unconditional)
        c = encoder.encode(distinct, chunks)[[row[p] for p in prompts]]
        if not unconditional:
            return c, None
        uc = self.model.negative_prompt_conditioning(negative, chunks)
        return c, uc.repeat(len(prompts), *(1,) * (c.ndim - 1))

    def start(self) -> None:
        """Draw the run's fixed random inputs; the caller seeds right before."""
        self._prng = np.random.RandomState(self.sampling.seed) if self.numpy_start_code else None
        self.start_code = self._noise(self.n_samples) if self.sampling.fixed_code else None

    def reseed(self, seed: int) -> None:
        """Restart the pipeline's own random stream (the NumPy starting noise) from ``seed``: the
        batch rule of distributed runs reseeds every batch (see docs/distributed.md)."""
        if self._prng is not None:
            self._prng = np.random.RandomState(seed)

    def _noise(self, batch_size: int) -> torch.Tensor | None:
        """Starting latents: from the NumPy stream where the original's demo draws them so, else
        None (the sampler draws them from torch's generator, as the original scripts)."""
        if self.start_code is not None:
            return self.start_code[:batch_size]
        if self._prng is not None:
            x = self._prng.randn(batch_size, *self.latent_shape)
            return torch.from_numpy(x).to(device=self.model.device, dtype=torch.float32)
        if self.sampling.fixed_code:
            return torch.randn([batch_size, *self.latent_shape], device=self.model.device)
        return None

    def sample(self, c: Any, uc: Any, batch_size: int, watch: FiniteWatch) -> torch.Tensor:
        """Latents for one batch: the sampler's full run from noise."""
        return self.sampler.sample(self.net, self.request(c, uc, batch_size, watch, noise=self._noise(batch_size)))

    def request(self, c: Any, uc: Any, batch_size: int, watch: FiniteWatch, **start: Any) -> SampleRequest:
        """What the sampler gets for one batch; ``start``: its noise, init latents and denoise steps."""
        s = self.sampling

        def step_done(i: int, latents: torch.Tensor) -> None:
            watch(latents, i)
            self._step_done(i)

        return SampleRequest(cond=c, uncond=uc, scale=s.scale, steps=s.steps, shape=(batch_size, *self.latent_shape),
                             eta=self.eta, schedule=self.schedule, callback=step_done, **start)

    def metadata(self) -> dict[str, Any]:
        """What a PNG of this task records beyond the shared settings."""
        return {}

    @property
    def steps_per_batch(self) -> int:
        """Sampler steps one batch takes (its progress ticks): a uniform grid of S steps can hold S + 1."""
        return self.sampler.run_steps(self.sampling.steps, self.schedule, self.model.num_timesteps)

    @property
    def guided(self) -> bool:
        """Whether the UNet runs cond and uncond as one doubled batch (not at scale 0 or 1)."""
        return self.sampling.scale not in (0.0, 1.0)

    @property
    def unet_calls_per_batch(self) -> int:
        """UNet evaluations one batch takes (each batching cond and uncond under guidance)."""
        return self.sampler.unet_calls(self.steps_per_batch)

    # -- shared ---------------------------------------------------------------------------
    @property
    def net(self) -> torch.nn.Module:
        return self.model.load()

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        f = self.model.geometry.vae_factor
        return (self.model.geometry.channels, self.height // f, self.width // f)

    def _resolve_eta(self) -> float | None:
        """The eta given, else the task's (for samplers that take one), else the sampler's."""
        if self.sampling.eta is not None:
            return self.sampling.eta
        if self.sampler.default_eta is None:
            return None
        return self.default_eta if self.default_eta is not None else self.sampler.default_eta

    def _check_sampling(self) -> None:
        s, sampler = self.sampling, self.sampler
        if not self.accepts(sampler):
            raise UsageError(f"the {self.task} task cannot sample with {sampler.title} ({s.sampler}); choose one of {', '.join(self.samplers())}")
        try:
            sampler.check(self.eta, self.schedule)
        except ValueError as e:
            raise UsageError(str(e)) from None
        try:
            sampler.run_steps(s.steps, self.schedule, self.model.num_timesteps)
        except ValueError as e:
            raise UsageError(f"--steps {s.steps}: {e}") from None

    def _step_done(self, i: int) -> None:
        if self.progress is not None:
            self.progress(i + 1, self.steps_per_batch)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] (not yet on the CPU), at most ``vae_slice_size`` latents per decoder call."""
        net, tile = self.net, self.vae_tile_size

        def decode(z_slice: torch.Tensor) -> torch.Tensor:
            if not tile:
                return net.decode_first_stage(z_slice)
            return decode_tiled(net.decode_first_stage, z_slice, self.model.geometry.vae_factor, tile, tile // 4)

        parts = [decode(z[i : i + self.vae_slice_size]) for i in range(0, z.shape[0], self.vae_slice_size)]
        images = torch.clamp((torch.cat(parts) + 1.0) / 2.0, min=0.0, max=1.0)
        return images if self.crop is None else images[:, :, : self.crop[0], : self.crop[1]]

    def use_controls(self, controls: list[ControlSettings]) -> None:
        """Guide every batch with these ControlNets (their hints are read now, at the image size)."""
        if controls and not self.controllable:
            raise UsageError(f"the {self.task} task takes no ControlNet (its UNet is not the SD2 text-to-image one)")
        self.controller = Controller(self.model, controls, (self.height, self.width)) if controls else None

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        watch = FiniteWatch(self.model.device)
        prompts = self.model.use_prompt_loras(prompts)
        c, uc = self.conditioning(prompts)
        if self.controller is not None:
            c, uc = self.controller.add_to(c, uc, len(prompts))
        with self.model.step_cache:
            z = self.sample(c, uc, len(prompts), watch)
        images = self.decode(z)
        finite = torch.isfinite(z).all() & torch.isfinite(images).all()  # one host sync per batch
        if not finite:
            raise NonFiniteError(self._where_non_finite(c, uc, z, watch))
        return images.float().cpu()  # NumPy has no bfloat16

    def _where_non_finite(self, c: Any, uc: Any, z: torch.Tensor, watch: FiniteWatch) -> str:
        if not (all_finite(c) and all_finite(uc)):
            where = "the text encoder's output"
        elif not bool(torch.isfinite(z).all()):
            step = watch.step()
            where = f"the UNet at sampling step {step + 1} of {self.steps_per_batch}" if step is not None else "sampling"
        else:
            where = "the decoder"
        return f"{where} produced NaN or inf values; {FP16_ADVICE}"
