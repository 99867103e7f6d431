"""One conversation with one peer: its current session, the sessions it replaced, and the rules
that pick between them (PROTOCOL.md §8). Sans-I/O: the node persists what `records` returns.

Two sessions with one peer exist whenever both sides start one at once (crossed INITs), or an
INIT arrives late. Every session is ranked by its INIT's signed freshness (`created`, the
initiator's clock in milliseconds) and, for equal freshness, by the initiator's certificate
fingerprint (lower wins). Both sides hold the same two INITs, so both compute the same order,
before and after any restart (the rank is part of the persisted session): no time window.

* The **current** session is the highest-ranked one; we encrypt with it.
* A session it outranks is **archived** (at most `MAX_ARCHIVED`, the lowest-ranked dropped
  first): a message the peer sent on it before it learned of the current one still decrypts
  (current first, then the archive, newest first), exactly once.
* An INIT that the current session outranks is **stale** and refused before it consumes any
  prekey, once the current session is confirmed (we received on it, or we answered its INIT).
  While it is not, the peer may not have seen our INIT yet: its INIT is a crossing one, and joins
  the archive so that what it carries is delivered.
* After `MAX_AUTH_FAILURES` messages in a row that no held session authenticates (the peer is on
  a session we do not have: its state or ours was lost or rolled back), the node starts a fresh
  handshake by itself (`reset_due`), whose INIT outranks every earlier one.
* Every session ends with the peer certificate it was made under (`expire`): a new handshake,
  which checks the renewed certificate against the current CRL, must come before more traffic; and
  a CRL listing any certificate seen for the peer's identity key ends them (`revoked_serial`,
  PROTOCOL.md §10.5).
"""

from __future__ import annotations

import functools
from collections.abc import Collection, Iterable
from datetime import datetime

import msgpack

from protocol.certs import CLOCK_SKEW
from protocol.errors import AuthenticationFailed, DecodeError, DuplicateMessage, RatchetError, SessionClosed, StaleInit
from protocol.messages import RatchetMessage
from protocol.session import Received, Session

#: Sessions kept per peer besides the current one (Signal keeps 40 previous states; crossed INITs
#: need one, a crossing during a re-handshake two).
MAX_ARCHIVED = 4
#: Messages in a row that authenticate under no held session before a fresh handshake starts.
MAX_AUTH_FAILURES = 3


def outranks(a: Session, b: Session) -> bool:
    """True if `a` is preferred over `b`: its INIT is fresher, or as fresh and from the lower fingerprint."""
    return (a.created, b.initiator) > (b.created, a.initiator)


class Conversation:
    """The sessions held with one peer and the per-peer decisions over them."""

    __slots__ = ("archive", "current", "failures", "renew")

    def __init__(self, current: Session | None = None, archive: list[Session] | None = None) -> None:
        self.current = current
        #: Replaced sessions, highest-ranked first.
        self.archive: list[Session] = list(archive or [])
        #: Messages in a row that no held session authenticated.
        self.failures = 0
        #: The sessions ended with the peer certificate they were made under: a new handshake (which
        #: checks the peer's current certificate against the current CRL) must come before traffic.
        self.renew = False

    def check_init(self, created: int, initiator: bytes, *, confirmed: bool) -> None:
        """Before a received INIT consumes anything: refuse it if it is stale (see the module doc)."""
        current = self.current
        if current is None or not confirmed or current.closed is not None:
            return
        if (created, current.initiator) < (current.created, initiator):
            raise StaleInit("initial message older than the live session (a delayed or replayed INIT): refused")

    def adopt(self, session: Session) -> bool:
        """Hold a new session (ours or the peer's); True if it became the current one."""
        current = self.current
        if current is None or current.closed is not None or outranks(session, current):
            if current is not None and current.closed is None:
                self._archive(current)
            self.current = session
            self.failures = 0
            self.renew = False
            return True
        self._archive(session)
        return False

    def _archive(self, session: Session) -> None:
        self.archive.append(session)
        self.archive.sort(key=functools.cmp_to_key(_by_rank))
        del self.archive[MAX_ARCHIVED:]

    def decrypt(self, message: RatchetMessage) -> tuple[Received, Session]:
        """Decrypt with the current session, then the archived ones; the session that took it is returned.

        A message no session authenticates raises the current session's error (or SessionClosed when
        there is none) and counts towards `reset_due`; a refusal changes no session.
        """
        current = self.current
        if current is None:
            self.failures += 1
            raise SessionClosed("no session with this peer")
        if current.closed is not None:
            raise SessionClosed(current.closed)
        refusal: RatchetError
        try:
            received = current.decrypt_message(message)
        except RatchetError as exc:
            refusal = exc
        else:
            self.failures = 0
            return received, current
        for session in self.archive:
            try:
                received = session.decrypt_message(message)
            except DuplicateMessage as duplicate:
                refusal = duplicate  # a replay on an archived session says so, and does not count
                continue
            except RatchetError:
                continue
            self.failures = 0
            return received, session
        if isinstance(refusal, AuthenticationFailed):
            # The peer is on a session we do not hold (a replay of one we do says DuplicateMessage).
            self.failures += 1
        raise refusal

    @property
    def reset_due(self) -> bool:
        """True once `MAX_AUTH_FAILURES` messages in a row authenticated under no held session, or when
        the sessions ended with the peer's certificate (`expire`): a new handshake should start."""
        if self.renew:
            return True
        return self.failures >= MAX_AUTH_FAILURES and (self.current is None or self.current.closed is None)

    def expire(self, now: datetime, not_after: datetime) -> bool:
        """End every session once the peer certificate they were made under is past its notAfter
        (plus the allowed skew): a renewed certificate must be checked (CRL included) by a new
        handshake before traffic continues (PROTOCOL.md §10.5). True if this call ended them."""
        current = self.current
        if current is None or current.closed is not None or now <= not_after + CLOCK_SKEW:
            return False
        self.close(f"the peer's certificate expired at {not_after.isoformat()}: a new handshake is needed")
        self.renew = True
        return True

    def close(self, reason: str) -> None:
        """End every session with this peer (revoked): later frames are refused with SessionClosed."""
        if self.current is not None:
            self.current.close(reason)
        self.archive.clear()

    def archive_bytes(self) -> bytes:
        """The archived sessions, for the keystore (secret: seal it)."""
        return msgpack.packb([s.to_bytes() for s in self.archive])

    @staticmethod
    def archive_from_bytes(data: bytes) -> list[Session]:
        """Restore what `archive_bytes` wrote. Raises DecodeError on anything malformed."""
        try:
            items = msgpack.unpackb(data, raw=False, max_map_len=0)
            if type(items) is not list or len(items) > MAX_ARCHIVED:
                raise DecodeError("malformed session archive")
            return [Session.from_bytes(item) for item in items]
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            raise DecodeError("malformed session archive") from exc


def _by_rank(a: Session, b: Session) -> int:
    """Highest-ranked first."""
    return -1 if outranks(a, b) else 1 if outranks(b, a) else 0


def revoked_serial(serials: Iterable[int], revoked: Collection[int]) -> int | None:
    """The first of a peer's certificate serials (every one seen for its current identity key) that
    `revoked` lists: revocation of any certificate of that key ends its sessions (PROTOCOL.md §10.5)."""
    return next((serial for serial in serials if serial in revoked), None)
