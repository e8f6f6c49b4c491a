"""The model on a CUDA GPU: float16 UNet for every attention implementation and SDPA backend,
float32 sampler, text encoder and VAE against the CPU, and scripts/txt2img.py on the GPU.

Skipped without a CUDA device; nothing else in the suite needs one.

Tolerances:

* float16 against the float32 CPU reference: 1e-2 relative (``rel_err``). float16 keeps 11
  significant bits (rounding 4.9e-4) and every activation of the tiny UNet's ~30 layers is
  rounded to it; the same float16 runs on the CPU measure 5.6-6.2e-4, and GPU kernels (other
  summation orders, float16 partial sums) may add a few times that. A wrong kernel, a missing
  scale or a dropped head is off by O(1), far above this.
* float32 GPU against float32 CPU: 1e-4 relative, with TF32 turned off (by default cuDNN runs
  float32 convolutions in TF32, whose 10-bit mantissa would give ~1e-3). What remains is the
  order of summation in matmuls and convolutions: ~1e-6 per layer.
"""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, child_env, rel_err, tiny_model, unet_inputs
from ldm.checkpoint import apply_state_dict
from ldm.models.diffusion.ddim import DDIMSampler
from ldm.modules import attention
from ldm.modules.attention import sdpa_backends, set_attention_implementation
from ldm.native_mha import to_native

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DEVICE = torch.device("cuda")
FP16_RTOL = 1e-2
FP32_RTOL = 1e-4
SCRIPT = ROOT / "scripts" / "txt2img.py"
IMPLEMENTATIONS = ["vanilla", "sdpa", "native", "xformers"]
BACKENDS = ["flash", "mem_efficient", "math"]


@pytest.fixture()
def ieee_float32():
    """Full float32 matmuls and convolutions on the GPU (no TF32) for the duration of a test."""
    settings = [torch.backends.cuda.matmul, torch.backends.cudnn.conv]
    before = [s.fp32_precision for s in settings]
    for s in settings:
        s.fp32_precision = "ieee"
    yield
    for s, value in zip(settings, before):
        s.fp32_precision = value


@pytest.fixture(scope="module")
def unets() -> dict[str, torch.nn.Module]:
    """The tiny UNet on the CPU in float32, in the original layout and converted to native MHA."""
    original = tiny_model()
    native = tiny_model(native_mha=True, seed=1)  # other weights, replaced by the converted ones
    apply_state_dict(native, to_native(original.state_dict()))
    return {"original": original.model.diffusion_model, "native": native.model.diffusion_model}


@pytest.fixture(scope="module")
def reference(unets) -> torch.Tensor:
    """The float32 CPU output of the original computation (vanilla attention)."""
    unet = copy.deepcopy(unets["original"])
    set_attention_implementation(unet, "vanilla")
    with torch.no_grad():
        return unet(*unet_inputs())


def unet_on_gpu(unets, implementation: str, dtype: torch.dtype) -> torch.nn.Module:
    """A copy of the tiny UNet on the GPU in ``dtype``, running ``implementation``."""
    if implementation == "native":
        return copy.deepcopy(unets["native"]).to(DEVICE, dtype)
    if implementation == "xformers" and attention.xops is None:
        pytest.skip("xFormers is not installed")
    unet = copy.deepcopy(unets["original"]).to(DEVICE, dtype)
    set_attention_implementation(unet, implementation)
    return unet


def run_unet(unet: torch.nn.Module, autocast: bool) -> torch.Tensor:
    """The UNet's output on :func:`unet_inputs`, back on the CPU in float32."""
    x, t, context = (v.to(DEVICE) for v in unet_inputs())
    with torch.no_grad(), torch.autocast(DEVICE.type, dtype=torch.float16, enabled=autocast):
        out = unet(x, t, context)
    return out.float().cpu()


@pytest.mark.parametrize("mode", ["half", "autocast"])
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_float16_unet_matches_float32_cpu(unets, reference, implementation, mode, monkeypatch):
    """float16 weights (``.half()``) or float32 weights under float16 autocast, per implementation;
    vanilla with its default float32 attention scores (ATTN_PRECISION=fp32)."""
    monkeypatch.setattr(attention, "ATTN_PRECISION", "fp32")
    half = mode == "half"
    unet = unet_on_gpu(unets, implementation, torch.float16 if half else torch.float32)
    out = run_unet(unet, autocast=not half)
    assert torch.isfinite(out).all()
    assert rel_err(out, reference) < FP16_RTOL


@pytest.fixture(scope="module")
def half_sdpa_unet(unets) -> torch.nn.Module:
    return unet_on_gpu(unets, "sdpa", torch.float16)


