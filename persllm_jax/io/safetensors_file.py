"""Reading and writing safetensors files with numpy memory maps.

The format is an 8-byte little-endian header length, a JSON header
({name: {dtype, shape, data_offsets}}, plus "__metadata__"), then the raw tensor bytes.
Reading maps the file and slices tensors lazily, so a loader can take one layer of one tensor
at a time; bfloat16 comes through ml_dtypes. Corrupt files fail with the file and tensor named.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
NAMES = {dtype: name for name, dtype in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


class SafetensorsError(ValueError):
    """A safetensors file that cannot be read as one."""


class SafetensorsFile:
    """One safetensors file, tensors read on demand."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"safetensors file {self.path} does not exist")
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise SafetensorsError(f"{self.path}: file is {size} bytes, too short for a header")
            (header_len,) = struct.unpack("<Q", raw_len)
            if header_len > min(_MAX_HEADER, size - 8):
                raise SafetensorsError(
                    f"{self.path}: header length {header_len} exceeds the file size {size} (corrupt file)"
                )
            try:
                header = json.loads(f.read(header_len))
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise SafetensorsError(f"{self.path}: header is not valid JSON ({err})") from err
        self.metadata = header.pop("__metadata__", None) or {}
        self._data_start = 8 + header_len
        self._entries = header
        data_size = size - self._data_start
        for name, entry in header.items():
            try:
                dtype = DTYPES[entry["dtype"]]
                begin, end = entry["data_offsets"]
                shape = tuple(entry["shape"])
            except (KeyError, TypeError, ValueError) as err:
                raise SafetensorsError(f"{self.path}: tensor {name!r} has a malformed entry {entry}") from err
            expected = math.prod(shape) * dtype.itemsize
            if end - begin != expected or end > data_size or begin < 0:
                raise SafetensorsError(
                    f"{self.path}: tensor {name!r} ({entry['dtype']}{list(shape)}) needs bytes "
                    f"[{begin}, {begin + expected}) but the data section holds {data_size} bytes "
                    "(truncated or corrupt file)"
                )
        self._map = None

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name]["shape"])

    def dtype(self, name: str) -> np.dtype:
        return DTYPES[self._entries[name]["dtype"]]

    def get(self, name: str) -> np.ndarray:
        """The tensor as a read-only memory-mapped array (no copy until sliced and cast)."""
        if self._map is None:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        entry = self._entries[name]
        begin, end = entry["data_offsets"]
        raw = self._map[self._data_start + begin : self._data_start + end]
        return raw.view(DTYPES[entry["dtype"]]).reshape(entry["shape"])


def write(path: str | os.PathLike, tensors: dict[str, np.ndarray], metadata: dict | None = None) -> None:
    """Write `tensors` (numpy arrays, bfloat16 allowed) as one safetensors file."""
    header, offset, arrays = {}, 0, []
    for name, array in tensors.items():
        array = np.ascontiguousarray(array)
        if array.dtype not in NAMES:
            raise SafetensorsError(f"tensor {name!r}: dtype {array.dtype} cannot be stored")
        header[name] = {
            "dtype": NAMES[array.dtype],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + array.nbytes],
        }
        offset += array.nbytes
        arrays.append(array)
    header["__metadata__"] = {"format": "pt", **(metadata or {})}
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # tensor data starts 8-byte aligned
    tmp = Path(str(path) + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for array in arrays:
            f.write(array.tobytes())
    os.replace(tmp, path)
