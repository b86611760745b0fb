"""Token-by-token decoding on the decoder graph, as benchmarks/decode_speed_graph.py drives it.

One [1, kv_heads, context, head_dim] buffer per cache is bound (IO binding) as both the past
input and the present output, so GroupQueryAttention appends in place and no cache is ever
copied; only ``input_ids`` and the ``attention_mask`` slice change between steps. Text comes
out incrementally: a piece is emitted only once it decodes to whole characters, so a
multi-byte character split over several tokens is never cut.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from coalora.runtime.graphs.llama import LlamaArch
from coalora.runtime.sampling import Sampler, SamplingParams
from coalora.runtime.table_rows import HeadTableRows, reads_fed_rows


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_ms: float = 0.0
    decode_ms: float = 0.0
    stopped: str = ""  # "eos", "max_tokens" or "context"

    @property
    def decode_tok_s(self) -> float:
        """Tokens per second of the single-token steps (the prefill excluded)."""
        steps = max(0, self.new_tokens - 1)
        return steps / (self.decode_ms / 1e3) if self.decode_ms > 0 else 0.0

    def describe(self) -> str:
        return (
            f"{self.new_tokens} tokens ({self.stopped}), prompt {self.prompt_tokens} tokens, "
            f"prefill {self.prefill_ms:.1f} ms, decode {self.decode_tok_s:.1f} tok/s"
        )


class KVDecoder:
    """Prefill + single-token steps over a shared past/present KV buffer."""

    def __init__(
        self,
        session: ort.InferenceSession,
        arch: LlamaArch,
        context_length: int,
        rows: HeadTableRows | None = None,
    ):
        """``rows``: where a graph built with ``embedding_from_head`` reads its embedding rows."""
        if (rows is not None) != reads_fed_rows(session):
            raise ValueError("pass rows= exactly when the graph is fed its embedding rows")
        self.session = session
        self.rows = rows
        self.context_length = context_length
        shape = (1, arch.num_key_value_heads, context_length, arch.head_dim)
        self._binding = session.io_binding()
        # Bound first so get_outputs()[0] is the logits (outputs come back in binding order).
        self._binding.bind_output("logits", "cpu")
        self._caches: list[ort.OrtValue] = []
        for i in range(arch.num_hidden_layers):
            for kind in ("key", "value"):
                buf = ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, np.float32))
                self._binding.bind_ortvalue_input(f"past_key_values.{i}.{kind}", buf)
                self._binding.bind_ortvalue_output(f"present.{i}.{kind}", buf)
                self._caches.append(buf)
        self._mask = np.ones((1, context_length), dtype=np.int64)

    def run(self, ids: np.ndarray, total: int) -> np.ndarray:
        """Feed ``ids`` [1, n] ending at position ``total``; logits of the last one [vocab]."""
        b = self._binding
        b.bind_output("logits", "cpu")
        if self.rows is not None:
            ids, fed = self.rows.feeds(ids)
            for name, array in fed.items():
                b.bind_cpu_input(name, array)
        b.bind_cpu_input("input_ids", ids)
        b.bind_cpu_input("attention_mask", self._mask[:, :total])
        self.session.run_with_iobinding(b)
        return b.get_outputs()[0].numpy()[0, -1]

    def logits(self, ids: np.ndarray) -> np.ndarray:
        """Every position's logits [n, vocab] for ``ids`` [1, n] fed from position 0 (a graph
        built with all logits)."""
        self.run(ids, ids.shape[1])
        return self._binding.get_outputs()[0].numpy()[0]

    def tokens(
        self,
        prompt_ids: list[int],
        max_new_tokens: int,
        sampling: SamplingParams,
        eos_ids: Iterable[int],
        stats: GenerationStats,
    ) -> Iterator[int]:
        """Generated token ids (EOS not included); fills ``stats`` as it goes."""
        eos = set(eos_ids)
        sampler = Sampler(sampling)
        total = len(prompt_ids)
        stats.prompt_tokens, stats.new_tokens = total, 0
        stats.prefill_ms = stats.decode_ms = 0.0
        budget = min(max_new_tokens, self.context_length - total + 1)
        stats.stopped = "max_tokens" if budget >= max_new_tokens else "context"
        if budget <= 0:
            return
        t0 = time.perf_counter()
        logits = self.run(np.asarray([prompt_ids], dtype=np.int64), total)
        stats.prefill_ms = (time.perf_counter() - t0) * 1e3
        decode_s = 0.0
        for step in range(budget):
            token = sampler(logits)
            if token in eos:
                stats.stopped = "eos"
                return
            stats.new_tokens += 1
            yield token
            if step + 1 == budget:
                return
            total += 1
            t0 = time.perf_counter()
            logits = self.run(np.asarray([[token]], dtype=np.int64), total)
            decode_s += time.perf_counter() - t0
            stats.decode_ms = decode_s * 1e3


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text pieces without splitting characters."""

    def __init__(self, decode: callable) -> None:  # type: ignore[valid-type]
        self._decode = decode
        self.ids: list[int] = []
        self._prefix = 0  # start of the window decoded for context
        self._read = 0  # first id whose text has not been emitted

    def push(self, token: int) -> str:
        self.ids.append(token)
        before = self._decode(self.ids[self._prefix : self._read])
        text = self._decode(self.ids[self._prefix :])
        # U+FFFD at the end: the last token ends inside a multi-byte character; wait for more.
        if len(text) > len(before) and not text.endswith("\ufffd"):
            piece = text[len(before) :]
            self._prefix, self._read = self._read, len(self.ids)
            return piece
        return ""

    def flush(self) -> str:
        """Whatever is still held back when generation ends."""
        before = self._decode(self.ids[self._prefix : self._read])
        text = self._decode(self.ids[self._prefix :])
        self._prefix = self._read = len(self.ids)
        return text[len(before) :] if len(text) > len(before) else ""
