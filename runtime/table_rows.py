"""A tied LM head's rows as the embedding, read from the bundle file per run, never mapped.

The head's MatMulNBits prepacks its codes into a buffer of its own, so the mapped file is not
read again for the head. Gathering the embedding from those mapped codes would fault their
pages back into the process, and a read fault maps up to 64 kB around the byte it wanted
(the kernel's fault-around): measured on the SmolLM2 demo bundle, ~60 kB per random row and
the mapped table growing by ~1 MB per 100 new tokens, towards its whole 33 MB. ``pread``
copies just the row's bytes out of the page cache, which is the kernel's and not the
process's, so the table is held once (prepacked) plus the rows of one run.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from coalora.kernels.matmulnbits import MatMulNBitsWeights
from coalora.runtime.format.reader import BundleError
from coalora.runtime.graphs.llama import EMBED_ROWS, embedding_rows
from coalora.runtime.mapped import MappedSafetensors


def reads_fed_rows(session: Any) -> bool:
    """Whether an onnxruntime session's graph takes its embedding rows as inputs."""
    return EMBED_ROWS[0] in {i.name for i in session.get_inputs()}


class FileRows:
    """Rows of one [rows, width] view of a mapped safetensors tensor, read with ``pread``."""

    def __init__(self, path: Path, fd: int, offset: int, view: np.ndarray):
        if view.ndim != 2 or view.strides[1] != view.itemsize:
            raise ValueError("rows must be 2-D with contiguous rows")
        self.path, self.fd = path, fd
        self.offset = offset
        self.stride = view.strides[0]
        self.width, self.dtype = view.shape[1], view.dtype

    def read(self, rows: Sequence[int]) -> np.ndarray:
        n = self.width * self.dtype.itemsize
        out = np.empty((len(rows), self.width), dtype=self.dtype)
        flat = out.view(np.uint8).reshape(len(rows), n)
        for i, r in enumerate(rows):
            got = os.pread(self.fd, n, self.offset + int(r) * self.stride)
            if len(got) != n:  # the file shrank since it was opened (mapped, that is SIGBUS)
                raise BundleError(f"{self.path}: row {r} is past the end; the file changed")
            flat[i] = np.frombuffer(got, dtype=np.uint8)
        return out


class HeadTableRows:
    """The feeds of a graph built with ``embedding_from_head``: the distinct tokens' rows of
    the head's codes, scales and zero points, and ``input_ids`` re-indexed onto them."""

    def __init__(
        self, mapped: MappedSafetensors, head: MatMulNBitsWeights, vocab: int, hidden: int
    ):
        self._fd = -1
        self.vocab = vocab
        self.path = Path(mapped.path)
        self._fd = os.open(self.path, os.O_RDONLY)
        self.parts = [
            FileRows(self.path, self._fd, mapped.offset_of(v), v)
            for v in embedding_rows(head, vocab, hidden)
        ]

    def feeds(self, ids: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(``input_ids`` onto the fed rows, the rows) for token ids ``ids``."""
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab):
            raise IndexError(f"token ids must lie in [0, {self.vocab})")
        rows, index = np.unique(ids, return_inverse=True)
        fed = {
            name: part.read(rows.tolist())
            for name, part in zip(EMBED_ROWS, self.parts, strict=True)
        }
        return index.reshape(ids.shape).astype(np.int64), fed

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        self.close()
