"""The responder's prekey account (PROTOCOL.md §4.3–4.4): private signed, ML-KEM and one-time
prekeys, the replay cache of initial messages without a one-time prekey, and when to rotate early.

Pure state; the node persists it and publishes what it says. The handshake (`handshake.respond`)
consults it and, once message 0 authenticated, consumes from it.

Persisted as one account record (`to_bytes`: the private prekeys and the rotation schedule) and one
small record per replay-cache entry, `replay/<spk id>:<EK hex>` holding the initiator's identity key
(so the per-initiator quota is rebuilt at load): accepting an INIT writes one entry, never the whole
cache. `take_changes` says which records to put and delete since it was last asked.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field

import msgpack

from protocol.errors import DecodeError, LocalError
from protocol.identity import KemKeyPair, X25519KeyPair
from protocol.messages import MAX_U32, X25519_LEN

#: Ephemeral keys remembered per signed prekey to refuse replayed initial messages that
#: carry no one-time prekey. Past it, such messages are refused until the prekey rotates.
MAX_REPLAY_CACHE = 100_000
#: One-time prekeys a responder keeps at most (the oldest is dropped to make room).
MAX_ONETIME_PREKEYS = 1000
#: Replay-cache entries one initiator (identity key) may add per signed prekey: one enrolled node
#: cannot fill a cache, nor make the prekey rotate early, by itself.
MAX_REPLAY_PER_INITIATOR = 100
#: Replay-cache entries on the newest signed prekey past which it rotates at once (and is published):
#: whoever drains the one-time prekeys and floods INITs without one never fills the cache of the
#: prekey new initiators use, and the record stays small.
ROTATE_EARLY_AT = 1000

#: The namespace of replay-cache entries: `<spk id>:<EK hex>` holding the initiator's identity key
#: (empty for an entry migrated from a state written before the quota existed: it counts for nobody).
NS_REPLAY = "replay"
Record = tuple[str, str]


@dataclass(frozen=True, slots=True)
class PrekeyChanges:
    """What to write since the last `take_changes`, in one commit: the account record (when it
    changed) and the replay-cache entries to put and delete."""

    account: bytes | None = None
    puts: dict[Record, bytes] = field(default_factory=dict)
    deletes: list[Record] = field(default_factory=list)


class PrekeySecrets:
    """The responder's private prekeys and its replay cache. Pure state; the node persists it.

    Rule for initial messages without a one-time prekey (none was left): they are accepted
    under the signed prekey alone, and the ephemeral key of each is remembered for as long as
    that signed prekey is held, so a replay is refused; once the prekey is destroyed, a replay
    names an unknown prekey and is refused too.
    """

    __slots__ = (
        "_dirty",
        "_entry_deletes",
        "_entry_puts",
        "_issued",
        "_kem",
        "_next_rotation",
        "_onetime",
        "_quota",
        "_retire",
        "_seen",
        "_spk",
    )

    def __init__(self) -> None:
        self._spk: dict[int, X25519KeyPair] = {}
        self._kem: dict[int, KemKeyPair] = {}
        self._onetime: dict[int, X25519KeyPair] = {}
        # One-time prekey ids only grow: an id below this mark that we no longer hold was consumed
        # (or dropped unused), which needs no per-id memory to recognise.
        self._issued = 0
        self._seen: dict[int, set[bytes]] = {}
        # Replay-cache entries per signed prekey and initiator identity key.
        self._quota: dict[int, dict[bytes, int]] = {}
        # The schedule (seconds since the epoch): when the next rotation is due (None: now), and when
        # each replaced signed prekey may be destroyed.
        self._next_rotation: float | None = None
        self._retire: dict[int, float] = {}
        # What `take_changes` hands out next: the account record changed, replay entries to write.
        self._dirty = False
        self._entry_puts: dict[Record, bytes] = {}
        self._entry_deletes: set[Record] = set()

    def add_signed(self, spk_id: int, key: X25519KeyPair) -> None:
        """Hold a signed prekey's private key (current, or kept for a grace period)."""
        self._spk[spk_id] = key
        self._seen.setdefault(spk_id, set())
        self._dirty = True

    def add_kem(self, kem_id: int, key: KemKeyPair) -> None:
        """Hold an ML-KEM prekey's private key."""
        self._kem[kem_id] = key
        self._dirty = True

    def add_onetime(self, key_id: int, key: X25519KeyPair) -> None:
        """Hold a one-time prekey's private key until one initial message consumes it."""
        if key_id < self._issued:
            raise LocalError(f"one-time prekey ids only grow: {key_id} is below {self._issued}")
        if key_id >= MAX_U32:
            raise LocalError("one-time prekey ids stop below 2**32 - 1")
        if len(self._onetime) >= MAX_ONETIME_PREKEYS:
            # The relay keeps the newest MAX_ONETIME_PREKEYS too: the oldest was handed out and never used.
            del self._onetime[min(self._onetime)]
        self._onetime[key_id] = key
        self._issued = key_id + 1
        self._dirty = True

    def take_onetime(self, key_id: int) -> None:
        """Consume a one-time prekey (an INIT that used it authenticated)."""
        del self._onetime[key_id]
        self._dirty = True

    def drop_signed(self, spk_id: int) -> None:
        """Destroy a signed prekey after its grace period (with its replay cache)."""
        if spk_id not in self._spk:
            return
        for ephemeral in self._seen.pop(spk_id, ()):
            self._forget_entry(_entry(spk_id, ephemeral))
        del self._spk[spk_id]
        self._quota.pop(spk_id, None)
        self._retire.pop(spk_id, None)
        self._dirty = True

    def drop_kem(self, kem_id: int) -> None:
        """Destroy an ML-KEM prekey after its grace period."""
        if self._kem.pop(kem_id, None) is not None:
            self._dirty = True

    def quota_left(self, spk_id: int, initiator: bytes) -> bool:
        """True while `initiator` (an identity key) may add to the replay cache of `spk_id`."""
        return self._quota.get(spk_id, {}).get(initiator, 0) < MAX_REPLAY_PER_INITIATOR

    def remember(self, spk_id: int, ephemeral: bytes, initiator: bytes) -> None:
        """Enter an accepted INIT without a one-time prekey into the replay cache, on its initiator's quota."""
        self._seen[spk_id].add(ephemeral)
        self._count(spk_id, initiator)
        record = _entry(spk_id, ephemeral)
        self._entry_deletes.discard(record)
        self._entry_puts[record] = initiator

    def _count(self, spk_id: int, initiator: bytes) -> None:
        if initiator:
            quota = self._quota.setdefault(spk_id, {})
            quota[initiator] = quota.get(initiator, 0) + 1

    def _forget_entry(self, record: Record) -> None:
        self._entry_puts.pop(record, None)
        self._entry_deletes.add(record)

    def replay_count(self, spk_id: int) -> int:
        """Ephemeral keys in the replay cache of `spk_id`."""
        return len(self._seen.get(spk_id, ()))

    def quota_used(self, spk_id: int, initiator: bytes) -> int:
        """Entries `initiator` (an identity key) put in the replay cache of `spk_id`."""
        return self._quota.get(spk_id, {}).get(initiator, 0)

    def take_changes(self) -> PrekeyChanges:
        """The records to write since the last call (the account only if it changed); commit them together."""
        changes = PrekeyChanges(self.to_bytes() if self._dirty else None, self._entry_puts, sorted(self._entry_deletes))
        self._dirty, self._entry_puts, self._entry_deletes = False, {}, set()
        return changes

    def replay_records(self) -> dict[Record, bytes]:
        """Every replay-cache entry as its record (for a full copy of the account, with `to_bytes`).

        Only the counts per initiator are kept in memory, so each initiator's key goes on as many
        entries as it has (which ones does not matter: the quota is rebuilt from the counts); any
        rest counts for nobody."""
        records: dict[Record, bytes] = {}
        for spk_id, seen in self._seen.items():
            counts = sorted(self._quota.get(spk_id, {}).items())
            initiators = [key for key, n in counts for _ in range(n)]
            for ephemeral, initiator in itertools.zip_longest(sorted(seen), initiators[: len(seen)], fillvalue=b""):
                records[_entry(spk_id, ephemeral)] = initiator
        return records

    def rotation_wanted(self) -> bool:
        """True when the newest signed prekey should rotate now, before its schedule: its replay cache
        passed `ROTATE_EARLY_AT`, or no one-time prekey is left (every new INIT enters the cache)."""
        if not self._spk:
            return False
        newest = max(self._spk)
        return len(self._seen.get(newest, ())) >= ROTATE_EARLY_AT or not self._onetime

    def rotation_due(self, now: float) -> bool:
        """True when the scheduled rotation is due at `now` (seconds since the epoch), or none was ever made."""
        return self._next_rotation is None or now >= self._next_rotation

    def rotated(self, spk_id: int, now: float, *, every: float, grace: float) -> list[int]:
        """Record a rotation to `spk_id` at `now`: the next one is due `every` seconds later; each
        older signed prekey is kept `grace` seconds after the first rotation past it (INITs in
        flight still open) and destroyed, with its ML-KEM prekey, at the first rotation after that.
        Returns the ids destroyed (their published bundles go too)."""
        self._next_rotation = now + every
        self._dirty = True
        destroyed = []
        for old in self.signed_ids():
            if old == spk_id:
                continue
            if now >= self._retire.setdefault(old, now + grace):
                self.drop_signed(old)
                self.drop_kem(old)
                destroyed.append(old)
        return destroyed

    @property
    def onetime_count(self) -> int:
        """One-time prekeys still unconsumed (the node replenishes below a threshold)."""
        return len(self._onetime)

    @property
    def next_onetime_id(self) -> int:
        """An id no one-time prekey has had yet."""
        return max(self._issued, 1)

    def signed_ids(self) -> list[int]:
        """Ids of the signed prekeys held."""
        return sorted(self._spk)

    def to_bytes(self) -> bytes:
        """The account record: every private prekey and the schedule, not the replay cache (secret: seal it)."""
        return msgpack.packb(
            [
                2,
                [[i, k.private_bytes()] for i, k in self._spk.items()],
                [[i, k.seed()] for i, k in self._kem.items()],
                [[i, k.private_bytes()] for i, k in self._onetime.items()],
                self._issued,
                [self._next_rotation, sorted(self._retire.items())],
            ]
        )

    @classmethod
    def from_bytes(cls, data: bytes, replay: Iterable[tuple[str, bytes]] = ()) -> PrekeySecrets:
        """Restore the account record `to_bytes` wrote and the replay entries (name, value) of
        NS_REPLAY. Raises DecodeError on anything malformed.

        A format-1 record still holds the cache (and its quota counts) itself: it is read once,
        and `take_changes` then gives the account without it and every entry as its own record.
        An entry of a signed prekey no longer held (its deletion raced a late write) is deleted.
        """
        out = cls()
        try:
            fields = msgpack.unpackb(data, raw=False, max_map_len=0, max_str_len=0)
            fmt = fields[0]
            if type(fmt) is not int or fmt not in (1, 2):
                raise DecodeError("unknown prekey state format")
            if fmt == 1:
                # A state written before the schedule moved in here has none: a rotation is due at once.
                _, spk, kem, onetime, issued, seen, *schedule = fields
                if len(schedule) > 1:
                    raise DecodeError("malformed prekey state")
            else:
                _, spk, kem, onetime, issued, *schedule = fields
                if len(schedule) != 1:
                    raise DecodeError("malformed prekey state")
                seen = []
            for i, k in spk:
                out._spk[_id(i)] = X25519KeyPair.from_private_bytes(k)
                out._seen[_id(i)] = set()
            for i, k in kem:
                out._kem[_id(i)] = KemKeyPair.from_seed(k)
            for i, k in onetime:
                out._onetime[_id(i)] = X25519KeyPair.from_private_bytes(k)
            out._issued = _id(issued)
            if schedule:
                ((due, retire),) = schedule
                out._next_rotation = None if due is None else _time(due)
                out._retire = {_id(i): _time(t) for i, t in retire}
            for i, s, *quota in seen:  # format 1; entries written before the quota existed have none
                out._seen[_id(i)] = {_ephemeral(e) for e in s}
                if quota:
                    (counts,) = quota
                    out._quota[_id(i)] = {_ephemeral(k): _id(n) for k, n in counts}
        except (ValueError, TypeError, IndexError, KeyError, msgpack.UnpackException) as exc:
            raise DecodeError("malformed prekey state") from exc
        if fmt == 1:
            out._dirty = True
            out._entry_puts = out.replay_records()
        for name, initiator in replay:
            out._load_entry(name, initiator)
        return out

    def _load_entry(self, name: str, initiator: bytes) -> None:
        spk_text, _, ephemeral_hex = name.partition(":")
        try:
            spk_id, ephemeral = _id(int(spk_text)), _ephemeral(bytes.fromhex(ephemeral_hex))
        except ValueError as exc:
            raise DecodeError("malformed replay-cache entry name") from exc
        if initiator:
            _ephemeral(initiator)
        seen = self._seen.get(spk_id)
        if seen is None:
            self._forget_entry((NS_REPLAY, name))
        elif ephemeral not in seen:
            seen.add(ephemeral)
            self._count(spk_id, initiator)

    def __repr__(self) -> str:
        return f"PrekeySecrets(signed={sorted(self._spk)}, kem={sorted(self._kem)}, onetime={len(self._onetime)})"


def _entry(spk_id: int, ephemeral: bytes) -> Record:
    return (NS_REPLAY, f"{spk_id}:{ephemeral.hex()}")


def _ephemeral(value: object) -> bytes:
    if type(value) is not bytes or len(value) != X25519_LEN:
        raise DecodeError("replay-cache entries are 32-byte X25519 keys")
    return value


def _id(value: object) -> int:
    if type(value) is not int or not 0 <= value <= 0xFFFFFFFF:
        raise DecodeError("prekey id out of range")
    return value


def _time(value: object) -> float:
    if type(value) not in (int, float) or not 0 <= value < 2**63:  # type: ignore[operator]
        raise DecodeError("prekey schedule time out of range")
    return float(value)  # type: ignore[arg-type]
