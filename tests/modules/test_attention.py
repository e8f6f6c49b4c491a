"""ldm/modules/attention.py: every attention implementation against an independent one
(diffusers' classic attention processor: baddbmm and softmax, no SDPA), against each other on
the tiny UNet, the precision rule, SDPA backend control, and which kernels actually run.

Tolerances: the implementations differ only in fusion and summation order, so float32 outputs
agree to ~1e-7 relative; 1e-5 is float32 rounding with margin.
"""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import ldm.modules.attention as attention
from conftest import assert_close, tiny_model
from ldm.modules.attention import (
    CrossAttention,
    NativeMHAttention,
    check_implementation,
    sdpa_backends,
    set_attention_implementation,
)
from ldm.native_mha import to_native

RTOL = 1e-5
AVAILABLE = ["vanilla", "sdpa"] + (["xformers"] if attention.xops is not None else [])
IMPLEMENTATIONS = ["vanilla", "sdpa", pytest.param("xformers", marks=pytest.mark.skipif(
    attention.xops is None, reason="xFormers not installed"))]
FUSED_SDPA = {"aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_efficient_attention",
              "aten::_scaled_dot_product_flash_attention", "aten::_scaled_dot_product_cudnn_attention"}
MATERIALISING = {"aten::softmax", "aten::_softmax", "aten::_safe_softmax", "aten::_native_multi_head_attention",
                 "aten::_scaled_dot_product_attention_math"}


def ops_run(fn) -> set[str]:
    """The aten operators ``fn`` runs (CPU profiler)."""
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {event.key for event in prof.key_averages()}


def diffusers_attention(dim: int, context_dim: int | None, heads: int):
    from diffusers.models.attention_processor import Attention, AttnProcessor

    reference = Attention(dim, cross_attention_dim=context_dim, heads=heads, dim_head=dim // heads, bias=False, out_bias=True)
    reference.set_processor(AttnProcessor())  # the plain computation, independent of SDPA
    return reference.eval()


def as_native(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One module's original-layout tensors in the native layout, converted by ldm.native_mha."""
    converted = to_native({f"attn1.{k}": v for k, v in state.items()})
    return {k.removeprefix("attn1."): v for k, v in converted.items()}


@pytest.fixture(params=[None, 48], ids=["self", "cross"])
def context_dim(request) -> int | None:
    return request.param


@pytest.fixture
def inputs(context_dim):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 37, 64, generator=gen)
    context = None if context_dim is None else torch.randn(2, 11, context_dim, generator=gen)
    return x, context


@pytest.mark.parametrize("name", IMPLEMENTATIONS)
def test_original_layout_matches_diffusers(name, context_dim, inputs):
    x, context = inputs
    reference = diffusers_attention(64, context_dim, heads=4)
    module = CrossAttention(64, context_dim, heads=4, dim_head=16).eval()
    module.load_state_dict(reference.state_dict())  # same key names: to_q, to_k, to_v, to_out.0
    module.implementation = name
    with torch.no_grad():
        assert_close(module(x, context), reference(x, encoder_hidden_states=context), RTOL)


def test_native_layout_matches_diffusers(context_dim, inputs):
    x, context = inputs
    reference = diffusers_attention(64, context_dim, heads=4)
    module = NativeMHAttention(64, context_dim, heads=4, dim_head=16).eval()
    module.load_state_dict(as_native(reference.state_dict()))
    with torch.no_grad():
        assert_close(module(x, context), reference(x, encoder_hidden_states=context), RTOL)


def test_native_layout_gradients_match(context_dim, inputs):
    """Fine-tuning in either layout moves the same weights the same way."""
    x, context = inputs
    original = CrossAttention(64, context_dim, heads=4, dim_head=16)
    original.implementation = "vanilla"
    native = NativeMHAttention(64, context_dim, heads=4, dim_head=16)
    native.load_state_dict(as_native(original.state_dict()))
    original(x, context).square().sum().backward()
    native(x, context).square().sum().backward()
    if context_dim is None:
        q_grad = native.in_proj_weight.grad[:64]
    else:
        q_grad = native.q_proj_weight.grad
    assert_close(q_grad, original.to_q.weight.grad, RTOL)
    assert_close(native.out_proj.weight.grad, original.to_out[0].weight.grad, RTOL)


def test_implementations_agree_on_the_unet():
    model = tiny_model()
    unet = model.model.diffusion_model
    gen = torch.Generator().manual_seed(1)
    x, context, t = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 7, 48, generator=gen), torch.tensor([3, 700])
    outputs = {}
    with torch.no_grad():
        for name in AVAILABLE:
            assert set_attention_implementation(unet, name) == 14  # 7 transformer blocks, 2 attentions each
            outputs[name] = unet(x, t, context)
    for name, out in outputs.items():
        assert_close(out, outputs["vanilla"], RTOL)


def test_implementation_choice_is_checked(monkeypatch):
    with pytest.raises(ValueError, match="unknown attention implementation 'flash'"):
        check_implementation("flash")
    with pytest.raises(ValueError, match="unknown attention implementation"):
        set_attention_implementation(torch.nn.Linear(2, 2), "nope")
    monkeypatch.setattr(attention, "xops", None)
    with pytest.raises(RuntimeError, match="xFormers is not installed"):
        check_implementation("xformers")


