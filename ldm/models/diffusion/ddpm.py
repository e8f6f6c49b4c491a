"""Latent diffusion: the SD2 model that ties the UNet, the autoencoder and the text encoder
to the DDPM noise schedule."""

from __future__ import annotations

import contextlib
import logging
from typing import Any, ClassVar, Iterator, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import ListConfig
from torch import nn

from ldm.modules.diffusionmodules.util import (
    ddpm_schedule,
    extract_into_tensor,
    make_beta_schedule,
    q_sample,
    register_schedule_buffers,
)
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.modules.ema import LitEma
from ldm.util import instantiate_from_config

logger = logging.getLogger(__name__)

PARAMETERIZATIONS = ("eps", "v")

# Options of the original DDPM/LatentDiffusion that only steer its training loop or logging.
_TRAINING_ONLY = {
    "loss_type", "ckpt_path", "ignore_keys", "load_only_unet", "monitor", "log_every_t", "clip_denoised",
    "original_elbo_weight", "v_posterior", "l_simple_weight", "scheduler_config", "use_positional_encodings",
    "learn_logvar", "logvar_init", "make_it_fit", "ucg_training", "reset_ema", "reset_num_ema_updates",
    "num_timesteps_cond", "concat_mode", "cond_stage_forward", "force_null_conditioning",
    "cond_stage_trainable", "base_learning_rate", "ema_decay",
}
# Conditioning keys of a batch that hold prompts (or boxes) rather than images, as in the original.
_TEXT_KEYS = ("caption", "coordinates_bbox", "txt")


def repeat_to_batch(x: torch.Tensor, batch: int, what: str) -> torch.Tensor:
    """``x`` with ``batch`` rows: as it is, or its single row repeated (as the original's demos
    repeat one input image to the number of samples before conditioning on it)."""
    if x.shape[0] == batch:
        return x
    if x.shape[0] != 1:
        raise ValueError(f"{x.shape[0]} {what} for a batch of {batch}")
    return x.expand(batch, *x.shape[1:]).contiguous()


def channels_first(x: torch.Tensor) -> torch.Tensor:
    """Images as data sets hold them (b, h, w, c; or b, h, w) as the models take them: (b, c, h, w),
    contiguous float32 (the original's ``DDPM.get_input``)."""
    if x.ndim == 3:
        x = x[..., None]
    return x.permute(0, 3, 1, 2).to(memory_format=torch.contiguous_format).float()


class DiffusionWrapper(nn.Module):
    """Holds the UNet as ``diffusion_model`` (the checkpoint's key prefix) and routes conditioning:
    ``c_concat`` joins the input channels, ``c_crossattn`` is the attention context, ``c_adm``
    (the ``*-adm`` keys: the x4 upscaler's noise level, unCLIP's image embedding) is the UNet's
    ``y``, and ``c_control`` (a list of :class:`~ldm.modules.diffusionmodules.controlnet.Control`)
    adds ControlNet residuals.
    """

    CONDITIONING_KEYS = (None, "crossattn", "concat", "hybrid", "hybrid-adm", "crossattn-adm")

    def __init__(self, diff_model_config: Mapping[str, Any], conditioning_key: str | None):
        super().__init__()
        if conditioning_key not in self.CONDITIONING_KEYS:
            raise ValueError(f"unsupported conditioning_key {conditioning_key!r} (one of {self.CONDITIONING_KEYS})")
        self.diffusion_model = instantiate_from_config(diff_model_config)
        self.conditioning_key = conditioning_key

    def forward(
        self, x, t, c_concat: list | None = None, c_crossattn: list | None = None, c_adm: torch.Tensor | None = None,
        c_control: list | None = None,
    ) -> torch.Tensor:
        if (c_adm is None) == str(self.conditioning_key).endswith("-adm"):
            raise ValueError(
                f"conditioning_key {self.conditioning_key!r}: the conditioning "
                + ("needs 'c_adm'" if c_adm is None else "must not hold 'c_adm'")
                + " (the class-label input: the x4 upscaler's noise level, unCLIP's image embedding)"
            )
        context = None if not c_crossattn else torch.cat(c_crossattn, 1)
        control = None
        if c_control:  # ControlNets (ldm.modules.diffusionmodules.controlnet) read the noisy latent alone
            from ldm.modules.diffusionmodules.controlnet import control_residuals

            control = control_residuals(c_control, x, t, context)
        if c_concat:
            x = torch.cat([x, *c_concat], dim=1)
        return self.diffusion_model(x, t, context=context, y=c_adm, control=control)


