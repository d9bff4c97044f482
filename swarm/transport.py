"""The swarm's DHT transport: signed, size-capped, sharded round records over hivemind.

Every peer may be malicious. Inside the DHT process a guard refuses records no swarm node writes
(guard.py: foreign keys, unsigned or non-canonical subkeys, oversized values, far expirations)
and a signature validator lets only a subkey's owner write it; both count what they refuse. On
our side every record is parsed defensively: nothing a peer stores can raise here, it is skipped
and counted. The key layout and the parsers are in entries.py.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections import Counter
from collections.abc import Iterable
from functools import partial
from typing import Any, Callable

from hivemind import DHT
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey
from hivemind.utils.mpfuture import MPFuture

from rollover.swarm.entries import SIGNATURE_RE, Received, entries, parse_status, payload_key, shard_of, \
    status_key, timed_entries
from rollover.swarm.guard import GUARD_REASONS, MAX_GROUPS_PER_ROUND, MAX_STATUS_BYTES, MAX_VALUE_BYTES, \
    ROUNDS_AHEAD, CountingSignatureValidator, GuardValidator
from rollover.swarm.identity import Identity, SwarmError, identity_from_key
from rollover.swarm.payload_cache import PayloadCache, read_new_in_dht

REJECTION_REASONS = (*GUARD_REASONS, "bad_signature")


# --- the DHT process -----------------------------------------------------------------------------


class _SwarmDHT(DHT):
    """hivemind's DHT holding the counters its validators share; the child sees its own copy."""

    def __init__(self, *, rejections: dict[str, int], **kwargs: Any):
        super().__init__(start=False, **kwargs)
        self.rejections = rejections


async def _read_rejections(dht: _SwarmDHT, node: Any) -> dict[str, int]:
    return dict(dht.rejections)


async def _visible_maddrs(dht: DHT, node: Any) -> list[str]:
    return [str(maddr) for maddr in await node.get_visible_maddrs()]


async def _peer_id(dht: DHT, node: Any) -> str:
    return node.peer_id.to_base58()


async def _block_command_pipe(dht: DHT, node: Any) -> None:
    os.set_blocking(dht._inner_pipe.fileno(), True)


def harden_dht_pipe(dht: DHT) -> None:
    """Make a started DHT survive large requests (call before sending any value over ~16 KiB).

    The DHT process reads requests from a pipe that uvloop has made non-blocking; a request that
    arrives in two writes (anything over 16 KiB) can be read half-way, raising BlockingIOError and
    wrecking the stream (docs/STACK_NOTES.md, "hivemind": large values crash the DHT). The loop only reads
    once poll() says data is there, so a blocking read just waits for the rest of the message.
    """
    dht.run_coroutine(_block_command_pipe)


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


# --- the transport ------------------------------------------------------------------------------