def test_native_mha_rejects_shapes_it_cannot_hold():
    with pytest.raises(ValueError, match="heads \\* dim_head == query_dim"):
        NativeMHAttention(64, None, heads=4, dim_head=32)
    with pytest.raises(ValueError, match="dropout=0"):
        NativeMHAttention(64, None, heads=4, dim_head=16, dropout=0.1)


def test_vanilla_scores_in_float32_do_not_overflow_in_float16(monkeypatch):
    """The original's ATTN_PRECISION=fp32 rule: q.k beyond float16's range stays finite."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 8, 64, generator=gen) * 45
    v = torch.randn(1, 8, 64, generator=gen)
    q16, v16 = q.half(), v.half()
    assert (q16.float() @ q16.float().transpose(1, 2)).abs().max() > torch.finfo(torch.float16).max
    expected = torch.softmax(q16.double() @ q16.double().transpose(1, 2) / 8, -1) @ v16.double()
    out = attention.attention(q16, q16, v16, heads=1, implementation="vanilla")
    assert out.dtype == torch.float16
    assert_close(out, expected, rtol=1e-3)  # float16 output rounding
    monkeypatch.setattr(attention, "ATTN_PRECISION", "fp16")
    assert not attention.attention(q16, q16, v16, heads=1, implementation="vanilla").isfinite().all()


def test_vanilla_under_cpu_autocast_scores_in_bfloat16_as_the_original():
    """The original's float32 rule turns off CUDA's autocast only, so under CPU autocast its scores
    are bfloat16 (and its UNet calls faster than with float32 scores): vanilla, the benchmark's
    "original" configuration, does the same."""
    softmax_inputs = []

    class RecordSoftmax(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func in (torch.softmax, torch.Tensor.softmax):
                softmax_inputs.append(args[0].dtype)
            return func(*args, **(kwargs or {}))

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 16, 32, generator=gen) for _ in range(3))
    with RecordSoftmax(), torch.autocast("cpu", torch.bfloat16):
        out = attention.attention(q, k, v, heads=2, implementation="vanilla")
    assert softmax_inputs == [torch.bfloat16]
    expected = attention.attention(q.double(), k.double(), v.double(), heads=2, implementation="vanilla")
    assert_close(out, expected, rtol=2e-2)  # bfloat16 inputs, scores and output


def test_sdpa_backends_all_disabled_is_an_error():
    with pytest.raises(ValueError, match="all SDPA backends .* are disabled"):
        with sdpa_backends(disable_flash=True, disable_mem_efficient=True, disable_math=True):
            pass


def test_sdpa_backends_choose_the_kernel_and_agree(inputs):
    x, context = inputs
    module = CrossAttention(64, context.shape[-1] if context is not None else None, heads=4, dim_head=16).eval()
    module.implementation = "sdpa"
    results = {}
    for label, flags, kernel in [
        ("math", dict(disable_flash=True, disable_mem_efficient=True), "aten::_scaled_dot_product_attention_math"),
        ("flash", dict(disable_math=True), "aten::_scaled_dot_product_flash_attention_for_cpu"),
    ]:
        with sdpa_backends(**flags):
            assert kernel in ops_run(lambda: module(x, context))
            with torch.no_grad():
                results[label] = module(x, context)
    assert_close(results["flash"], results["math"], RTOL)
    with sdpa_backends():  # nothing disabled: PyTorch's own choice, the fused CPU kernel
        assert "aten::_scaled_dot_product_flash_attention_for_cpu" in ops_run(lambda: module(x, context))


def test_fused_kernels_run_everywhere(context_dim, inputs):
    """sdpa and native MHA run a fused SDPA kernel and never materialise the score matrix
    (nn.MultiheadAttention's CPU fast path would); vanilla does materialise it."""
    x, context = inputs
    sdpa = CrossAttention(64, context_dim, heads=4, dim_head=16).eval()
    sdpa.implementation = "sdpa"
    native = NativeMHAttention(64, context_dim, heads=4, dim_head=16).eval()
    for module in (sdpa, native):
        ops = ops_run(lambda: module(x, context))
        assert ops & FUSED_SDPA and not ops & MATERIALISING, sorted(ops)
    sdpa.implementation = "vanilla"
    assert "aten::softmax" in ops_run(lambda: sdpa(x, context))


def test_text_encoder_and_vae_attention_run_sdpa():
    model = tiny_model()
    encoder = model.cond_stage_model
    assert all(isinstance(b.attn, torch.nn.MultiheadAttention) for b in encoder.model.transformer.resblocks)
    ops = ops_run(lambda: encoder(["a photograph of an astronaut"]))
    assert ops & FUSED_SDPA and not ops & MATERIALISING, sorted(ops)
    ops = ops_run(lambda: model.decode_first_stage(torch.randn(1, 4, 8, 8)))  # the mid-block AttnBlock
    assert ops & FUSED_SDPA and not ops & MATERIALISING, sorted(ops)
