"""The model of a run: config and checkpoint resolution, the sizes it fixes, loading, attention
kernel, compilation and the precision and SDPA-backend contexts it runs under."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from ldm.checkpoint import CheckpointError
from ldm.diffusers_format import Folder, inspect_folder
from ldm.generation.errors import GenerationError, UsageError
from ldm.generation.settings import ModelSettings
from ldm.generation.speed import BACKENDS, compile_model, compile_module, hold_weights, resolve_precision, use_compile_cache
from ldm.loading import build_model, load_config, load_model_from_config
from ldm.lora import LoraMerge, lora_names, merge_loras, prompt_loras
from ldm.modules.attention import check_implementation, sdpa_backends, set_attention_implementation
from ldm.modules.diffusionmodules.deepcache import StepCache, install as install_step_cache
from ldm.modules.encoders.embeddings import Embedding, EmbeddingError, load_embeddings
from ldm.modules.encoders.prompts import PROMPT_SYNTAXES, PromptEncoder

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
SD2_CONFIG = Path("configs/stable-diffusion/v2-inference.yaml")
MIDAS_CONFIG = Path("configs/stable-diffusion/v2-midas-inference.yaml")
DEMO_CONFIG = REPO_ROOT / "configs" / "demo" / "shapes-demo.yaml"
DEMO_CKPT = Path(__file__).resolve().parents[1] / "demo" / "shapes-demo.safetensors"
# What a config's ``sampling:`` section may set (see Model.sampling_defaults).
SAMPLING_KEYS = ("sampler", "schedule", "steps", "scale", "strength")
KEPT_TEXT = 16  # negative prompts whose encoding a model keeps (the web UI's recent ones)


@dataclass
class ModelFiles:
    config: Path
    ckpt: Path | None  # None: random weights
    demo: bool = False


def resolve_model_files(settings: ModelSettings) -> ModelFiles:
    """The config and checkpoint to use; the demo model when neither was named and it is installed.
    A diffusers folder as the checkpoint names its own config when none is given."""
    if settings.config is None and settings.ckpt is None and not settings.random_weights and DEMO_CONFIG.is_file() and DEMO_CKPT.is_file():
        return ModelFiles(DEMO_CONFIG, DEMO_CKPT, demo=True)
    folder = _diffusers_folder(settings.ckpt) if settings.ckpt is not None and settings.ckpt.is_dir() else None
    config = settings.config or (Path(folder.config_name) if folder else SD2_CONFIG)
    if settings.config is None and not config.exists():
        config = REPO_ROOT / config  # the original's default path, wherever the script is run from
    _check_readable(config, "--config")
    if settings.random_weights:
        if settings.ckpt is not None:
            raise UsageError("--random_weights and --ckpt exclude each other")
        return ModelFiles(config, None)
    if settings.ckpt is None:
        raise GenerationError(
            f"--ckpt is required with {config}: pass an SD2 checkpoint (e.g. --ckpt v2-1_512-ema-pruned.ckpt), "
            "or --random_weights for timing runs"
        )
    if folder is None:
        _check_readable(settings.ckpt, "--ckpt")
    elif settings.config is None:
        logger.info("--ckpt %s: a diffusers %s model (%s prediction): --config %s", settings.ckpt, folder.family,
                    folder.parameterization, folder.config_name)
    return ModelFiles(config, settings.ckpt)


def _diffusers_folder(path: Path) -> Folder:
    try:
        return inspect_folder(path)
    except CheckpointError as e:
        raise GenerationError(f"--ckpt: {e}") from None


def _check_readable(path: Path, flag: str) -> None:
    if not path.exists():
        raise GenerationError(f"{flag} {path}: no such file")
    if not path.is_file():
        raise GenerationError(f"{flag} {path}: not a file")
    if not os.access(path, os.R_OK):
        raise GenerationError(f"{flag} {path}: not readable (permission denied)")


def read_config(path: Path) -> DictConfig:
    """The YAML config, checked to describe a latent-diffusion model."""
    try:
        config = load_config(path)
    except Exception as e:  # YAML syntax, encoding and OS errors alike
        raise GenerationError(f"--config {path}: cannot be read as YAML: {e}") from None
    params = config.get("model", {}).get("params") if isinstance(config, DictConfig) else None
    if not params or "unet_config" not in params or "first_stage_config" not in params:
        raise GenerationError(f"--config {path}: not a latent-diffusion config (needs model.params.unet_config and first_stage_config)")
    return config


@dataclass
class Geometry:
    """Sizes the model fixes, read off its modules built on the meta device."""

    channels: int
    vae_factor: int
    unet_factor: int
    latent_size: int
    net: torch.nn.Module  # the whole model, on the meta device

    @property
    def unet(self) -> torch.nn.Module:
        return self.net.model.diffusion_model

    @property
    def vae(self) -> torch.nn.Module:
        return self.net.first_stage_model

    @property
    def multiple(self) -> int:
        """Image sides must be multiples of this."""
        return self.vae_factor * self.unet_factor

    @property
    def native_size(self) -> int:
        return self.latent_size * self.vae_factor


def model_geometry(config: DictConfig, path: Path) -> Geometry:
    """Build the model on the meta device (allocates nothing) and read its sizes."""
    params = config.model.params
    try:
        net = build_model(config, "meta")
    except Exception as e:
        raise GenerationError(f"--config {path}: cannot build its model: {type(e).__name__}: {e}") from None
    unet, vae = net.model.diffusion_model, net.first_stage_model
    return Geometry(int(params.get("channels", 4)), vae.downsampling_factor, unet.downsampling_factor,
                    int(params.get("image_size", 64)), net)


def check_settings(settings: ModelSettings) -> None:
    """Combinations that cannot work on this platform, found before anything is loaded."""
    if settings.disable_flash and settings.disable_mem_efficient and settings.disable_math:
        raise UsageError("--disable_flash, --disable_mem_efficient and --disable_math together leave SDPA no backend: keep one")
    if settings.device == "cpu" and settings.disable_flash and settings.disable_math:
        raise UsageError("on the CPU, SDPA has only the flash and math backends: --disable_flash and --disable_math leave it none")
    try:
        check_implementation(settings.attention)
    except (RuntimeError, ValueError) as e:
        raise UsageError(f"--attention: {e}") from None
    if settings.compile and settings.compile_backend == "openvino" and settings.device != "cpu":
        raise UsageError("--compile_backend openvino runs on the CPU: add --device cpu, or compile with inductor")
    if settings.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available to this PyTorch; use --device cpu")
    if settings.compile_mode is not None and not settings.compile:
        logger.warning("--compile_mode has no effect without --compile")
    if settings.compile_backend not in BACKENDS:
        raise UsageError(f"--compile_backend {settings.compile_backend!r}: choose one of {', '.join(BACKENDS)}")
    if settings.compile_backend != "inductor" and not settings.compile:
        logger.warning("--compile_backend has no effect without --compile")
    if settings.compile:
        from torch._inductor import list_mode_options

        modes = ["default", *list_mode_options()]
        if (settings.compile_mode or "default") not in modes:
            raise UsageError(f"--compile_mode {settings.compile_mode!r}: choose one of {', '.join(dict.fromkeys(modes))}")


def check_compile(device: torch.device) -> None:
    """Compile a trivial function first: a missing compiler toolchain fails here, clearly, before the
    model is loaded. --compile never falls back to eager, so timings are never silently mislabelled."""
    import torch._dynamo

    if not torch._dynamo.is_dynamo_supported():
        raise GenerationError(f"--compile: torch.compile does not support this Python ({sys.version.split()[0]}) with torch {torch.__version__}")
    try:
        torch.compile(lambda x: torch.sin(x) + 1.0)(torch.ones(8, device=device))
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise GenerationError(f"--compile: torch.compile cannot compile for {device.type} here ({reason}); run without --compile") from None


class Model:
    """A model of a run: resolved and checked at construction (cheap), loaded by :meth:`load`.

    Pipelines take one; an application (the web UI) loads it once and serves many requests.
    """

    def __init__(self, settings: ModelSettings):
        check_settings(settings)
        self.settings = settings
        self.device = torch.device(settings.device)
        self.files = resolve_model_files(settings)
        if settings.taesd is not None:
            _check_readable(settings.taesd, "--taesd")
        self.config = read_config(self.files.config)
        self.geometry = model_geometry(self.config, self.files.config)
        fed = BACKENDS[settings.compile_backend].precision if settings.compile else None
        self.computes_in = fed or resolve_precision(settings.precision, self.device)
        """The precision really used: ``settings.precision``, but "full" for the default on a CPU
        without native bfloat16 (see :mod:`ldm.generation.speed`), and the one a compile backend
        must be fed (OpenVINO: float32, computed in its own choice)."""
        self.embeddings: list[Embedding] = self._read_embeddings()
        self._net: torch.nn.Module | None = None
        self._lora_merge = LoraMerge()
        self._controlnets: dict[Path, torch.nn.Module] = {}
        self._depth_estimators: dict[tuple[Path, Path | None], torch.nn.Module] = {}
        self._step_cache: StepCache | None = None
        self._prompts: PromptEncoder | None = None
        self._kept_text: dict[tuple[str, int, bool, torch.dtype], torch.Tensor] = {}

    @property
    def target(self) -> str:
        """The config's model class name (``LatentDiffusion``, ``LatentInpaintDiffusion``, ...)."""
        return str(self.config.model.target).rsplit(".", 1)[-1]

    def sampling_defaults(self, task: str) -> dict[str, Any]:
        """The config's ``sampling:`` section for ``task``: the scripts' and the web UI's defaults for
        this model (SD-Turbo's 1 step without guidance), its per-task entries over the shared ones."""
        section = self.config.get("sampling") or {}
        shared = {k: v for k, v in section.items() if not isinstance(v, Mapping)}
        own = section.get(task) or {}
        unknown = (set(shared) | set(own)) - set(SAMPLING_KEYS)
        if unknown:
            raise GenerationError(f"--config {self.files.config}: unknown sampling defaults {sorted(unknown)} (known: {', '.join(SAMPLING_KEYS)})")
        return {**shared, **own}

    @property
    def num_timesteps(self) -> int:
        return int(self.config.model.params.get("timesteps", 1000))

    @property
    def net(self) -> torch.nn.Module:
        """The loaded ``LatentDiffusion`` (or family) module."""
        if self._net is None:
            raise RuntimeError("call Model.load() first")
        return self._net

    def load(self) -> torch.nn.Module:
        """Load the weights (or random ones), choose the attention kernel, compile (see :func:`compile_model`)."""
        if self._net is not None:
            return self._net
        settings = self.settings
        if settings.compile:
            use_compile_cache()  # before anything compiles: the probe would fix PyTorch's default folder
            check_compile(self.device)
        net = self._read_weights()
        if settings.taesd is not None:
            net.use_latent_decoder(self._read_tiny_decoder())
        try:
            merge_loras(net, settings.loras, self._lora_merge)  # in float32, before the UNet is held in bf16
        except CheckpointError as e:
            raise GenerationError(f"--lora: {e}") from None
        if set_attention_implementation(net, settings.attention) == 0 and settings.attention != "sdpa":
            logger.warning("--attention %s has no effect: this model's attention is nn.MultiheadAttention (native-MHA layout)", settings.attention)
        if self.device.type == "cpu" and self.computes_in != "full":
            # Autocast computes them in bf16 anyway: no cast per call. Only the UNet's: it computes in its
            # weights' dtype even outside autocast, where the text encoder and VAE would fail.
            hold_weights(net.model.diffusion_model, torch.bfloat16)
        if settings.cache_interval > 1:
            try:
                self._step_cache = install_step_cache(net.model.diffusion_model, settings.cache_interval, settings.cache_depth)
            except ValueError as e:
                raise UsageError(f"--cache_interval/--cache_depth: {e}") from None
            logger.info("step caching: the whole UNet every %d calls, its shallow path (depth %d) between",
                        settings.cache_interval, settings.cache_depth)
        if settings.compile:
            compile_model(net, self.device, settings.compile_mode, self._step_cache, settings.compile_backend)
        self._net = net
        return net

    @property
    def step_cache(self) -> contextlib.AbstractContextManager:
        """What each sampling run is wrapped in: the UNet's step cache (``--cache_interval``; entering
        starts a run afresh), or nothing."""
        return self._step_cache if self._step_cache is not None else contextlib.nullcontext()

    def use_prompt_loras(self, prompts: list[str]) -> list[str]:
        """Merge the LoRAs of ``--lora`` and of the prompts' ``<lora:NAME:WEIGHT>`` tags (files of
        ``--lora_dir``) if they are not what is merged now, recompiling what was compiled with frozen
        weights; returns the prompts without their tags."""
        net = self.load()
        cleaned, wanted = [], {str(p): w for p, w in self.settings.loras}
        for prompt in prompts:
            text, tags = prompt_loras(prompt)
            cleaned.append(text)
            for name, weight in tags:
                path = str(self._lora_file(name))
                if wanted.get(path, weight) != weight:
                    raise UsageError(f"<lora:{name}>: two weights in one batch ({wanted[path]} and {weight})")
                wanted[path] = weight
        loras = tuple(sorted(wanted.items()))
        if loras != tuple(sorted(self._lora_merge.loras)):
            try:
                merge_loras(net, loras, self._lora_merge)
            except CheckpointError as e:
                raise GenerationError(f"LoRA: {e}") from None
            self._kept_text.clear()  # a LoRA of the text encoder changes the kept negative prompts' encodings
            if self.settings.compile and self.device.type == "cpu":  # frozen weights: compiled anew (or found on disk)
                compile_model(net, self.device, self.settings.compile_mode, self._step_cache, self.settings.compile_backend)
        return cleaned

    def _lora_file(self, name: str) -> Path:
        folder = self.settings.lora_dir
        if folder is None:
            raise UsageError(f"<lora:{name}> in the prompt needs --lora_dir, the folder of the LoRA files")
        files = lora_names(folder)
        if name not in files:
            raise UsageError(f"<lora:{name}>: no such LoRA in {folder} ({', '.join(files) or 'it holds none'})")
        return files[name]

    @property
    def prompts(self) -> PromptEncoder:
        """The loaded model's prompt encoder: A1111's syntax (or none, ``prompt_syntax``), prompts of
        any length in 75-token chunks, and the textual-inversion embeddings (see ldm.modules.encoders.prompts)."""
        if self._prompts is None:
            self._prompts = PromptEncoder(self.load().cond_stage_model, self.embeddings, PROMPT_SYNTAXES[self.settings.prompt_syntax])
        return self._prompts

    def check_prompts(self, prompts: list[str]) -> None:
        """A UsageError for a prompt the syntax cannot read (``(word:1.2.3)``), before anything runs."""
        parse = PROMPT_SYNTAXES[self.settings.prompt_syntax]
        for prompt in prompts:
            try:
                parse(prompt)
            except ValueError as e:
                raise UsageError(f"{e}: {prompt[:80]!r}") from None

    def negative_prompt_conditioning(self, prompt: str = "", chunks: int = 1) -> torch.Tensor:
        """The conditioning of guidance's unconditional text (the empty prompt by default) in at least
        ``chunks`` chunks: the same for every batch, so encoded once per text, length and autocast
        state, not once per batch (the last :data:`KEPT_TEXT` texts are kept)."""
        device = self.device.type
        key = (prompt, chunks, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        if key not in self._kept_text:
            while len(self._kept_text) >= KEPT_TEXT:
                del self._kept_text[next(iter(self._kept_text))]
            self._kept_text[key] = self.prompts.encode([prompt], chunks)
        return self._kept_text[key]

    def _read_embeddings(self) -> list[Embedding]:
        """The textual-inversion embeddings of the settings, checked against the text encoder's width."""
        s = self.settings
        if not s.embeddings and s.embeddings_dir is None:
            return []
        width = self.geometry.net.cond_stage_model.model.token_embedding.embedding_dim
        try:
            return load_embeddings(s.embeddings, s.embeddings_dir, width)
        except EmbeddingError as e:
            raise GenerationError(f"textual inversion: {e}") from None

    def controlnet(self, path: Path) -> torch.nn.Module:
        """The ControlNet in ``path`` for this model, loaded once (held and compiled as the UNet)."""
        path = Path(path)
        if path not in self._controlnets:
            from ldm.modules.diffusionmodules.controlnet import load_controlnet

            _check_readable(path, "--control")
            unet = self.load().model.diffusion_model
            try:
                net = load_controlnet(path, self.config.model.params.unet_config.params, self.device)
            except CheckpointError as e:
                raise GenerationError(f"--control: {e}") from None
            if net.encoder_channels != unet.encoder_channels:
                raise GenerationError(f"--control {path}: its residuals ({net.encoder_channels} channels) do not fit this "
                                      f"model's UNet ({unet.encoder_channels}); SD2.1 ControlNets fit the 512 and 768 models")
            set_attention_implementation(net, self.settings.attention)
            if self.device.type == "cpu" and self.computes_in != "full":
                hold_weights(net, torch.bfloat16)
            if self.settings.compile:
                compile_module(net, self.device, self.settings.compile_mode, self.settings.compile_backend)
            self._controlnets[path] = net
        return self._controlnets[path]

    def depth_estimator(self, path: Path, config: Path | None = None) -> torch.nn.Module:
        """The MiDaS of ``path`` (the depth checkpoint or MiDaS's file) sized by the depth ``config``
        (None: v2-midas-inference.yaml), loaded once, in float32 on this model's device."""
        key = (Path(path), config)
        if key not in self._depth_estimators:
            from ldm.modules.midas.api import load_midas

            _check_readable(key[0], "--midas")
            config = config or REPO_ROOT / MIDAS_CONFIG
            _check_readable(config, "--midas_config")
            sizes = read_config(config).model.params.get("depth_stage_config", {}).get("params")
            if sizes is None:
                raise GenerationError(f"--midas_config {config}: not a depth config (needs model.params.depth_stage_config)")
            try:
                self._depth_estimators[key] = load_midas(key[0], sizes, self.device)
            except CheckpointError as e:
                raise GenerationError(f"--midas: {e}") from None
        return self._depth_estimators[key]

    def _read_weights(self) -> torch.nn.Module:
        files, config, device = self.files, self.config, self.device
        if files.ckpt is None:
            logger.warning("--random_weights: the model of %s gets random weights; the images are noise (use this for timing only)", files.config)
            try:
                with torch.random.fork_rng(devices=[]):  # the same weights every run: --compile's packages are reused
                    torch.manual_seed(0)
                    return build_model(config, device).to(device).eval()
            except Exception as e:
                raise GenerationError(f"--config {files.config}: cannot build its model: {type(e).__name__}: {e}") from None
        logger.info("loading %s with %s", files.ckpt, files.config)
        try:
            return load_model_from_config(config, files.ckpt, device)
        except CheckpointError as e:
            raise GenerationError(f"cannot load --ckpt into the model of --config {files.config}: {e}") from None
        except Exception as e:
            raise GenerationError(f"cannot load the model of {files.config} from {files.ckpt}: {type(e).__name__}: {e}") from None

    def _read_tiny_decoder(self) -> torch.nn.Module:
        from ldm.models.taesd import load_tiny_decoder

        try:
            decoder = load_tiny_decoder(self.settings.taesd, self.device)
        except CheckpointError as e:
            raise GenerationError(f"--taesd: {e}") from None
        if decoder[1].in_channels != self.geometry.channels or self.geometry.vae_factor != 8:
            raise GenerationError(f"--taesd {self.settings.taesd}: a decoder of {decoder[1].in_channels}-channel latents by 8; "
                                  f"this model's are {self.geometry.channels} channels by {self.geometry.vae_factor}")
        return decoder

    def precision(self) -> contextlib.AbstractContextManager:
        """Autocast as the original (fp16 on CUDA, bf16 on the CPU; bf16 everywhere for "bf16"), or
        nothing for "full" (and for the default on a CPU without native bf16: :attr:`computes_in`)."""
        if self.computes_in == "full":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16 if self.computes_in == "bf16" else None)

    def backends(self) -> contextlib.AbstractContextManager:
        s = self.settings
        return sdpa_backends(s.disable_flash, s.disable_mem_efficient, s.disable_math)
