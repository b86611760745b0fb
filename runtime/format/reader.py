"""Read and verify a coalora bundle (names: ``spec``; prose: docs/bundle-format.md). No torch.

``Bundle.open(path)`` reads the manifest, checks that every listed file exists with the right
size, and hashes files as they are first used (``verify="all"`` hashes everything at open).
Any problem raises ``BundleError`` with one line naming what is wrong.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from coalora.kernels import ConfigError, ConfigSpace, Configuration, QuantOption
from coalora.kernels.matmulnbits import MatMulNBitsWeights
from coalora.runtime.format.spec import (
    BASE_FILE,
    FORMAT,
    FORMAT_VERSION,
    LORA_A,
    LORA_B,
    LORA_FILE,
    MANIFEST,
    PARETO_FILE,
    QUANT_PARTS,
    QWEIGHT,
    QZEROS,
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
    Theta,
    quant_file,
    tensor_name,
)

Verify = Literal["used", "all", "none"]


class BundleError(ValueError):
    """The bundle is missing, damaged, or of a version this reader does not know."""


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
        try:
            manifest = json.loads(mpath.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BundleError(f"{mpath}: manifest is not valid JSON ({exc})") from None
        if not isinstance(manifest, dict) or manifest.get(Key.FORMAT) != FORMAT:
            raise BundleError(f"{mpath}: not a coalora bundle manifest")
        version = manifest.get(Key.FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise BundleError(
                f"{root}: bundle format version {version!r} is not supported "
                f"(this coalora reads version {FORMAT_VERSION})"
            )
        for key in REQUIRED_SECTIONS:
            if key not in manifest:
                raise BundleError(f"{mpath}: manifest has no {key!r} section")
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
        bundle = cls(root=root, manifest=manifest, space=space, shipped=shipped, verify=verify)
        bundle._check_listing()
        if verify == "all":
            for rel in manifest[Key.FILES]:
                bundle._verify(rel)
        return bundle

    def _check_listing(self) -> None:
        files: dict[str, Any] = self.manifest[Key.FILES]
        needed = list(REQUIRED_FILES) + [quant_file(o) for o in self.shipped]
        for rel in needed:
            if rel not in files:
                raise BundleError(f"{self.root}: manifest does not list {rel}")
        for rel, meta in files.items():
            if Path(rel).is_absolute() or ".." in Path(rel).parts:
                raise BundleError(f"{self.root}: manifest lists a path outside the bundle: {rel}")
            path = self.root / rel
            if not path.is_file():
                raise BundleError(f"{self.root}: file {rel} is missing")
            size = path.stat().st_size
            if size != meta.get(FileEntry.BYTES):
                raise BundleError(
                    f"{self.root}: file {rel} is {size} bytes, the manifest says "
                    f"{meta.get(FileEntry.BYTES)} (truncated or altered)"
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
        """The option of a quantized LM head, if the bundle stores one."""
        return self.architecture.get(Arch.LM_HEAD)

    @property
    def lora_rank(self) -> int:
        return int(self.manifest[Key.LORA][Lora.RANK])

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

    def lora_pairs(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """The shared LoRA as (A per matrix, B per matrix)."""
        lora = self.lora_tensors()
        names = [m.name for m in self.space.matrices]
        a = {n: lora[tensor_name(n, LORA_A)] for n in names}
        b = {n: lora[tensor_name(n, LORA_B)] for n in names}
        return a, b

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
        if w.nbytes() != option.nbytes(w.N, w.K):
            raise BundleError(f"{self.root}: tensors of {name} at {option} have the wrong size")
        return w

    def theta_path(self) -> Path:
        return self._verify(THETA_FILE)

    def pareto_dict(self) -> dict[str, Any]:
        path = self._verify(PARETO_FILE)
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BundleError(f"{self.root}: {PARETO_FILE} is not valid JSON ({exc})") from None

    def tokenizer_path(self) -> Path | None:
        if TOKENIZER_FILE not in self.manifest[Key.FILES]:
            return None
        return self._verify(TOKENIZER_FILE)

    def size_on_disk(self) -> int:
        return (
            sum(int(m[FileEntry.BYTES]) for m in self.manifest[Key.FILES].values())
            + (self.root / MANIFEST).stat().st_size
        )