@pytest.mark.parametrize("backend", BACKENDS)
def test_each_sdpa_backend_alone_matches(half_sdpa_unet, reference, backend):
    """Only ``backend`` enabled (the other two disabled): a backend that cannot run these
    shapes raises rather than silently falling back, so each kernel is exercised."""
    disabled = {f"disable_{name}": name != backend for name in BACKENDS}
    with sdpa_backends(**disabled):
        out = run_unet(half_sdpa_unet, autocast=False)
    assert torch.isfinite(out).all()
    assert rel_err(out, reference) < FP16_RTOL


def test_sdpa_backends_all_disabled_is_an_error(half_sdpa_unet):
    with pytest.raises(ValueError, match="all SDPA backends"):
        with sdpa_backends(disable_flash=True, disable_mem_efficient=True, disable_math=True):
            run_unet(half_sdpa_unet, autocast=False)


@pytest.fixture(scope="module")
def gpu_model():
    """The tiny eps model (the same weights as ``tiny_eps_model``) on the GPU in float32."""
    return tiny_model().to(DEVICE)


def test_ddim_run_on_gpu_matches_cpu(gpu_model, tiny_eps_model, guidance_inputs, ieee_float32):
    """Five guided DDIM steps (scale 9) from the same x_T and text contexts."""
    def sample(model, device: torch.device) -> torch.Tensor:
        x_T, c, uc = (guidance_inputs[k].to(device) for k in ("x_T", "c", "uc"))
        samples, _ = DDIMSampler(model).sample(S=5, batch_size=2, shape=(4, 8, 8), conditioning=c, x_T=x_T, verbose=False,
                                               unconditional_guidance_scale=9.0, unconditional_conditioning=uc)  # fmt: skip
        return samples.cpu()

    expected = sample(tiny_eps_model, torch.device("cpu"))
    actual = sample(gpu_model, DEVICE)
    assert torch.isfinite(actual).all()
    assert rel_err(actual, expected) < FP32_RTOL


def test_text_encoder_on_gpu_matches_cpu(gpu_model, tiny_eps_model, ieee_float32):
    prompts = ["a red cube on a wooden table", ""]
    with torch.no_grad():
        expected = tiny_eps_model.get_learned_conditioning(prompts)
        actual = gpu_model.get_learned_conditioning(prompts)
    assert actual.device.type == DEVICE.type
    assert rel_err(actual.cpu(), expected) < FP32_RTOL


def test_vae_on_gpu_matches_cpu(gpu_model, tiny_eps_model, ieee_float32):
    gen = torch.Generator().manual_seed(3)
    image = torch.rand(2, 3, 64, 64, generator=gen) * 2 - 1
    z = torch.randn(2, 4, 8, 8, generator=gen)
    with torch.no_grad():
        cpu_posterior = tiny_eps_model.encode_first_stage(image)
        gpu_posterior = gpu_model.encode_first_stage(image.to(DEVICE))
        expected, actual = tiny_eps_model.decode_first_stage(z), gpu_model.decode_first_stage(z.to(DEVICE))
    assert rel_err(gpu_posterior.mean.cpu(), cpu_posterior.mean) < FP32_RTOL
    assert rel_err(gpu_posterior.std.cpu(), cpu_posterior.std) < FP32_RTOL
    assert rel_err(actual.cpu(), expected) < FP32_RTOL


def run_txt2img(tiny_files, cwd: Path, *flags: str) -> subprocess.CompletedProcess:
    model = ["--config", str(tiny_files["config"]), "--ckpt", str(tiny_files["safetensors"])]
    # 4 steps, not 3: the script refuses 3 (a stride of 1000 // 3 visits 4 timesteps, the last, 999 + 1, past the schedule).
    fast = ["--H", "64", "--W", "64", "--steps", "4", "--n_samples", "1", "--n_iter", "1"]
    return subprocess.run([sys.executable, str(SCRIPT), *model, *fast, "--device", DEVICE.type, "--outdir", "out", *flags],
                          cwd=cwd, capture_output=True, text=True, timeout=300, env=child_env())  # fmt: skip


@pytest.mark.parametrize("compile_flags", [[], ["--compile"]], ids=["eager", "compile"])
def test_txt2img_on_gpu(tiny_files, tmp_path, compile_flags):
    """The script as a user runs it, with float16 autocast: timing, peak GPU memory and device in the stats."""
    timing = ["--skip_first", "--time_file", "time.txt", "--stats_file", "stats.json"]
    result = run_txt2img(tiny_files, tmp_path, "--precision", "autocast", *timing, *compile_flags)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert len(list((tmp_path / "out" / "samples").glob("*.png"))) == 1
    seconds = float((tmp_path / "time.txt").read_text())
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert seconds > 0 and math.isclose(stats["seconds"], seconds, abs_tol=1e-5)
    assert DEVICE.type in stats["device"]
    assert stats["peak_gpu_memory_bytes"] > 0
    assert stats["precision"] == "autocast"
    assert stats["compile"] == ("default" if compile_flags else False)
