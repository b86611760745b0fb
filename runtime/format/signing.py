"""Signed bundles on the OpenSSF model-signing format (the ``model-signing`` package).

Hashes in the manifest catch damage, not tampering: whoever can write a bundle can rehash it.
A signed bundle holds ``SIGNATURE_FILE``: a Sigstore bundle (DSSE envelope over an in-toto
statement) listing the SHA-256 of every other file of the directory, manifest included,
signed with an elliptic-curve private key (model-signing's key-based method: offline, no
transparency log). A device given the matching public key (``--trusted-key``, or a profile's
``trusted_key``) refuses a bundle that is unsigned, signed by another key, or has a file
added, removed or changed since it was signed.

The one home of the signing logic: the writer signs with ``sign_bundle`` before its final
rename, ``Runtime.open`` checks with ``verify_signature``, ``coalora inspect`` reads the
signer with ``signer_of`` (no model-signing needed: the signature file is JSON).
``model-signing`` is imported only when signing or verifying, so a device install without the
``sign`` extra serves unsigned bundles as before.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coalora.runtime.format.reader import BundleError, load_json
from coalora.runtime.format.spec import SIGNATURE_FILE

# A key-based signature of a large bundle is a few kB per hundred files; past this it is junk.
MAX_SIGNATURE_BYTES = 4 << 20
INSTALL_HINT = "pip install 'coalora[sign]'"
_HEX64 = re.compile(r"[0-9a-f]{64}")


class SigningError(BundleError):
    """A bundle that is unsigned, wrongly signed or changed since signing; a key that cannot
    be used; or model-signing missing. One line, like every ``BundleError``."""


@dataclass(frozen=True)
class Signer:
    """Who signed a bundle, as its signature file says (not yet checked against any key)."""

    key_fingerprint: str  # SHA-256 of the public key's PEM (model-signing's key hint)
    method: str = "EC key, OpenSSF model-signing"

    def describe(self) -> str:
        return f"key sha256:{self.key_fingerprint[:16]}… ({self.method})"


def _model_signing(what: str) -> Any:
    try:
        import model_signing  # noqa: F401
        from model_signing import hashing, signing, verifying
    except ImportError as exc:
        raise SigningError(
            f"{what} needs model-signing ({INSTALL_HINT}; {exc.name} is missing)"
        ) from None
    return hashing, signing, verifying


def _hashing_config(hashing: Any) -> Any:
    # Every file but the signature itself; symlinks are refused, as the reader refuses them.
    return hashing.Config().set_ignored_paths(paths=[SIGNATURE_FILE], ignore_git_paths=False)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:300]


def _key_path(key: str | Path, what: str) -> Path:
    path = Path(key).expanduser()
    if not path.is_file():
        raise SigningError(
            f"{what} {path}: no such file"
            if not path.exists()
            else f"{what} {path}: not a regular file"
        )
    if path.stat().st_size > 64 << 10:
        raise SigningError(f"{what} {path}: too large for a PEM key")
    return path


def key_fingerprint(public_key: str | Path) -> str:
    """The fingerprint ``signer_of`` reports for a bundle signed by this public key's pair."""
    path = _key_path(public_key, "trusted key")
    _model_signing("checking a bundle's signature (--trusted-key)")
    from cryptography.hazmat.primitives import serialization

    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except (ValueError, TypeError) as exc:
        raise SigningError(f"trusted key {path}: not a PEM public key ({_one_line(exc)})") from None
    pem = key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(pem).hexdigest()


def check_private_key(private_key: str | Path) -> Path:
    """Refuse an unusable signing key before any work (an export trains for an hour first)."""
    path = _key_path(private_key, "signing key")
    _, signing, _ = _model_signing("signing a bundle (--sign)")
    try:
        signing.Config().use_elliptic_key_signer(private_key=path)
    except Exception as exc:  # model-signing and cryptography raise several types
        raise SigningError(
            f"signing key {path}: not an elliptic-curve private key PEM ({_one_line(exc)})"
        ) from None
    return path


def sign_bundle(root: str | Path, private_key: str | Path) -> Path:
    """Sign every file of the bundle directory ``root``; writes ``root/SIGNATURE_FILE``."""
    root = Path(root)
    key = check_private_key(private_key)
    hashing, signing, _ = _model_signing("signing a bundle (--sign)")
    out = root / SIGNATURE_FILE
    try:
        signing.Config().use_elliptic_key_signer(private_key=key).set_hashing_config(
            _hashing_config(hashing)
        ).sign(root, out)
    except Exception as exc:
        out.unlink(missing_ok=True)
        raise SigningError(f"cannot sign {root}: {_one_line(exc)}") from None
    return out


def signer_of(root: str | Path) -> Signer | None:
    """The signer a bundle's signature file names, or ``None`` for an unsigned bundle.
    Reads JSON only; ``verify_signature`` is what checks it."""
    path = Path(root) / SIGNATURE_FILE
    if not path.exists() and not path.is_symlink():
        return None
    if path.is_symlink() or not path.is_file():
        raise SigningError(f"{root}: {SIGNATURE_FILE} is not a plain file")
    try:
        data = load_json(path, f"{root}: {SIGNATURE_FILE}", MAX_SIGNATURE_BYTES)
    except SigningError:
        raise
    except BundleError as exc:  # too large, not JSON, nested too deep
        raise SigningError(str(exc)) from None
    try:
        hint = data["verificationMaterial"]["publicKey"]["hint"]
    except (KeyError, TypeError):
        hint = None
    if not isinstance(hint, str) or not _HEX64.fullmatch(hint):
        raise SigningError(
            f"{root}: {SIGNATURE_FILE} is not a key-based model-signing signature "
            "(no public key fingerprint)"
        )
    return Signer(key_fingerprint=hint)


def verify_signature(root: str | Path, public_key: str | Path) -> Signer:
    """Refuse the bundle at ``root`` unless ``public_key``'s pair signed exactly its files."""
    root = Path(root)
    key = _key_path(public_key, "trusted key")
    if not root.is_dir():
        raise SigningError(f"no bundle at {root}")
    signer = signer_of(root)
    if signer is None:
        raise SigningError(
            f"{root} is not signed ({SIGNATURE_FILE} is missing) and a trusted key is required"
        )
    fingerprint = key_fingerprint(key)
    if signer.key_fingerprint != fingerprint:
        raise SigningError(
            f"{root} is signed by key sha256:{signer.key_fingerprint[:16]}…, not by the "
            f"trusted key {key} (sha256:{fingerprint[:16]}…)"
        )
    hashing, _, verifying = _model_signing("checking a bundle's signature (--trusted-key)")
    try:
        verifying.Config().use_elliptic_key_verifier(public_key=key).set_hashing_config(
            _hashing_config(hashing)
        ).verify(root, root / SIGNATURE_FILE)
    except Exception as exc:  # a bad signature, a changed file, a damaged envelope
        raise SigningError(f"{root}: signature check failed: {_one_line(exc)}") from None
    return signer
