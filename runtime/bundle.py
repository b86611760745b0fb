"""Read and verify a coalora bundle (spec: docs/bundle-format.md). No torch.

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

FORMAT = "coalora-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
BASE_FILE = "base.safetensors"
LORA_FILE = "lora.safetensors"
THETA_FILE = "theta.onnx"
PARETO_FILE = "pareto.json"
TOKENIZER_FILE = "tokenizer.json"
REQUIRED_FILES = (BASE_FILE, LORA_FILE, THETA_FILE, PARETO_FILE)

Verify = Literal["used", "all", "none"]


class BundleError(ValueError):
    """The bundle is missing, damaged, or of a version this reader does not know."""


def quant_file(option: QuantOption) -> str:
    return f"quant/{option.name}.safetensors"


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
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise BundleError(f"{mpath}: not a coalora bundle manifest")
        version = manifest.get("format_version")
        if version != FORMAT_VERSION:
            raise BundleError(
                f"{root}: bundle format version {version!r} is not supported "
                f"(this coalora reads version {FORMAT_VERSION})"
            )
        for key in ("architecture", "space", "shipped", "lora", "theta", "files"):
            if key not in manifest:
                raise BundleError(f"{mpath}: manifest has no {key!r} section")
        try:
            space = ConfigSpace.from_dict(manifest["space"])
            shipped = {
                QuantOption.parse(opt): frozenset(names)
                for opt, names in manifest["shipped"].items()
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
            for rel in manifest["files"]:
                bundle._verify(rel)
        return bundle

    def _check_listing(self) -> None:
        files: dict[str, Any] = self.manifest["files"]
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
            if size != meta.get("bytes"):
                raise BundleError(
                    f"{self.root}: file {rel} is {size} bytes, the manifest says "
                    f"{meta.get('bytes')} (truncated or altered)"
                )

    def _verify(self, rel: str) -> Path:
        path = self.root / rel
        if self.verify == "none" or rel in self._verified:
            return path
        meta = self.manifest["files"].get(rel)
        if meta is None:
            raise BundleError(f"{self.root}: file {rel} is not listed in the manifest")
        if sha256_file(path) != meta.get("sha256"):
            raise BundleError(
                f"{self.root}: file {rel} fails its SHA-256 check (damaged or altered)"
            )
        self._verified.add(rel)
        return path

    # -- what the manifest says ---------------------------------------------------------------
    @property
    def architecture(self) -> dict[str, Any]:
        return self.manifest["architecture"]

    @property
    def task(self) -> str:
        return str(self.architecture.get("task", "causal-lm"))

    @property
    def lora_rank(self) -> int:
        return int(self.manifest["lora"]["rank"])

    @property
    def lora_scale(self) -> float:
        lora = self.manifest["lora"]
        return float(lora["alpha"]) / float(lora["rank"])

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

    def quantized(self, config: Configuration) -> dict[str, MatMulNBitsWeights]:
        """The MatMulNBits weights of every matrix under ``config``, one read per option file."""
        self.check_config(config)
        by_option: dict[QuantOption, list[str]] = {}
        for name, opt in config.items():
            by_option.setdefault(opt, []).append(name)
        out: dict[str, MatMulNBitsWeights] = {}
        for opt, names in by_option.items():
            keys = [f"{n}.{part}" for n in names for part in ("qweight", "scales", "qzeros")]
            tensors = self._load(quant_file(opt), keys)
            for n in names:
                out[n] = self.matmulnbits(
                    n, opt, tensors[f"{n}.qweight"], tensors[f"{n}.scales"], tensors[f"{n}.qzeros"]
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
        if TOKENIZER_FILE not in self.manifest["files"]:
            return None
        return self._verify(TOKENIZER_FILE)

    def size_on_disk(self) -> int:
        return (
            sum(int(m["bytes"]) for m in self.manifest["files"].values())
            + (self.root / MANIFEST).stat().st_size
        )
