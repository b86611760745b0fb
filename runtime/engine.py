"""``Runtime``: serve one bundle on this device, at the best configuration the budget allows.

    bundle -> Pareto set -> select(budget, memory plan) -> θ(config) -> fold -> graph
           -> onnxruntime session (every weight handed over in place: memory-mapped bundle
              tensors, fused q/k/v and gate/up plus the packed LoRA in scratch pages)

The graph references its weights instead of holding them, and the pages MatMulNBits has
prepacked leave the process while the session is built, so building holds about one copy of
the weights (benchmarks/results/robustness.md, the demo bundle: coalora-run peaks at 0.90-0.92
of the plan at every stored configuration; benchmarks/results/runtime_speed.md: with the
weights embedded in the proto it peaked at 985 MB against a 303 MB plan). The graph fuses
q/k/v and gate/up (with one LoRA slot per fused group) and computes logits for the last
position only.

``switch()`` repeats the same steps from selection on in the running process, dropping the
old session first (and trimming the C heap) so its memory is gone before the new one is
built.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from coalora.kernels import Configuration
from coalora.kernels.matmulnbits import DEFAULT_ACCURACY_LEVEL
from coalora.runtime import assemble
from coalora.runtime.adapt import AdaptPolicy, MemoryAdapter
from coalora.runtime.adapter import ThetaRunner, bundle_adapters, open_theta
from coalora.runtime.budget import Budget, BudgetError, parse_budget
from coalora.runtime.chat import ChatFormat
from coalora.runtime.contention import SPIN_MODES, SpinChoice, choose_spin
from coalora.runtime.format.pareto import ParetoError, ParetoSet
from coalora.runtime.format.reader import Bundle, BundleError, Verify
from coalora.runtime.format.signing import verify_signature
from coalora.runtime.format.spec import BASE_FILE, THETA_FILE
from coalora.runtime.generate import GenerationStats, IncrementalDetokenizer, KVDecoder
from coalora.runtime.graphs.llama import LlamaArch
from coalora.runtime.isa import CpuClass, check_device_class, detect
from coalora.runtime.mapped import Scratch
from coalora.runtime.plan import Accountant, MemoryPlan
from coalora.runtime.probe import available_memory, physical_cores, usable_cpus
from coalora.runtime.profiles import DeviceProfile, load_profile
from coalora.runtime.report import option_histogram
from coalora.runtime.sampling import NonFiniteLogitsError, SamplingParams
from coalora.runtime.selection import Selection, select
from coalora.runtime.session import BuiltSession, create_session
from coalora.runtime.speed import (
    CALIBRATION_TOKENS,
    DeviceSpeed,
    cached_speed,
    decode_work,
    device_speed,
    options_read,
    record_decode,
)

__all__ = [
    "BudgetError",
    "BundleError",
    "Classification",
    "GenerationStats",
    "ModelOutputError",
    "Runtime",
    "RuntimeInputError",
]


log = logging.getLogger("coalora.runtime")


class ModelOutputError(RuntimeError):
    """The model computed NaN or infinite values: the bundle's weights (or θ) are damaged."""


