"""Read and verify a coalora bundle (names: ``spec``; prose: docs/bundle-format.md). No torch.

``Bundle.open(path)`` reads the manifest, checks that every listed file exists with the right
size, and hashes files as they are first used (``verify="all"`` hashes everything at open).
Any problem raises ``BundleError`` with one line naming what is wrong.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from coalora.kernels import ConfigError, ConfigSpace, Configuration, QuantOption
from coalora.kernels.matmulnbits import MatMulNBitsWeights
from coalora.runtime.format.schema import json_depth, validate_manifest
from coalora.runtime.format.spec import (
    BASE_FILE,
    FORMAT,
    LORA_A,
    LORA_A_LOW,
    LORA_B,
    LORA_B_LOW,
    LORA_FILE,
    MANIFEST,
    PARETO_FILE,
    QUANT_PARTS,
    QWEIGHT,
    QZEROS,
    READABLE_VERSIONS,
    REQUIRED_FILES,
    REQUIRED_SECTIONS,
    SCALES,
    TASK_CAUSAL_LM,
    THETA_FILE,
    TOKENIZER_FILE,
    Arch,
    FileEntry,
    Key,
    Lora,
    LoraRanks,
    Theta,
    head_file,
    quant_file,
    tensor_name,
)

Verify = Literal["used", "all", "none"]

# Bounds checked before a JSON file is parsed: no real bundle comes near them, and a file past
# them (or nested deeper) is damage or an attack, not a bundle.
MAX_MANIFEST_BYTES = 64 << 20
MAX_PARETO_BYTES = 256 << 20
MAX_JSON_DEPTH = 32


@dataclass(frozen=True)
class SharedLora:
    """The bundle's LoRA: A [r, in] and B [out, r] per matrix, and the low-bit pair
    (A_low, B_low at ``LoraRanks.low_rank``) per matrix where the bundle has one."""

    a: Mapping[str, np.ndarray]
    b: Mapping[str, np.ndarray]
    a_low: Mapping[str, np.ndarray] = field(default_factory=dict)
    b_low: Mapping[str, np.ndarray] = field(default_factory=dict)


class BundleError(ValueError):
    """The bundle is missing, damaged, or of a version this reader does not know."""


def load_json(path: Path, what: str, max_bytes: int) -> Any:
    """Parse a bundle's JSON file after bounding its size and before trusting its depth."""
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise BundleError(f"cannot read {what}: {exc.strerror or exc}") from None
    if size > max_bytes:
        raise BundleError(f"{what} is {size} bytes, more than any bundle's ({max_bytes})")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{what} is not valid JSON ({exc})") from None
    except RecursionError:
        data = None
    if data is None or json_depth(data, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
        raise BundleError(f"{what} is nested deeper than {MAX_JSON_DEPTH} levels")
    return data


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class Bundle:
    root: Path
    manifest: dict[str, Any]
    space: ConfigSpace
    shipped: dict[QuantOption, frozenset[str]]
    verify: Verify = "used"
    _verified: set[str] = field(default_factory=set)
    # (device, inode, size, mtime) of every file when it was listed: a file replaced or
    # rewritten in place since then serves other weights than were verified
    _identity: dict[str, tuple[int, int, int, int]] = field(default_factory=dict)

    # -- opening ------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path, *, verify: Verify = "used") -> Bundle:
        root = Path(path)
        if not root.exists():
            raise BundleError(f"no bundle at {root}")
        if not root.is_dir():
            raise BundleError(f"{root} is not a bundle directory")
        mpath = root / MANIFEST
        if not mpath.is_file():
            raise BundleError(f"{root} is not a coalora bundle: {MANIFEST} is missing")
        _inside(root, MANIFEST)
        manifest = load_json(mpath, f"{mpath}", MAX_MANIFEST_BYTES)
        if not isinstance(manifest, dict) or manifest.get(Key.FORMAT) != FORMAT:
            raise BundleError(f"{mpath}: not a coalora bundle manifest")
        version = manifest.get(Key.FORMAT_VERSION)
        if version not in READABLE_VERSIONS:
            readable = " and ".join(str(v) for v in READABLE_VERSIONS)
            raise BundleError(
                f"{root}: bundle format version {version!r} is not supported "
                f"(this coalora reads versions {readable})"
            )
        for key in REQUIRED_SECTIONS:
            if key not in manifest:
                raise BundleError(f"{mpath}: manifest has no {key!r} section")
        problem = validate_manifest(manifest)
        if problem is not None:
            raise BundleError(f"{mpath}: {problem}")
        try:
            space = ConfigSpace.from_dict(manifest[Key.SPACE])
            shipped = {
                QuantOption.parse(opt): frozenset(names)
                for opt, names in manifest[Key.SHIPPED].items()
            }
        except (ConfigError, ValueError, TypeError, AttributeError) as exc:
            raise BundleError(f"{mpath}: {exc}") from None
        for opt, names in shipped.items():
            unknown = sorted(set(names) - {m.name for m in space.matrices})
            if unknown:
                raise BundleError(f"{mpath}: option {opt} lists unknown matrix {unknown[0]!r}")
        if space.head_options:
            default = manifest[Key.ARCHITECTURE].get(Arch.LM_HEAD)
            if default not in [o.name for o in space.head_options]:
                raise BundleError(
                    f"{mpath}: the default LM head {default!r} is not one of the head's options"
                )
        bundle = cls(root=root, manifest=manifest, space=space, shipped=shipped, verify=verify)
        bundle._check_listing()
        if verify == "all":
            for rel in manifest[Key.FILES]:
                bundle._verify(rel)
        return bundle

    def _check_listing(self) -> None:
        files: dict[str, Any] = self.manifest[Key.FILES]
        needed = list(REQUIRED_FILES) + [quant_file(o) for o in self.shipped]
        needed += [head_file(o) for o in self.space.head_options if o.name != self.lm_head]
        for rel in needed:
            if rel not in files:
                raise BundleError(f"{self.root}: manifest does not list {rel}")
        # The schema refused absolute and ".." names; ``_inside`` refuses links out.
        for rel, meta in files.items():
            path = _inside(self.root, rel)
            if not path.is_file():
                raise BundleError(f"{self.root}: file {rel} is missing")
            stat = path.stat()
            size = stat.st_size
            self._identity[rel] = _identity(stat)
            if size != meta.get(FileEntry.BYTES):
                raise BundleError(
                    f"{self.root}: file {rel} is {size} bytes, the manifest says "
                    f"{meta.get(FileEntry.BYTES)} (truncated or altered)"
                )

    def changed_files(self) -> list[str]:
        """Files replaced, rewritten or removed since the bundle was opened. The runtime maps
        files and re-reads their pages, so a changed file changes answers (or, truncated,
        kills the process with SIGBUS): it checks this before every switch."""
        changed = []
        for rel, ident in self._identity.items():
            try:
                now = _identity((self.root / rel).stat())
            except OSError:
                now = None
            if now != ident:
                changed.append(rel)
        return changed

    def check_unchanged(self) -> None:
        changed = self.changed_files()
        if changed:
            raise BundleError(
                f"{self.root}: {changed[0]} changed on disk since the bundle was opened "
                f"({len(changed)} file(s)); reopen it"
            )

    def _verify(self, rel: str) -> Path:
        path = self.root / rel
        if self.verify == "none" or rel in self._verified:
            return path
        meta = self.manifest[Key.FILES].get(rel)
        if meta is None:
            raise BundleError(f"{self.root}: file {rel} is not listed in the manifest")
        if sha256_file(path) != meta.get(FileEntry.SHA256):
            raise BundleError(
                f"{self.root}: file {rel} fails its SHA-256 check (damaged or altered)"
            )
        self._verified.add(rel)
        return path

    # -- what the manifest says ---------------------------------------------------------------
    @property
    def architecture(self) -> dict[str, Any]:
        return self.manifest[Key.ARCHITECTURE]

    @property
    def family(self) -> str | None:
        return self.architecture.get(Arch.FAMILY)

    @property
    def task(self) -> str:
        return str(self.architecture.get(Arch.TASK, TASK_CAUSAL_LM))

    @property
    def model_config(self) -> dict[str, Any]:
        """The Hugging Face config fields the graph builders read."""
        return self.architecture[Arch.CONFIG]

    @property
    def labels(self) -> list[str] | None:
        return self.architecture.get(Arch.LABELS)

    @property
    def chat_format(self) -> Any:
        return self.architecture.get(Arch.CHAT_FORMAT)

    @property
    def eos_token_ids(self) -> list[int]:
        return [int(i) for i in self.architecture.get(Arch.EOS_TOKEN_IDS) or []]

    @property
    def lm_head(self) -> str | None:
        """The option of a quantized LM head, if the bundle stores one (the default head,
        where configurations may choose another: ``space.head_options``)."""
        return self.architecture.get(Arch.LM_HEAD)

    def head_option(self, config: Mapping[str, QuantOption] | None = None) -> QuantOption | None:
        """The option of the LM head serving ``config``: the one it names, else the
        default; None where the head is fp32 (or the model has none)."""
        head = getattr(config, "head", None)
        if head is not None:
            return head
        return QuantOption.parse(self.lm_head) if self.lm_head else None

    def head_source(self, option: QuantOption) -> str:
        """The file holding the LM head at ``option``."""
        return BASE_FILE if option.name == self.lm_head else head_file(option)

    @property
    def lora_rank(self) -> int:
        return int(self.manifest[Key.LORA][Lora.RANK])

    @property
    def lora_ranks(self) -> LoraRanks:
        """The shared pair's rank and the low-bit pair's, where the bundle has one."""
        section = self.manifest[Key.LORA]
        low = int(section.get(Lora.LOW_RANK, 0))
        return LoraRanks(self.lora_rank, low, int(section[Lora.LOW_BITS]) if low else None)

    @property
    def lora_alpha(self) -> float:
        return float(self.manifest[Key.LORA][Lora.ALPHA])

    @property
    def lora_scale(self) -> float:
        return self.lora_alpha / float(self.lora_rank)

    @property
    def theta_inputs(self) -> list[str]:
        return list(self.manifest[Key.THETA][Theta.INPUTS])

    @property
    def theta_vocab(self) -> dict[str, Any]:
        """θ's vocabulary as stored (``theta.ThetaVocab.from_dict`` reads it)."""
        return self.manifest[Key.THETA][Theta.VOCAB]

    @property
    def format_version(self) -> int:
        return int(self.manifest[Key.FORMAT_VERSION])

    @property
    def producer(self) -> str | None:
        return self.manifest.get(Key.PRODUCER)

    def file_bytes(self, rel: str) -> int | None:
        """The size the manifest lists for ``rel`` (``None`` when it is not in the bundle)."""
        entry = self.manifest[Key.FILES].get(rel)
        return int(entry[FileEntry.BYTES]) if entry else None

    def section(self, key: str) -> Any:
        """An optional top-level section (``Key.TRAINING``, ``Key.SLIMMED``), or ``None``."""
        return self.manifest.get(key)

    def file(self, rel: str) -> Path:
        """A verified path inside the bundle."""
        return self._verify(rel)

    def verify_config(self, config: Configuration) -> None:
        """Hash every file serving ``config`` would read (a dry run reads none of them, and
        should not report a plan for a configuration that cannot load)."""
        self.check_config(config)
        needed = [*REQUIRED_FILES, *sorted({quant_file(o) for o in config.values()})]
        if config.head is not None:
            needed.append(self.head_source(config.head))
        if TOKENIZER_FILE in self.manifest[Key.FILES]:
            needed.append(TOKENIZER_FILE)
        for rel in needed:
            self._verify(rel)

    def check_config(self, config: Configuration) -> None:
        """Raise if ``config`` uses a (matrix, option) pair this bundle does not ship."""
        self.space.validate(config)
        for name, opt in config.items():
            if name not in self.shipped.get(opt, ()):
                raise BundleError(f"bundle does not ship option {opt} for matrix {name!r}")

    # -- tensors ------------------------------------------------------------------------------
    def _load(self, rel: str, names: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        from safetensors import SafetensorError, safe_open

        path = self._verify(rel)
        try:
            with safe_open(str(path), framework="numpy") as fh:
                keys = list(fh.keys()) if names is None else list(names)
                return {k: fh.get_tensor(k) for k in keys}
        except (SafetensorError, OSError) as exc:
            raise BundleError(f"{self.root}: cannot read {rel}: {exc}") from None
        except KeyError as exc:
            raise BundleError(f"{self.root}: {rel} has no tensor {exc}") from None

    def base_tensors(self) -> dict[str, np.ndarray]:
        return self._load(BASE_FILE)

    def lora_tensors(self) -> dict[str, np.ndarray]:
        return self._load(LORA_FILE)

    def lora_pairs(self) -> SharedLora:
        """The shared LoRA (and the low-bit pair, where the bundle has one), checked."""
        return self.read_lora(self.lora_tensors().__getitem__)

    def read_lora(self, tensor: Callable[[str], np.ndarray]) -> SharedLora:
        """The shared LoRA from ``tensor`` (a name in ``lora.safetensors`` -> its array),
        checked against the manifest's ranks (``check_lora``)."""
        names = [m.name for m in self.space.matrices]
        parts = [LORA_A, LORA_B] + ([LORA_A_LOW, LORA_B_LOW] if self.lora_ranks.low_rank else [])
        try:
            a, b, *low = ({n: tensor(tensor_name(n, p)) for n in names} for p in parts)
        except KeyError as exc:
            raise BundleError(f"{self.root}: {LORA_FILE} has no tensor {exc}") from None
        lora = SharedLora(a, b, *low)
        self.check_lora(lora)
        return lora

    def check_lora(self, lora: SharedLora) -> None:
        """Every matrix's A is float32 [rank, in] and B float32 [out, rank], as the manifest
        implies, and so is a low-bit pair at its rank; else onnxruntime would fail deep
        inside the session build."""
        ranks = self.lora_ranks
        pairs = [(LORA_A, LORA_B, lora.a, lora.b, ranks.rank)]
        if ranks.low_rank:
            pairs.append((LORA_A_LOW, LORA_B_LOW, lora.a_low, lora.b_low, ranks.low_rank))
        for m in self.space.matrices:
            for a_part, b_part, a, b, r in pairs:
                for part, arr, shape in (
                    (a_part, a[m.name], (r, m.in_features)),
                    (b_part, b[m.name], (m.out_features, r)),
                ):
                    if arr.dtype != np.float32 or tuple(arr.shape) != shape:
                        raise BundleError(
                            f"{self.root}: {LORA_FILE}: {tensor_name(m.name, part)} is "
                            f"{arr.dtype} {list(arr.shape)}, expected float32 {list(shape)}"
                        )

    def quantized(self, config: Configuration) -> dict[str, MatMulNBitsWeights]:
        """The MatMulNBits weights of every matrix under ``config``, one read per option file."""
        self.check_config(config)
        by_option: dict[QuantOption, list[str]] = {}
        for name, opt in config.items():
            by_option.setdefault(opt, []).append(name)
        out: dict[str, MatMulNBitsWeights] = {}
        for opt, names in by_option.items():
            keys = [tensor_name(n, part) for n in names for part in QUANT_PARTS]
            tensors = self._load(quant_file(opt), keys)
            for n in names:
                out[n] = self.matmulnbits(
                    n,
                    opt,
                    *(tensors[tensor_name(n, part)] for part in (QWEIGHT, SCALES, QZEROS)),
                )
        return out

    def matmulnbits(
        self,
        name: str,
        option: QuantOption,
        qweight: np.ndarray,
        scales: np.ndarray,
        qzeros: np.ndarray,
    ) -> MatMulNBitsWeights:
        """One matrix's stored tensors as MatMulNBits weights, refused if their size is off."""
        spec = self.space.matrix(name)
        w = MatMulNBitsWeights(
            b=qweight,
            scales=scales,
            zero_points=qzeros,
            K=spec.in_features,
            N=spec.out_features,
            bits=option.bits,
            block_size=option.block_size,
        )
        problem = w.layout_problem()
        if problem is None and w.nbytes() != option.nbytes(w.N, w.K):
            problem = "the wrong size"
        if problem is not None:
            raise BundleError(f"{self.root}: tensors of {name} at {option}: {problem}")
        return w

    def theta_path(self) -> Path:
        return self._verify(THETA_FILE)

    def pareto_dict(self) -> dict[str, Any]:
        path = self._verify(PARETO_FILE)
        return load_json(path, f"{self.root}: {PARETO_FILE}", MAX_PARETO_BYTES)

    def tokenizer_path(self) -> Path | None:
        if TOKENIZER_FILE not in self.manifest[Key.FILES]:
            return None
        return self._verify(TOKENIZER_FILE)

    def size_on_disk(self) -> int:
        return (
            sum(int(m[FileEntry.BYTES]) for m in self.manifest[Key.FILES].values())
            + (self.root / MANIFEST).stat().st_size
        )


def _identity(stat: os.stat_result) -> tuple[int, int, int, int]:
    return (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)


def _inside(root: Path, rel: str) -> Path:
    """``root / rel``, refused if it is a symlink or resolves outside the bundle: a link in a
    bundle could hand the device any file (its hash in the manifest says nothing of where the
    file lives)."""
    path = root / rel
    base = root.resolve()
    try:
        real = path.resolve(strict=False)
    except (OSError, RuntimeError) as exc:  # a symlink loop
        raise BundleError(f"{root}: {rel} cannot be resolved ({exc})") from None
    if real != base / rel:
        where = "outside the bundle" if not real.is_relative_to(base) else "a symlink"
        raise BundleError(f"{root}: {rel} is {where}: bundles hold plain files only")
    return path
