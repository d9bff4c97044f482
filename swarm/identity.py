"""A swarm node's identity, kept in its run folder so a restart is the same peer.

Two keys: the RSA key that signs our DHT records (peers know us by its public key) and the libp2p
key that fixes our peer id. Both are written atomically with mode 0600. A key file that exists
but cannot be read is an error, never a reason to start as a new identity.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.p2p import P2P, PeerID
from hivemind.utils.crypto import RSAPrivateKey

from rollover.swarm.records import SwarmError  # noqa: F401  (raised here; importable without hivemind)

KEY_FILENAME = "swarm_key.pem"
P2P_FILENAME = "swarm_p2p.key"
_KEY_BITS = (2048, 4096)  # what we accept from disk; hivemind itself generates 2048-bit keys
PEER_KEY_BITS = (2048, 4096)  # the modulus sizes accepted from peers, inclusive
PEER_KEY_EXPONENTS = (65537,)  # what every RSA library generates; a huge one makes each check slow
_MARKER_RE = re.compile(rb"\[owner:(.+?)\]")


class BadKey(ValueError):
    """A peer's owner marker that is not an acceptable RSA public key (one line)."""


@dataclass(frozen=True)
class Identity:
    """Our signing key, our libp2p key file (None: a fresh peer id per start) and our owner marker."""

    private_key: RSAPrivateKey
    p2p_identity_path: Path | None
    public_key_marker: bytes  # b"[owner:ssh-rsa ...]", what RSASignatureValidator looks for in subkeys

    @property
    def sender_id(self) -> str:
        """The short id peers see for us."""
        return sender_id(self.public_key_marker)


def sender_id(public_key_marker: bytes) -> str:
    """A short stable id for an owner marker (sha256 hex, 16 digits), for logs and credit.

    Derived from the key itself (modulus and exponent), not from its text: one key written
    with another comment or encoding is the same sender. Raises BadKey for a marker that is not
    an RSA key of PEER_KEY_BITS with a standard exponent.
    """
    modulus, exponent = public_key_numbers(public_key_marker)
    return hashlib.sha256(f"rsa:{modulus:x}:{exponent:x}".encode("ascii")).hexdigest()[:16]


def check_public_key(public_key_marker: bytes) -> None:
    """Raise BadKey unless the marker holds an acceptable key: call it before verifying a
    signature with that key (an exponent of thousands of bits makes each check ~300x dearer)."""
    public_key_numbers(public_key_marker)


@lru_cache(maxsize=8192)
def public_key_numbers(public_key_marker: bytes) -> tuple[int, int]:
    """(modulus, exponent) of an owner marker "[owner:ssh-rsa ...]" (or the bare key), checked."""
    if not isinstance(public_key_marker, bytes) or len(public_key_marker) > 4096:
        raise BadKey("owner marker is not bytes of a sane size")
    match = _MARKER_RE.fullmatch(public_key_marker)
    text = match.group(1) if match else public_key_marker
    try:
        key = serialization.load_ssh_public_key(text)
    except Exception as exc:  # cryptography raises ValueError, UnsupportedAlgorithm, ...
        raise BadKey(f"owner key does not parse ({type(exc).__name__})") from None
    if not isinstance(key, rsa.RSAPublicKey):
        raise BadKey("owner key is not RSA")
    numbers = key.public_numbers()
    bits = numbers.n.bit_length()
    if not PEER_KEY_BITS[0] <= bits <= PEER_KEY_BITS[1]:
        raise BadKey(f"owner key has {bits} bits, accepted {PEER_KEY_BITS[0]}..{PEER_KEY_BITS[1]}")
    if numbers.e not in PEER_KEY_EXPONENTS:
        raise BadKey(f"owner key exponent is not one of {PEER_KEY_EXPONENTS}")
    return numbers.n, numbers.e


def identity_from_key(private_key: RSAPrivateKey, p2p_identity_path: Path | None = None) -> Identity:
    """Wrap a signing key (and optionally a libp2p key file) as an Identity."""
    marker = RSASignatureValidator(private_key).local_public_key
    return Identity(private_key=private_key, p2p_identity_path=p2p_identity_path, public_key_marker=marker)


def load_or_create_identity(folder: Path) -> Identity:
    """Load the identity kept in `folder`, creating whichever key file is missing."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SwarmError(f"cannot create identity folder {folder}: {e.strerror or e}") from None
    key_path = folder / KEY_FILENAME
    if key_path.exists():
        private_key = _read_signing_key(key_path)
    else:
        private_key = RSAPrivateKey()
        _write_private(key_path, _to_pem(private_key))
    p2p_path = folder / P2P_FILENAME
    if p2p_path.exists():
        _check_p2p_key(p2p_path)
    else:
        _create_p2p_key(p2p_path)
    return identity_from_key(private_key, p2p_path)


def p2p_peer_id(p2p_identity_path: Path) -> str:
    """The libp2p peer id (base58) that a key file gives, as hivemind computes it."""
    return PeerID.from_identity(Path(p2p_identity_path).read_bytes()).to_base58()


def _to_pem(private_key: RSAPrivateKey) -> bytes:
    der_key = serialization.load_der_private_key(private_key.to_bytes(), password=None)
    return der_key.private_bytes(
        encoding=serialization.Encoding.PEM,
        format=serialization.PrivateFormat.PKCS8,
        encryption_algorithm=serialization.NoEncryption(),
    )


def _read_signing_key(path: Path) -> RSAPrivateKey:
    try:
        loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except OSError as e:
        raise SwarmError(f"cannot read swarm key {path}: {e.strerror or e}") from None
    except (ValueError, TypeError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise SwarmError(f"swarm key {path} is not an unencrypted PEM private key ({reason})") from None
    if not isinstance(loaded, rsa.RSAPrivateKey) or loaded.key_size not in _KEY_BITS:
        raise SwarmError(f"swarm key {path} is not a 2048- or 4096-bit RSA key")
    # hivemind's RSAPrivateKey() always generates a fresh key; wrap the loaded one instead
    # (RSAPrivateKey keeps the cryptography key in `_private_key`, see hivemind/utils/crypto.py).
    key = RSAPrivateKey.__new__(RSAPrivateKey)
    key._private_key = loaded
    return key


def _check_p2p_key(path: Path) -> None:
    try:
        p2p_peer_id(path)
    except OSError as e:
        raise SwarmError(f"cannot read libp2p key {path}: {e.strerror or e}") from None
    except Exception as e:  # protobuf DecodeError, cryptography ValueError, ...
        raise SwarmError(f"libp2p key {path} is corrupt ({type(e).__name__})") from None


def _create_p2p_key(path: Path) -> None:
    """Generate with hivemind's own helper (its file format) into a temp file, then rename."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        P2P.generate_identity(str(tmp))  # writes the file with mode 0400
        os.chmod(tmp, 0o600)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise SwarmError(f"cannot write libp2p key {path}: {e.strerror or e}") from None


def _write_private(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically (temp file + rename), readable by the owner only."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o600)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise SwarmError(f"cannot write swarm key {path}: {e.strerror or e}") from None
