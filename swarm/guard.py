"""What a swarm node's DHT process agrees to store or read: the validators hivemind runs.

hivemind calls a validator on every record another peer asks us to store and on every record a
peer returns to our reads; one refused subkey makes a reader drop that replica's whole
dictionary. So the rules here are the same on every node (swarm-wide constants, never a node's
own settings) and never grow stricter for a record that is still alive: what one honest node
stores, every honest node reads.

The guard bounds what one owner key can make the swarm hold: keys only in the swarm's namespace
and near the current round, a canonical owner marker on every subkey (an unsigned subkey is
refused), payload indices below MAX_GROUPS_PER_ROUND, one status per owner per round, values
under one size cap, expirations within a few rounds of the key's round, and only standard RSA
keys (a huge public exponent makes each signature check hundreds of times dearer).
"""

from __future__ import annotations

from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.utils import MSGPackSerializer, get_dht_time
from hivemind.utils.crypto import RSAPrivateKey, RSAPublicKey

from rollover.swarm.entries import SIGNATURE_RE, is_status_subkey, payload_key, shard_of, split_payload_subkey, \
    status_key
from rollover.swarm.identity import check_public_key

# Swarm-wide limits: equal on every node, whatever its recipe says (see the module docstring).
MAX_VALUE_BYTES = 16384  # one payload: the largest swarm.max_record_bytes a recipe may set
MAX_STATUS_BYTES = 4096  # one status record: every owner's status shares one key
MAX_GROUPS_PER_ROUND = 256  # payload indices 0..255: the largest swarm.max_groups_per_peer
SIGNED_OVERHEAD = 1024  # msgpack header + "[signature:...]" of up to a 4096-bit key, on the wire
MAX_SUBKEY_BYTES = 2048  # an owner marker of a 4096-bit key plus "/index" fits easily
ROUNDS_AHEAD = 1  # a key may name the next round (a peer's clock a little ahead), no later
ROUNDS_BACK = 4  # older keys hold nothing alive (ROUND_LIFETIME) and are not read
ROUND_LIFETIME = 3  # a record of round r expires by the end of round r + 2 (+ one round of slack)

GUARD_REASONS = ("oversized", "malformed", "missing_signature", "bad_key", "foreign_key",
                 "index_out_of_range", "far_expiration")
_KEY_CACHE_SIZE = 4096


def _reject(rejections: dict[str, int], reason: str) -> bool:
    rejections[reason] = rejections.get(reason, 0) + 1
    return False


_owner_keys: dict[bytes, bool] = {}


def owner_key_ok(marker: bytes) -> bool:
    """Whether b"[owner:<key>]" holds an acceptable RSA key (identity.check_public_key) in the one
    spelling hivemind writes (no comment, no other text): one key is one owner marker."""
    known = _owner_keys.get(marker)
    if known is None:
        known = _check_owner_key(marker)
        if len(_owner_keys) >= _KEY_CACHE_SIZE:
            _owner_keys.clear()
        _owner_keys[marker] = known
    return known


def _check_owner_key(marker: bytes) -> bool:
    try:
        check_public_key(marker)  # a standard exponent and a sane size (identity.py)
        text = marker[len(b"[owner:"):-1]
        return RSAPublicKey.from_bytes(text).to_bytes() == text
    except Exception:
        return False


class GuardValidator(RecordValidatorBase):
    """Refuses every record no honest swarm node writes (reasons in GUARD_REASONS).

    It runs first (priority above RSASignatureValidator's), on the wire value with its signature,
    so nothing it refuses costs a signature check. hivemind hands validators the key's DHTID, not
    its text, so the keys of the rounds near now are hashed here (once per round).
    """

    def __init__(self, namespace: str, shards: int, round_seconds: float, rejections: dict[str, int],
                 rounds_ahead: int = ROUNDS_AHEAD):
        self.namespace, self.shards, self.round_seconds = namespace, shards, round_seconds
        self.rounds_ahead = rounds_ahead
        self.rejections = rejections
        self._window_round: int | None = None
        self._keys: dict[bytes, tuple[int, int | None]] = {}  # DHTID bytes -> (round, shard or None)

    @property
    def priority(self) -> int:
        return 20  # above RSASignatureValidator's 10: validated first

    def validate(self, record: DHTRecord) -> bool:
        try:
            return self._validate(record)
        except Exception:  # nothing a peer sends may raise in the DHT process
            return _reject(self.rejections, "malformed")

    def _validate(self, record: DHTRecord) -> bool:
        place = self._known_keys().get(record.key)
        if place is None:
            return _reject(self.rejections, "foreign_key")
        round, shard = place
        cap = MAX_STATUS_BYTES if shard is None else MAX_VALUE_BYTES
        if len(record.value) > cap + SIGNED_OVERHEAD or len(record.subkey) > MAX_SUBKEY_BYTES:
            return _reject(self.rejections, "oversized")
        try:  # what hivemind will decode once the signature is stripped
            subkey = MSGPackSerializer.loads(record.subkey)
            value = MSGPackSerializer.loads(SIGNATURE_RE.sub(b"", record.value))
        except Exception:
            return _reject(self.rejections, "malformed")
        if not isinstance(subkey, bytes) or not isinstance(value, bytes):
            return _reject(self.rejections, "malformed")  # a plain value would replace a whole shard
        if len(value) > cap:
            return _reject(self.rejections, "oversized")
        if b"[owner:" not in subkey:
            return _reject(self.rejections, "missing_signature")
        if shard is None:
            if not is_status_subkey(subkey):
                return _reject(self.rejections, "malformed")
            marker = subkey
        else:
            split = split_payload_subkey(subkey)
            if split is None:
                return _reject(self.rejections, "malformed")
            marker, index = split
            if index >= MAX_GROUPS_PER_ROUND:
                return _reject(self.rejections, "index_out_of_range")
            if shard_of(marker, index, self.shards) != shard:
                return _reject(self.rejections, "malformed")
        if not owner_key_ok(marker):
            return _reject(self.rejections, "bad_key")
        if not record.expiration_time <= (round + ROUND_LIFETIME) * self.round_seconds:  # NaN too
            return _reject(self.rejections, "far_expiration")
        return True

    def _known_keys(self) -> dict[bytes, tuple[int, int | None]]:
        now = int(get_dht_time() // self.round_seconds)
        if now != self._window_round:
            keys: dict[bytes, tuple[int, int | None]] = {}
            for round in range(max(0, now - ROUNDS_BACK), now + self.rounds_ahead + 1):
                for shard in range(self.shards):
                    keys[_key_id(payload_key(self.namespace, round, shard))] = (round, shard)
                keys[_key_id(status_key(self.namespace, round))] = (round, None)
            self._keys, self._window_round = keys, now
        return self._keys


def _key_id(key: str) -> bytes:
    """The bytes hivemind passes validators as a record's key (DHT.store hashes the key text)."""
    return DHTID.generate(source=key).to_bytes()


class CountingSignatureValidator(RSASignatureValidator):
    """hivemind's owner-signature check, counting refusals; a garbled owner key is a refusal too.

    RSASignatureValidator.merge_with absorbs any later RSASignatureValidator, so as the first one
    given to the DHT this instance stays the one that validates (and counts).
    """

    def __init__(self, private_key: RSAPrivateKey, rejections: dict[str, int]):
        super().__init__(private_key)
        self.rejections = rejections

    def validate(self, record: DHTRecord) -> bool:
        try:
            ok = super().validate(record)
        except Exception:  # e.g. "[owner:garbage]": hivemind's key parser raises
            ok = False
        return True if ok else _reject(self.rejections, "bad_signature")
