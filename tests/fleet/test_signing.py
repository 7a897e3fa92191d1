"""Ed25519 manifest signatures: a signed manifest verifies; any change or wrong key does not."""

from __future__ import annotations

import dataclasses
import errno
import os
from pathlib import Path
from typing import Any

import pytest

from fleet.errors import IntegrityError, InvalidInput, ProtocolError
from fleet.protocol import InputSpec, ModelManifest, SignedManifest
from fleet.signing import (
    PRIVATE_KEY_ENV,
    KeyRing,
    generate_keypair,
    key_id,
    load_private_key,
    sign_manifest,
    sign_rotation,
    verify_file_sha256,
    verify_manifest,
    write_keypair,
)
from tests.support.models import make_model_files


def test_sign_then_verify(tmp_path: Path) -> None:
    pair = generate_keypair()
    key = load_private_key(pair.private_pem)
    files = make_model_files(tmp_path, "v1", private_key=key)
    assert files.signed is not None
    assert files.signed.key_id == pair.key_id == key_id(pair.public_b64)
    assert verify_manifest(files.signed, pair.public_b64) == files.manifest
    verify_file_sha256(files.onnx_path, files.manifest.onnx_sha256, files.manifest.onnx_size)


def test_tampered_manifest_or_wrong_key_is_refused(tmp_path: Path) -> None:
    pair, other = generate_keypair(), generate_keypair()
    files = make_model_files(tmp_path, "v1", private_key=load_private_key(pair.private_pem))
    assert files.signed is not None
    with pytest.raises(IntegrityError, match="does not verify"):
        verify_manifest(files.signed, other.public_b64)
    tampered = dataclasses.replace(
        files.signed, manifest=dataclasses.replace(files.manifest, class_names=["x", "y", "z"])
    )
    with pytest.raises(IntegrityError, match="does not verify"):
        verify_manifest(tampered, pair.public_b64)


def test_file_hash_mismatch_is_refused(tmp_path: Path) -> None:
    files = make_model_files(tmp_path, "v1")
    data = bytearray(files.onnx_path.read_bytes())
    data[-1] ^= 0xFF
    files.onnx_path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="sha256"):
        verify_file_sha256(files.onnx_path, files.manifest.onnx_sha256)
    with pytest.raises(IntegrityError, match="size"):
        verify_file_sha256(files.onnx_path, files.manifest.onnx_sha256, files.manifest.onnx_size + 1)