class SwarmTransport:
    """A swarm node's DHT: publish and collect a round's payloads, publish and read statuses.

    Blocking calls have timeouts and may run in worker threads (requests go down one pipe, under
    a lock). Peer data never raises: bad records are skipped and counted (rejection_counts()).
    """

    def __init__(self, namespace: str, identity: Identity | None, *, initial_peers: list[str] = (),
                 host_maddrs: list[str] | None = None, announce_maddrs: list[str] | None = None,
                 max_record_bytes: int = 12288, shards: int = 4, client_mode: bool = False,
                 startup_timeout: float = 60, request_timeout: float = 30,
                 round_seconds: float | None = None, rounds_ahead: int = ROUNDS_AHEAD):
        if not isinstance(namespace, str) or not re.fullmatch(r"[A-Za-z0-9._:/-]{1,128}", namespace):
            raise SwarmError(f"bad swarm namespace {namespace!r} (letters, digits, ._:/- only)")
        if not 1 <= max_record_bytes <= MAX_VALUE_BYTES or shards < 1:
            raise SwarmError(f"max_record_bytes must be 1..{MAX_VALUE_BYTES} and shards positive")
        if (round_seconds is not None and not round_seconds > 0) or rounds_ahead < 0:
            raise SwarmError("round_seconds must be positive and rounds_ahead >= 0")
        # the guard's rules must be the same on every node of a swarm: round_seconds is the
        # swarm's (None: any whole-second length, for a bootstrap node; guard.py), and
        # rounds_ahead is for tests only (more future rounds than one)
        self.round_seconds = float(round_seconds) if round_seconds is not None else None
        self.rounds_ahead = rounds_ahead
        self.namespace = namespace
        self.identity = identity if identity is not None else identity_from_key(RSAPrivateKey())
        self.initial_peers = [str(peer) for peer in initial_peers]
        self.host_maddrs = list(host_maddrs) if host_maddrs is not None else ["/ip4/0.0.0.0/tcp/0"]
        self.announce_maddrs = list(announce_maddrs) if announce_maddrs is not None else None
        self.max_record_bytes = max_record_bytes
        self.shards = shards
        self.client_mode = client_mode
        self.startup_timeout = startup_timeout
        self.request_timeout = request_timeout
        self._dht: _SwarmDHT | None = None
        self._peer_id: str | None = None
        self._send_lock = threading.Lock()  # one writer at a time on the DHT's request pipe
        self._counts_lock = threading.Lock()
        self._rejections: Counter[str] = Counter()  # found on our side, while parsing
        self._failures: Counter[str] = Counter()  # requests that failed or timed out
        self._payloads = PayloadCache(shards, max_record_bytes)  # each entry read is parsed once
        self._reader = os.urandom(8).hex()  # names our new-entries cache inside the DHT process

    # lifecycle

    def start(self) -> SwarmTransport:
        """Start our DHT node and join the swarm (SwarmError on a bad address or no reachable peer)."""
        if self._dht is not None:
            raise SwarmError("swarm transport already started")
        rejections: dict[str, int] = {}
        validators = [GuardValidator(self.namespace, self.shards, self.round_seconds, rejections,
                                     rounds_ahead=self.rounds_ahead),
                      CountingSignatureValidator(self.identity.private_key, rejections)]
        options: dict[str, Any] = dict(host_maddrs=self.host_maddrs, client_mode=self.client_mode,
                                       startup_timeout=self.startup_timeout)
        if self.announce_maddrs is not None:
            options["announce_maddrs"] = self.announce_maddrs
        if self.identity.p2p_identity_path is not None:
            options["identity_path"] = str(self.identity.p2p_identity_path)
        dht = None
        try:
            dht = _SwarmDHT(rejections=rejections, initial_peers=self.initial_peers or None,
                            record_validators=validators, **options)
            # the identity check spawns a second daemon, then come the bootstrap pings
            dht.run_in_background(await_ready=True, timeout=2 * self.startup_timeout + 15)
            self._dht = dht
            self._call(lambda: dht.run_coroutine(_block_command_pipe, return_future=True))
            self._peer_id = self._call(lambda: dht.run_coroutine(_peer_id, return_future=True))
        except Exception as e:
            self._dht = None
            if dht is not None and dht.is_alive():
                dht.shutdown()
            raise SwarmError(f"swarm DHT did not start: {_one_line(e)}") from None
        return self

    def shutdown(self) -> None:
        """Stop our DHT node (idempotent)."""
        dht, self._dht = self._dht, None
        if dht is not None and dht.is_alive():
            with self._send_lock:
                dht.shutdown()

    def __enter__(self) -> SwarmTransport:
        return self if self._dht is not None else self.start()

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    @property
    def peer_id(self) -> str:
        """Our libp2p peer id (base58)."""
        self._require_dht()
        return self._peer_id

    @property
    def sender(self) -> str:
        """Our sender id as peers' collect() reports it (to tell our own records apart)."""
        return self.identity.sender_id

    def visible_maddrs(self) -> list[str]:
        """Our multiaddrs as other nodes should pass them in --peers."""
        dht = self._require_dht()
        return self._call(lambda: dht.run_coroutine(_visible_maddrs, return_future=True))

    def is_alive(self) -> bool:
        """Whether our DHT process is running."""
        return self._dht is not None and self._dht.is_alive()

    # round payloads

    def shard_keys(self, round: int) -> list[str]:
        """The DHT keys holding a round's payloads."""
        return [payload_key(self.namespace, _check_round(round), shard) for shard in range(self.shards)]

    def publish(self, round: int, payloads: list[bytes], expiration_time: float, first_index: int = 0) -> int:
        """Store our payloads for `round` as indices first_index, first_index + 1, ..., signed,
        until `expiration_time` (DHT time); how many stored.

        A subkey is only replaced by a later expiration: republishing with the same one is refused,
        so a node publishing twice in a round continues its indices.
        """
        keys = self.shard_keys(round)
        if first_index < 0 or first_index + len(payloads) > MAX_GROUPS_PER_ROUND:
            raise SwarmError(f"payload indices of a round are 0..{MAX_GROUPS_PER_ROUND - 1}")
        for i, payload in enumerate(payloads):
            self._check_value(payload, f"payload {i}")
        self._check_expiration(expiration_time)
        marker = self.identity.public_key_marker
        requests = [dict(key=keys[shard_of(marker, i, self.shards)], subkey=marker + f"/{i}".encode(),
                         value=bytes(payload), expiration_time=expiration_time)
                    for i, payload in enumerate(payloads, start=first_index)]
        return sum(self._store_many(requests))

    def collect(self, round: int, new_only: bool = False, budget: int | None = None, prefer: Iterable[str] = (),
                max_index: int = MAX_GROUPS_PER_ROUND) -> list[Received]:
        """Every well-formed, signed payload of `round` found in the DHT (ours included), each
        subkey parsed once (payload_cache.py). With `new_only`, only entries not returned before,
        at most `budget` of them, first those of the senders in `prefer` (their indices below
        `max_index`); the rest come on later calls. New entries are picked out inside the DHT
        process (payload_cache.read_new_in_dht): only they cross its pipe."""
        if new_only:
            return self._collect_new(round, budget, list(prefer), max_index)
        found = self._get_many(self.shard_keys(round))
        count = lambda reason: self._count(self._rejections, reason)  # noqa: E731
        received = self._payloads.read(round, found, count, new_only=new_only, budget=budget, prefer=prefer,
                                       max_index=max_index)
        return sorted(received, key=lambda item: (item.sender, item.index))

    def _collect_new(self, round: int, budget: int | None, prefer: list[str], max_index: int) -> list[Received]:
        dht = self._require_dht()
        read = partial(read_new_in_dht, reader=self._reader, keys=self.shard_keys(round), round=round,
                       shards=self.shards, max_record_bytes=self.max_record_bytes, budget=budget, prefer=prefer,
                       max_index=max_index, timeout=0.8 * self.request_timeout)
        try:
            received, skipped, failures = self._call(lambda: dht.run_coroutine(read, return_future=True))
        except SwarmError:  # no answer in time: counted (the DHT process gives up its gets sooner, so
            # entries it handed out to an answer lost here are rare)
            self._count(self._failures, "get_error")
            return []
        with self._counts_lock:
            self._rejections.update(skipped)
            self._failures.update(failures)
        return sorted(received, key=lambda item: (item.sender, item.index))

    # status records

    def status_key(self, round: int) -> str:
        """The DHT key holding nodes' statuses for a round."""
        return status_key(self.namespace, _check_round(round))

    def publish_status(self, round: int, status: dict, expiration_time: float) -> bool:
        """Store our small JSON status for `round` (signed) until `expiration_time`."""
        if not isinstance(status, dict):
            raise SwarmError("a status must be a dict")
        try:
            raw = json.dumps(status, sort_keys=True, separators=(",", ":")).encode()
        except (TypeError, ValueError) as e:
            raise SwarmError(f"status is not JSON: {_one_line(e)}") from None
        self._check_value(raw, "status", MAX_STATUS_BYTES)
        self._check_expiration(expiration_time)
        request = dict(key=self.status_key(round), subkey=self.identity.public_key_marker, value=raw,
                       expiration_time=expiration_time)
        return self._store_many([request])[0]

    def read_status(self, rounds: list[int]) -> dict[str, dict]:
        """Each sender's status from the latest of `rounds` it published for; bad records skipped."""
        ordered = sorted(set(rounds))
        statuses: dict[str, dict] = {}
        for found in self._get_many([self.status_key(round) for round in ordered]):
            for subkey, raw in entries(found):
                try:
                    item = parse_status(subkey, raw, max_record_bytes=self.max_record_bytes)
                except Exception:
                    item = "malformed"
                if isinstance(item, tuple):
                    statuses[item[0]] = item[1]
                else:
                    self._count(self._rejections, item)
        return statuses

    # counters

    def rejection_counts(self) -> dict[str, int]:
        """Records refused so far, by reason: in our DHT process plus while parsing here."""
        dht = self._require_dht()
        child = self._call(lambda: dht.run_coroutine(_read_rejections, return_future=True))
        with self._counts_lock:
            counts = Counter(child) + self._rejections
        return {reason: counts.get(reason, 0) for reason in (*REJECTION_REASONS, *sorted(counts))}

    def failure_counts(self) -> dict[str, int]:
        """Our DHT requests that failed or timed out, by kind."""
        with self._counts_lock:
            return dict(self._failures)

    # internals

    def _require_dht(self) -> _SwarmDHT:
        if self._dht is None:
            raise SwarmError("swarm transport is not started")
        if not self._dht.is_alive():
            raise SwarmError(f"swarm DHT process died (exit code {self._dht.exitcode})")
        return self._dht

    def _count(self, counter: Counter[str], reason: str) -> None:
        with self._counts_lock:
            counter[reason] += 1

    def _submit(self, send: Callable[[], MPFuture]) -> MPFuture:
        with self._send_lock:
            return send()

    def _call(self, send: Callable[[], MPFuture]) -> Any:
        """Run one request in our DHT process and wait for it (SwarmError on failure)."""
        future = self._submit(send)
        try:
            return future.result(timeout=self.request_timeout)
        except TimeoutError:
            future.cancel()
            raise SwarmError(f"swarm DHT did not answer within {self.request_timeout:g} s") from None
        except Exception as e:
            raise SwarmError(f"swarm DHT request failed: {_one_line(e)}") from None

    def _store_many(self, requests: list[dict]) -> list[bool]:
        """Whether each record is now held by the swarm.

        hivemind's store reports the answer of the replica that answered last, so one replica
        holding a forgery under our subkey (it refuses our record as not newer) would make a
        record every honest replica took look lost. A refusal is checked by reading the key back:
        readers drop the forger's replica, and ours counts where our exact record is held."""
        dht = self._require_dht()
        futures = [self._submit(lambda request=request: dht.store(**request, return_future=True))
                   for request in requests]
        answers = self._wait_all(futures, "store")
        refused = sorted({request["key"] for request, answer in zip(requests, answers) if answer is False})
        held = {key: {subkey: (value, expiration) for subkey, value, expiration in timed_entries(found)}
                for key, found in zip(refused, self._get_many(refused))} if refused else {}
        return [bool(answer) or held.get(request["key"], {}).get(request["subkey"])
                == (request["value"], request["expiration_time"]) for request, answer in zip(requests, answers)]

    def _get_many(self, keys: list[str]) -> list[object]:
        dht = self._require_dht()
        futures = [self._submit(lambda key=key: dht.get(key=key, latest=True, return_future=True))
                   for key in keys]
        return self._wait_all(futures, "get")

    def _wait_all(self, futures: list[MPFuture], kind: str) -> list[object]:
        """Results of concurrent requests, None for each that failed or ran out of time."""
        deadline = time.monotonic() + self.request_timeout
        results: list[object] = []
        for future in futures:
            try:
                results.append(future.result(timeout=max(0.0, deadline - time.monotonic())))
            except TimeoutError:
                future.cancel()
                self._count(self._failures, f"{kind}_timeout")
                results.append(None)
            except Exception:
                self._count(self._failures, f"{kind}_error")
                results.append(None)
        return results

    def _check_value(self, value: object, what: str, cap: int | None = None) -> None:
        cap = self.max_record_bytes if cap is None else cap
        if not isinstance(value, (bytes, bytearray)):
            raise SwarmError(f"{what} must be bytes, not {type(value).__name__}")
        if len(value) > cap:
            raise SwarmError(f"{what} is {len(value)} bytes, over the {cap}-byte record cap")
        if SIGNATURE_RE.search(bytes(value)):  # hivemind would strip it and fail our signature
            raise SwarmError(f"{what} contains a '[signature:...]' sequence, which hivemind strips")

    @staticmethod
    def _check_expiration(expiration_time: float) -> None:
        if expiration_time <= get_dht_time():
            raise SwarmError("expiration_time is not in the future (DHT time, hivemind.utils.get_dht_time)")


def _check_round(round: int) -> int:
    if isinstance(round, bool) or not isinstance(round, int) or round < 0:
        raise SwarmError(f"a round is an int >= 0, not {round!r}")
    return round
