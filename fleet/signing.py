"""Ed25519 keys and manifest signatures (cryptography), shared by the trainer, the hub and the edge."""

from __future__ import annotations

import base64
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fleet.errors import IntegrityError, InvalidInput, require
from fleet.protocol import ModelManifest, SignedManifest

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

__all__ = ["KeyPair", "PRIVATE_KEY_ENV", "generate_keypair", "key_id", "load_private_key", "public_key_b64",
    "read_keypair", "sign_manifest", "verify_file_sha256", "verify_manifest", "write_keypair"]


PRIVATE_KEY_ENV = "FLYWHEEL_SIGNING_KEY"  # PEM text of the private key, or a path to it


@dataclass(frozen=True)
class KeyPair:
    private_pem: bytes
    public_b64: str

    @property
    def key_id(self) -> str:
        return key_id(self.public_b64)


def generate_keypair() -> KeyPair:
    """A fresh ed25519 key pair: PKCS8 PEM private key and base64 raw public key."""
    require("cryptography", "edge")
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return KeyPair(private_pem=pem, public_b64=public_key_b64(key))


def write_keypair(pair: KeyPair, directory: Path) -> tuple[Path, Path]:
    """Write ``signing.key`` (mode 0600) and ``signing.pub`` into ``directory``; refuse to overwrite."""
    directory.mkdir(parents=True, exist_ok=True)
    priv, pub = directory / "signing.key", directory / "signing.pub"
    for p in (priv, pub):
        if p.exists():
            raise InvalidInput(f"{p} already exists; refusing to overwrite a signing key")
    fd = os.open(priv, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pair.private_pem)
    pub.write_text(pair.public_b64 + "\n")
    return priv, pub


def read_keypair(directory: Path) -> KeyPair:
    """The pair :func:`write_keypair` wrote into ``directory``; its public half is derived from the private key
    (and must match ``signing.pub``, if that file is there)."""
    priv, pub = directory / "signing.key", directory / "signing.pub"
    key = load_private_key(priv)
    public = public_key_b64(key)
    if pub.exists() and pub.read_text().strip() != public:
        raise InvalidInput(f"{pub} does not hold the public half of {priv}; expected {public}")
    return KeyPair(private_pem=priv.read_bytes(), public_b64=public)


def load_private_key(source: str | Path | bytes | None = None) -> Ed25519PrivateKey:
    """Load a private key from PEM bytes, a file path, or the FLYWHEEL_SIGNING_KEY environment variable."""
    require("cryptography", "edge")
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    if source is None:
        env = os.environ.get(PRIVATE_KEY_ENV)
        if not env:
            raise InvalidInput(f"no signing key given and {PRIVATE_KEY_ENV} is not set")
        source = env.encode() if "BEGIN" in env else Path(env)
    if isinstance(source, str):
        source = source.encode() if "BEGIN" in source else Path(source)
    if isinstance(source, Path):
        if not source.is_file():
            raise InvalidInput(f"signing key file {source} does not exist")
        source = source.read_bytes()
    try:
        key = serialization.load_pem_private_key(source, password=None)
    except (ValueError, TypeError) as exc:
        raise InvalidInput(f"signing key is not a PEM private key: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise InvalidInput(f"signing key must be ed25519; received {type(key).__name__}")
    return key


def public_key_b64(key: Ed25519PrivateKey) -> str:
    from cryptography.hazmat.primitives import serialization

    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode("ascii")


def key_id(public_b64: str) -> str:
    """A short stable name for a public key: the first 16 hex digits of sha256 of its raw bytes."""
    return hashlib.sha256(_raw_public(public_b64)).hexdigest()[:16]


def sign_manifest(manifest: ModelManifest, key: Ed25519PrivateKey) -> SignedManifest:
    """Validate the manifest, then sign its canonical bytes."""
    manifest.validate()
    sig = key.sign(manifest.canonical_bytes())
    return SignedManifest(
        manifest=manifest,
        signature=base64.b64encode(sig).decode("ascii"),
        key_id=key_id(public_key_b64(key)),
    )


def verify_manifest(signed: SignedManifest, public_b64: str) -> ModelManifest:
    """Return the manifest if its signature verifies under ``public_b64``; raise IntegrityError if not."""
    require("cryptography", "edge")
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    pub: Ed25519PublicKey = Ed25519PublicKey.from_public_bytes(_raw_public(public_b64))
    try:
        sig = base64.b64decode(signed.signature, validate=True)
        pub.verify(sig, signed.manifest.canonical_bytes())
    except (InvalidSignature, ValueError) as exc:
        raise IntegrityError(
            f"manifest signature for model {signed.manifest.version!r} does not verify under key "
            f"{key_id(public_b64)} (signed by key {signed.key_id})"
        ) from exc
    return signed.manifest


def verify_file_sha256(path: Path, expected: str, expected_size: int | None = None) -> None:
    """Raise IntegrityError unless the file's sha256 (and size) match."""
    h = hashlib.sha256()
    size = 0
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
            size += len(chunk)
    if expected_size is not None and size != expected_size:
        raise IntegrityError(f"{path.name}: size {size} bytes, expected {expected_size}")
    if h.hexdigest() != expected:
        raise IntegrityError(f"{path.name}: sha256 {h.hexdigest()}, expected {expected}")


def _raw_public(public_b64: str) -> bytes:
    try:
        raw = base64.b64decode(public_b64.strip(), validate=True)
    except ValueError as exc:
        raise InvalidInput(f"public key must be base64 of 32 raw bytes; received {public_b64[:20]!r}") from exc
    if len(raw) != 32:
        raise InvalidInput(f"public key must be 32 raw bytes; received {len(raw)}")
    return raw
