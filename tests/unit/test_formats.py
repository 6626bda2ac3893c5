"""A corpus of malformed model files: each gets a clear ArtifactError, nothing else."""

from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from llmos.errors import ArtifactError
from llmos.registry.formats import check_gguf, check_safetensors, is_pickle_checkpoint


def _safetensors(path: Path, header: dict, data: bytes = b"") -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def test_valid_safetensors_counts_parameters(tmp_path: Path) -> None:
    save_file({"w": torch.zeros(3, 4), "b": torch.zeros(4)}, tmp_path / "m.safetensors")
    summary = check_safetensors(tmp_path / "m.safetensors")
    assert (summary.tensors, summary.parameters) == (2, 16)


@pytest.mark.parametrize(
    ("header", "data"),
    [
        ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8),  # offsets past the end
        ({"w": {"dtype": "F32", "shape": [1 << 40], "data_offsets": [0, 16]}}, b"\0" * 16),  # huge dimensions
        ({"w": {"dtype": "XX", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 16),  # unknown dtype
        ({"w": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}}, b"\0" * 16),  # negative shape
        ({"w": {"dtype": "F32", "shape": [4]}}, b"\0" * 16),  # missing offsets
        ({"w": "nonsense"}, b""),
    ],
)
def test_bad_safetensors_headers(tmp_path: Path, header: dict, data: bytes) -> None:
    with pytest.raises(ArtifactError):
        check_safetensors(_safetensors(tmp_path / "bad.safetensors", header, data))


def test_safetensors_header_length_beyond_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", 10**12) + b"{}")
    with pytest.raises(ArtifactError, match="exceeds"):
        check_safetensors(path)


def test_truncated_safetensors(tmp_path: Path) -> None:
    save_file({"w": torch.zeros(64, 64)}, tmp_path / "m.safetensors")
    raw = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "m.safetensors").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ArtifactError):
        check_safetensors(tmp_path / "m.safetensors")


def test_gguf_magic_only(tmp_path: Path) -> None:
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    with pytest.raises(ArtifactError, match=r"truncated|magic"):
        check_gguf(tmp_path / "m.gguf")


def test_gguf_bad_magic(tmp_path: Path) -> None:
    (tmp_path / "m.gguf").write_bytes(b"NOPE" + b"\0" * 100)
    with pytest.raises(ArtifactError):
        check_gguf(tmp_path / "m.gguf")


def test_gguf_implausible_counts(tmp_path: Path) -> None:
    (tmp_path / "m.gguf").write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 10**12, 10**12))
    with pytest.raises(ArtifactError, match="implausible"):
        check_gguf(tmp_path / "m.gguf")


def _tiny_gguf(path: Path) -> Path:
    import numpy as np
    from gguf import GGUFWriter

    writer = GGUFWriter(path, "llama")
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_valid_gguf_header(tmp_path: Path) -> None:
    info = check_gguf(_tiny_gguf(tmp_path / "m.gguf"))
    assert info == {"architecture": "llama", "tensors": 1}


def test_truncated_gguf(tmp_path: Path) -> None:
    path = _tiny_gguf(tmp_path / "m.gguf")
    raw = path.read_bytes()
    path.write_bytes(raw[:-64])
    with pytest.raises(ArtifactError):
        check_gguf(path)


class _Sentinel:
    def __reduce__(self) -> tuple:
        import os

        return (os.system, ("touch SENTINEL",))


def test_pickle_checkpoints_are_detected_without_loading(tmp_path: Path) -> None:
    path = tmp_path / "weights.data"
    path.write_bytes(pickle.dumps(_Sentinel()))
    assert is_pickle_checkpoint(path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"PK\x03\x04")
    assert is_pickle_checkpoint(tmp_path / "pytorch_model.bin")
    assert not (tmp_path / "SENTINEL").exists()