def check_text(text: str, what: str) -> None:
    """Text from the caller must be valid Unicode: the command line hands over undecodable
    bytes as lone surrogates, which the tokenizer cannot take."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise RuntimeInputError(f"{what} is not valid UTF-8 (character {exc.start})") from None


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


# Speeds are predicted with this many tokens in the KV cache: a short prompt and answer.
PREDICTION_POSITION = 128


def check_min_speed(min_speed: float, arch: Any) -> float:
    """``--min-speed``: a positive, finite tok/s, for a bundle that decodes."""
    if not isinstance(arch, LlamaArch):
        raise RuntimeInputError("--min-speed applies to causal-lm bundles (they decode tokens)")
    if not (isinstance(min_speed, int | float) and 0 < min_speed < float("inf")):
        raise RuntimeInputError(f"min-speed must be a positive number of tok/s, got {min_speed}")
    return float(min_speed)


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
        all_logits: bool = False,
    ) -> None:
        self.bundle = bundle
        self.all_logits = all_logits  # logits at every position (``logits()``), not the last
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
        self.adapt: MemoryAdapter | None = None  # set by open(adapt=...): see runtime/adapt.py
        self.min_speed: float | None = None  # decode tok/s a choice must be predicted to meet
        self.spin_mode: str = "auto"  # intra-op threads spinning: runtime/contention.py
        self.spin: SpinChoice | None = None  # what the last build chose
        self._speeds: dict[str, DeviceSpeed] = {}
        self._calibration_checked = False  # the first long decode calibrates (``_calibrate``)
        self._check_context()
        base = self._mapped.file(BASE_FILE)
        self.accountant = Accountant.for_bundle(
            bundle,
            self.arch,
            base_bytes=base.nbytes(),
            base_names=set(base),
            context_length=self.context_length,
            lora_bits=lora_bits,
            theta_bytes=bundle.file_bytes(THETA_FILE) or 0,
            accuracy_level=accuracy_level,
            threads=threads,
        )

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
        adapt: bool | AdaptPolicy = False,
        all_logits: bool = False,
        device_class: str | None = None,
        min_speed: float | None = None,
        spin: str = "auto",
        trusted_key: str | Path | None = None,
    ) -> Runtime:
        """Open ``bundle`` and build a session for the best configuration within ``budget``
        (and ``profile``'s usable RAM when given). ``build=False`` only selects (dry run).

        ``accuracy_level``: MatMulNBits' compute type; 4 (the default) quantizes activations
        to int8 per block, the fast CPU path; 0 keeps them in fp32 (slower, for parity checks).

        ``adapt`` (True or an ``AdaptPolicy``): watch the device's memory and switch the
        configuration down when it runs short, back up once it returns (runtime/adapt.py);
        checked before each request, never during one. ``all_logits``: the graph returns the
        logits of every position, for ``logits()`` (teacher-forced evaluation).

        ``device_class`` (``runtime.isa``: "armv8.0", ..., "any") replaces the profile's CPU
        class and this CPU's own for choosing which options to avoid as slow.

        ``min_speed`` (tok/s): choose only among configurations whose predicted decode speed
        on this device (or ``profile``'s) meets it (``runtime/speed.py``).

        ``spin`` ("auto", "on", "off"): whether onnxruntime's threads spin between nodes;
        ``auto`` turns it off when other processes keep the cores busy (runtime/contention.py),
        judged at every build.

        ``trusted_key`` (or the profile's ``trusted_key``): a public key (PEM); the bundle is
        refused unless that key's pair signed exactly its files (``format/signing.py``).
        """
        t0 = time.perf_counter()
        parsed = _budget(budget)
        dev = load_profile(profile) if profile else None
        key = trusted_key if trusted_key is not None else (dev.trusted_key if dev else None)
        if key is not None:
            verify_signature(bundle, key)  # before anything reads the bundle
        b = Bundle.open(bundle, verify=verify)
        pareto = pareto_of(b)
        if threads is not None and threads < 1:
            raise RuntimeInputError(f"threads must be at least 1, got {threads}")
        rt = cls(
            b,
            pareto,
            context_length=context_length,
            # A profile's thread count is its board's; this machine may have fewer CPUs.
            threads=clamp_threads(threads)
            if threads is not None
            else min(dev.threads if dev else physical_cores(), usable_cpus()),
            lora_bits=lora_bits,
            accuracy_level=accuracy_level,
            all_logits=all_logits,
        )
        if device_class is not None:
            rt.device_class = check_device_class(device_class)
        if min_speed is not None:
            rt.min_speed = check_min_speed(min_speed, rt.arch)
        if spin not in SPIN_MODES:
            raise RuntimeInputError(f"spin must be one of {', '.join(SPIN_MODES)}, got {spin!r}")
        rt.spin_mode = spin
        bundle_s = time.perf_counter() - t0
        sel = rt.choose(parsed, dev)
        if build:
            rt._apply(sel)
        else:
            b.verify_config(sel.config)
            rt._selection = sel
        rt.timings.bundle_s = bundle_s
        if adapt:
            policy = adapt if isinstance(adapt, AdaptPolicy) else None
            rt.adapt = MemoryAdapter(rt, parsed, policy)
            rt.adapt.start()
        return rt

    def _check_context(self) -> None:
        # Positions beyond what the model was trained on are meaningless: clamp to them.
        if self.context_length < 2:
            raise RuntimeInputError(f"context length must be at least 2, got {self.context_length}")
        limit = getattr(self.arch, "max_position_embeddings", self.context_length)
        self.context_length = min(self.context_length, limit)

    def plan(self, config: Configuration) -> MemoryPlan:
        """The memory plan of serving ``config`` at this runtime's context length."""
        return self.accountant.plan(config)

    def choose(self, budget: Budget, profile: DeviceProfile | None = None) -> Selection:
        """The selection for ``budget``, clamped to ``profile``'s RAM or, without a profile, to
        what this device can give (``probe.available_memory``: memory and address space);
        builds nothing. A clamp that changes the choice of an explicit budget is a warning."""
        t0 = time.perf_counter()
        available: int | None = None
        address_space: int | None = None
        if profile is not None:  # planning for that board, which may not be this machine
            available = profile.usable_ram_bytes
            if budget.kind == "auto":
                budget = profile.budget()
        else:
            # The whole process may use what is free plus what it holds (a switch frees the
            # current session, and its pages are counted as held).
            probe = available_memory()
            available, address_space = probe.plan_limit_bytes, probe.rlimit_bytes
        sel = select(
            self.pareto,
            budget,
            self.plan,
            available_bytes=available,
            address_space_bytes=address_space,
            cpu=self.cpu_class(profile),
            accuracy_level=self.accuracy_level,
            min_speed=self.min_speed,
            speed_fn=(lambda c: self.predicted_tok_s(c, profile)) if self.min_speed else None,
        )
        if sel.clamped_from is not None:
            log.warning("warning: %s: serving %.2f bits", sel.clamp_note, sel.entry.bits)
        self.timings.select_s = time.perf_counter() - t0
        self.profile = profile
        return sel

    def device_speed(self, profile: DeviceProfile | None = None) -> DeviceSpeed:
        """The decode costs of this machine (measured once, cached) or of ``profile``'s
        board (its memory bandwidth)."""
        key = profile.name if profile is not None else ""
        if key not in self._speeds:
            if profile is not None:
                self._speeds[key] = DeviceSpeed.from_bandwidth(
                    profile.memory_bandwidth_gbs,
                    f"profile {profile.name}: {profile.memory_bandwidth_gbs:g} GB/s",
                )
            else:
                self._speeds[key] = device_speed(
                    options_read(self.accountant), self.threads, self.accuracy_level
                )
        return self._speeds[key]

    def speed_source(self, profile: DeviceProfile | None = None) -> str | None:
        """Where the decode costs came from, once known (None: not measured yet)."""
        known = self._speeds.get(profile.name if profile is not None else "")
        return known.source if known is not None else None

    def predicted_tok_s(
        self,
        config: Configuration,
        profile: DeviceProfile | None = None,
        position: int = PREDICTION_POSITION,
    ) -> float:
        """Predicted decode tokens/s of ``config`` with ``position`` tokens in the cache."""
        work = decode_work(self.accountant, self.arch, config, min(position, self.context_length))
        return self.device_speed(profile).tok_s(work)

    def cpu_class(self, profile: DeviceProfile | None = None) -> CpuClass:
        """The CPU class the selection avoids slow options for: the override, the profile's,
        or this CPU's."""
        if self.device_class is not None:
            return CpuClass(self.device_class, "--device-class")
        if profile is not None:
            slow = None if profile.slow_bits is None else frozenset(profile.slow_bits)
            return CpuClass(profile.device_class, f"profile {profile.name}", slow)
        return detect()

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

    def use(self, sel: Selection) -> None:
        """Serve ``sel`` (from ``choose`` or ``select``): rebuild unless it is the current one."""
        if self._built is not None and self._selection is not None and sel.config == self.config:
            self._selection = sel
            return
        self._drop()
        self._apply(sel)

    def _adapt_check(self) -> None:
        if self.adapt is not None and self._built is not None:
            self.adapt.check()

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
        self.bundle.check_unchanged()
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
            last_logits=not self.all_logits,
        )
        del adapters
        t1 = time.perf_counter()
        t.graph_s = t1 - t0
        # Mapped pages leave the process as soon as MatMulNBits has prepacked them (and for
        # good after); the scratch pages once the session exists. The prepacked copies are
        # all the session reads.
        try:
            self.spin = choose_spin(self.spin_mode)
            self._built = create_session(
                proto,
                threads=self.threads,
                initializers=arrays,
                release=self._mapped.release,
                config=self.spin.session_config(),
            )
        except Exception as exc:  # onnxruntime's own types: the weights do not fit the graph
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            raise BundleError(
                f"{self.bundle.root}: the bundle's weights do not fit its architecture ({first})"
            ) from None
        scratch.release()
        self._built.keep.append(scratch)
        del proto, arrays
        gc.collect()
        if isinstance(self.arch, LlamaArch):
            rows = assemble.head_table_rows(self._mapped, self.arch, self.accuracy_level, config)
            self._decoder = KVDecoder(
                self._built.session, self.arch, self.context_length, rows=rows
            )
        t.session_s = time.perf_counter() - t1
        self._selection = sel

    def _adapters(self, config: Configuration) -> tuple[dict, Any]:
        if self._theta is None:
            self._theta = open_theta(self.bundle)
        return bundle_adapters(self.bundle, self._theta, self._mapped.lora(), config)

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
            return ChatFormat.from_dict(self.bundle.chat_format)
        except ValueError as exc:
            raise BundleError(f"{self.bundle.root}: {exc}") from None

    @property
    def eos_token_ids(self) -> list[int]:
        return self.bundle.eos_token_ids

    @property
    def labels(self) -> list[str]:
        labels = self.bundle.labels
        n = getattr(self.arch, "num_labels", 0)
        return [str(x) for x in labels] if labels else [f"LABEL_{i}" for i in range(n)]

    # -- tokenizer ----------------------------------------------------------------------------
    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            if self.bundle.tokenizer_path() is None:
                raise BundleError(f"{self.bundle.root}: the bundle has no tokenizer.json")
            self._tokenizer = load_tokenizer(self.bundle)
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
        """Token ids of the prompt, in the chat format unless ``chat=False``. The caller's text
        never becomes control tokens: "<|im_end|>" typed by a user stays plain text."""
        self._need("causal-lm")
        check_text(prompt, "prompt")
        if system is not None:
            check_text(system, "system message")
        if not prompt.strip():
            raise RuntimeInputError("empty prompt")
        fmt = self.chat_format if chat else None
        if fmt is None:
            ids = self._encode(prompt, literal=True, add_special_tokens=True)
        else:
            ids = []
            for text, from_caller in fmt.segments(prompt, system):
                ids += self._encode(text, literal=from_caller, add_special_tokens=False)
        if len(ids) >= self.context_length:
            raise RuntimeInputError(
                f"prompt is {len(ids)} tokens: the context holds {self.context_length} "
                "(raise --context or shorten the prompt)"
            )
        return list(ids)

    def _encode(self, text: str, *, literal: bool, add_special_tokens: bool) -> list[int]:
        """``literal``: special-token strings in ``text`` are encoded as the text they are."""
        tok = self.tokenizer
        tok.encode_special_tokens = literal
        try:
            return list(tok.encode(text, add_special_tokens=add_special_tokens).ids)
        finally:
            tok.encode_special_tokens = False

    @contextlib.contextmanager
    def _finite_output(self) -> Iterator[None]:
        try:
            yield
        except NonFiniteLogitsError as exc:
            e = self.selection.entry
            raise ModelOutputError(
                f"the {e.bits:.2f}-bit configuration ({option_histogram(e.config)}) computed "
                f"non-finite logits ({exc}): the bundle's weights or θ are damaged"
            ) from None

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
        self._adapt_check()
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
        tokens = self._decoder.tokens(ids, max_new_tokens, sampling, self.eos_token_ids, stats)
        with self._finite_output():
            for token in tokens:
                piece = detok.push(token)
                if piece:
                    yield piece
        rest = detok.flush()
        if rest:
            yield rest
        self._calibrate(stats)

    def _calibrate(self, stats: GenerationStats) -> None:
        """The first decode on this machine long enough calibrates its predicted speeds,
        once, where its costs are already measured (``speed.record_decode``)."""
        if self._calibration_checked or stats.new_tokens < CALIBRATION_TOKENS:
            return
        if not isinstance(self.arch, LlamaArch) or not stats.decode_tok_s > 0:
            return
        # one look per runtime: a server does not read the cache file at every request
        self._calibration_checked = True
        known = self._speeds.get("") or cached_speed(self.threads, self.accuracy_level)
        if known is None or known.calibration != 1.0:
            return
        position = stats.prompt_tokens + stats.new_tokens // 2
        work = decode_work(self.accountant, self.arch, self.config, position)
        # costs measured for another bundle's options: nothing to calibrate (the answer is out)
        if not known.prices(work):
            return
        predicted = known.tok_s(work)
        record_decode(self.threads, self.accuracy_level, predicted, stats.decode_tok_s)
        self._speeds[""] = replace(known, calibration=stats.decode_tok_s / predicted)

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
        with self._finite_output():
            out = list(
                self._decoder.tokens(
                    prompt_ids,
                    max_new_tokens,
                    sampling or SamplingParams(),
                    self.eos_token_ids,
                    stats,
                )
            )
        self._calibrate(stats)
        return out

    def logits(self, ids: list[int]) -> np.ndarray:
        """Logits [len(ids), vocab] of one teacher-forced pass over ``ids`` from position 0
        (open with ``all_logits=True``)."""
        self._need("causal-lm")
        if not self.all_logits:
            raise RuntimeError("logits() needs a runtime opened with all_logits=True")
        if not ids or len(ids) > self.context_length:
            raise RuntimeInputError("ids must hold 1 to context_length tokens")
        if self._decoder is None:
            raise RuntimeError("no session: call build() first (opened with build=False)")
        return self._decoder.logits(np.asarray([ids], dtype=np.int64))

    # -- classification -----------------------------------------------------------------------
    def classify(self, text: str, *, max_length: int | None = None) -> Classification:
        self._need("classify")
        check_text(text, "text")
        if not text.strip():
            raise RuntimeInputError("empty text")
        self._adapt_check()
        tok = self.tokenizer
        limit = getattr(self.arch, "max_position_embeddings", 512)
        limit = min(limit, max_length) if max_length else limit
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
        if not np.isfinite(z).all():
            with self._finite_output():
                raise NonFiniteLogitsError(f"{int(np.count_nonzero(~np.isfinite(z)))} logits")
        p = np.exp(z - z.max())
        p /= p.sum()
        labels = self.labels
        probs = {labels[i]: float(p[i]) for i in range(len(p))}
        return Classification(label=labels[int(np.argmax(p))], probs=probs)

    def close(self) -> None:
        if self.adapt is not None:
            self.adapt.stop()
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


def load_tokenizer(bundle: Bundle) -> Any:
    """The bundle's tokenizer (``None`` if it has none), with padding and truncation off; an
    unreadable one is a ``BundleError``."""
    from tokenizers import Tokenizer

    path = bundle.tokenizer_path()
    if path is None:
        return None
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises its own exception type
        raise BundleError(f"{bundle.root}: tokenizer.json: {exc}") from None
    tok.no_padding()
    tok.no_truncation()
    return tok


def clamp_threads(threads: int) -> int:
    """More intra-op threads than the CPUs this process may use only add rendezvous cost (a
    pool of 1000 takes most of a minute to start and decodes at a crawl)."""
    cores = usable_cpus()
    if threads > cores:
        log.warning(
            "warning: %d threads asked for, this process can use %d CPUs: using %d",
            threads,
            cores,
            cores,
        )
        return cores
    return threads
