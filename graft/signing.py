"""Authenticity of a SkillPack or routed-model folder: signed with a private key, verified with its public key.

Checksums and content hashes show a folder was not damaged; anyone can recompute them after an
edit. A signature shows who made it. Signing uses the OpenSSF `model-signing` library with an
elliptic-curve key pair (offline: no certificate authority, no transparency log): every file of the
folder is hashed into a signed in-toto statement, `graftline.sig` (a Sigstore bundle) inside the
folder. Verification fails for a changed, added or removed file, or another key. graftline's own
marker (`_graftline.json`, which describes where the folder came from and not what it holds) and
the signature itself are the only files outside the signature.
"""

from __future__ import annotations

import os
from pathlib import Path

from graft.artifacts import ArtifactError
from graft.atomic import MARKER

SIGNATURE = "graftline.sig"
UNSIGNED = (SIGNATURE, MARKER)


class SignatureError(ArtifactError):
    """A folder whose signature is missing, does not verify, or cannot be made; the message names it."""


def _hashing():
    import model_signing

    return model_signing.hashing.Config().set_ignored_paths(paths=list(UNSIGNED), ignore_git_paths=False)


def generate_keypair(private_key: str | Path, public_key: str | Path) -> None:
    """Write a new P-256 key pair as PEM files (the private one readable by its owner only); never over a file."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    private_key, public_key = Path(private_key), Path(public_key)
    for path in (private_key, public_key):
        if path.exists():
            raise SignatureError(f"{path}: already exists; keys are never overwritten")
    key = ec.generate_private_key(ec.SECP256R1())
    private_key.parent.mkdir(parents=True, exist_ok=True)
    public_key.parent.mkdir(parents=True, exist_ok=True)
    with open(private_key, "xb", opener=lambda p, flags: os.open(p, flags, 0o600)) as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    with open(public_key, "xb") as f:
        f.write(key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))


def sign_folder(folder: str | Path, private_key: str | Path) -> Path:
    """Sign every file of `folder` with the PEM private key; writes and returns `folder/graftline.sig`."""
    import model_signing

    folder, private_key = Path(folder), Path(private_key)
    if not private_key.is_file():
        raise SignatureError(f"{private_key}: no such private key file")
    signature = folder / SIGNATURE
    try:
        (model_signing.signing.Config().use_elliptic_key_signer(private_key=private_key)
         .set_hashing_config(_hashing()).sign(folder, signature))
    except (ValueError, TypeError) as e:
        raise SignatureError(f"{private_key}: cannot sign with it ({_first_line(e)})") from None
    return signature


def verify_folder(folder: str | Path, public_key: str | Path) -> None:
    """Raise SignatureError unless `folder` carries a signature by the key pair of the PEM `public_key` over all its files."""
    import model_signing

    folder, public_key = Path(folder), Path(public_key)
    if not public_key.is_file():
        raise SignatureError(f"{public_key}: no such public key file")
    signature = folder / SIGNATURE
    if not signature.is_file():
        raise SignatureError(f"{folder}: not signed (no {SIGNATURE})")
    try:
        (model_signing.verifying.Config().use_elliptic_key_verifier(public_key=public_key)
         .set_hashing_config(_hashing()).verify(folder, signature))
    except Exception as e:  # model_signing raises ValueError for mismatches, others for malformed bundles or keys
        raise SignatureError(f"{signature}: does not verify with {public_key} ({_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:300]
