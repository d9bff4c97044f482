"""A node's swarm identity survives restarts, is private to its owner, and is never silently replaced."""

from __future__ import annotations

import hashlib
import stat

import pytest
from cryptography.hazmat.primitives import serialization
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.p2p import PeerID

from rollover.swarm.identity import SwarmError, load_or_create_identity


def _public_numbers(identity):
    return identity.private_key.get_public_key()._public_key.public_numbers()


def test_identity_persists_across_loads(tmp_path):
    first = load_or_create_identity(tmp_path / "run")
    p2p_bytes = (tmp_path / "run" / "swarm_p2p.key").read_bytes()
    second = load_or_create_identity(tmp_path / "run")

    assert _public_numbers(first) == _public_numbers(second)
    assert second.public_key_marker == first.public_key_marker
    assert second.public_key_marker == RSASignatureValidator(first.private_key).local_public_key
    assert second.public_key_marker.startswith(b"[owner:ssh-rsa ")
    assert (tmp_path / "run" / "swarm_p2p.key").read_bytes() == p2p_bytes
    assert second.p2p_identity_path == tmp_path / "run" / "swarm_p2p.key"
    numbers = _public_numbers(first)  # the id is the key's (modulus, exponent), not its text
    assert second.sender_id == hashlib.sha256(f"rsa:{numbers.n:x}:{numbers.e:x}".encode()).hexdigest()[:16]
    # the reloaded key signs what the first one verifies
    signature = second.private_key.sign(b"round 7")
    assert first.private_key.get_public_key().verify(b"round 7", signature)
    # the libp2p key is hivemind's own format: it yields a peer id
    assert PeerID.from_identity(p2p_bytes).to_base58().startswith("Qm")


def test_key_files_are_owner_only_pem(tmp_path):
    load_or_create_identity(tmp_path)
    for name in ("swarm_key.pem", "swarm_p2p.key"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600, name
    pem = (tmp_path / "swarm_key.pem").read_bytes()
    assert pem.startswith(b"-----BEGIN PRIVATE KEY-----")
    assert serialization.load_pem_private_key(pem, password=None).key_size == 2048
    assert sorted(p.name for p in tmp_path.iterdir()) == ["swarm_key.pem", "swarm_p2p.key"]  # no temp files


def test_two_folders_are_two_identities(tmp_path):
    one = load_or_create_identity(tmp_path / "a")
    two = load_or_create_identity(tmp_path / "b")
    assert one.public_key_marker != two.public_key_marker
    assert (tmp_path / "a" / "swarm_p2p.key").read_bytes() != (tmp_path / "b" / "swarm_p2p.key").read_bytes()


@pytest.mark.parametrize("name, garbage", [
    ("swarm_key.pem", b"-----BEGIN PRIVATE KEY-----\nnot base64 at all\n-----END PRIVATE KEY-----\n"),
    ("swarm_key.pem", b""),
    ("swarm_p2p.key", b"\x08\x00\x12\x05hello"),
])
def test_corrupt_key_file_is_an_error_not_a_new_identity(tmp_path, name, garbage):
    load_or_create_identity(tmp_path)
    (tmp_path / name).chmod(0o600)
    (tmp_path / name).write_bytes(garbage)

    with pytest.raises(SwarmError) as error:
        load_or_create_identity(tmp_path)

    message = str(error.value)
    assert "\n" not in message and name in message
    assert (tmp_path / name).read_bytes() == garbage  # left for the user to inspect, not replaced


def test_non_rsa_key_is_refused(tmp_path):
    from cryptography.hazmat.primitives.asymmetric import ec

    ec_pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    (tmp_path / "swarm_key.pem").write_bytes(ec_pem)
    with pytest.raises(SwarmError, match="RSA"):
        load_or_create_identity(tmp_path)
