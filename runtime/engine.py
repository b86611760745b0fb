"""``Runtime``: serve one bundle on this device, at the best configuration the budget allows.

    bundle -> Pareto set -> select(budget, memory plan) -> θ(config) -> fold -> graph
           -> onnxruntime session (every weight handed over in place: memory-mapped bundle
              tensors, fused q/k/v and gate/up plus the packed LoRA in scratch pages)

The graph references its weights instead of holding them, and the pages MatMulNBits has
prepacked leave the process while the session is built, so building holds about one copy of
the weights (benchmarks/results/runtime_speed.md, SmolLM2-135M shapes: open() peaks at
0.76-0.90 of the plan; with the weights embedded in the proto it peaked at 985 MB against a
303 MB plan). The graph fuses q/k/v and gate/up (with
one LoRA slot per fused group) and computes logits for the last position only.

``switch()`` repeats the same steps from selection on in the running process, dropping the
old session first (and trimming the C heap) so its memory is gone before the new one is
built.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from coalora.kernels import Configuration
from coalora.kernels.matmulnbits import DEFAULT_ACCURACY_LEVEL
from coalora.runtime import assemble
from coalora.runtime.adapter import ThetaRunner, generate_adapters
from coalora.runtime.budget import Budget, BudgetError, parse_budget
from coalora.runtime.bundle import THETA_FILE, Bundle, BundleError, Verify
from coalora.runtime.chat import ChatFormat
from coalora.runtime.generate import GenerationStats, IncrementalDetokenizer, KVDecoder
from coalora.runtime.graphs.llama import LlamaArch
from coalora.runtime.isa import CpuClass, check_device_class, detect
from coalora.runtime.mapped import Scratch
from coalora.runtime.plan import DEFAULT_OVERHEAD, MemoryPlan, plan_memory
from coalora.runtime.probe import available_memory, physical_cores
from coalora.runtime.profiles import DeviceProfile, load_profile
from coalora.runtime.sampling import SamplingParams
from coalora.runtime.selection import ParetoError, ParetoSet, Selection, select
from coalora.runtime.session import BuiltSession, create_session
from coalora.runtime.theta import ThetaVocab

__all__ = [
    "BudgetError",
    "BundleError",
    "Classification",
    "GenerationStats",
    "Runtime",
    "RuntimeInputError",
]


class RuntimeInputError(ValueError):
    """A request the runtime cannot serve: empty or too long prompt, wrong task."""


@dataclass(frozen=True)
class Classification:
    label: str
    probs: dict[str, float]


@dataclass
class Timings:
    """Seconds spent in each step of the last open or switch."""

    bundle_s: float = 0.0
    select_s: float = 0.0
    theta_s: float = 0.0
    fold_s: float = 0.0
    graph_s: float = 0.0
    session_s: float = 0.0

    @property
    def adapter_s(self) -> float:
        return self.theta_s + self.fold_s

    @property
    def total_s(self) -> float:
        return self.select_s + self.theta_s + self.fold_s + self.graph_s + self.session_s

    def to_dict(self) -> dict[str, float]:
        return {
            "bundle_s": self.bundle_s,
            "select_s": self.select_s,
            "theta_s": self.theta_s,
            "fold_s": self.fold_s,
            "graph_s": self.graph_s,
            "session_s": self.session_s,
        }


def _budget(budget: str | Budget) -> Budget:
    return budget if isinstance(budget, Budget) else parse_budget(budget)


class Runtime:
    """A served bundle. Build with ``Runtime.open``."""

    def __init__(
        self,
        bundle: Bundle,
        pareto: ParetoSet,
        *,
        context_length: int,
        threads: int,
        lora_bits: int,
        accuracy_level: int = DEFAULT_ACCURACY_LEVEL,
    ) -> None:
        self.bundle = bundle
        self.pareto = pareto
        self.context_length = context_length
        self.threads = threads
        self.lora_bits = lora_bits
        self.accuracy_level = accuracy_level
        self.arch = assemble.arch_of(bundle)
        self.timings = Timings()
        self.last_stats: GenerationStats | None = None
        self.profile: DeviceProfile | None = None
        self.device_class: str | None = None  # overrides the profile's and the detected one
        self._mapped = assemble.MappedBundle(bundle)
        self._selection: Selection | None = None
        self._built: BuiltSession | None = None
        self._decoder: KVDecoder | None = None
        self._theta: ThetaRunner | None = None
        self._tokenizer: Any = None
        self._check_context()
        base = self._mapped.file(assemble.BASE_FILE).nbytes()
        self._other_bytes = (
            base
            + assemble.rope_cache_bytes(self.arch, context_length)
            + bundle.manifest["files"][THETA_FILE]["bytes"]
        )
        self._kv_per_token = assemble.kv_bytes_per_token(self.arch)
        self._overhead = DEFAULT_OVERHEAD + assemble.tokenizer_bytes(bundle)

    # -- opening and switching ------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        bundle: str | Path,
        *,
        budget: str | Budget = "auto",
        profile: str | None = None,
        context_length: int = 512,
        threads: int | None = None,
        verify: Verify = "used",
        lora_bits: int = assemble.DEFAULT_LORA_BITS,
        accuracy_level: int = DEFAULT_ACCURACY_LEVEL,
        build: bool = True,
        device_class: str | None = None,
    ) -> Runtime:
        """Open ``bundle`` and build a session for the best configuration within ``budget``
        (and ``profile``'s usable RAM when given). ``build=False`` only selects (dry run).

        ``accuracy_level``: MatMulNBits' compute type; 4 (the default) quantizes activations
        to int8 per block, the fast CPU path; 0 keeps them in fp32 (slower, for parity checks).

        ``device_class`` (``runtime.isa``: "armv8.0", ..., "any") replaces the profile's CPU
        class and this CPU's own for choosing which options to avoid as slow.
        """
        t0 = time.perf_counter()
        parsed = _budget(budget)
        dev = load_profile(profile) if profile else None
        b = Bundle.open(bundle, verify=verify)
        pareto = pareto_of(b)
        if threads is not None and threads < 1:
            raise RuntimeInputError(f"threads must be at least 1, got {threads}")
        rt = cls(
            b,
            pareto,
            context_length=context_length,
            threads=threads or (dev.threads if dev else physical_cores()),
            lora_bits=lora_bits,
            accuracy_level=accuracy_level,
        )
        if device_class is not None:
            rt.device_class = check_device_class(device_class)
        bundle_s = time.perf_counter() - t0
        sel = rt.choose(parsed, dev)
        if build:
            rt._apply(sel)
        else:
            rt._selection = sel
        rt.timings.bundle_s = bundle_s
        return rt

    def _check_context(self) -> None:
        # Positions beyond what the model was trained on are meaningless: clamp to them.
        if self.context_length < 2:
            raise RuntimeInputError(f"context length must be at least 2, got {self.context_length}")
        limit = getattr(self.arch, "max_position_embeddings", self.context_length)
        self.context_length = min(self.context_length, limit)

    def plan(self, config: Configuration) -> MemoryPlan:
        """The memory plan of serving ``config`` at this runtime's context length."""
        return plan_memory(
            self.bundle.space,
            config,
            other_weights_bytes=self._other_bytes,
            lora_bytes=assemble.lora_bytes(self.bundle, self.lora_bits, config),
            kv_bytes_per_token=self._kv_per_token,
            context_length=self.context_length,
            overhead_bytes=self._overhead,
        )

    def choose(self, budget: Budget, profile: DeviceProfile | None = None) -> Selection:
        """The selection for ``budget`` (clamped to ``profile``'s RAM, or what the device has
        free for ``auto``); builds nothing."""
        t0 = time.perf_counter()
        if profile is not None:
            available = profile.usable_ram_bytes
            if budget.kind == "auto":
                budget = profile.budget()
        elif budget.kind == "auto":
            available = available_memory().available_bytes + self._held_bytes()
        else:
            available = None
        sel = select(
            self.pareto,
            budget,
            self.plan,
            available_bytes=available,
            cpu=self.cpu_class(profile),
            accuracy_level=self.accuracy_level,
        )
        self.timings.select_s = time.perf_counter() - t0
        self.profile = profile
        return sel

    def cpu_class(self, profile: DeviceProfile | None = None) -> CpuClass:
        """The CPU class the selection avoids slow options for: the override, the profile's,
        or this CPU's."""
        if self.device_class is not None:
            return CpuClass(self.device_class, "--device-class")
        if profile is not None:
            slow = None if profile.slow_bits is None else frozenset(profile.slow_bits)
            return CpuClass(profile.device_class, f"profile {profile.name}", slow)
        return detect()

    def _held_bytes(self) -> int:
        """What the current session holds: freed by a switch, so available to it."""
        return self._selection.plan.total if self._selection is not None else 0

    def switch(self, budget: str | Budget = "auto", profile: str | None = None) -> Selection:
        """Re-select for a new budget and rebuild; the same configuration is a no-op."""
        dev = load_profile(profile) if profile else None
        sel = self.choose(_budget(budget), dev)
        if self._selection is not None and sel.config == self._selection.config:
            self._selection = sel
            return sel
        self._drop()
        self._apply(sel)
        return sel

    def build(self) -> None:
        """Build the session for the current selection (after ``open(build=False)``)."""
        if self._built is None:
            self._apply(self.selection)

    def _drop(self) -> None:
        self._decoder = None
        self._built = None
        gc.collect()
        # Pages of the mapped files that decoding touched (the embedding table) go too, and
        # the C heap gives the freed session back to the system (glibc keeps it otherwise:
        # measured ~120 MB held after dropping a SmolLM2-sized session).
        self._mapped.release()
        trim_heap()

    def _apply(self, sel: Selection) -> None:
        t = self.timings
        t.theta_s = t.fold_s = t.graph_s = t.session_s = 0.0
        config = sel.config
        adapters, timing = self._adapters(config)
        t.theta_s, t.fold_s = timing.theta_s, timing.fold_s

        t0 = time.perf_counter()
        # The proto only references the weights; ``arrays`` holds them: views of the mapped
        # files, and what the build computes (fused q/k/v and gate/up, the LoRA packed from
        # ``adapters``) in ``scratch``. The session uses them in place.
        scratch = Scratch()
        proto, arrays = assemble.build_graph(
            self._mapped,
            self.arch,
            config,
            context_length=self.context_length,
            lora_bits=self.lora_bits,
            accuracy_level=self.accuracy_level,
            adapters=adapters,
            external=True,
            fuse=True,
            scratch=scratch,
            last_logits=True,
        )
        del adapters
        t1 = time.perf_counter()
        t.graph_s = t1 - t0
        # Mapped pages leave the process as soon as MatMulNBits has prepacked them (and for
        # good after); the scratch pages once the session exists. The prepacked copies are
        # all the session reads.
        self._built = create_session(
            proto, threads=self.threads, initializers=arrays, release=self._mapped.release
        )
        scratch.release()
        self._built.keep.append(scratch)
        del proto, arrays
        gc.collect()
        if isinstance(self.arch, LlamaArch):
            self._decoder = KVDecoder(self._built.session, self.arch, self.context_length)
        t.session_s = time.perf_counter() - t1
        self._selection = sel

    def _adapters(self, config: Configuration) -> tuple[dict, Any]:
        if self._theta is None:
            theta_meta = self.bundle.manifest["theta"]
            self._theta = ThetaRunner(
                str(self.bundle.theta_path()), list(theta_meta["inputs"]), threads=1
            )
        try:
            vocab = ThetaVocab.from_dict(self.bundle.manifest["theta"]["vocab"])
            arrays = vocab.encode(config, self.bundle.space)
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"{self.bundle.root}: θ vocabulary: {exc}") from None
        lora_a, lora_b = self._mapped.lora()
        names = [m.name for m in self.bundle.space.matrices]
        return generate_adapters(self._theta, arrays, names, lora_a, lora_b, self.bundle.lora_scale)

    # -- properties ---------------------------------------------------------------------------
    @property
    def selection(self) -> Selection:
        assert self._selection is not None
        return self._selection

    @property
    def config(self) -> Configuration:
        return self.selection.config

    @property
    def session(self) -> Any:
        if self._built is None:
            raise RuntimeError("no session: call build() first (opened with build=False)")
        return self._built.session

    @property
    def task(self) -> str:
        return self.bundle.task

    @property
    def chat_format(self) -> ChatFormat | None:
        try:
            return ChatFormat.from_dict(self.bundle.architecture.get("chat_format"))
        except ValueError as exc:
            raise BundleError(f"{self.bundle.root}: {exc}") from None

    @property
    def eos_token_ids(self) -> list[int]:
        return [int(i) for i in self.bundle.architecture.get("eos_token_ids") or []]

    @property
    def labels(self) -> list[str]:
        labels = self.bundle.architecture.get("labels")
        n = getattr(self.arch, "num_labels", 0)
        return [str(x) for x in labels] if labels else [f"LABEL_{i}" for i in range(n)]

    # -- tokenizer ----------------------------------------------------------------------------
    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from tokenizers import Tokenizer

            path = self.bundle.tokenizer_path()
            if path is None:
                raise BundleError(f"{self.bundle.root}: the bundle has no tokenizer.json")
            try:
                tok = Tokenizer.from_file(str(path))
            except Exception as exc:  # tokenizers raises its own exception type
                raise BundleError(f"{self.bundle.root}: tokenizer.json: {exc}") from None
            tok.no_padding()
            tok.no_truncation()
            self._tokenizer = tok
        return self._tokenizer

    # -- causal LM ----------------------------------------------------------------------------
    def _need(self, task: str) -> None:
        if self.task != task:
            verb = "generate" if task == "causal-lm" else "classify"
            raise RuntimeInputError(
                f"this bundle is a {self.task} model: it cannot {verb} (use "
                f"{'classify' if self.task == 'classify' else 'generate'})"
            )

    def encode_prompt(
        self, prompt: str, *, chat: bool = True, system: str | None = None
    ) -> list[int]:
        self._need("causal-lm")
        if not prompt.strip():
            raise RuntimeInputError("empty prompt")
        fmt = self.chat_format if chat else None
        text = fmt.render(prompt, system) if fmt is not None else prompt
        ids = self.tokenizer.encode(text, add_special_tokens=fmt is None).ids
        if len(ids) >= self.context_length:
            raise RuntimeInputError(
                f"prompt is {len(ids)} tokens: the context holds {self.context_length} "
                "(raise --context or shorten the prompt)"
            )
        return list(ids)

    def stream(
        self,
        prompt: str,
        *,
        max_new_tokens: int = 128,
        sampling: SamplingParams | None = None,
        chat: bool = True,
        system: str | None = None,
    ) -> Iterator[str]:
        """Text pieces as tokens arrive; ``last_stats`` holds the run's figures. The prompt is
        checked here, before the first piece is asked for."""
        if max_new_tokens < 1:
            raise RuntimeInputError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        ids = self.encode_prompt(prompt, chat=chat, system=system)
        if self._decoder is None:
            raise RuntimeError("no session: call build() first (opened with build=False)")
        stats = GenerationStats()
        self.last_stats = stats
        return self._pieces(ids, max_new_tokens, sampling or SamplingParams(), stats)

    def _pieces(
        self, ids: list[int], max_new_tokens: int, sampling: SamplingParams, stats: GenerationStats
    ) -> Iterator[str]:
        assert self._decoder is not None
        tok = self.tokenizer
        detok = IncrementalDetokenizer(lambda xs: tok.decode(xs, skip_special_tokens=True))
        for token in self._decoder.tokens(ids, max_new_tokens, sampling, self.eos_token_ids, stats):
            piece = detok.push(token)
            if piece:
                yield piece
        rest = detok.flush()
        if rest:
            yield rest

    def generate(self, prompt: str, **kwargs: Any) -> str:
        """The whole answer (same arguments as ``stream``)."""
        return "".join(self.stream(prompt, **kwargs))

    def generate_ids(
        self, prompt_ids: list[int], max_new_tokens: int, sampling: SamplingParams | None = None
    ) -> list[int]:
        """Token ids straight from ids (no tokenizer, no chat format)."""
        self._need("causal-lm")
        if not prompt_ids or len(prompt_ids) >= self.context_length:
            raise RuntimeInputError("prompt must hold 1 to context_length - 1 tokens")
        if self._decoder is None:
            raise RuntimeError("no session: call build() first (opened with build=False)")
        stats = GenerationStats()
        self.last_stats = stats
        return list(
            self._decoder.tokens(
                prompt_ids, max_new_tokens, sampling or SamplingParams(), self.eos_token_ids, stats
            )
        )

    # -- classification -----------------------------------------------------------------------
    def classify(self, text: str) -> Classification:
        self._need("classify")
        if not text.strip():
            raise RuntimeInputError("empty text")
        tok = self.tokenizer
        limit = getattr(self.arch, "max_position_embeddings", 512)
        tok.enable_truncation(max_length=limit)
        try:
            enc = tok.encode(text)
        finally:
            tok.no_truncation()
        feeds = {
            "input_ids": np.asarray([enc.ids], dtype=np.int64),
            "attention_mask": np.asarray([enc.attention_mask], dtype=np.int64),
            "token_type_ids": np.asarray([enc.type_ids], dtype=np.int64),
        }
        (logits,) = self.session.run(["logits"], feeds)
        z = logits[0].astype(np.float64)
        p = np.exp(z - z.max())
        p /= p.sum()
        labels = self.labels
        probs = {labels[i]: float(p[i]) for i in range(len(p))}
        return Classification(label=labels[int(np.argmax(p))], probs=probs)

    def close(self) -> None:
        self._drop()
        self._theta = None


def trim_heap() -> None:
    """Return the C heap's free memory to the system (glibc's malloc_trim; a no-op elsewhere)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def pareto_of(bundle: Bundle) -> ParetoSet:
    try:
        return ParetoSet.from_dict(bundle.pareto_dict(), bundle.space)
    except ParetoError as exc:
        raise BundleError(f"{bundle.root}: pareto.json: {exc}") from None
