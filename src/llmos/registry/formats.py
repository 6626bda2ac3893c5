"""Safe inspection of model files: safetensors and GGUF headers checked against the file
size before anything is loaded, and pickle-based checkpoints refused outright."""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmos.errors import ArtifactError


def json_depth_exceeds(body: bytes, limit: int) -> bool:
    """True if brackets nest deeper than ``limit`` (strings and escapes skipped, linear time)."""
    depth = 0
    in_string = escaped = False
    for byte in body:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):  # [ {
            depth += 1
            if depth > limit:
                return True
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return False


# Formats that deserialise with pickle: never loaded, whatever their content.
PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".joblib"})
_SAFETENSORS_DTYPE_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
_MAX_HEADER = 100 * 1024 * 1024
GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class TensorSummary:
    tensors: int
    parameters: int


def is_pickle_checkpoint(path: Path) -> bool:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return True
    with path.open("rb") as f:
        head = f.read(2)
    # Protocol 2+ pickles start with PROTO (0x80); torch.save zips start with "PK".
    return path.suffix.lower() not in {".safetensors", ".gguf", ".json", ".txt", ".model"} and head[:1] == b"\x80"


def check_safetensors(path: Path) -> TensorSummary:
    """Validate a safetensors file's header and offsets; return tensor and parameter counts."""
    size = path.stat().st_size
    if size < 8:
        raise ArtifactError(f"{path.name}: truncated safetensors file ({size} bytes)", code="corrupt_artifact")
    with path.open("rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > min(_MAX_HEADER, size - 8):
            raise ArtifactError(
                f"{path.name}: safetensors header length {header_len} exceeds the file", code="corrupt_artifact"
            )
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path.name}: safetensors header is not valid JSON", code="corrupt_artifact") from exc
    if not isinstance(header, dict):
        raise ArtifactError(f"{path.name}: safetensors header is not an object", code="corrupt_artifact")
    data_len = size - 8 - header_len
    params = 0
    covered = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        params += _check_tensor_entry(path.name, name, info, data_len)
        covered = max(covered, info["data_offsets"][1])
    if covered > data_len:
        raise ArtifactError(f"{path.name}: tensor data runs past the end of the file", code="corrupt_artifact")
    return TensorSummary(tensors=len(header) - ("__metadata__" in header), parameters=params)


def _check_tensor_entry(file: str, name: str, info: Any, data_len: int) -> int:
    try:
        dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
        width = _SAFETENSORS_DTYPE_BYTES[dtype]
        if not all(isinstance(d, int) and d >= 0 for d in shape):
            raise ValueError("bad shape")
        count = math.prod(shape)
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"{file}: malformed header entry for tensor {name!r}", code="corrupt_artifact") from exc
    if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end <= data_len):
        raise ArtifactError(f"{file}: tensor {name!r} offsets lie outside the file", code="corrupt_artifact")
    if end - begin != count * width:
        raise ArtifactError(f"{file}: tensor {name!r} size does not match its shape", code="corrupt_artifact")
    return count


def check_gguf(path: Path) -> dict[str, Any]:
    """Parse a GGUF file's header with every tensor bounded by the file size.

    Returns the architecture and tensor count; raises ArtifactError on anything malformed.
    """
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(24)
    if len(head) < 24 or head[:4] != GGUF_MAGIC:
        raise ArtifactError(f"{path.name}: not a GGUF file (bad magic or truncated)", code="corrupt_artifact")
    version, n_tensors, n_kv = struct.unpack("<IQQ", head[4:24])
    if version not in (2, 3) or n_tensors > 1_000_000 or n_kv > 1_000_000:
        raise ArtifactError(
            f"{path.name}: implausible GGUF header (version {version}, {n_tensors} tensors, {n_kv} keys)",
            code="corrupt_artifact",
        )
    try:
        from gguf import GGUFReader

        reader = GGUFReader(path, "r")
        for tensor in reader.tensors:
            if int(tensor.data_offset) + int(tensor.n_bytes) > size:
                raise ArtifactError(
                    f"{path.name}: tensor {tensor.name} runs past the end of the file", code="corrupt_artifact"
                )
        arch_field = reader.fields.get("general.architecture")
        arch = bytes(arch_field.parts[arch_field.data[0]]).decode() if arch_field else None
    except ArtifactError:
        raise
    except Exception as exc:  # the gguf reader raises many kinds on malformed input
        raise ArtifactError(
            f"{path.name}: corrupt GGUF file ({type(exc).__name__}: {exc})", code="corrupt_artifact"
        ) from exc
    return {"architecture": arch, "tensors": len(reader.tensors)}


def parse_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path.name}: not valid JSON", code="corrupt_artifact") from exc


def read_json(path: Path) -> dict[str, Any]:
    data = parse_json(path)
    if not isinstance(data, dict):
        raise ArtifactError(f"{path.name}: expected a JSON object", code="corrupt_artifact")
    return data
