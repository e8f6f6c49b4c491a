"""Diffusers folders of the tiny SD2-structured models, written by diffusers' own
``save_pretrained`` (every component converted by diffusers' and transformers' code), read by
:mod:`ldm.diffusers_format`, and the same models written by it.

Oracles: the original-layout state dict the folder was made from (every tensor the model uses
equal bit for bit; the text tower's unused last layer and projection, which the folder lacks,
are the documented fillers), and diffusers' pipeline on the folder. Against the pipeline, the
text encoder, UNet and VAE compute in float32 with other operation orders (separate vs fused
q/k/v projections, attention kernels), so they agree to float32 rounding: relative error (L2
norm of the difference over the reference's) at most 1e-5 for the text encoder and the VAE, 1e-4
for the UNet (rounding amplified through ~20 layers, as in
tests/modules/diffusionmodules/test_openaimodel.py). Observed on this CPU: 0 for the text
encoder, the UNet and the VAE encoder, 6e-7 for the VAE decoder. Round trips through the other
format are bit-exact.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from conftest import (
    CONFIGS, child_env, diffusers_pipeline_twin, family_keys, rel_err, sd2_ddim_scheduler, tiny_config, tiny_family_config,
    tiny_x4_config,
)
from ldm.checkpoint import CheckpointError, load_state_dict
from ldm.diffusers_format import DiffusersFormatError, check_config, inspect_folder, load_folder, save_folder
from ldm.diffusers_format.convert import CLIP_LOGIT_SCALE
from ldm.loading import load_model_from_config

PROMPTS = ["a red cube on a wooden table", ""]
LAST = "cond_stage_model.model.transformer.resblocks.2."  # the tiny tower's third and last layer
UNUSED = {f"{LAST}{name}" for name in (
    "ln_1.weight", "ln_1.bias", "attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight", "attn.out_proj.bias",
    "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias",
)} | {"cond_stage_model.model.text_projection", "cond_stage_model.model.logit_scale"}


@pytest.fixture(params=["eps", "v"])
def case(request, tiny_diffusers_folders, tiny_eps_model, tiny_v_model):
    """(parameterization, its tiny model, that model's diffusers folder)."""
    p = request.param
    return p, tiny_eps_model if p == "eps" else tiny_v_model, tiny_diffusers_folders[p]


def pipeline(folder: Path):
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(folder).to(torch.float32)


def assert_is_original(state: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> None:
    """``state`` is ``reference`` bit for bit, but for the unused text tensors, which are the fillers."""
    assert state.keys() == reference.keys()
    for key in reference.keys() - UNUSED:
        assert state[key].dtype == reference[key].dtype and torch.equal(state[key], reference[key]), key
    assert all(not state[k].any() for k in UNUSED - {"cond_stage_model.model.logit_scale"})
    assert state["cond_stage_model.model.logit_scale"].item() == pytest.approx(CLIP_LOGIT_SCALE, rel=1e-3)  # float16 too


def with_fillers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: (torch.full_like(v, CLIP_LOGIT_SCALE) if k.endswith("logit_scale") else torch.zeros_like(v)) if k in UNUSED else v
            for k, v in state.items()}


def test_folder_is_recognised(case):
    p, _, folder = case
    info = inspect_folder(folder)
    assert (info.family, info.parameterization) == ("text-to-image", p)
    assert info.config_name == f"configs/stable-diffusion/{'v2-inference.yaml' if p == 'eps' else 'v2-inference-v.yaml'}"


def test_folder_reads_as_the_original_state(case):
    p, model, folder = case
    assert_is_original(load_state_dict(folder, config=tiny_config(p)), model.state_dict())


def test_outputs_equal_diffusers_pipeline_on_the_folder(case):
    p, _, folder = case
    ours, theirs = load_model_from_config(tiny_config(p), folder), pipeline(folder)
    gen = torch.Generator().manual_seed(0)
    x, z, image = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(1, 4, 8, 8, generator=gen), torch.rand(1, 3, 64, 64, generator=gen) * 2 - 1
    t = torch.tensor([3, 700])
    with torch.no_grad():
        c = ours.get_learned_conditioning(PROMPTS)
        c_ref = theirs.encode_prompt(PROMPTS, "cpu", 1, False)[0]
        eps, eps_ref = ours.apply_model(x, t, c), theirs.unet(x, t, encoder_hidden_states=c).sample
        decoded, decoded_ref = ours.decode_first_stage(z), theirs.vae.decode(z / theirs.vae.config.scaling_factor).sample
        mean, mean_ref = ours.encode_first_stage(image).mean, theirs.vae.encode(image).latent_dist.mean
    assert min(c_ref.abs().mean(), eps_ref.abs().mean(), decoded_ref.abs().mean(), mean_ref.abs().mean()) > 0.05
    assert rel_err(c, c_ref) <= 1e-5
    assert rel_err(eps, eps_ref) <= 1e-4
    assert rel_err(decoded, decoded_ref) <= 1e-5 and rel_err(mean, mean_ref) <= 1e-5


def tensors(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Each component's tensors, the text encoder's without the ``text_model.`` level."""
    out = {}
    for component in ("unet", "vae", "text_encoder"):
        (file,) = (folder / component).glob("*.safetensors")
        out[component] = {k.removeprefix("text_model."): v for k, v in load_file(file).items()}
    return out


def test_folder_to_original_to_folder_is_bit_exact(case, tmp_path):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    p, _, folder = case
    save_folder(load_state_dict(folder, config=tiny_config(p)), tiny_config(p), tmp_path / "back")
    theirs, ours = tensors(folder), tensors(tmp_path / "back")
    for component in theirs:
        assert ours[component].keys() == theirs[component].keys()
        assert all(torch.equal(ours[component][k], v) and ours[component][k].dtype == v.dtype for k, v in theirs[component].items())
    # diffusers and transformers load what is written, every tensor in its place.
    for cls, component in ((UNet2DConditionModel, "unet"), (AutoencoderKL, "vae"), (CLIPTextModel, "text_encoder")):
        _, info = cls.from_pretrained(tmp_path / "back" / component, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], component
    assert inspect_folder(tmp_path / "back").parameterization == p
    again = pipeline(tmp_path / "back")
    with torch.no_grad():
        assert torch.equal(again.encode_prompt(PROMPTS, "cpu", 1, False)[0], pipeline(folder).encode_prompt(PROMPTS, "cpu", 1, False)[0])
    assert [p.name for p in tmp_path.iterdir()] == ["back"]  # no temporary folder left


def test_original_to_folder_to_original_is_bit_exact(case, tmp_path):
    p, model, _ = case
    state = model.state_dict()
    save_folder(state, tiny_config(p), tmp_path / "real")
    assert_is_original(load_folder(tmp_path / "real", tiny_config(p)), state)
    save_folder(with_fillers(state), tiny_config(p), tmp_path / "filled")
    back = load_folder(tmp_path / "filled", tiny_config(p))
    assert back.keys() == state.keys() and all(torch.equal(back[k], v) for k, v in with_fillers(state).items())


def test_the_filled_last_layer_is_the_identity(tiny_diffusers_folders):
    """With the zero layer, the tower's last layer conditions as its penultimate (and as diffusers)."""
    config = tiny_config()
    config.model.params.cond_stage_config.params.layer = "last"
    last = load_model_from_config(config, tiny_diffusers_folders["eps"])
    penultimate = load_model_from_config(tiny_config(), tiny_diffusers_folders["eps"])
    with torch.no_grad():
        assert torch.equal(last.get_learned_conditioning(PROMPTS), penultimate.get_learned_conditioning(PROMPTS))


def test_native_mha_config_reads_the_folder(tiny_diffusers_folders, tiny_eps_model):
    native = load_model_from_config(tiny_config(native_mha=True), tiny_diffusers_folders["eps"])
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([3, 700])
    with torch.no_grad():
        c = native.get_learned_conditioning(PROMPTS)
        assert torch.equal(c, tiny_eps_model.get_learned_conditioning(PROMPTS))
        assert rel_err(native.apply_model(x, t, c), tiny_eps_model.apply_model(x, t, c)) <= 1e-5


def test_native_mha_checkpoint_writes_the_same_folder(tiny_eps_model, tmp_path):
    from ldm.native_mha import to_native

    save_folder(tiny_eps_model.state_dict(), tiny_config(), tmp_path / "original")
    save_folder(to_native(tiny_eps_model.state_dict()), tiny_config(native_mha=True), tmp_path / "native")
    ours, theirs = tensors(tmp_path / "native"), tensors(tmp_path / "original")
    assert all(ours[c].keys() == theirs[c].keys() and all(torch.equal(ours[c][k], v) for k, v in theirs[c].items()) for c in theirs)


def test_neither_diffusers_nor_transformers_is_needed(tiny_diffusers_folders, tmp_path):
    """Reading and writing folders in a process where importing either fails."""

    OmegaConf.save(tiny_config(), tmp_path / "tiny.yaml")
    code = (
        "import sys; sys.modules['diffusers'] = sys.modules['transformers'] = None\n"
        "from ldm.loading import load_model_from_config, load_config\n"
        "from ldm.diffusers_format import save_folder\n"
        f"model = load_model_from_config({str(tmp_path / 'tiny.yaml')!r}, {str(tiny_diffusers_folders['eps'])!r})\n"
        f"save_folder(model.state_dict(), load_config({str(tmp_path / 'tiny.yaml')!r}), {str(tmp_path / 'out')!r})\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=child_env(), timeout=120)
    assert done.returncode == 0, done.stderr
    assert inspect_folder(tmp_path / "out").family == "text-to-image"


# -- other files of the same model: pickles, fp16 variants, older names ----------------------------
def copy(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / "copy"))


def rewrite(path: Path, change) -> None:
    path.write_text(json.dumps(change(json.loads(path.read_text()))))


def as_pickles(folder: Path) -> None:
    for file in folder.glob("*/*.safetensors"):
        name = "pytorch_model.bin" if file.parent.name == "text_encoder" else "diffusion_pytorch_model.bin"
        torch.save(load_file(file), file.parent / name)
        file.unlink()


def as_fp16_variant(folder: Path) -> None:
    for file in folder.glob("*/*.safetensors"):
        save_file({k: v.half() for k, v in load_file(file).items()}, file.with_suffix(".fp16.safetensors"))
        file.unlink()


def as_old_diffusers(folder: Path) -> None:
    """The names of diffusers < 0.14 (VAE attention) and transformers < 5 (``text_model.``, position ids)."""
    old = {"to_q.": "query.", "to_k.": "key.", "to_v.": "value.", "to_out.0.": "proj_attn."}
    vae = load_file(folder / "vae" / "diffusion_pytorch_model.safetensors")
    renamed = {}
    for key, value in vae.items():
        for new, legacy in old.items():
            key = key.replace(f"attentions.0.{new}", f"attentions.0.{legacy}")
        renamed[key] = value
    save_file(renamed, folder / "vae" / "diffusion_pytorch_model.safetensors")
    text = load_file(folder / "text_encoder" / "model.safetensors")
    text = {f"text_model.{k}": v for k, v in text.items()} | {"text_model.embeddings.position_ids": torch.arange(77)[None]}
    save_file(text, folder / "text_encoder" / "model.safetensors")


@pytest.mark.parametrize("variant", [as_pickles, as_fp16_variant, as_old_diffusers], ids=["bin", "fp16", "old-names"])
def test_other_files_of_the_same_model(variant, tiny_diffusers_folders, tiny_eps_model, tmp_path):
    folder = copy(tiny_diffusers_folders["eps"], tmp_path)
    variant(folder)
    reference = tiny_eps_model.state_dict()
    if variant is as_fp16_variant:
        reference = {k: v.half() if k.startswith(("model.", "first_stage", "cond_stage")) else v for k, v in reference.items()}
    assert_is_original(load_folder(folder, tiny_config()), reference)


def test_full_precision_is_read_before_the_fp16_variant(tiny_diffusers_folders, tiny_eps_model, tmp_path):
    folder = copy(tiny_diffusers_folders["eps"], tmp_path)
    unet = folder / "unet" / "diffusion_pytorch_model.safetensors"
    save_file({k: v.half() for k, v in load_file(unet).items()}, unet.with_suffix(".fp16.safetensors"))
    assert_is_original(load_folder(folder, tiny_config()), tiny_eps_model.state_dict())


# -- inpainting ---------------------------------------------------------------------------------------
def test_inpainting_folder(tiny_inpaint_model, tmp_path):
    config = tiny_family_config("inpainting")
    diffusers_pipeline_twin(config, tiny_inpaint_model).save_pretrained(tmp_path / "inpaint")
    info = inspect_folder(tmp_path / "inpaint")
    assert info.family == "inpainting" and info.config_name == "configs/stable-diffusion/v2-inpainting-inference.yaml"
    assert_is_original(load_folder(tmp_path / "inpaint", config), tiny_inpaint_model.state_dict())
    ours, theirs = load_model_from_config(config, tmp_path / "inpaint"), pipeline(tmp_path / "inpaint")
    x, t = torch.randn(2, 9, 8, 8, generator=torch.Generator().manual_seed(2)), torch.tensor([3, 700])
    with torch.no_grad():
        c = ours.get_learned_conditioning(PROMPTS)
        eps = ours.model.diffusion_model(x, t, context=c)
        assert rel_err(eps, theirs.unet(x, t, encoder_hidden_states=c).sample) <= 1e-4
    save_folder(tiny_inpaint_model.state_dict(), config, tmp_path / "back")
    assert json.loads((tmp_path / "back" / "model_index.json").read_text())["_class_name"] == "StableDiffusionInpaintPipeline"
    assert pipeline(tmp_path / "back").unet.config.in_channels == 9


# -- the real SD2 configs, against the JSON configs diffusers writes for them ----------------------
def sd2_json_folder(path: Path, config_name: str, keys: dict[str, list[int]]) -> Path:
    """A folder of the JSON configs diffusers' classes write for an SD2 config (no weights)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import create_unet_diffusers_config_from_ldm, create_vae_diffusers_config_from_ldm
    from transformers import CLIPTextConfig

    original = OmegaConf.to_container(OmegaConf.load(CONFIGS / config_name))
    state = {k: torch.empty(shape, device="meta") for k, shape in keys.items()}
    with torch.device("meta"):
        UNet2DConditionModel(**create_unet_diffusers_config_from_ldm(original, state)).save_config(path / "unet")
        AutoencoderKL(**create_vae_diffusers_config_from_ldm(original, state)).save_config(path / "vae")
    CLIPTextConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                   hidden_act="gelu").save_pretrained(path / "text_encoder")
    sd2_ddim_scheduler(original["model"]["params"].get("parameterization", "eps")).save_config(path / "scheduler")
    (path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}))
    return path


@pytest.mark.parametrize("config_name", ["v2-inference.yaml", "v2-inference-v.yaml", "v2-inpainting-inference.yaml"])
def test_real_sd2_folders_name_their_config(config_name, tmp_path):
    keys = family_keys("inpainting" if "inpainting" in config_name else "sd2")
    folder = inspect_folder(sd2_json_folder(tmp_path, config_name, keys))
    assert folder.config_name == f"configs/stable-diffusion/{config_name}"
    check_config(folder, OmegaConf.load(CONFIGS / config_name))
    other = "v2-inference.yaml" if config_name == "v2-inference-v.yaml" else "v2-inference-v.yaml"
    with pytest.raises(DiffusersFormatError, match=f"the folder's config is configs/stable-diffusion/{config_name}"):
        check_config(folder, OmegaConf.load(CONFIGS / other), other)


# -- what is not an SD2 folder, or not this config's model -----------------------------------------
def edit(component: str, **changes):
    file = "model_index.json" if component == "model_index" else f"{component}/{'scheduler_config' if component == 'scheduler' else 'config'}.json"
    return lambda folder: rewrite(folder / file, lambda config: {**config, **changes})


def both(*changes):
    return lambda folder: [change(folder) for change in changes]


BAD_FOLDERS = {
    "sd1": (edit("text_encoder", hidden_size=768), "a Stable Diffusion 1.x model .CLIP ViT-L text encoder, 768-wide"),
    "sdxl": (edit("model_index", text_encoder_2=["transformers", "CLIPTextModelWithProjection"]), "an SDXL model"),
    "sd3": (edit("model_index", transformer=["diffusers", "SD3Transformer2DModel"]), "transformer-based model"),
    "upscaler": (edit("model_index", low_res_scheduler=["diffusers", "DDPMScheduler"]), "the SD2 x4 upscaler: not converted"),
    "depth": (edit("model_index", depth_estimator=["transformers", "DPTForDepthEstimation"]), "SD2 depth-to-image"),
    "unclip": (edit("model_index", image_noising_scheduler=["diffusers", "DDPMScheduler"]), "Stable unCLIP"),
    "7-channels": (edit("unet", in_channels=7), "7 input channels .the SD2 x4 upscaler."),
    "x0": (edit("scheduler", prediction_type="sample"), "prediction_type 'sample'"),
    "inpainting-v": (both(edit("unet", in_channels=9), edit("scheduler", prediction_type="v_prediction")),
                     "inpainting model with v_prediction prediction, which SD2 has no config for"),
    "groups": (edit("unet", norm_num_groups=16), "unet/config.json norm_num_groups is 16, not 32"),
    "schedule": (edit("scheduler", beta_schedule="linear"), "beta_schedule is 'linear', not 'scaled_linear'"),
    "no-index": (lambda f: (f / "model_index.json").unlink(), "no diffusers pipeline .it has no model_index.json"),
    "no-vae": (lambda f: shutil.rmtree(f / "vae"), "lacks the vae/config.json"),
    "no-weights": (lambda f: (f / "unet" / "diffusion_pytorch_model.safetensors").unlink(), "unet holds no weights file"),
    "sharded": (lambda f: (f / "unet" / "diffusion_pytorch_model.safetensors").rename(
        f / "unet" / "diffusion_pytorch_model.safetensors.index.json"), "sharded weights"),
    "bad-json": (lambda f: (f / "unet" / "config.json").write_text("{"), "unet/config.json: not a readable JSON config"),
    "extra-tensor": (lambda f: save_file({**load_file(f / "vae" / "diffusion_pytorch_model.safetensors"), "encoder.extra.weight": torch.zeros(1)},
                                         f / "vae" / "diffusion_pytorch_model.safetensors"), "1 VAE tensors have no counterpart.*encoder.extra.weight"),
    "all-text-layers": (edit("text_encoder", num_hidden_layers=3), "has all 3 layers and diffusers conditions on the last"),
    "text-layers": (edit("text_encoder", num_hidden_layers=1), "text encoder has 1 layers, the config's text tower 3"),
    # Entries that change no tensor's shape: the strict load would not see them.
    "heads": (edit("unet", attention_head_dim=[1, 2]), r"attention_head_dim is \[1, 2\], the config's \[2, 4\]"),
    "text-heads": (edit("text_encoder", num_attention_heads=4), "num_attention_heads is 4, the config's 2"),
    "latent-scale": (edit("vae", scaling_factor=0.13025), "scaling_factor is 0.13025, the config's 0.18215"),
    "v-for-eps": (edit("scheduler", prediction_type="v_prediction"), "prediction_type is 'v_prediction', the config's 'epsilon'"),
}


@pytest.mark.parametrize("name", sorted(BAD_FOLDERS))
def test_bad_folders_are_clear_errors(name, tiny_diffusers_folders, tmp_path):
    change, message = BAD_FOLDERS[name]
    folder = copy(tiny_diffusers_folders["eps"], tmp_path)
    change(folder)
    with pytest.raises(DiffusersFormatError, match=message):
        load_folder(folder, tiny_config())


def test_a_component_folder_names_its_pipeline(tiny_diffusers_folders):
    with pytest.raises(DiffusersFormatError, match="one component of a diffusers pipeline: pass its folder"):
        inspect_folder(tiny_diffusers_folders["eps"] / "unet")


def test_config_of_another_family_is_named(tiny_diffusers_folders):
    with pytest.raises(DiffusersFormatError, match=r"text-to-image model, the config describes inpainting \(the folder's config is configs/stable-diffusion/v2-inference.yaml\)"):
        load_folder(tiny_diffusers_folders["eps"], tiny_family_config("inpainting"))


def test_what_a_folder_cannot_hold_is_refused(tiny_eps_model, tiny_x4_model, tmp_path):
    with pytest.raises(DiffusersFormatError, match="LatentUpscaleDiffusion model: the SD2 models converted are"):
        save_folder(tiny_x4_model.state_dict(), tiny_x4_config(), tmp_path / "x4")
    with pytest.raises(CheckpointError, match="unexpected keys 1: extra"):
        save_folder({**tiny_eps_model.state_dict(), "extra": torch.zeros(1)}, tiny_config(), tmp_path / "extra")
    incomplete = {k: v for k, v in tiny_eps_model.state_dict().items() if "out.2." not in k}
    with pytest.raises(CheckpointError, match="missing keys 2: model.diffusion_model.out.2.bias"):
        save_folder(incomplete, tiny_config(), tmp_path / "incomplete")
    betas = {**tiny_eps_model.state_dict(), "betas": torch.linspace(1e-4, 2e-2, 1000)}
    with pytest.raises(DiffusersFormatError, match="noise schedule .betas. is not the config's"):
        save_folder(betas, tiny_config(), tmp_path / "betas")
    assert not list(tmp_path.iterdir())
