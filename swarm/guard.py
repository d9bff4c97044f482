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

The round window needs the swarm's round length (keys name rounds, and hivemind hands a validator
only the key's hash, so the guard lists the keys it accepts). A node that trains knows it; a
bootstrap node may not. Told none, the guard serves every whole-second round length up to
MAX_ROUND_SECONDS at once: the windows of different lengths name different rounds now (at
today's clock, lengths L and L + 1 are now / (L (L + 1)) > 100 rounds apart, far more than a
window), so the namespace and round-window checks and the expiration bound (the key's own
length) all still hold, at the price of ~100k listed keys (~0.4 s once, ~16 MB) and a few key
hashes per second. Putting the length into the key namespace instead would not help: the guard
still could not list keys of a length it does not know; bounds absolute in time alone would let
a bootstrap node store any key at all.
"""

from __future__ import annotations

import hashlib
import heapq

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
MAX_ROUND_SECONDS = 3600  # swarm.round_seconds' upper bound (trainer/config.py)

VERDICTS_KEPT = 131_072  # records whose verdict is remembered (~10 MB): a flood is checked once

GUARD_REASONS = ("oversized", "malformed", "missing_signature", "bad_key", "foreign_key",
                 "index_out_of_range", "far_expiration")
_KEY_CACHE_SIZE = 4096


class VerdictCache:
    """Verdicts on records already checked, by a digest of (key, subkey, value, expiration).

    hivemind validates every entry a peer returns to every read: under a flood of keys that is
    tens of thousands of records per poll, each read every few seconds. A record is the same
    bytes every time, so it is checked once; the oldest verdicts are forgotten past `size`.
    """

    def __init__(self, size: int = VERDICTS_KEPT):
        self.size = size
        self._verdicts: dict[bytes, bool] = {}

    @staticmethod
    def digest(record: DHTRecord) -> bytes:
        h = hashlib.sha256()
        for part in (record.key, record.subkey, record.value):
            h.update(len(part).to_bytes(8, "big"))
            h.update(part)
        h.update(repr(float(record.expiration_time)).encode())
        return h.digest()

    def get(self, digest: bytes) -> bool | None:
        return self._verdicts.get(digest)

    def put(self, digest: bytes, verdict: bool) -> None:
        if len(self._verdicts) >= self.size:
            del self._verdicts[next(iter(self._verdicts))]
        self._verdicts[digest] = verdict


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

    def __init__(self, namespace: str, shards: int, round_seconds: float | None, rejections: dict[str, int],
                 rounds_ahead: int = ROUNDS_AHEAD):
        self.namespace, self.shards, self.round_seconds = namespace, shards, round_seconds
        self.rounds_ahead = rounds_ahead
        self.rejections = rejections
        # None: any whole-second round length (see the module docstring); otherwise the swarm's.
        self._lengths = [float(round_seconds)] if round_seconds is not None else \
            [float(length) for length in range(1, MAX_ROUND_SECONDS + 1)]
        self._keys: dict[bytes, tuple[int, int | None, float]] = {}  # DHTID bytes -> (round, shard, length)
        self._windows: dict[float, int] = {}  # round length -> the round its keys were listed for
        self._due: list[tuple[float, float]] = []  # heap of (when a length's round ends, length)
        self._passed = VerdictCache()

    @property
    def priority(self) -> int:
        return 20  # above RSASignatureValidator's 10: validated first

    def validate(self, record: DHTRecord) -> bool:
        try:
            digest = VerdictCache.digest(record)
            if self._passed.get(digest):
                return True  # checked before; while it lives it stays in the window (ROUNDS_BACK)
            ok = self._validate(record)
            if ok:  # a refusal is not kept: a key a little ahead of our clock passes later
                self._passed.put(digest, True)
            return ok
        except Exception:  # nothing a peer sends may raise in the DHT process
            return _reject(self.rejections, "malformed")

    def _validate(self, record: DHTRecord) -> bool:
        place = self._known_keys().get(record.key)
        if place is None:
            return _reject(self.rejections, "foreign_key")
        round, shard, length = place
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
        if not record.expiration_time <= (round + ROUND_LIFETIME) * length:  # NaN too
            return _reject(self.rejections, "far_expiration")
        return True

    def _known_keys(self) -> dict[bytes, tuple[int, int | None, float]]:
        """The keys of the rounds near now, for each round length this guard serves; a length's
        keys are listed again only when its round changes (a heap says when)."""
        now = get_dht_time()
        if not self._windows:
            for length in self._lengths:
                self._move(length, now)
        while self._due and self._due[0][0] <= now:
            _, length = heapq.heappop(self._due)
            self._move(length, now)
        return self._keys

    def _move(self, length: float, now: float) -> None:
        current = int(now // length)
        before = self._windows.get(length)
        wanted = set(range(max(0, current - ROUNDS_BACK), current + self.rounds_ahead + 1))
        had = set(range(max(0, before - ROUNDS_BACK), before + self.rounds_ahead + 1)) if before is not None else set()
        for round in had - wanted:
            for key in self._round_keys(round):
                if self._keys.get(key, (None, None, length))[2] == length:
                    self._keys.pop(key, None)
        for round in wanted - had:
            for shard, key in zip([*range(self.shards), None], self._round_keys(round)):
                self._keys[key] = (round, shard, length)
        self._windows[length] = current
        heapq.heappush(self._due, ((current + 1) * length, length))

    def _round_keys(self, round: int) -> list[bytes]:
        """A round's payload keys (shard order), then its status key."""
        return [*(_key_id(payload_key(self.namespace, round, shard)) for shard in range(self.shards)),
                _key_id(status_key(self.namespace, round))]


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
        self._verdicts = VerdictCache()

    def validate(self, record: DHTRecord) -> bool:
        """hivemind's check, once per record (a signature's verdict never changes)."""
        try:
            digest = VerdictCache.digest(record)
        except Exception:
            return _reject(self.rejections, "bad_signature")
        ok = self._verdicts.get(digest)
        if ok is None:
            try:
                ok = bool(super().validate(record))
            except Exception:  # e.g. "[owner:garbage]": hivemind's key parser raises
                ok = False
            self._verdicts.put(digest, ok)
        return True if ok else _reject(self.rejections, "bad_signature")
