"""Memory-mapped safetensors: numpy views straight onto a bundle file, no copy.

``safetensors.safe_open(...).get_tensor`` copies every tensor into fresh memory. A device
that hands weights to onnxruntime as external initializers wants the file's own pages
instead: they are only resident while touched, and ``release()`` drops them again after the
session has prepacked what it needs (the pages stay valid; a later read faults them back in
from the file).
"""

from __future__ import annotations

import json
import mmap
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np

_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
# The format caps the header at 100 MB; anything larger is a damaged file.
_MAX_HEADER = 100_000_000


class MappedFileError(ValueError):
    """The file is not a readable safetensors file."""


class MappedSafetensors:
    """Read-only views of every tensor of one safetensors file."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        with self.path.open("rb") as fh:
            size = self.path.stat().st_size
            raw = fh.read(8)
            if len(raw) < 8:
                raise MappedFileError(f"{self.path}: too short for a safetensors file")
            (n,) = struct.unpack("<Q", raw)
            if n > min(_MAX_HEADER, size - 8):
                raise MappedFileError(f"{self.path}: bad safetensors header length {n}")
            try:
                header = json.loads(fh.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise MappedFileError(
                    f"{self.path}: unreadable safetensors header ({exc})"
                ) from None
            self._mmap = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) if size else None
        if not isinstance(header, dict):
            raise MappedFileError(f"{self.path}: safetensors header is not an object")
        header.pop("__metadata__", None)
        self._base = 8 + n
        self._specs: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        for name, spec in header.items():
            try:
                dtype = _DTYPES[spec["dtype"]]
                shape = tuple(int(d) for d in spec["shape"])
                start, end = (int(o) for o in spec["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise MappedFileError(f"{self.path}: tensor {name!r} has a bad header") from None
            count = int(np.prod(shape, dtype=np.int64))
            if end - start != count * dtype.itemsize or self._base + end > size or start < 0:
                raise MappedFileError(f"{self.path}: tensor {name!r} lies outside the file")
            self._specs[name] = (dtype, shape, start, end)

    def keys(self) -> list[str]:
        return list(self._specs)

    def __contains__(self, name: object) -> bool:
        return name in self._specs

    def __iter__(self) -> Iterator[str]:
        return iter(self._specs)

    def nbytes(self, name: str | None = None) -> int:
        """Bytes of one tensor, or of all of them (from the header: nothing is read)."""
        specs = self._specs.values() if name is None else [self._specs[name]]
        return sum(end - start for _, _, start, end in specs)

    def __getitem__(self, name: str) -> np.ndarray:
        dtype, shape, start, end = self._specs[name]
        if self._mmap is None or start == end:
            return np.zeros(shape, dtype=dtype)
        arr = np.frombuffer(
            self._mmap,
            dtype=dtype,
            count=(end - start) // dtype.itemsize,
            offset=self._base + start,
        )
        return arr.reshape(shape)

    def release(self) -> None:
        """Drop the file's pages from this process (they reload on the next touch)."""
        if self._mmap is not None and hasattr(mmap, "MADV_DONTNEED"):
            self._mmap.madvise(mmap.MADV_DONTNEED)