def test_keys_from_file_env_and_refusals(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pair = generate_keypair()
    priv, pub = write_keypair(pair, tmp_path)
    assert priv.stat().st_mode & 0o777 == 0o600
    assert pub.read_text().strip() == pair.public_b64
    with pytest.raises(InvalidInput, match="refusing to overwrite"):
        write_keypair(generate_keypair(), tmp_path)
    with pytest.raises(InvalidInput, match=f"{pub} is a file; expected a folder"):
        write_keypair(generate_keypair(), pub)
    # a pair that cannot be written whole leaves neither half: a full disk as the public half is written
    real_fdopen, calls = os.fdopen, []

    def full_on_second(fd: int, mode: str = "r") -> Any:
        calls.append(mode)
        if len(calls) == 2:
            os.close(fd)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fdopen(fd, mode)

    monkeypatch.setattr(os, "fdopen", full_on_second)
    (tmp_path / "full").mkdir()
    with pytest.raises(InvalidInput, match="cannot write signing.key and signing.pub into .*No space left"):
        write_keypair(generate_keypair(), tmp_path / "full")
    assert list((tmp_path / "full").iterdir()) == []  # the folder was there before: it stays, empty
    calls.clear()  # folders the call made for the pair go too, and nothing above them
    with pytest.raises(InvalidInput, match="No space left"):
        write_keypair(generate_keypair(), tmp_path / "new" / "keys")
    monkeypatch.setattr(os, "fdopen", real_fdopen)
    assert not (tmp_path / "new").exists() and tmp_path.is_dir()
    monkeypatch.setenv(PRIVATE_KEY_ENV, str(priv))
    m = make_model_files(tmp_path / "m", "v1").manifest
    assert verify_manifest(sign_manifest(m, load_private_key()), pair.public_b64) == m
    monkeypatch.delenv(PRIVATE_KEY_ENV)
    with pytest.raises(InvalidInput, match="not set"):
        load_private_key()
    with pytest.raises(InvalidInput, match="does not exist"):
        load_private_key(tmp_path / "missing.key")
    with pytest.raises(InvalidInput, match=f"signing key file {tmp_path} is a folder; expected .*signing.key"):
        load_private_key(tmp_path)
    with pytest.raises(InvalidInput, match="not a PEM private key"):
        load_private_key(b"-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n")
    with pytest.raises(InvalidInput, match="32 raw bytes"):
        key_id("c2hvcnQ=")


# ---------------------------------------------------------------------------------------------
# key rotation (fleet.signing.KeyRing)
# ---------------------------------------------------------------------------------------------


def _signed(version: str, private: object) -> SignedManifest:
    spec = InputSpec(height=8, width=8, channels=1, mean=[0.0], std=[1.0])
    manifest = ModelManifest(version=version, onnx_sha256="0" * 64, onnx_size=1, input=spec, class_names=["a", "b"],
                             embedding_dim=4, created_at=0.0)
    return sign_manifest(manifest, private)  # type: ignore[arg-type]


def test_a_rotation_trusts_the_new_key_and_the_old_one_only_through_the_overlap() -> None:
    old, new = generate_keypair(), generate_keypair()
    old_key, new_key = load_private_key(old.private_pem), load_private_key(new.private_pem)
    rotation = sign_rotation(old_key, new.public_b64, old_key_until=1_000.0, issued_at=100.0)
    ring = KeyRing(old.public_b64)
    with pytest.raises(IntegrityError, match="not a trusted fleet key"):
        ring.verify(_signed("by-new", new_key), now=200.0)
    assert ring.accept(rotation) and not ring.accept(rotation)  # the second time: already followed
    assert ring.verify(_signed("by-old", old_key), now=1_000.0).version == "by-old"  # the overlap's last second
    assert ring.verify(_signed("by-new", new_key), now=200.0).version == "by-new"
    with pytest.raises(IntegrityError, match="rotated out"):
        ring.verify(_signed("by-old", old_key), now=1_000.5)
    assert ring.verify(_signed("by-new", new_key), now=10_000.0).version == "by-new"


def test_a_rotation_signed_by_an_untrusted_key_or_tampered_with_is_refused() -> None:
    old, new, stranger = generate_keypair(), generate_keypair(), generate_keypair()
    ring = KeyRing(old.public_b64)
    forged = sign_rotation(load_private_key(stranger.private_pem), new.public_b64, old_key_until=5.0, issued_at=1.0)
    with pytest.raises(IntegrityError, match="not trusted here"):
        ring.accept(forged)
    good = sign_rotation(load_private_key(old.private_pem), new.public_b64, old_key_until=5.0, issued_at=1.0)
    stretched = dataclasses.replace(good, old_key_until=5e9)  # a longer overlap than the old key signed
    with pytest.raises(IntegrityError, match="does not verify"):
        ring.accept(stretched)
    assert [k.key_id for k in ring.keys] == [old.key_id]
    with pytest.raises(InvalidInput, match="new key is the old key"):
        sign_rotation(load_private_key(old.private_pem), old.public_b64, old_key_until=5.0, issued_at=1.0)
    with pytest.raises(ProtocolError, match="before issued_at"):
        sign_rotation(load_private_key(old.private_pem), new.public_b64, old_key_until=0.5, issued_at=1.0)


def test_rotations_chain_and_a_ring_follows_them_in_order() -> None:
    k1, k2, k3 = generate_keypair(), generate_keypair(), generate_keypair()
    r12 = sign_rotation(load_private_key(k1.private_pem), k2.public_b64, old_key_until=10.0, issued_at=1.0)
    r23 = sign_rotation(load_private_key(k2.private_pem), k3.public_b64, old_key_until=20.0, issued_at=11.0)
    ring = KeyRing.following(k1.public_b64, [r12, r23])
    assert [(k.key_id, k.until) for k in ring.keys] == [(k1.key_id, 10.0), (k2.key_id, 20.0), (k3.key_id, None)]
    assert [k.key_id for k in KeyRing.following(k1.public_b64, [r23]).keys] == [k1.key_id]  # r23 needs k2 first
