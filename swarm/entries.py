"""What a swarm round's DHT entries look like, and how a peer's entry is read without trusting it.

Layout: payload i of a round lives under key f"{namespace}/r{round}/s{shard}", subkey
owner_marker + b"/i", shard = (hash(owner_marker) + i) % shards; a node's status for a round
lives under f"{namespace}/status/r{round}", subkey owner_marker. Values are bytes. The parsers
here never raise on what a peer stored: they return the entry, or the reason it is skipped.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from typing import NamedTuple

from hivemind.dht.crypto import RSASignatureValidator

from rollover.swarm.identity import sender_id

SIGNATURE_RE = re.compile(re.escape(RSASignatureValidator.SIGNATURE_FORMAT).replace(b"_value_", rb"(.+?)"))
# An index has one spelling ("/01" would be a second subkey for slot 1).
_PAYLOAD_SUBKEY_RE = re.compile(rb"(\[owner:[^\]]+\])/(0|[1-9][0-9]{0,5})")
_STATUS_SUBKEY_RE = re.compile(rb"\[owner:[^\]]+\]")
_OWNER_TAG = b"[owner:"


def payload_key(namespace: str, round: int, shard: int) -> str:
    """The DHT key of one shard of a round's payloads."""
    return f"{namespace}/r{round}/s{shard}"


def status_key(namespace: str, round: int) -> str:
    """The DHT key holding nodes' statuses for a round."""
    return f"{namespace}/status/r{round}"


def split_payload_subkey(subkey: bytes) -> tuple[bytes, int] | None:
    """(owner marker, index) of a payload subkey in its one canonical spelling, else None."""
    match = _PAYLOAD_SUBKEY_RE.fullmatch(subkey)
    return (match.group(1), int(match.group(2))) if match else None


def is_status_subkey(subkey: bytes) -> bool:
    """Whether `subkey` is exactly one owner marker (a status entry's subkey)."""
    return _STATUS_SUBKEY_RE.fullmatch(subkey) is not None


class Received(NamedTuple):
    """One payload a peer published for a round; `sender_key` is its verified owner marker,
    `expiration` the DHT time its signed entry expires."""

    sender: str
    sender_key: bytes
    index: int
    raw: bytes
    round: int
    expiration: float = math.inf


def shard_of(public_key_marker: bytes, index: int, shards: int) -> int:
    """The shard of a sender's payload `index`: spreads each sender's payloads over all shards."""
    return (int.from_bytes(hashlib.sha256(public_key_marker).digest()[:8], "big") + index) % shards


def parse_payload(subkey: object, raw: object, *, round: int, shard: int, shards: int,
                  max_record_bytes: int, expiration: float = math.inf) -> Received | str:
    """One shard-dictionary entry as a Received, or the reason it is skipped."""
    if not isinstance(subkey, bytes):
        return "malformed"
    if _OWNER_TAG not in subkey:
        return "missing_signature"
    split = split_payload_subkey(subkey)
    if split is None:
        return "malformed"
    marker, index = split
    if shard_of(marker, index, shards) != shard or not isinstance(raw, bytes):
        return "malformed"
    if len(raw) > max_record_bytes:
        return "oversized"
    return Received(sender=sender_id(marker), sender_key=marker, index=index, raw=raw, round=round,
                    expiration=expiration if isinstance(expiration, float) else math.inf)


def parse_status(subkey: object, raw: object, *, max_record_bytes: int) -> tuple[str, dict] | str:
    """One status entry as (sender, status dict), or the reason it is skipped."""
    if not isinstance(subkey, bytes):
        return "malformed"
    if _OWNER_TAG not in subkey:
        return "missing_signature"
    if not is_status_subkey(subkey) or not isinstance(raw, bytes):
        return "malformed"
    if len(raw) > max_record_bytes:
        return "oversized"
    try:
        status = json.loads(raw)
    except (ValueError, RecursionError):
        return "malformed"
    if not isinstance(status, dict):
        return "malformed"
    return sender_id(subkey), status


def entries(found: object) -> list[tuple[object, object]]:
    """(subkey, value) pairs of a get() result that is a subkey dictionary; [] for anything else."""
    return [(subkey, raw) for subkey, raw, _ in timed_entries(found)]


def timed_entries(found: object) -> list[tuple[object, object, float]]:
    """(subkey, value, expiration) triples of a get() result that is a subkey dictionary."""
    value = getattr(found, "value", None)
    if not isinstance(value, dict):
        return []
    return [(subkey, getattr(item, "value", None), getattr(item, "expiration_time", math.inf))
            for subkey, item in value.items()]
