"""Memory-mapped safetensors: numpy views straight onto a bundle file, no copy.

``safetensors.safe_open(...).get_tensor`` copies every tensor into fresh memory. A device
that hands weights to onnxruntime as external initializers wants the file's own pages
instead: they are only resident while touched, and ``release()`` drops them again after the
session has prepacked what it needs (the pages stay valid; a later read faults them back in
from the file).
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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


def _whole(value: Any) -> int:
    """A non-negative whole number from a header (JSON ints only: no bools, floats, text)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(value)
    return value


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
            except RecursionError:
                raise MappedFileError(f"{self.path}: safetensors header nests too deep") from None
            self._mmap = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) if size else None
        if not isinstance(header, dict):
            raise MappedFileError(f"{self.path}: safetensors header is not an object")
        header.pop("__metadata__", None)
        self._base = 8 + n
        self._specs: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        for name, spec in header.items():
            try:
                dtype = _DTYPES[spec["dtype"]]
                shape = tuple(_whole(d) for d in spec["shape"])
                start, end = (_whole(o) for o in spec["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise MappedFileError(f"{self.path}: tensor {name!r} has a bad header") from None
            count = math.prod(shape)  # Python ints: a huge shape cannot wrap around
            if end - start != count * dtype.itemsize or self._base + end > size or start < 0:
                raise MappedFileError(f"{self.path}: tensor {name!r} lies outside the file")
            self._specs[name] = (dtype, shape, start, end)
        # The format forbids overlapping tensors: two names over the same bytes serve garbage.
        spans = sorted((start, end, name) for name, (_, _, start, end) in self._specs.items())
        for (_, prev_end, prev), (start, _, name) in zip(spans, spans[1:], strict=False):
            if start < prev_end:
                raise MappedFileError(f"{self.path}: tensors {prev!r} and {name!r} overlap")

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

    def offset_of(self, view: np.ndarray) -> int:
        """Where in the file the first byte of ``view`` (a view of one of its tensors) is."""
        if self._mmap is None:
            raise ValueError(f"{self.path}: an empty file has no views")
        start = np.frombuffer(self._mmap, dtype=np.uint8).__array_interface__["data"][0]
        offset = view.__array_interface__["data"][0] - start
        last = (
            offset
            + sum((n - 1) * s for n, s in zip(view.shape, view.strides, strict=True))
            + view.itemsize
        )
        if offset < 0 or last > len(self._mmap) or min(view.strides, default=0) < 0:
            raise ValueError(f"the array is not a view of {self.path}")
        return offset

    def release(self) -> None:
        """Drop the file's pages from this process (they reload on the next touch)."""
        if self._mmap is not None and hasattr(mmap, "MADV_DONTNEED"):
            self._mmap.madvise(mmap.MADV_DONTNEED)


class Scratch:
    """Arrays the runtime computes (fused weights, packed LoRA), kept in shared maps of an
    unlinked temporary file, so their pages can leave the process once onnxruntime has
    prepacked them: ``release()`` drops every page (MADV_DONTNEED) and a later read faults
    the same bytes back in from the file. Whether a kernel prepacks depends on the CPU (without
    dot-product instructions MatMulNBits keeps reading some originals), so the pages must stay
    readable: private anonymous memory would read back as zeros. Bump-allocated in chunks,
    64-byte aligned. ``COALORA_SCRATCH_DIR`` picks the file's folder (default: the temp dir;
    on a tmpfs the pages stay in memory, still correct).
    """

    CHUNK = 16 * 2**20
    ALIGN = 64

    # Without shared file maps and madvise (not POSIX) arrays are plain numpy ones.
    AVAILABLE = hasattr(mmap, "MAP_SHARED") and hasattr(mmap, "MADV_DONTNEED")

    def __init__(self) -> None:
        self._chunks: list[mmap.mmap] = []
        self._files: list[Any] = []
        self._used = 0
        self.nbytes = 0  # bytes handed out

    def _new_chunk(self, length: int) -> mmap.mmap:
        fh = tempfile.TemporaryFile(  # noqa: SIM115  (lives as long as its map)
            prefix="coalora-scratch-", dir=os.environ.get("COALORA_SCRATCH_DIR")
        )
        fh.truncate(length)
        self._files.append(fh)
        return mmap.mmap(fh.fileno(), length, flags=mmap.MAP_SHARED)

    def empty(self, shape: tuple[int, ...], dtype: np.dtype | type) -> np.ndarray:
        dt = np.dtype(dtype)
        n = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        self.nbytes += n
        if not self.AVAILABLE:
            return np.empty(shape, dtype=dt)
        size = max(n, 1)
        if not self._chunks or self._used + size > len(self._chunks[-1]):
            length = max(self.CHUNK, -(-size // mmap.PAGESIZE) * mmap.PAGESIZE)
            self._chunks.append(self._new_chunk(length))
            self._used = 0
        arr = np.frombuffer(self._chunks[-1], dtype=dt, count=n // dt.itemsize, offset=self._used)
        self._used += -(-size // self.ALIGN) * self.ALIGN
        return arr.reshape(shape)

    def copy(self, array: np.ndarray) -> np.ndarray:
        out = self.empty(array.shape, array.dtype)
        out[...] = array
        return out

    def release(self) -> None:
        """Give every page back; a later read reloads it from the scratch file."""
        for m in self._chunks:
            m.madvise(mmap.MADV_DONTNEED)
