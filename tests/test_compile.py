"""torch.compile of the UNet: one graph, no breaks, for every implementation but xFormers,
and compiled output equal to eager output (tracing or compiling the whole UNet is marked slow).

Tolerance of the compiled run: inductor fuses and reorders float32 arithmetic (and may use
other matmul kernels), so it agrees with eager to float32 rounding accumulated over the
network: 1e-4 relative to the output's scale (observed ~5e-7 on the tiny UNet).
"""

from __future__ import annotations

import pytest
import torch

from conftest import assert_close, tiny_model, unet_inputs
from ldm.modules.attention import set_attention_implementation
from ldm.modules.diffusionmodules.util import timestep_embedding


def assert_no_graph_breaks(fn, *args) -> None:
    torch._dynamo.reset()
    with torch.no_grad():
        explanation = torch._dynamo.explain(fn)(*args)
    reasons = [str(r.reason) for r in explanation.break_reasons]
    assert explanation.graph_break_count == 0, reasons
    assert explanation.graph_count == 1


@pytest.fixture(scope="module")
def unets():
    unet = tiny_model().model.diffusion_model
    native = tiny_model(native_mha=True).model.diffusion_model
    return {"original": unet, "native": native}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vanilla", "sdpa", "native"])
def test_unet_has_no_graph_breaks(unets, name):
    if name == "native":
        unet = unets["native"]
    else:
        unet = unets["original"]
        set_attention_implementation(unet, name)
    assert_no_graph_breaks(unet, *unet_inputs())


@pytest.mark.slow
@pytest.mark.parametrize("family", ["x4", "unclip"])
def test_class_conditional_unet_has_no_graph_breaks(family, tiny_x4_model, tiny_unclip_models):
    """The label embedding (x4: integer noise levels; unCLIP: the adm vector) stays in the graph."""
    x, t, context = unet_inputs()
    if family == "x4":
        unet, x, y = tiny_x4_model.model.diffusion_model, torch.cat([x, x[:, :3]], 1), torch.tensor([20, 350])
    else:
        unet, y = tiny_unclip_models["h"].model.diffusion_model, torch.randn(2, 64)
    assert_no_graph_breaks(unet, x, t, context, y)


@pytest.mark.parametrize("kdim", [None, 48], ids=["self", "cross"])
def test_multihead_attention_forward_has_no_graph_breaks(kdim):
    mha = torch.nn.MultiheadAttention(64, 4, kdim=kdim, vdim=kdim, batch_first=True).eval()
    x = torch.randn(2, 9, 64)
    context = x if kdim is None else torch.randn(2, 5, kdim)
    assert_no_graph_breaks(lambda q, kv: mha(q, kv, kv, need_weights=False)[0], x, context)


def test_timestep_embedding_has_no_graph_breaks():
    assert_no_graph_breaks(lambda t: timestep_embedding(t, 32), torch.tensor([1.0, 500.0]))


@pytest.mark.slow
def test_compiled_unet_matches_eager(unets):
    """Inductor on the CPU, native-MHA UNet, whole graph (fullgraph=True fails on any break)."""
    unet = unets["native"]
    x, t, context = unet_inputs()
    torch._dynamo.reset()
    compiled = torch.compile(unet, backend="inductor", fullgraph=True)
    with torch.no_grad():
        expected = unet(x, t, context)
        actual = compiled(x, t, context)
    assert_close(actual, expected, 1e-4)


@pytest.mark.slow
def test_every_sampler_runs_a_compiled_unet_without_breaks_or_recompiles(guidance_inputs):
    """A whole run of each sampler through one compiled UNet (fullgraph: a break fails): it compiles at
    most once per timestep dtype (DDIM and PLMS pass integer timesteps, the rest fractional ones) and
    never again, whatever the sampler, step or schedule. Dynamo alone is what is tested (backend eager)."""
    from torch._dynamo.utils import counters

    from ldm.models.diffusion.samplers import SAMPLERS
    from ldm.models.diffusion.sampling import SampleRequest

    model = tiny_model()
    unet = model.model.diffusion_model
    torch._dynamo.reset()
    counters.clear()
    unet.forward = torch.compile(unet.forward, backend="eager", fullgraph=True, dynamic=False)
    c, uc, x_T = guidance_inputs["c"], guidance_inputs["uc"], guidance_inputs["x_T"]
    graphs = []
    with torch.no_grad():
        for name, sampler in SAMPLERS.items():
            for schedule in sampler.schedules[:2]:
                sampler.sample(model, SampleRequest(c, uc, 9.0, 6, tuple(x_T.shape), schedule=schedule, noise=x_T))
                graphs.append((name, schedule, counters["stats"]["unique_graphs"]))
    assert graphs[-1][2] <= 2, graphs
    assert not counters["graph_break"], dict(counters["graph_break"])
