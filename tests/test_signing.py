"""Signed bundles (OpenSSF model-signing, elliptic-curve keys): signed at export, checked by
``coalora-run --trusted-key``, ``Runtime.open(trusted_key=...)`` and a profile's
``trusted_key``; ``coalora inspect`` names the signer."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from coalora.runtime.engine import Runtime
from coalora.runtime.format.signing import (
    SigningError,
    key_fingerprint,
    sign_bundle,
    signer_of,
    verify_signature,
)
from coalora.runtime.format.spec import PARETO_FILE, SIGNATURE_FILE

RUN = [sys.executable, "-m", "coalora.runtime.cli"]
PROMPT = ["--prompt", "the news", "--max-tokens", "2", "--threads", "1", "--context", "64"]


def _keys(folder: Path, name: str) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    private, public = folder / f"{name}.pem", folder / f"{name}.pub.pem"
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return private, public


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    folder = tmp_path_factory.mktemp("keys")
    return {"good": _keys(folder, "good"), "other": _keys(folder, "other")}


@pytest.fixture(scope="module")
def signed(tiny_llama_bundle: Path, keys, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A slimmed copy of the tiny bundle, signed by the writer before its final rename."""
    from coalora.export.slim import slim_bundle

    out = tmp_path_factory.mktemp("signed") / "b"
    slim_bundle(tiny_llama_bundle, out, 64.0, sign_key=keys["good"][0])
    return out


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*RUN, *args], capture_output=True, text=True, timeout=120)


def _refused(proc: subprocess.CompletedProcess, *words: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for w in words:
        assert w in lines[0], lines[0]


def test_writer_signs_and_names_the_signer(signed: Path, keys) -> None:
    assert (signed / SIGNATURE_FILE).is_file()
    assert not any(p.name.startswith(".") for p in signed.parent.iterdir())  # no partial dir
    signer = signer_of(signed)
    assert signer is not None and signer.key_fingerprint == key_fingerprint(keys["good"][1])
    assert verify_signature(signed, keys["good"][1]) == signer


def test_good_signature_is_served(signed: Path, keys) -> None:
    proc = _run(str(signed), "--trusted-key", str(keys["good"][1]), *PROMPT)
    assert proc.returncode == 0, proc.stderr
    assert "2 tokens" in proc.stderr  # generated


def test_other_key_is_refused(signed: Path, keys) -> None:
    _refused(_run(str(signed), "--trusted-key", str(keys["other"][1]), *PROMPT), "signed by key")


def test_file_changed_after_signing_is_refused(signed: Path, keys, tmp_path: Path) -> None:
    bundle = Path(shutil.copytree(signed, tmp_path / "b"))
    pareto = json.loads((bundle / PARETO_FILE).read_text())
    (bundle / PARETO_FILE).write_text(json.dumps(pareto, indent=2))  # same content, new bytes
    with pytest.raises(SigningError, match="signature check failed"):
        Runtime.open(bundle, trusted_key=keys["good"][1], build=False)
    (bundle / PARETO_FILE).write_bytes((signed / PARETO_FILE).read_bytes())
    (bundle / "extra.txt").write_text("added after signing")
    with pytest.raises(SigningError, match="signature check failed"):
        Runtime.open(bundle, trusted_key=keys["good"][1], build=False)


def test_missing_signature_refused_with_a_key_served_without(tiny_llama_bundle: Path, keys) -> None:
    assert signer_of(tiny_llama_bundle) is None
    _refused(
        _run(str(tiny_llama_bundle), "--trusted-key", str(keys["good"][1]), *PROMPT), "not signed"
    )
    rt = Runtime.open(tiny_llama_bundle, build=False, threads=1, context_length=64)
    assert rt.selection is not None


def test_signature_file_damage_is_one_line(signed: Path, keys, tmp_path: Path) -> None:
    bundle = Path(shutil.copytree(signed, tmp_path / "b"))
    for text in ("garbage", "{}", "[" * 5000, json.dumps({"verificationMaterial": 1})):
        (bundle / SIGNATURE_FILE).write_text(text)
        with pytest.raises(SigningError):
            verify_signature(bundle, keys["good"][1])
    sig = json.loads((signed / SIGNATURE_FILE).read_text())
    sig["dsseEnvelope"]["signatures"][0]["sig"] = "AAAA"
    (bundle / SIGNATURE_FILE).write_text(json.dumps(sig))
    with pytest.raises(SigningError, match="signature check failed"):
        verify_signature(bundle, keys["good"][1])
    with pytest.raises(SigningError, match="not a PEM public key"):
        verify_signature(signed, keys["good"][0].parent / "good.pem")  # a private key


def test_profile_trusted_key(signed: Path, tiny_llama_bundle: Path, keys, tmp_path: Path) -> None:
    from coalora.runtime.profiles import load_profile

    data = json.loads((Path(__file__).parents[1] / "device_profiles" / "ci-2core.json").read_text())
    shutil.copy(keys["good"][1], tmp_path / "vendor.pub.pem")
    data["trusted_key"] = "vendor.pub.pem"  # relative to the profile's folder
    profile = tmp_path / "board.json"
    profile.write_text(json.dumps(data))
    assert load_profile(str(profile)).trusted_key == str(tmp_path / "vendor.pub.pem")
    Runtime.open(signed, profile=str(profile), build=False, context_length=64)
    with pytest.raises(SigningError, match="not signed"):
        Runtime.open(tiny_llama_bundle, profile=str(profile), build=False, context_length=64)


def test_inspect_shows_the_signer(signed: Path, tiny_llama_bundle: Path, keys) -> None:
    cli = [sys.executable, "-m", "coalora.export.cli", "inspect"]
    out = subprocess.run([*cli, str(signed)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert key_fingerprint(keys["good"][1]) in out.stdout and "not checked" in out.stdout
    out = subprocess.run(
        [*cli, str(signed), "--trusted-key", str(keys["good"][1]), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert json.loads(out.stdout)["signed_by"]["verified"] is True
    out = subprocess.run([*cli, str(tiny_llama_bundle)], capture_output=True, text=True)
    assert "signature: unsigned" in out.stdout


def test_without_model_signing_a_trusted_key_is_one_line(signed: Path, keys) -> None:
    code = (
        "import sys; sys.modules['model_signing'] = None; "
        "from coalora.runtime.cli import main; main()"
    )
    args = [str(signed), "--trusted-key", str(keys["good"][1]), *PROMPT]
    proc = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120
    )
    _refused(proc, "needs model-signing", "pip install 'coalora[sign]'")


def test_signing_refuses_a_bad_key_before_writing(tiny_llama_bundle: Path, tmp_path: Path) -> None:
    from coalora.export.slim import slim_bundle

    bad = tmp_path / "bad.pem"
    bad.write_text("not a key")
    with pytest.raises(SigningError, match="signing key"):
        slim_bundle(tiny_llama_bundle, tmp_path / "out", 64.0, sign_key=bad)
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.pem"]
    with pytest.raises(SigningError, match="no such file"):
        sign_bundle(tiny_llama_bundle, tmp_path / "missing.pem")


def test_export_refuses_an_unusable_key_before_training(tmp_path: Path) -> None:
    from coalora.export.options import ExportOptions

    bad = tmp_path / "bad.pem"
    bad.write_text("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n")
    opts = ExportOptions.for_model("smollm2", tmp_path / "out", fast=True, sign=str(bad))
    with pytest.raises(SigningError, match="not an elliptic-curve private key"):
        opts.check()
