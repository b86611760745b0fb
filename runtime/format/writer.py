"""Write a coalora bundle (names: ``spec``; prose: docs/bundle-format.md; reader: ``reader``).

The writer builds the bundle in a temporary sibling directory and renames it into place only
when every file is written, hashed and (with ``sign_key``) signed, so a failed export leaves
nothing half-written and a signed bundle never appears unsigned.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

import coalora
from coalora.kernels import ConfigSpace, QuantOption
from coalora.kernels.matmulnbits import MatMulNBitsWeights
from coalora.runtime.format.reader import sha256_file
from coalora.runtime.format.signing import check_private_key, sign_bundle
from coalora.runtime.format.spec import (
    BASE_FILE,
    FORMAT,
    FORMAT_VERSION,
    HEADS_DIR,
    LM_HEAD,
    LORA_A,
    LORA_A_LOW,
    LORA_B,
    LORA_B_LOW,
    LORA_FILE,
    LOW_PAIR_FORMAT_VERSION,
    MANIFEST,
    PARETO_FILE,
    QUANT_DIR,
    QWEIGHT,
    QZEROS,
    SCALES,
    THETA_FILE,
    THETA_INPUTS,
    THETA_OUTPUT,
    TOKENIZER_FILE,
    Arch,
    FileEntry,
    Key,
    Lora,
    Space,
    Theta,
    head_file,
    quant_file,
    tensor_name,
)
from coalora.runtime.tempfiles import make_owned_dir


@dataclass
class BundleContents:
    """Everything a bundle holds, in memory, ready to be written."""

    architecture: dict[str, Any]
    space: ConfigSpace
    # option -> matrix name -> weights; only (matrix, option) pairs some configuration uses
    quantized: Mapping[QuantOption, Mapping[str, MatMulNBitsWeights]]
    base: Mapping[str, np.ndarray]
    lora_a: Mapping[str, np.ndarray]
    lora_b: Mapping[str, np.ndarray]
    lora_rank: int
    lora_alpha: float
    theta_onnx: bytes
    theta_vocab: dict[str, Any]
    pareto: dict[str, Any]
    tokenizer_json: Path | None = None
    theta_inputs: tuple[str, ...] = THETA_INPUTS
    extra: dict[str, Any] = field(default_factory=dict)
    # a configured head (``space.head_options``): its codes at every option but the default
    # one, which is in ``base`` (``spec.head_file``)
    heads: Mapping[QuantOption, MatMulNBitsWeights] = field(default_factory=dict)
    # a low-bit pair (``spec.LoraRanks``): A_low [low_rank, in] / B_low [out, low_rank] per
    # matrix, run where a matrix's option is at ``lora_low_bits``
    lora_low_rank: int = 0
    lora_low_bits: int | None = None
    lora_a_low: Mapping[str, np.ndarray] = field(default_factory=dict)
    lora_b_low: Mapping[str, np.ndarray] = field(default_factory=dict)


def _check(contents: BundleContents) -> None:
    names = {m.name for m in contents.space.matrices}
    for opt, mats in contents.quantized.items():
        for name, w in mats.items():
            if name not in names:
                raise ValueError(f"quantized weights for unknown matrix {name!r}")
            spec = contents.space.matrix(name)
            if (w.N, w.K, w.bits, w.block_size) != (
                spec.out_features,
                spec.in_features,
                opt.bits,
                opt.block_size,
            ):
                raise ValueError(f"quantized weights of {name} do not match {opt} {spec.shape}")
    head = contents.space.head
    default = contents.architecture.get(Arch.LM_HEAD)
    wanted = {o for o in contents.space.head_options if o.name != default}
    if set(contents.heads) != wanted:
        got = ", ".join(sorted(o.name for o in contents.heads)) or "none"
        need = ", ".join(sorted(o.name for o in wanted)) or "none"
        raise ValueError(f"LM heads given at {got}; the space's head options need {need}")
    for opt, w in contents.heads.items():
        assert head is not None
        if (w.N, w.K, w.bits, w.block_size) != (*head.shape, opt.bits, opt.block_size):
            raise ValueError(f"the LM head at {opt} does not match {head.shape}")
    pairs = [("LoRA", contents.lora_a, contents.lora_b, contents.lora_rank)]
    if contents.lora_low_rank:
        bits = {o.bits for o in contents.space.options}
        if contents.lora_low_bits not in bits:
            raise ValueError(
                f"the low-bit pair runs at {contents.lora_low_bits} bits, which no option has"
            )
        low = (contents.lora_a_low, contents.lora_b_low, contents.lora_low_rank)
        pairs.append(("the low-bit pair", *low))
    elif contents.lora_a_low or contents.lora_b_low:
        raise ValueError("a low-bit pair is given with lora_low_rank 0")
    for name in names:
        for what, a_of, b_of, r in pairs:
            a, b = a_of.get(name), b_of.get(name)
            if a is None or b is None:
                raise ValueError(f"no {what} A/B for matrix {name!r}")
            spec = contents.space.matrix(name)
            if a.shape != (r, spec.in_features) or b.shape != (spec.out_features, r):
                raise ValueError(
                    f"{what} of {name} has shapes {a.shape}/{b.shape}, expected rank {r}"
                )


def write_bundle(
    out_dir: str | Path,
    contents: BundleContents,
    *,
    overwrite: bool = False,
    sign_key: str | Path | None = None,
) -> Path:
    """Write ``contents`` as a bundle at ``out_dir``; returns the path. ``sign_key``: an
    elliptic-curve private key (PEM) to sign it with (``format.signing``)."""
    _check(contents)
    if sign_key is not None:
        check_private_key(sign_key)  # before any byte is written
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists (pass overwrite to replace it)")
    if out.exists() and (out.is_symlink() or not out.is_dir()):
        raise FileExistsError(f"{out} exists and is not a bundle directory: not replacing it")
    out.parent.mkdir(parents=True, exist_ok=True)
    # Named after this process: a write killed half-way is swept by the next one.
    tmp = make_owned_dir(f".{out.name}.partial-", out.parent)
    try:
        (tmp / QUANT_DIR).mkdir()
        save_file({k: np.ascontiguousarray(v) for k, v in contents.base.items()}, tmp / BASE_FILE)
        lora: dict[str, np.ndarray] = {}
        for name in sorted(contents.lora_a):
            a, b = contents.lora_a[name], contents.lora_b[name]
            lora[tensor_name(name, LORA_A)] = np.ascontiguousarray(a, dtype=np.float32)
            lora[tensor_name(name, LORA_B)] = np.ascontiguousarray(b, dtype=np.float32)
        for name in sorted(contents.lora_a_low):
            a, b = contents.lora_a_low[name], contents.lora_b_low[name]
            lora[tensor_name(name, LORA_A_LOW)] = np.ascontiguousarray(a, dtype=np.float32)
            lora[tensor_name(name, LORA_B_LOW)] = np.ascontiguousarray(b, dtype=np.float32)
        save_file(lora, tmp / LORA_FILE)
        shipped: dict[str, list[str]] = {}
        for opt in sorted(contents.quantized):
            mats = contents.quantized[opt]
            if not mats:
                continue
            tensors: dict[str, np.ndarray] = {}
            for name in sorted(mats):
                w = mats[name]
                tensors[tensor_name(name, QWEIGHT)] = np.ascontiguousarray(w.b, dtype=np.uint8)
                tensors[tensor_name(name, SCALES)] = np.ascontiguousarray(w.scales, np.float32)
                tensors[tensor_name(name, QZEROS)] = np.ascontiguousarray(w.zero_points, np.uint8)
            save_file(tensors, tmp / quant_file(opt))
            shipped[opt.name] = sorted(mats)
        if contents.heads:
            (tmp / HEADS_DIR).mkdir()
        for opt, w in contents.heads.items():
            save_file(
                {
                    tensor_name(LM_HEAD, QWEIGHT): np.ascontiguousarray(w.b, dtype=np.uint8),
                    tensor_name(LM_HEAD, SCALES): np.ascontiguousarray(w.scales, np.float32),
                    tensor_name(LM_HEAD, QZEROS): np.ascontiguousarray(w.zero_points, np.uint8),
                },
                tmp / head_file(opt),
            )
        (tmp / THETA_FILE).write_bytes(contents.theta_onnx)
        (tmp / PARETO_FILE).write_text(json.dumps(contents.pareto, indent=1), encoding="utf-8")
        if contents.tokenizer_json is not None:
            shutil.copyfile(contents.tokenizer_json, tmp / TOKENIZER_FILE)

        files = {}
        for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
            rel = path.relative_to(tmp).as_posix()
            files[rel] = {FileEntry.SHA256: sha256_file(path), FileEntry.BYTES: path.stat().st_size}
        space = contents.space.to_dict()
        space[Space.OPTIONS] = sorted(shipped, key=lambda s: QuantOption.parse(s))
        lora_section: dict[str, Any] = {
            Lora.RANK: contents.lora_rank,
            Lora.ALPHA: contents.lora_alpha,
        }
        if contents.lora_low_rank:
            lora_section |= {
                Lora.LOW_RANK: contents.lora_low_rank,
                Lora.LOW_BITS: contents.lora_low_bits,
            }
        manifest = {
            Key.FORMAT: FORMAT,
            Key.FORMAT_VERSION: LOW_PAIR_FORMAT_VERSION
            if contents.lora_low_rank
            else FORMAT_VERSION,
            Key.PRODUCER: f"coalora {coalora.__version__}",
            Key.ARCHITECTURE: contents.architecture,
            Key.SPACE: space,
            Key.SHIPPED: shipped,
            Key.LORA: lora_section,
            Key.THETA: {
                Theta.INPUTS: list(contents.theta_inputs),
                Theta.OUTPUT: THETA_OUTPUT,
                Theta.VOCAB: contents.theta_vocab,
            },
            Key.FILES: files,
            **contents.extra,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
        if sign_key is not None:
            sign_bundle(tmp, sign_key)  # the signature names files, not the directory
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
