"""The responder's prekey account (PROTOCOL.md §4.3–4.4): private signed, ML-KEM and one-time
prekeys, the replay cache of initial messages without a one-time prekey, and when to rotate early.

Pure state; the node persists it and publishes what it says. The handshake (`handshake.respond`)
consults it and, once message 0 authenticated, consumes from it.
"""

from __future__ import annotations

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


class PrekeySecrets:
    """The responder's private prekeys and its replay cache. Pure state; the node persists it.

    Rule for initial messages without a one-time prekey (none was left): they are accepted
    under the signed prekey alone, and the ephemeral key of each is remembered for as long as
    that signed prekey is held, so a replay is refused; once the prekey is destroyed, a replay
    names an unknown prekey and is refused too.
    """

    __slots__ = ("_issued", "_kem", "_next_rotation", "_onetime", "_quota", "_retire", "_seen", "_spk")

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

    def add_signed(self, spk_id: int, key: X25519KeyPair) -> None:
        """Hold a signed prekey's private key (current, or kept for a grace period)."""
        self._spk[spk_id] = key
        self._seen.setdefault(spk_id, set())

    def add_kem(self, kem_id: int, key: KemKeyPair) -> None:
        """Hold an ML-KEM prekey's private key."""
        self._kem[kem_id] = key

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

    def drop_signed(self, spk_id: int) -> None:
        """Destroy a signed prekey after its grace period (with its replay cache)."""
        self._spk.pop(spk_id, None)
        self._seen.pop(spk_id, None)
        self._quota.pop(spk_id, None)
        self._retire.pop(spk_id, None)

    def drop_kem(self, kem_id: int) -> None:
        """Destroy an ML-KEM prekey after its grace period."""
        self._kem.pop(kem_id, None)

    def quota_left(self, spk_id: int, initiator: bytes) -> bool:
        """True while `initiator` (an identity key) may add to the replay cache of `spk_id`."""
        return self._quota.get(spk_id, {}).get(initiator, 0) < MAX_REPLAY_PER_INITIATOR

    def remember(self, spk_id: int, ephemeral: bytes, initiator: bytes) -> None:
        """Enter an accepted INIT without a one-time prekey into the replay cache, on its initiator's quota."""
        self._seen[spk_id].add(ephemeral)
        quota = self._quota.setdefault(spk_id, {})
        quota[initiator] = quota.get(initiator, 0) + 1

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
        """Every private prekey and the replay cache, for the keystore (secret: seal it)."""
        return msgpack.packb(
            [
                1,
                [[i, k.private_bytes()] for i, k in self._spk.items()],
                [[i, k.seed()] for i, k in self._kem.items()],
                [[i, k.private_bytes()] for i, k in self._onetime.items()],
                self._issued,
                [[i, sorted(s), sorted(self._quota.get(i, {}).items())] for i, s in self._seen.items()],
                [self._next_rotation, sorted(self._retire.items())],
            ]
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> PrekeySecrets:
        """Restore what `to_bytes` wrote. Raises DecodeError on anything malformed."""
        out = cls()
        try:
            fields = msgpack.unpackb(data, raw=False, max_map_len=0, max_str_len=0)
            # A state written before the schedule moved in here has none: a rotation is due at once.
            fmt, spk, kem, onetime, issued, seen, *schedule = fields
            if len(schedule) > 1:
                raise DecodeError("malformed prekey state")
            if type(fmt) is not int or fmt != 1:
                raise DecodeError("unknown prekey state format")
            for i, k in spk:
                out._spk[_id(i)] = X25519KeyPair.from_private_bytes(k)
                out._seen[_id(i)] = set()
            for i, k in kem:
                out._kem[_id(i)] = KemKeyPair.from_seed(k)
            for i, k in onetime:
                out._onetime[_id(i)] = X25519KeyPair.from_private_bytes(k)
            out._issued = _id(issued)
            for i, s, *quota in seen:  # entries written before the quota existed have none
                out._seen[_id(i)] = {_ephemeral(e) for e in s}
                if quota:
                    (counts,) = quota
                    out._quota[_id(i)] = {_ephemeral(k): _id(n) for k, n in counts}
            if schedule:
                ((due, retire),) = schedule
                out._next_rotation = None if due is None else _time(due)
                out._retire = {_id(i): _time(t) for i, t in retire}
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            raise DecodeError("malformed prekey state") from exc
        return out

    def __repr__(self) -> str:
        return f"PrekeySecrets(signed={sorted(self._spk)}, kem={sorted(self._kem)}, onetime={len(self._onetime)})"


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
