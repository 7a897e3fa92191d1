"""Ed25519 keys and manifest signatures (cryptography), shared by the trainer, the hub and the edge."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fleet.errors import IntegrityError, InvalidInput, require
from fleet.protocol import KeyRotation, ModelManifest, SignedManifest

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

__all__ = ["KeyPair", "KeyRing", "PRIVATE_KEY_ENV", "TrustedKey", "generate_keypair", "key_id", "load_private_key",
    "public_key_b64", "read_keypair", "sign_manifest", "sign_rotation", "verify_file_sha256", "verify_manifest",
    "verify_rotation", "write_keypair"]


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
    """Write ``signing.key`` (mode 0600) and ``signing.pub`` into ``directory``; refuse to overwrite. A pair that
    cannot be written whole leaves neither file behind, nor the folders this call made for it."""
    if directory.exists() and not directory.is_dir():
        raise InvalidInput(f"{directory} is a file; expected a folder to write signing.key and signing.pub into")
    priv, pub = directory / "signing.key", directory / "signing.pub"
    for p in (priv, pub):
        if p.exists():
            raise InvalidInput(f"{p} already exists; refusing to overwrite a signing key")
    made: list[Path] = []
    folders = [d for d in (directory, *directory.parents) if not d.exists()]  # innermost first
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(priv, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        made.append(priv)
        with os.fdopen(fd, "wb") as fh:
            fh.write(pair.private_pem)
        fd = os.open(pub, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        made.append(pub)
        with os.fdopen(fd, "w") as text:
            text.write(pair.public_b64 + "\n")
    except OSError as exc:
        for p in made:
            p.unlink(missing_ok=True)
        for d in folders:
            with contextlib.suppress(OSError):  # not made, or no longer empty: left as it is
                d.rmdir()
        raise InvalidInput(f"cannot write signing.key and signing.pub into {directory}: {exc.strerror or exc}") \
            from None
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
        if source.is_dir():
            raise InvalidInput(f"signing key file {source} is a folder; expected the private key file in it "
                               f"({source / 'signing.key'}, from flywheel keys generate) or another PEM file")
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


def sign_rotation(old_key: Ed25519PrivateKey, new_public_b64: str, *, old_key_until: float,
                  issued_at: float) -> KeyRotation:
    """Announce ``new_public_b64`` as the fleet's key under ``old_key``, which keeps verifying model signatures
    until ``old_key_until`` (unix seconds)."""
    key_id(new_public_b64)  # refuses a key that is not 32 raw bytes of base64
    unsigned = KeyRotation(new_public_key=new_public_b64.strip(), old_key_id=key_id(public_key_b64(old_key)),
                           old_key_until=float(old_key_until), issued_at=float(issued_at), signature="-")
    if unsigned.old_key_id == key_id(new_public_b64):
        raise InvalidInput("the new key is the old key; a rotation needs a new key pair (flywheel keys generate)")
    unsigned.validate()
    unsigned.signature = base64.b64encode(old_key.sign(unsigned.signed_bytes())).decode("ascii")
    return unsigned


def verify_rotation(rotation: KeyRotation, old_public_b64: str) -> None:
    """Raise IntegrityError unless ``rotation`` was signed by ``old_public_b64`` (the key it names as old)."""
    require("cryptography", "edge")
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    rotation.validate()
    if key_id(old_public_b64) != rotation.old_key_id:
        raise IntegrityError(f"key rotation names old key {rotation.old_key_id}, not {key_id(old_public_b64)}")
    key_id(rotation.new_public_key)
    pub: Ed25519PublicKey = Ed25519PublicKey.from_public_bytes(_raw_public(old_public_b64))
    try:
        pub.verify(base64.b64decode(rotation.signature, validate=True), rotation.signed_bytes())
    except (InvalidSignature, ValueError) as exc:
        raise IntegrityError(f"key rotation to {key_id(rotation.new_public_key)} does not verify under key "
                             f"{rotation.old_key_id}") from exc


@dataclass
class TrustedKey:
    """A fleet key and, once a rotation replaced it, the end of the overlap in which its signatures still count."""

    public_key: str
    until: float | None = None

    @property
    def key_id(self) -> str:
        return key_id(self.public_key)


class KeyRing:
    """The fleet keys a device (or the hub) trusts: the key pinned at enrollment, then each key a trusted key
    announced (:class:`~fleet.protocol.KeyRotation`). A manifest verifies under the key it names, and under an
    old key only until that key's overlap ends."""

    def __init__(self, pinned: str) -> None:
        key_id(pinned)
        self.keys: list[TrustedKey] = [TrustedKey(pinned.strip())]

    @classmethod
    def following(cls, pinned: str, rotations: list[KeyRotation]) -> KeyRing:
        """The ring after ``rotations`` in order; one that no key on the ring signed is skipped."""
        ring = cls(pinned)
        for r in rotations:
            try:
                ring.accept(r)
            except (IntegrityError, InvalidInput):
                continue
        return ring

    def get(self, kid: str) -> TrustedKey | None:
        return next((k for k in self.keys if k.key_id == kid), None)

    def accept(self, rotation: KeyRotation) -> bool:
        """Follow ``rotation`` if a key on the ring signed it: trust its new key, and its old key's signatures only
        until ``old_key_until``. False if it is already followed; IntegrityError if no trusted key signed it."""
        signer = self.get(rotation.old_key_id)
        if signer is None:
            raise IntegrityError(f"key rotation signed by key {rotation.old_key_id}, which is not trusted here "
                                 f"(trusted: {[k.key_id for k in self.keys]})")
        verify_rotation(rotation, signer.public_key)
        if self.get(key_id(rotation.new_public_key)) is not None:
            return False
        signer.until = rotation.old_key_until if signer.until is None else min(signer.until, rotation.old_key_until)
        self.keys.append(TrustedKey(rotation.new_public_key.strip()))
        return True

    def verify(self, signed: SignedManifest, *, now: float) -> ModelManifest:
        """The manifest, if a key on the ring made its signature and still counts at ``now``; else IntegrityError
        that says which key signed it and why that is not enough."""
        key = self.get(signed.key_id)
        what = f"manifest signature for model {signed.manifest.version!r} does not verify"
        if key is None:
            raise IntegrityError(f"{what}: it is made by key {signed.key_id}, which is not a trusted fleet key "
                                 f"(trusted: {[k.key_id for k in self.keys]})")
        if key.until is not None and now > key.until:
            raise IntegrityError(f"{what} any more: it is made by key {signed.key_id}, which was rotated out; its "
                                 f"signatures counted until {key.until:.0f} (now {now:.0f})")
        return verify_manifest(signed, key.public_key)


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
