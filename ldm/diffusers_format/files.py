"""The files of a diffusers folder: finding and reading a component's weights, and writing a
whole folder atomically (a hidden folder beside the target, renamed into place when complete)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping

import torch

from ldm.checkpoint import load_state_dict, save_state_dict
from ldm.diffusers_format.names import DiffusersFormatError
from ldm.fileio import atomic_folder

logger = logging.getLogger(__name__)

# A component's weights files, the preferred first: full precision before the fp16 variant,
# safetensors before pickles (read with weights_only=True all the same).
WEIGHTS = {
    "unet": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
             "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.fp16.bin"),
    "text_encoder": ("model.safetensors", "pytorch_model.bin", "model.fp16.safetensors", "pytorch_model.fp16.bin"),
}
WEIGHTS["vae"] = WEIGHTS["unet"]


def weights_file(folder: Path, component: str) -> Path:
    """The file a component's weights are read from (see :data:`WEIGHTS`)."""
    for name in WEIGHTS[component]:
        if (folder / component / name).is_file():
            return folder / component / name
    shards = sorted(p.name for p in (folder / component).glob("*.index*.json"))
    if shards:
        raise DiffusersFormatError(f"{folder / component}: sharded weights ({shards[0]}) are not read; save the "
                                   "component unsharded (save_pretrained with a larger max_shard_size)")
    raise DiffusersFormatError(f"{folder / component} holds no weights file (looked for {', '.join(WEIGHTS[component])})")


def read_weights(folder: Path, component: str, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    path = weights_file(folder, component)
    logger.info("reading %s", path)
    return load_state_dict(path, device=device)


def tokenizer_files(arch: str, context_length: int) -> dict[str, str]:
    """transformers' CLIPTokenizer files (``vocab.json``, ``merges.txt``) of open_clip's tokenizer
    for ``arch``, the BPE of every SD2 model, as SD2's diffusers folders hold it: start and end
    tokens spelt as OpenAI's CLIP spells them (open_clip's ``<start_of_text>`` is the same id),
    padding with "!" (id 0) as open_clip pads."""
    import open_clip

    bpe = open_clip.get_tokenizer(arch)
    if not hasattr(bpe, "bpe_ranks"):
        raise DiffusersFormatError(f"the text tower {arch!r} has a {type(bpe).__name__}, not CLIP's BPE tokenizer")
    start, end, pad = "<|startoftext|>", "<|endoftext|>", bpe.decoder[0]
    spelling = {bpe.sot_token_id: start, bpe.eot_token_id: end}
    vocab = {spelling.get(i, token): i for token, i in bpe.encoder.items()}
    merges = sorted(bpe.bpe_ranks, key=bpe.bpe_ranks.get)
    special = {"bos_token": start, "eos_token": end, "unk_token": end, "pad_token": pad}
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": context_length, "do_lower_case": True,
              "errors": "replace", "add_prefix_space": False, **special}
    return {
        "vocab.json": json.dumps(vocab, ensure_ascii=False),
        "merges.txt": "#version: 0.2\n" + "\n".join(" ".join(pair) for pair in merges) + "\n",
        "special_tokens_map.json": json.dumps(special, indent=2),
        "tokenizer_config.json": json.dumps(config, indent=2),
    }


def write_folder(
    path: str | os.PathLike,
    configs: Mapping[str, Mapping[str, Any]],
    weights: Mapping[str, Mapping[str, torch.Tensor]],
    text_files: Mapping[str, str],
    overwrite: bool = False,
) -> None:
    """Write a diffusers folder: ``configs`` by file path inside it (``unet/config.json``), each
    component's ``weights`` as its safetensors file, and ``text_files`` (the tokenizer's) as they are."""
    with atomic_folder(Path(path), overwrite) as tmp:
        for name, config in configs.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        for name, text in text_files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_text(text, encoding="utf-8")
        for component, state in weights.items():
            (tmp / component).mkdir(exist_ok=True)
            save_state_dict(state, tmp / component / WEIGHTS[component][0], metadata={"format": "pt"})
