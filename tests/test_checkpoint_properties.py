"""Property-based tests (Hypothesis) of the checkpoint reader: whatever bytes a file holds,
``ldm.checkpoint.load_state_dict`` returns tensors or raises CheckpointError, never anything else.

The inputs: random bytes; real .ckpt and .safetensors files truncated anywhere or with bytes
overwritten; random bytes behind a zip signature; safetensors headers (valid JSON, sizes and
offsets that may or may not fit) over random data. Derandomized: the same examples every run.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ldm.checkpoint import CheckpointError, load_state_dict, save_state_dict

PROPERTY = settings(max_examples=60, deadline=None, derandomize=True, database=None)
SUFFIXES = [".ckpt", ".pt", ".safetensors"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("properties")


@pytest.fixture(scope="module")
def real_files(folder) -> dict[str, bytes]:
    """The bytes of a small real checkpoint in each format."""
    state = {"w": torch.randn(3, 4), "b": torch.arange(4.0), "step": torch.tensor(7), "mask": torch.ones(2, dtype=torch.bool)}
    files = {}
    for suffix in (".ckpt", ".safetensors"):
        save_state_dict(state, folder / f"real{suffix}")
        files[suffix] = (folder / f"real{suffix}").read_bytes()
    return files


def read(folder: Path, suffix: str, data: bytes) -> None:
    """The property: tensors by name, or CheckpointError."""
    path = folder / f"input{suffix}"
    path.write_bytes(data)
    try:
        state = load_state_dict(path)
    except CheckpointError:
        return
    assert isinstance(state, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items())


@PROPERTY
@given(suffix=st.sampled_from(SUFFIXES), data=st.binary(max_size=2048))
def test_random_bytes(folder, suffix, data):
    read(folder, suffix, data)


@PROPERTY
@given(suffix=st.sampled_from([".ckpt", ".safetensors"]), fraction=st.floats(0.0, 1.0, exclude_max=True))
def test_truncated_real_files(folder, real_files, suffix, fraction):
    data = real_files[suffix]
    read(folder, suffix, data[: int(fraction * len(data))])


@PROPERTY
@given(
    suffix=st.sampled_from([".ckpt", ".safetensors"]),
    changes=st.lists(st.tuples(st.floats(0.0, 1.0, exclude_max=True), st.integers(0, 255)), min_size=1, max_size=8),
)
def test_real_files_with_bytes_overwritten(folder, real_files, suffix, changes):
    data = bytearray(real_files[suffix])
    for where, value in changes:
        data[int(where * len(data))] = value
    read(folder, suffix, bytes(data))


@PROPERTY
@given(suffix=st.sampled_from([".ckpt", ".pt"]), data=st.binary(max_size=2048))
def test_random_bytes_behind_a_zip_signature(folder, suffix, data):
    read(folder, suffix, b"PK\x03\x04" + data)


_DTYPES = ["F32", "F16", "BF16", "F64", "I64", "I32", "I8", "U8", "BOOL", "F8_E4M3", "C64", "XYZ", ""]
_TENSOR_HEADER = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from(_DTYPES),
        "shape": st.lists(st.integers(0, 2**40), max_size=4) | st.lists(st.integers(-3, 5), max_size=3),
        "data_offsets": st.lists(st.integers(-4, 2**40), min_size=0, max_size=3) | st.tuples(st.integers(0, 64), st.integers(0, 64)),
    }
)


@PROPERTY
@given(
    tensors=st.dictionaries(st.text(max_size=8), _TENSOR_HEADER, max_size=4),
    metadata=st.none() | st.dictionaries(st.text(max_size=4), st.text(max_size=4) | st.integers(), max_size=2),
    size_delta=st.integers(-8, 8) | st.just(2**63),
    payload=st.binary(max_size=256),
)
def test_safetensors_headers_over_random_data(folder, tensors, metadata, size_delta, payload):
    header = dict(tensors)
    if metadata is not None:
        header["__metadata__"] = metadata
    text = json.dumps(header).encode()
    size = max(0, min(len(text) + size_delta, 2**64 - 1))
    read(folder, ".safetensors", struct.pack("<Q", size) + text + payload)
