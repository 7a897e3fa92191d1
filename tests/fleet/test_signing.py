"""Ed25519 manifest signatures: a signed manifest verifies; any change or wrong key does not."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from fleet.errors import IntegrityError, InvalidInput
from fleet.signing import (
    PRIVATE_KEY_ENV,
    generate_keypair,
    key_id,
    load_private_key,
    sign_manifest,
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
    monkeypatch.setenv(PRIVATE_KEY_ENV, str(priv))
    m = make_model_files(tmp_path / "m", "v1").manifest
    assert verify_manifest(sign_manifest(m, load_private_key()), pair.public_b64) == m
    monkeypatch.delenv(PRIVATE_KEY_ENV)
    with pytest.raises(InvalidInput, match="not set"):
        load_private_key()
    with pytest.raises(InvalidInput, match="does not exist"):
        load_private_key(tmp_path / "missing.key")
    with pytest.raises(InvalidInput, match="not a PEM private key"):
        load_private_key(b"-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n")
    with pytest.raises(InvalidInput, match="32 raw bytes"):
        key_id("c2hvcnQ=")
