"""Reading and writing safetensors files: opening one with an error that names the file, the names, shapes and
dtypes of its header (read before any tensor data), and writing one in full or not at all."""

from __future__ import annotations

import contextlib
import os
import struct
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
          "I16": torch.int16, "I8": torch.int8, "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16,
          "U8": torch.uint8, "BOOL": torch.bool}
"""safetensors' dtype names as torch dtypes."""


@dataclass(frozen=True)
class TensorSpec:
    """The shape and dtype of a tensor (a torch dtype, or the file's own name of a dtype torch lacks)."""

    shape: tuple[int, ...]
    dtype: torch.dtype | str

    def without_member_dim(self) -> TensorSpec:
        return TensorSpec(self.shape[1:], self.dtype)


def looks_like_safetensors(path: Path) -> bool:
    """Whether ``path`` starts as a safetensors file does: an 8-byte header length that fits in the file, then a
    JSON object."""
    with open(path, "rb") as f:
        start = f.read(9)
    if len(start) < 9:
        return False
    (header_length,) = struct.unpack("<Q", start[:8])
    return start[8:9] == b"{" and 8 + header_length <= path.stat().st_size


@contextlib.contextmanager
def open_safetensors(path: Path) -> Iterator:
    """``safe_open(path)`` on the CPU; a file safetensors cannot read (not a safetensors file, truncated, a corrupt
    header) raises a ValueError that names it."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
    except SafetensorError as error:
        raise ValueError(f"{path}: not a readable safetensors file ({error})") from None
    with handle:
        yield handle


def header_specs(handle) -> dict[str, TensorSpec]:
    """Name -> shape and dtype of every tensor of an open safetensors file, from its header only."""
    specs = {}
    for name in handle.keys():
        tensor_slice = handle.get_slice(name)
        dtype = tensor_slice.get_dtype()
        specs[name] = TensorSpec(tuple(tensor_slice.get_shape()), DTYPES.get(dtype, dtype))
    return specs


def write_safetensors(tensors: Mapping[str, torch.Tensor], path: Path, metadata: Mapping[str, str]) -> None:
    """Writes ``tensors`` (CPU, contiguous) to ``path`` through a temporary file in the same folder, so that ``path``
    is either the complete new file or untouched."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(descriptor)
    try:
        save_file(dict(tensors), temporary, metadata=dict(metadata))
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(temporary)
        raise
