"""Diffusers-format Stable Diffusion 2 models: a pipeline folder (``model_index.json``,
``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``) read as this
codebase's original-layout state dict, and a model written as such a folder.

Neither diffusers nor transformers is needed: the tensor names are mapped here
(:mod:`~ldm.diffusers_format.names`), a folder is recognised from its JSON configs
(:mod:`~ldm.diffusers_format.identify`), a YAML config's model written as JSON configs
(:mod:`~ldm.diffusers_format.configs`) and files (:mod:`~ldm.diffusers_format.files`); the
conversions, and what the formats do not share, are in :mod:`~ldm.diffusers_format.convert`.
``ldm.checkpoint.load_state_dict`` reads a folder through :func:`load_folder`, so ``--ckpt`` may
name one anywhere a checkpoint is read.
"""

from ldm.diffusers_format.convert import load_folder, save_folder, to_diffusers, to_original
from ldm.diffusers_format.identify import Folder, check_config, inspect_folder, is_diffusers_folder
from ldm.diffusers_format.names import DiffusersFormatError

__all__ = [
    "DiffusersFormatError", "Folder", "check_config", "inspect_folder", "is_diffusers_folder", "load_folder",
    "save_folder", "to_diffusers", "to_original",
]