class LatentDiffusion(nn.Module):
    """Stable Diffusion 2 in the original module layout (``model.diffusion_model``,
    ``first_stage_model``, ``cond_stage_model``, schedule buffers), so that official
    checkpoints load strictly. Inference and the plain training loss; the training loop
    itself lives in :mod:`ldm.training`.
    """

    # Whether the schedule buffers are state-dict keys: the original's files hold them.
    persistent_schedule: ClassVar[bool] = True

    def __init__(
        self,
        first_stage_config: Mapping[str, Any],
        cond_stage_config: Mapping[str, Any],
        unet_config: Mapping[str, Any],
        timesteps: int = 1000,
        beta_schedule: str = "linear",
        linear_start: float = 1e-4,
        linear_end: float = 2e-2,
        cosine_s: float = 8e-3,
        given_betas: Any = None,
        image_size: int = 64,
        channels: int = 4,
        conditioning_key: str | None = "crossattn",
        parameterization: str = "eps",
        scale_factor: float = 1.0,
        scale_by_std: bool = False,
        use_ema: bool = True,
        first_stage_key: str = "image",
        cond_stage_key: str = "image",
        **training_options: Any,
    ):
        super().__init__()
        unknown = set(training_options) - _TRAINING_ONLY
        if unknown:
            raise TypeError(f"LatentDiffusion got unknown parameters: {sorted(unknown)}")
        if parameterization not in PARAMETERIZATIONS:
            raise ValueError(f"parameterization must be one of {PARAMETERIZATIONS}, got {parameterization!r}")
        self.parameterization = parameterization
        self.image_size = image_size
        self.channels = channels
        self.first_stage_key, self.cond_stage_key = first_stage_key, cond_stage_key
        if scale_by_std:
            # The original keeps a scale estimated from the data as a buffer (a checkpoint key).
            self.register_buffer("scale_factor", torch.tensor(scale_factor, device="cpu"))
        else:
            self.scale_factor = scale_factor
        self.training_options = training_options
        self.cond_stage_trainable = bool(training_options.get("cond_stage_trainable", False))
        self.model = DiffusionWrapper(unet_config, conditioning_key)
        self.use_ema = use_ema
        if use_ema:
            self.model_ema = LitEma(self.model, decay=float(training_options.get("ema_decay", 0.9999)))
        self.register_schedule(given_betas, beta_schedule, timesteps, linear_start, linear_end, cosine_s)
        self.first_stage_model = instantiate_from_config(first_stage_config).eval()
        for p in self.first_stage_model.parameters():
            p.requires_grad = False
        self.cond_stage_model = instantiate_from_config(cond_stage_config)
        if training_options.get("ckpt_path"):
            self.init_from_ckpt(training_options["ckpt_path"], training_options.get("ignore_keys", ()))

    def init_from_ckpt(self, path: str, ignore_keys=()) -> None:
        """Start from a checkpoint (the original's ``ckpt_path``), strictly but for ``ignore_keys`` prefixes."""
        from ldm.checkpoint import apply_state_dict, load_state_dict

        state = {k: v for k, v in load_state_dict(path).items() if not k.startswith(tuple(ignore_keys))}
        own = self.state_dict()
        state.update({k: own[k] for k in own if k.startswith(tuple(ignore_keys)) and k not in state})
        apply_state_dict(self, state)
        logger.info("initialised from %s", path)

    def register_schedule(
        self,
        given_betas=None,
        beta_schedule: str = "linear",
        timesteps: int = 1000,
        linear_start: float = 1e-4,
        linear_end: float = 2e-2,
        cosine_s: float = 8e-3,
    ) -> dict[str, np.ndarray]:
        """The DDPM schedule as float32 buffers, computed in float64 as the original does;
        returns the float64 arrays, by buffer name."""
        if given_betas is not None:
            betas = np.asarray(given_betas, dtype=np.float64)
        else:
            betas = make_beta_schedule(beta_schedule, timesteps, linear_start, linear_end, cosine_s)
        schedule = ddpm_schedule(betas)
        self.num_timesteps = len(betas)
        self.linear_start, self.linear_end = linear_start, linear_end
        register_schedule_buffers(self, schedule, persistent=self.persistent_schedule)
        return schedule

    @property
    def device(self) -> torch.device:
        return self.betas.device

    # -- diffusion maths ---------------------------------------------------------------
    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        return q_sample(self, x_start, t, noise)

    def get_v(self, x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return (
            extract_into_tensor(self.sqrt_alphas_cumprod, t, x.shape) * noise
            - extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x.shape) * x
        )

    def predict_start_from_noise(self, x_t: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return (
            extract_into_tensor(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
            - extract_into_tensor(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * noise
        )

    def predict_start_from_z_and_v(self, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return (
            extract_into_tensor(self.sqrt_alphas_cumprod, t, x_t.shape) * x_t
            - extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_t.shape) * v
        )

    def predict_eps_from_z_and_v(self, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        from ldm.models.diffusion.sampling import eps_from_v

        alpha = extract_into_tensor(self.sqrt_alphas_cumprod, t, x_t.shape)
        return eps_from_v(v, x_t, alpha, extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_t.shape))

    # -- the entry points of the original ---------------------------------------------
    def apply_model(self, x_noisy: torch.Tensor, t: torch.Tensor, cond, return_ids: bool = False) -> torch.Tensor:
        """The UNet's prediction (eps or v) for ``x_noisy`` at ``t`` under ``cond``."""
        if not isinstance(cond, dict):
            cond = cond if isinstance(cond, list) else [cond]
            key = "c_concat" if self.model.conditioning_key == "concat" else "c_crossattn"
            cond = {key: cond}
        return self.model(x_noisy, t, **cond)

    def get_learned_conditioning(self, c):
        """Text (a list of prompts) to the cross-attention context."""
        encode = getattr(self.cond_stage_model, "encode", None)
        c = encode(c) if callable(encode) else self.cond_stage_model(c)
        return c.mode() if isinstance(c, DiagonalGaussianDistribution) else c

    def encode_first_stage(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        return self.first_stage_model.encode(x)

    def get_first_stage_encoding(self, encoder_posterior) -> torch.Tensor:
        if isinstance(encoder_posterior, DiagonalGaussianDistribution):
            z = encoder_posterior.sample()
        elif isinstance(encoder_posterior, torch.Tensor):
            z = encoder_posterior
        else:
            raise TypeError(f"encoder_posterior of type {type(encoder_posterior)} not supported")
        return self.scale_factor * z

    def decode_first_stage(self, z: torch.Tensor, predict_cids: bool = False, force_not_quantize: bool = False) -> torch.Tensor:
        if self.latent_decoder is not None:
            return self.latent_decoder(z)
        # Multiplying by the reciprocal, as the original does, rounds exactly as it does.
        return self.first_stage_model.decode(1.0 / self.scale_factor * z)

    @property
    def latent_decoder(self) -> nn.Module | None:
        """The decoder in the VAE's place, if :meth:`use_latent_decoder` set one."""
        return self.__dict__.get("_latent_decoder")

    def use_latent_decoder(self, decoder: nn.Module | None) -> None:
        """Decode the UNet's latents with ``decoder`` instead of the VAE (TAESD's, ldm.models.taesd),
        or with the VAE again for None. Kept outside the module tree: no checkpoint key, no EMA."""
        self.__dict__["_latent_decoder"] = decoder

    # -- the original's batch API: its training data and its demos ----------------------
    def get_input(
        self, batch: Mapping[str, Any], k: str, return_first_stage_outputs: bool = False, force_c_encode: bool = False,
        cond_key: str | None = None, return_original_cond: bool = False, bs: int | None = None, return_x: bool = False,
    ) -> list:
        """``[z, c]`` for a data batch, as the original: ``z`` the scaled latent (a posterior sample)
        of the images ``batch[k]`` (b, h, w, c in [-1, 1]), ``c`` the conditioning of
        ``batch[cond_key or cond_stage_key]`` (prompts under ``"txt"``). Then, as asked: the images
        and their reconstruction, the images again, the raw conditioning. ``bs`` keeps the first
        ``bs`` samples."""
        x = channels_first(batch[k])[:bs].to(self.device)
        z = self.get_first_stage_encoding(self.encode_first_stage(x)).detach()
        c = xc = None
        if self.model.conditioning_key is not None and not self.training_options.get("force_null_conditioning"):
            cond_key = cond_key or self.cond_stage_key
            if cond_key == self.first_stage_key:
                xc = x
            elif cond_key in _TEXT_KEYS:
                xc = batch[cond_key]
            elif cond_key in ("class_label", "cls"):
                xc = batch
            else:
                xc = channels_first(batch[cond_key]).to(self.device)
            c = self.get_learned_conditioning(xc) if force_c_encode or not self.cond_stage_trainable else xc
            c = c[:bs]
        out = [z, c]
        if return_first_stage_outputs:
            out += [x, self.decode_first_stage(z)]
        if return_x:
            out.append(x)
        if return_original_cond:
            out.append(xc)
        return out

    def get_unconditional_conditioning(self, batch_size: int, null_label: Any = None) -> torch.Tensor:
        """The conditioning of ``null_label`` (a prompt, or a list of one) repeated to ``batch_size``:
        what the original demos guide away from, ``get_unconditional_conditioning(n, "")``.
        Without ``null_label`` it is the empty prompt's (the original raised for text models)."""
        label = "" if null_label is None else null_label
        if isinstance(label, ListConfig):
            label = list(label)
        elif isinstance(label, torch.Tensor):
            label = label.to(self.device)
        c = self.get_learned_conditioning(label)
        if isinstance(c, list):
            return [repeat_to_batch(x, batch_size, "null labels").to(self.device) for x in c]
        return repeat_to_batch(c, batch_size, "null labels").to(self.device)

    @contextlib.contextmanager
    def ema_scope(self, context: str | None = None) -> Iterator[None]:
        """Run the block with the EMA weights swapped in; a no-op when the model keeps none."""
        if not self.use_ema:
            yield
            return
        self.model_ema.store(self.model.parameters())
        self.model_ema.copy_to(self.model)
        if context is not None:
            logger.info("%s: switched to EMA weights", context)
        try:
            yield
        finally:
            self.model_ema.restore(self.model.parameters())
            if context is not None:
                logger.info("%s: restored training weights", context)

    # -- training loss ---------------------------------------------------------------
    def p_losses(self, x_start: torch.Tensor, cond, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """The simple (MSE) denoising loss on latents ``x_start`` at timesteps ``t``."""
        noise = torch.randn_like(x_start) if noise is None else noise
        x_noisy = self.q_sample(x_start, t, noise)
        target = noise if self.parameterization == "eps" else self.get_v(x_start, noise, t)
        return F.mse_loss(self.apply_model(x_noisy, t, cond).float(), target.float())

    def forward(self, x: torch.Tensor, c, *args, **kwargs) -> torch.Tensor:
        t = torch.randint(0, self.num_timesteps, (x.shape[0],), device=x.device).long()
        if self.cond_stage_trainable:
            c = self.get_learned_conditioning(c)
        return self.p_losses(x, c, t)


# The other SD2 families live in a module each; the original configs name them here
# (``target: ldm.models.diffusion.ddpm.LatentInpaintDiffusion``), so they resolve lazily.
_FAMILIES = {
    "LatentFinetuneDiffusion": "ldm.models.diffusion.finetune",
    "LatentInpaintDiffusion": "ldm.models.diffusion.inpaint",
    "LatentDepth2ImageDiffusion": "ldm.models.diffusion.depth",
    "LatentUpscaleDiffusion": "ldm.models.diffusion.upscale",
    "LatentUpscaleFinetuneDiffusion": "ldm.models.diffusion.upscale",
    "ImageEmbeddingConditionedLatentDiffusion": "ldm.models.diffusion.unclip",
}


def __getattr__(name: str) -> Any:
    if name in _FAMILIES:
        import importlib

        return getattr(importlib.import_module(_FAMILIES[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
