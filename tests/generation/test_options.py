"""ldm/generation/options.py and settings.py: flag names and defaults, bad values (also under
Hypothesis: any input parses or is a usage error), image size, prompt files, VAE slicing."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from omegaconf import OmegaConf

from conftest import CONFIGS
from ldm.generation import options
from ldm.generation.errors import GenerationError, UsageError
from ldm.generation.model import Model
from ldm.generation.settings import ModelSettings, SamplingSettings
from ldm.generation.tasks import Txt2ImgPipeline
from ldm.models.diffusion.samplers import SAMPLERS

ORIGINAL_TXT2IMG_DEFAULTS = {
    "outdir": "outputs/txt2img-samples", "steps": 50, "sampler": "ddim", "fixed_code": False, "ddim_eta": None,
    "n_iter": 3, "n_samples": 3, "n_rows": 0, "scale": 9.0, "from_file": None, "repeat": 1, "seed": 42,
    "precision": "autocast", "bf16": False,
}  # fmt: skip


def parsed(task: str, argv: list[str], model: Model):
    """The flags of ``task`` with the defaults filled in for ``model``, and their sampling settings."""
    args = options.build_parser(task).parse_args(argv)
    return args, options.sampling_from_args(args, task, model)


def test_txt2img_flags_keep_the_original_names_and_defaults(sd2_model):
    args, sampling = parsed("txt2img", [], sd2_model)
    for name, value in ORIGINAL_TXT2IMG_DEFAULTS.items():
        assert getattr(args, name) == value, name
    assert args.device == ("cuda" if torch.cuda.is_available() else "cpu")
    # --H/--W/--C/--f default to the model's own sizes (512, 512, 4, 8 for SD2 base).
    assert (args.H, args.W, args.C, args.f) == (None, None, None, None)
    assert (args.attention, args.compile, args.skip_first, args.time_file, args.vae_slice_size) == ("sdpa", False, False, None, None)
    # The original's DDIM at eta 0.
    pipeline = Txt2ImgPipeline(sd2_model, sampling)
    assert (pipeline.sampler.name, pipeline.schedule, pipeline.eta) == ("ddim", "uniform", 0.0)


def test_img2img_flags_keep_the_original_defaults(sd2_model):
    args, _ = parsed("img2img", ["--init-img", "x.png", "--ddim_steps", "7"], sd2_model)
    assert (args.init_img, args.steps, args.strength, args.n_iter, args.n_samples) == ("x.png", 7, 0.8, 1, 2)
    assert args.outdir == "outputs/img2img-samples"
    assert not hasattr(args, "H")
    # img2img offers the samplers that can start part way (not PLMS nor the original DPM-Solver).
    with pytest.raises(SystemExit):
        options.build_parser("img2img").parse_args(["--init-img", "x.png", "--plms"])


@pytest.mark.parametrize("argv, sampler, schedule", [
    (["--plms"], "plms", "uniform"),
    (["--dpm"], "dpm", "time_uniform"),
    (["--sampler", "DPM++ 2M Karras"], "dpmpp_2m", "karras"),
    (["--sampler", "dpmpp_2m"], "dpmpp_2m", "karras"),
    (["--sampler", "Euler a", "--schedule", "sgm_uniform"], "euler_ancestral", "trailing"),
    (["--sampler", "k_dpmpp_2m_sde"], "dpmpp_2m_sde", "exponential"),
])  # fmt: skip
def test_sampler_and_schedule_flags(sd2_model, argv, sampler, schedule):
    _, sampling = parsed("txt2img", argv, sd2_model)
    pipeline = Txt2ImgPipeline(sd2_model, sampling)
    assert (pipeline.sampler.name, pipeline.schedule) == (sampler, schedule)


@pytest.mark.parametrize("argv, message", [
    (["--sampler", "DPM++ 2M Karras", "--schedule", "exponential"], "names the karras schedule"),
    (["--sampler", "ddim", "--schedule", "karras"], "DDIM runs on the uniform schedule, not karras"),
    (["--dpm", "--steps", "1"], "takes 2 to 1000 steps"),
    (["--plms", "--ddim_eta", "0.5"], "PLMS takes no eta"),
    (["--sampler", "euler", "--ddim_eta", "1"], "Euler takes no eta"),
    (["--sampler", "euler", "--schedule", "turbo", "--steps", "5"], "turbo schedule takes 1 to 4 steps"),
    (["--steps", "501"], "nearest step counts"),
])  # fmt: skip
def test_sampling_settings_that_cannot_run_are_usage_errors(sd2_model, argv, message):
    with pytest.raises(UsageError, match=message):
        _, sampling = parsed("txt2img", argv, sd2_model)
        Txt2ImgPipeline(sd2_model, sampling)


def test_an_unknown_sampler_is_a_usage_error_naming_the_choices(capsys):
    with pytest.raises(SystemExit) as e:
        options.build_parser("txt2img").parse_args(["--sampler", "DPM++ 9M"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "unknown sampler 'DPM++ 9M'" in err and "dpmpp_2m (DPM++ 2M)" in err


def test_eta_defaults_per_sampler_and_task(sd2_model):
    from ldm.generation.tasks import InpaintPipeline

    def eta(sampler, pipeline=Txt2ImgPipeline, given=None):
        return pipeline._resolve_eta.__get__(type("P", (), {"sampling": SamplingSettings(sampler, eta=given),
                                                            "sampler": SAMPLERS[sampler], "default_eta": pipeline.default_eta})())()

    assert (eta("ddim"), eta("euler_ancestral"), eta("dpmpp_2m_sde"), eta("euler"), eta("plms")) == (0.0, 1.0, 1.0, None, None)
    assert (eta("ddim", InpaintPipeline), eta("euler", InpaintPipeline), eta("ddim", InpaintPipeline, 0.3)) == (1.0, None, 0.3)


def test_model_config_sampling_defaults_yield_to_flags(tmp_path):
    config = OmegaConf.load(CONFIGS / "v2-inference.yaml")
    config.sampling = {"sampler": "euler_ancestral", "schedule": "trailing", "steps": 1, "scale": 1.0,
                       "img2img": {"steps": 2, "strength": 0.5}}
    OmegaConf.save(config, tmp_path / "turbo-like.yaml")
    model = Model(ModelSettings(config=tmp_path / "turbo-like.yaml", random_weights=True, device="cpu"))
    args, sampling = parsed("txt2img", [], model)
    assert (sampling.sampler, sampling.schedule, sampling.steps, sampling.scale) == ("euler_ancestral", "trailing", 1, 1.0)
    args, sampling = parsed("img2img", ["--init-img", "x.png"], model)
    assert (sampling.steps, args.strength, sampling.scale) == (2, 0.5, 1.0)
    args, sampling = parsed("txt2img", ["--steps", "4", "--scale", "2", "--plms"], model)
    assert (sampling.sampler, sampling.schedule, sampling.steps, sampling.scale) == ("plms", None, 4, 2.0)  # its own grid
    _, sampling = parsed("txt2img", ["--sampler", "DPM++ 2M Karras"], model)  # the spelling's schedule, not the config's
    assert (sampling.sampler, sampling.schedule) == ("dpmpp_2m", "karras")
    _, sampling = parsed("txt2img", ["--sampler", "euler"], model)
    assert (sampling.sampler, sampling.schedule) == ("euler", "trailing")
    config.sampling = {"sampler": "euler", "cfg": 7}
    OmegaConf.save(config, tmp_path / "bad.yaml")
    bad = Model(ModelSettings(config=tmp_path / "bad.yaml", random_weights=True, device="cpu"))
    with pytest.raises(GenerationError, match=r"unknown sampling defaults \['cfg'\]"):
        parsed("txt2img", [], bad)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--n_samples", "0"], "must be at least 1"),
        (["--steps", "-1"], "must be at least 1"),
        (["--n_iter", "x"], "expected an integer"),
        (["--seed", str(2**32)], "below 2**32"),
        (["--plms", "--dpm"], "not allowed with"),
        (["--attention", "flash"], "invalid choice"),
    ],
)
def test_bad_flag_values_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        options.build_parser("txt2img").parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--scale", "--ddim_eta"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "NaN"])
def test_float_flags_must_be_finite(flag, value, capsys):
    """NaN or infinite guidance made all-black images that were written as results."""
    with pytest.raises(SystemExit) as e:
        options.build_parser("txt2img").parse_args([f"{flag}={value}"])
    assert e.value.code == 2 and "must be a finite number" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        options.build_parser("img2img").parse_args(["--init-img", "x.png", f"--strength={value}"])


def test_sampling_settings_refuse_non_finite_numbers():
    with pytest.raises(UsageError, match="scale must be a finite number"):
        SamplingSettings(scale=float("nan"))
    with pytest.raises(UsageError, match="eta must be a finite number"):
        SamplingSettings(eta=float("inf"))


@pytest.fixture(scope="module")
def sd2_model() -> Model:
    """The SD2 base model resolved and checked, not loaded (built on the meta device)."""
    return Model(ModelSettings(config=CONFIGS / "v2-inference.yaml", random_weights=True, device="cpu"))


def test_image_size_defaults_to_the_model_and_names_valid_sizes(sd2_model):
    def size(**kw):
        return Txt2ImgPipeline(sd2_model, SamplingSettings(), **kw).image_size()

    assert size() == (512, 512)
    assert size(height=768, width=640) == (768, 640)
    with pytest.raises(UsageError, match=r"--W 500: image sides must be multiples of 64 .* nearest: 448 or 512"):
        size(width=500)
    args = options.build_parser("txt2img").parse_args(["--f", "16", "--C", "8"])
    with pytest.raises(UsageError, match="--f 16: this model's autoencoder downsamples by 8"):
        options.check_latent_flags(args, sd2_model.geometry)


def test_read_prompts_batches_and_repeats(tmp_path):
    file = tmp_path / "prompts.txt"
    file.write_text("a\n\n  \nb\nc\n", encoding="utf-8")
    assert options.read_prompts(None, str(file), 2, "default", repeat=2) == [["a", "a"], ["b", "b"], ["c", "c"]]
    assert options.read_prompts(None, None, 3, "default") == [["default"] * 3]
    file.write_text("\n \n")
    with pytest.raises(GenerationError, match="holds no prompts"):
        options.read_prompts(None, str(file), 1, "x")
    file.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(GenerationError, match="not UTF-8"):
        options.read_prompts(None, str(file), 1, "x")


def test_automatic_vae_slice_size(sd2_model):
    def slice_size(side, given=None):
        return Txt2ImgPipeline(sd2_model, SamplingSettings(), height=side, width=side, vae_slice_size=given).vae_slice_size

    assert (slice_size(512), slice_size(768), slice_size(64), slice_size(64, 3)) == (4, 1, 256, 3)


# -- any input gives a result or the project's own error (Hypothesis) ------------------------
@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.binary(max_size=200))
def test_prompt_file_reader_on_any_bytes(tmp_path_factory, data):
    file = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    file.write_bytes(data)
    try:
        batches = options.read_prompts(None, str(file), 2, "x")
    except GenerationError:
        return
    assert batches and all(1 <= len(b) <= 2 and all(p.strip() for p in b) for b in batches)


NUMERIC_FLAGS = ["--steps", "--n_samples", "--n_iter", "--n_rows", "--scale", "--ddim_eta", "--seed", "--H", "--W"]


@settings(max_examples=150, deadline=None, derandomize=True)
@given(st.sampled_from(NUMERIC_FLAGS), st.one_of(st.text(max_size=12), st.integers().map(str), st.floats().map(str)))
def test_numeric_flags_parse_or_exit_with_usage(flag, text):
    parser = options.build_parser("txt2img")
    parser.exit = lambda status=0, message=None: (_ for _ in ()).throw(SystemExit(status))
    try:
        args = parser.parse_args([f"{flag}={text}"])
    except SystemExit as e:
        assert e.code == 2
        return
    value = getattr(args, flag.lstrip("-"))
    assert math.isfinite(value)


@settings(max_examples=80, deadline=None, derandomize=True)
@given(st.integers(min_value=1, max_value=10**6), st.integers(min_value=1, max_value=10**6))
def test_size_checks_accept_or_explain(sd2_model, height, width):
    try:
        h, w = Txt2ImgPipeline(sd2_model, SamplingSettings(), height=height, width=width).image_size()
    except UsageError as e:
        assert "must be multiples of 64" in str(e)
        return
    assert (h, w) == (height, width) and h % 64 == 0 == w % 64
