"""Both training stages learn: on a handful of samples, seeded, the loss measured on a fixed
batch (fixed noise and timesteps) falls clearly over a few dozen steps."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch

from conftest import tiny_config
from ldm.data.shapes import ShapesDataset
from ldm.training.autoencoder import AutoencoderTrainer
from ldm.training.diffusion import LatentDiffusionTrainer

SIZE = 16


def fit(module: pl.LightningModule, steps: int) -> None:
    data = ShapesDataset(8, size=SIZE, seed=4)
    loader = torch.utils.data.DataLoader(data, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(0))
    trainer = pl.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu")
    trainer.fit(module, loader)


def fixed_batch() -> dict:
    data = ShapesDataset(8, size=SIZE, seed=4)
    return {"image": torch.stack([data[i]["image"] for i in range(8)]), "caption": [data[i]["caption"] for i in range(8)]}


def test_autoencoder_loss_decreases():
    pl.seed_everything(0)
    module = AutoencoderTrainer(tiny_config().model.params.first_stage_config, learning_rate=2e-3)
    x = fixed_batch()["image"]

    def loss() -> float:
        torch.manual_seed(1)
        with torch.no_grad():
            return float(module.losses(x)["rec_loss"])

    before = loss()
    fit(module, 30)
    after = loss()
    assert after < 0.6 * before, (before, after)


def test_diffusion_loss_decreases(parameterization):
    pl.seed_everything(0)
    config = tiny_config(parameterization).model
    module = LatentDiffusionTrainer(config, first_stage_ckpt=None, learning_rate=1e-3, ema_decay=0.9)
    batch = fixed_batch()
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        z = module.latents(batch["image"])
        c = module.context(batch["caption"])
    t = torch.linspace(50, 950, 8).long()
    noise = torch.randn(z.shape, generator=gen)

    def loss() -> float:
        with torch.no_grad():
            return float(module.model.p_losses(z, c, t, noise))

    before = loss()
    fit(module, 80)
    after = loss()
    assert after < 0.8 * before, (before, after)


def test_native_attention_layout_trains():
    """The UNet in the native nn.MultiheadAttention layout learns as well: its packed
    projections receive gradients and the loss decreases."""
    pl.seed_everything(0)
    module = LatentDiffusionTrainer(tiny_config(native_mha=True).model, learning_rate=1e-3, ema_decay=0.9)
    unet = module.model.model.diffusion_model
    before = {n: p.detach().clone() for n, p in unet.named_parameters() if n.endswith("in_proj_weight")}
    assert before
    fit(module, 3)
    assert all(not torch.equal(before[n], p) for n, p in unet.named_parameters() if n in before)


@pytest.mark.slow
def test_compiled_unet_trains():
    """torch.compile'd training (AOTAutograd graphs, forward and backward; the 'aot_eager'
    backend keeps the test fast, inductor only changes the kernels) takes optimizer steps."""
    pl.seed_everything(0)
    module = LatentDiffusionTrainer(tiny_config().model, learning_rate=1e-3, ema_decay=0.9)
    module.compile_model(backend="aot_eager")
    out = module.model.model.diffusion_model.out[2].weight
    before = out.detach().clone()
    fit(module, 2)
    assert not torch.equal(before, out)
