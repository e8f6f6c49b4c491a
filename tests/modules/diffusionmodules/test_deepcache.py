"""Step caching (ldm/modules/diffusionmodules/deepcache.py).

The oracle is diffusers' UNet2DConditionModel holding the same weights with DeepCache's rule put in
by forward hooks: at a cached call, the hidden state entering the shallow output block is replaced
by the one recorded at the last full call, and everything else is computed as usual. Both compute
in float32 with different operation orders: relative error (L2) <= 1e-4, as the UNet's own check
(tests/modules/diffusionmodules/test_openaimodel.py). The shallow path given the features of the
same call is the full forward, bit for bit (the same operations in the same order).
"""

from __future__ import annotations

import pytest
import torch

from conftest import diffusers_unet_twin, randomize_, rel_err, tiny_config, unet_inputs
from ldm.loading import build_model
from ldm.modules.diffusionmodules.deepcache import StepCache, install

RTOL = 1e-4


def sd2_levels_model():
    """SD2's pattern at small scale: two res blocks per level, three levels, the deepest without attention."""
    config = tiny_config()
    config.model.params.unet_config.params.update(channel_mult=[1, 2, 2], num_res_blocks=2, attention_resolutions=[2, 1])
    return config, randomize_(build_model(config, "cpu"), seed=3).eval()


@pytest.fixture(scope="module")
def sd2_levels():
    return sd2_levels_model()


def residual_shapes(unet, x, t, c) -> list[torch.Size]:
    """The shapes of the ControlNet residuals the UNet takes: its input blocks' outputs and the middle block's."""
    shapes = []
    hooks = [m.register_forward_hook(lambda _, __, out: shapes.append(out.shape)) for m in (*unet.input_blocks, unet.middle_block)]
    with torch.no_grad():
        unet(x, t, c)
    for hook in hooks:
        hook.remove()
    return shapes


@pytest.mark.parametrize("controlled", [False, True], ids=["plain", "controlnet-residuals"])
def test_the_shallow_path_on_its_own_features_is_the_full_forward(sd2_levels, controlled):
    _, model = sd2_levels
    unet = model.model.diffusion_model
    x, t, c = unet_inputs(seed=4)
    control = None
    if controlled:  # ControlNet residuals: the shallow path adds those of its own skip connections
        gen = torch.Generator().manual_seed(7)
        control = [0.1 * torch.randn(shape, generator=gen) for shape in residual_shapes(unet, x, t, c)]
    with torch.no_grad():
        full = unet(x, t, c, control=control)
        for depth in range(len(unet.input_blocks)):
            out, deep = unet.run(x, t, c, control=control, depth=depth)
            assert torch.equal(out, full)
            assert torch.equal(unet.run(x, t, c, control=control, depth=depth, deep=deep)[0], full), depth


def entering_output_block(twin, k: int, layers: int) -> torch.nn.Module:
    """The diffusers module whose output is the hidden state entering our output block ``k``
    (``layers`` output blocks per level: the up block ``k // layers``, its layer ``k % layers``)."""
    block, layer = divmod(k, layers)
    if layer == 0:
        return twin.mid_block if block == 0 else twin.up_blocks[block - 1]
    up = twin.up_blocks[block]
    return up.attentions[layer - 1] if getattr(up, "attentions", None) else up.resnets[layer - 1]


def deepcache_reference(twin, module, x1, t1, x2, t2, c):
    """diffusers' output at (x1, t1), then at (x2, t2) with ``module``'s output replaced by its output at (x1, t1)."""
    kept = {}

    def record(_, __, output):
        kept["h"] = output

    def replace(_, __, output):
        return kept["h"]

    with torch.no_grad():
        handle = module.register_forward_hook(record)
        first = twin(x1, t1, encoder_hidden_states=c).sample
        handle.remove()
        handle = module.register_forward_hook(replace)
        second = twin(x2, t2, encoder_hidden_states=c).sample
        handle.remove()
    return first, second


@pytest.mark.parametrize("depth", [0, 1, 2, 5])
def test_a_cached_call_is_diffusers_with_the_deep_features_kept(sd2_levels, depth):
    """Interval 2: the first call is the UNet's, the second diffusers' with the kept features."""
    config, model = sd2_levels
    twin = diffusers_unet_twin(config, model)
    unet = build_model(config, "cpu").eval()
    unet.load_state_dict(model.state_dict())
    unet = unet.model.diffusion_model
    layers = unet.num_res_blocks[0] + 1  # output blocks per level (the same at every level here)
    x1, t1, c = unet_inputs(seed=5, timesteps=(801, 801))
    x2 = x1 + 0.3 * torch.randn(x1.shape, generator=torch.Generator().manual_seed(6))
    t2 = torch.tensor([601, 601])
    module = entering_output_block(twin, len(unet.output_blocks) - depth - 1, layers)
    first, second = deepcache_reference(twin, module, x1, t1, x2, t2, c)
    with torch.no_grad():
        plain = unet(x2, t2, c)
        cache = install(unet, interval=2, depth=depth)
        with cache:
            got = [unet(x1, t1, c), unet(x2, t2, c)]
    assert (cache.full_calls, cache.shallow_calls) == (1, 1)
    assert rel_err(got[0], first) <= RTOL and rel_err(got[1], second) <= RTOL
    assert rel_err(second, plain) > 1e-3  # the kept features really changed the second call


class Recorder:
    def __init__(self):
        self.calls = []

    def full(self, x, *args):
        self.calls.append("F")
        return x, x

    def shallow(self, x, *args):
        self.calls.append("S")
        return x


def recorded_cache(interval: int) -> tuple[StepCache, Recorder]:
    cache = StepCache(build_model(tiny_config(), "meta").model.diffusion_model, interval)
    recorder = Recorder()
    cache.full, cache.shallow = recorder.full, recorder.shallow
    return cache, recorder


def test_every_interval_th_call_is_full_and_each_run_starts_afresh():
    cache, rec = recorded_cache(3)
    x, t = torch.zeros(2, 4, 8, 8), torch.zeros(2)
    with cache:
        for _ in range(7):
            cache(x, t)
    with cache:  # a new run: full first, whatever the count
        cache(x, t)
        cache(torch.zeros(4, 4, 8, 8), t)  # another batch: its own features
        cache(torch.zeros(4, 4, 8, 8), t)
    assert "".join(rec.calls) == "FSSFSSF" + "FFS"


def test_bad_settings_are_refused():
    unet = build_model(tiny_config(), "meta").model.diffusion_model
    with pytest.raises(ValueError, match="at least 1"):
        StepCache(unet, 0)
    with pytest.raises(ValueError, match="cache depth 4: this UNet takes 0 to 3"):
        StepCache(unet, 2, depth=4)
    with pytest.raises(ValueError, match="the depth they were kept at"):
        unet.run(*unet_inputs(), deep=torch.zeros(1))


@pytest.mark.slow
def test_both_steps_compile_to_one_graph_each(tiny_eps_model):
    """The full and the shallow step are each one graph without a break, as torch.compile sees them."""
    cache = StepCache(tiny_eps_model.model.diffusion_model, 3)
    x, t, c = unet_inputs()
    with torch.no_grad():
        _, deep = cache.full(x, t, c)
        for step, args in ((cache.full, (x, t, c)), (cache.shallow, (x, t, deep, c))):
            torch._dynamo.reset()
            explanation = torch._dynamo.explain(step)(*args)
            assert explanation.graph_break_count == 0, [str(r.reason) for r in explanation.break_reasons]
            assert explanation.graph_count == 1
