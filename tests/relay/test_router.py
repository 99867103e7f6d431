"""relay/router.py without sockets: who may log in and publish, where an envelope goes, quotas,
the CRL feed flags, REVOKED, the frame and ACK budgets, and the re-send bookkeeping.

Each test builds a router and its connections by hand, hands it frames and facts (the time, what
the store answered) and reads what it decided: the frames queued on a connection, its flags, and
the values it returned.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import msgpack
import pytest
from cryptography import x509

from protocol import wire
from protocol.link import (
    MAX_LINK_FRAME,
    Accepted,
    Ack,
    Error,
    ErrorCode,
    FetchBundle,
    LinkFrame,
    PublishBundle,
    PublishCrl,
    Send,
)
from protocol.messages import OneTimePrekey, PrekeyBundle
from relay.errors import LinkRefused, QuotaExceeded, StoreUnavailable, StoreWriteRefused
from relay.metrics import Metrics
from relay.ratelimit import TokenBucket
from relay.router import (
    CLOSE_TOO_BIG,
    MAX_STRIKES,
    RESEND_BACKOFF_MAX,
    RESEND_BATCH,
    RESEND_GAP,
    Link,
    Router,
)
from relay.store import Envelope, share_full

RESEND_AFTER = 3.0


class Clock:
    """The time the token buckets read (seconds), moved by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@dataclass(eq=False, kw_only=True)
class Conn(Link):
    """A connection without a socket: it counts the times the router woke it."""

    wakes: int = 0

    def wake(self) -> None:
        self.wakes += 1


class World:
    """A router, its metrics, the buckets' clock, and who the interceptor lets stay revoked."""

    def __init__(
        self, ca_root: x509.Certificate, *, queue_limit: int = 1024, rate: float = 10.0, burst: float = 5.0
    ) -> None:
        self.metrics = Metrics()
        self.clock = Clock()
        self.rate, self.burst = rate, burst
        self.admitted: set[str] = set()
        self.router: Router[Conn] = Router(
            ca_root,
            self.metrics,
            crl_publisher="ca",
            resend_after=RESEND_AFTER,
            queue_limit=queue_limit,
            admits_revoked=lambda name: name in self.admitted,
        )

    def connect(self, name: str, serial: int = 1, certificate: bytes = b"cert") -> Conn:
        conn = Conn(
            name=name,
            certificate=certificate,
            serial=serial,
            identity=b"",
            epoch=None,
            bucket=TokenBucket(self.rate, self.burst, clock=self.clock),
            acks=TokenBucket(self.rate, self.burst, clock=self.clock),
        )
        assert self.router.attach(conn) is None
        return conn

    def refused(self, reason: str) -> float:
        value: float = self.metrics.refused.labels(reason)._value.get()
        return value


@pytest.fixture
def world(ca: Any) -> World:
    return World(ca.root)


def sent(conn: Link) -> list[LinkFrame | Envelope]:
    """What the router queued for `conn`, decoded, in order."""
    return [wire.decode_link(item) if isinstance(item, bytes) else item for item in conn.outbox]


def errors(conn: Link) -> list[tuple[ErrorCode, bytes | None]]:
    return [(ErrorCode(f.code), f.msg_id) for f in sent(conn) if isinstance(f, Error)]


def msg_id() -> bytes:
    return os.urandom(16)


def envelope(seq: int, to: str = "bob", sender: str = "alice") -> Envelope:
    return Envelope(seq, seq.to_bytes(16, "big"), sender, to, b"opaque", 0)


# --- connections and frames ---------------------------------------------------------------------------


def test_a_newer_connection_replaces_the_old_one_which_then_cannot_unseat_it(world: World) -> None:
    old = world.connect("bob")
    new = Conn(**{**old.__dict__, "outbox": type(old.outbox)()})
    assert world.router.attach(new) is old
    world.router.detach(old)  # the old connection's handler ends after the new one came
    assert world.router.links == {"bob": new}
    world.router.detach(new)
    assert world.router.links == {}
    assert world.metrics.connected._value.get() == 0


@pytest.mark.parametrize(
    ("raw", "code", "close"),
    [
        ("text", ErrorCode.MALFORMED, 1008),
        (b"\x00" * (MAX_LINK_FRAME + 1), ErrorCode.TOO_LARGE, CLOSE_TOO_BIG),
        (msgpack.packb([1, 99]), ErrorCode.UNKNOWN_TYPE, 1008),
        (b"\xc1", ErrorCode.MALFORMED, 1008),
    ],
)
def test_a_message_that_is_no_frame_ends_the_connection(raw: object, code: ErrorCode, close: int) -> None:
    with pytest.raises(LinkRefused) as refused:
        Router.decode(raw)
    assert (refused.value.code, refused.value.close) == (code, close)


def test_a_batch_decodes_to_its_frames_in_order() -> None:
    frames: list[LinkFrame] = [Ack(msg_id()), FetchBundle(1, "bob")]
    (raw,) = wire.pack_link_frames([wire.encode_link(f) for f in frames])
    assert Router.decode(raw) == frames


# --- budgets --------------------------------------------------------------------------------------------


def test_frames_past_the_budget_are_refused_each_with_rate_limited_then_the_connection_ends(world: World) -> None:
    alice = world.connect("alice")
    m = msg_id()
    for _ in range(int(world.burst)):
        assert world.router.admit(alice, Send(m, "bob", b"x"))
    assert not world.router.admit(alice, Send(m, "bob", b"x"))
    assert errors(alice) == [(ErrorCode.RATE_LIMITED, m)]  # says which SEND it refused
    assert not world.router.admit(alice, FetchBundle(1, "bob"))
    assert errors(alice)[-1] == (ErrorCode.RATE_LIMITED, None)
    for _ in range(MAX_STRIKES - 2):
        assert not world.router.admit(alice, FetchBundle(1, "bob"))
    with pytest.raises(LinkRefused) as refused:
        world.router.admit(alice, FetchBundle(1, "bob"))
    assert refused.value.code == ErrorCode.RATE_LIMITED
    assert world.refused("rate_limited") == MAX_STRIKES + 1


def test_a_frame_within_the_budget_again_forgives_the_strikes(world: World) -> None:
    alice = world.connect("alice")
    for _ in range(int(world.burst)):
        world.router.admit(alice, FetchBundle(1, "bob"))
    for _ in range(MAX_STRIKES):
        assert not world.router.admit(alice, FetchBundle(1, "bob"))
    world.clock.now += 1 / world.rate  # one token back
    assert world.router.admit(alice, FetchBundle(1, "bob"))
    assert alice.strikes == 0
    assert not world.router.admit(alice, FetchBundle(1, "bob"))  # one strike, not MAX_STRIKES + 1


def test_acks_and_the_feed_have_their_own_budget(world: World) -> None:
    """A node draining its mailbox acknowledges as fast as it is delivered to: never cut off for it."""
    bob = world.connect("bob")
    for _ in range(int(world.burst)):
        world.router.admit(bob, FetchBundle(1, "alice"))
    assert not world.router.admit(bob, FetchBundle(1, "alice"))
    assert world.router.admit(bob, Ack(msg_id()))
    assert world.router.admit(bob, PublishCrl(b"crl"))
    assert world.metrics.frames.labels("Ack")._value.get() == 1  # admitted frames are counted


# --- SEND: routing and quotas ---------------------------------------------------------------------------


def test_a_send_to_nobody_known_is_refused_with_its_msg_id(world: World) -> None:
    alice = world.connect("alice")
    m = msg_id()
    assert not world.router.recipient_known(alice, Send(m, "nobody", b"x"), known=False)
    assert errors(alice) == [(ErrorCode.UNKNOWN_RECIPIENT, m)]
    assert world.router.recipient_known(alice, Send(m, "bob", b"x"), known=True)
    assert len(alice.outbox) == 1


def test_an_envelope_for_a_connected_recipient_keeping_up_is_pushed_from_memory(world: World) -> None:
    bob = world.connect("bob")
    bob.behind = False  # it has read its mailbox
    world.router.route(envelope(1))
    assert sent(bob) == [envelope(1)] and bob.wakes == 1


def test_an_envelope_for_an_offline_recipient_stays_in_the_store(world: World) -> None:
    alice = world.connect("alice")
    alice.behind = False
    world.router.route(envelope(1, to="bob"))
    assert not alice.outbox and alice.wakes == 0  # nobody else hears of it


def test_a_recipient_still_reading_its_mailbox_gets_new_mail_from_the_store(world: World) -> None:
    bob = world.connect("bob")
    assert bob.behind  # as it connects
    world.router.route(envelope(1))
    assert not bob.outbox and bob.behind and bob.wakes == 1


def test_a_recipient_whose_outbox_is_full_falls_behind_and_reads_from_the_store(ca: Any) -> None:
    world = World(ca.root, queue_limit=2)
    bob = world.connect("bob")
    bob.behind = False
    for seq in (1, 2, 3, 4):
        world.router.route(envelope(seq))
    assert sent(bob) == [envelope(1), envelope(2)] and bob.behind


def test_an_envelope_is_pushed_once_though_read_from_the_store_and_pushed_from_memory(world: World) -> None:
    bob = world.connect("bob")
    assert world.router.due(bob, envelope(1)) and world.router.due(bob, envelope(2))
    assert not world.router.due(bob, envelope(2)) and not world.router.due(bob, envelope(1))
    assert bob.cursor == 2


def test_a_full_share_of_a_mailbox_refuses_that_sender_only(world: World) -> None:
    alice, mallory = world.connect("alice"), world.connect("mallory", serial=2)
    full, other = msg_id(), msg_id()
    world.router.over_quota(mallory, full, QuotaExceeded(share_full("mallory", "bob", "2500 envelopes")))
    assert errors(mallory) == [(ErrorCode.QUOTA_EXCEEDED, full)]
    (frame,) = sent(mallory)
    assert isinstance(frame, Error) and "mallory's share of the mailbox of bob is full" in frame.text
    assert world.router.settled(alice, other, 1, None) is None
    assert sent(alice) == [Accepted(other)]


def test_a_send_is_accepted_only_once_its_writes_are_durable(world: World) -> None:
    alice = world.connect("alice")
    m = msg_id()
    assert world.router.settled(alice, m, 2, None) is None
    assert sent(alice) == [Accepted(m)]
    assert world.metrics.stored._value.get() == 2


@pytest.mark.parametrize(
    ("failure", "code"),
    [
        (QuotaExceeded("bob's mailbox is full"), ErrorCode.QUOTA_EXCEEDED),
        (StoreUnavailable("no Redis"), ErrorCode.UNAVAILABLE),
        (StoreWriteRefused("disk full"), ErrorCode.UNAVAILABLE),
    ],
)
def test_a_send_whose_write_failed_is_refused_with_its_msg_id(
    world: World, failure: Exception, code: ErrorCode
) -> None:
    alice = world.connect("alice")
    m = msg_id()
    assert world.router.settled(alice, m, 1, failure) is None
    assert errors(alice) == [(code, m)]
    assert world.metrics.stored._value.get() == 0
    refused_writes = world.metrics.write_refused.labels("envelope")._value.get()
    assert refused_writes == (1 if isinstance(failure, StoreWriteRefused) else 0)
    assert world.metrics.writable._value.get() == (0 if isinstance(failure, StoreWriteRefused) else 1)


def test_a_write_failing_for_a_bug_of_ours_is_handed_back_to_end_the_connection(world: World) -> None:
    alice = world.connect("alice")
    bug = RuntimeError("bug")
    assert world.router.settled(alice, msg_id(), 1, bug) is bug
    assert not alice.outbox


def test_an_acknowledged_delete_is_counted_and_only_a_bug_is_handed_back(world: World) -> None:
    assert world.router.deleted(True) is None
    assert world.router.deleted(False) is None  # there was none (deleted already)
    assert world.router.deleted(StoreUnavailable("no Redis")) is None  # delivered again later
    bug = RuntimeError("bug")
    assert world.router.deleted(bug) is bug
    assert world.metrics.acked._value.get() == 1


# --- who may publish ------------------------------------------------------------------------------------


def test_a_node_publishes_its_own_bundle_without_its_one_time_prekeys(world: World, bob_prekeys: Any) -> None:
    bob = world.connect("bob", certificate=bob_prekeys.bundle.certificate)
    onetime = [list(vars_of(key)) for key in bob_prekeys.onetime.values()]
    publish = PublishBundle(wire.encode(bob_prekeys.bundle), onetime, 0)
    stored = world.router.bundle_to_store(bob, publish)
    assert stored is not None
    signed, prekeys = stored
    frame = wire.decode(signed)
    assert isinstance(frame, PrekeyBundle) and frame.onetime is None
    assert prekeys == list(bob_prekeys.onetime.values())
    # Handed out with one of them: what the store takes back is a bundle again.
    bundle, left = Router.bundle_of((signed, prekeys[0], 2))
    assert bundle is not None and left == 2
    handed = wire.decode(bundle)
    assert isinstance(handed, PrekeyBundle) and handed.onetime == min(
        bob_prekeys.onetime.values(), key=lambda k: k.key_id
    )
    assert Router.bundle_of(None) == (None, 0)


def vars_of(key: OneTimePrekey) -> tuple[object, ...]:
    return (key.key_id, key.public, key.signature)


def test_nobody_publishes_a_bundle_for_another_node(world: World, bob_prekeys: Any) -> None:
    mallory = world.connect("mallory", certificate=b"mallory's certificate")
    publish = PublishBundle(wire.encode(bob_prekeys.bundle), [], 1)
    assert world.router.bundle_to_store(mallory, publish) is None
    assert errors(mallory) == [(ErrorCode.NOT_ALLOWED, None)]
    assert world.refused("not_allowed") == 1


def test_a_bundle_that_is_no_bundle_ends_the_connection(world: World) -> None:
    alice = world.connect("alice")
    for carried in (b"\xc1", wire.encode_link(Ack(msg_id()))):
        with pytest.raises(LinkRefused) as refused:
            world.router.bundle_to_store(alice, PublishBundle(carried, [], 0))
        assert refused.value.code == ErrorCode.MALFORMED


def test_only_the_ca_node_publishes_crls(world: World, ca: Any, now: datetime) -> None:
    mallory = world.connect("mallory")
    assert world.router.take_crl(mallory, PublishCrl(ca.crl(number=1)), now) is None
    assert errors(mallory) == [(ErrorCode.NOT_ALLOWED, None)]
    assert world.router.feed.highest_number is None


def test_a_crl_is_taken_once_and_never_an_older_or_forged_one(
    world: World, ca: Any, rogue_ca: Any, now: datetime
) -> None:
    publisher = world.connect("ca")
    crl = world.router.take_crl(publisher, PublishCrl(ca.crl(number=2)), now)
    assert crl is not None and crl.number == 2
    assert world.router.take_crl(publisher, PublishCrl(ca.crl(number=2)), now) is None  # the one held: silence
    assert not publisher.outbox
    assert world.router.take_crl(publisher, PublishCrl(ca.crl(number=1)), now) is None
    assert world.router.take_crl(publisher, PublishCrl(rogue_ca.crl(number=3)), now) is None
    assert errors(publisher) == [(ErrorCode.MALFORMED, None)] * 2
    assert world.router.feed.highest_number == 2


def test_a_crl_the_store_could_not_take_is_pushed_and_the_ca_hears_of_it(world: World) -> None:
    publisher = world.connect("ca")
    world.router.crl_unsaved(publisher, 4, StoreWriteRefused("disk full"))
    world.router.crl_outdated(publisher)
    assert errors(publisher) == [(ErrorCode.UNAVAILABLE, None), (ErrorCode.MALFORMED, None)]
    assert world.metrics.write_refused.labels("crl")._value.get() == 1


# --- the feed and REVOKED -------------------------------------------------------------------------------


def test_a_crl_held_is_due_once_to_every_connection(world: World, ca: Any, now: datetime) -> None:
    alice, bob = world.connect("alice", serial=1), world.connect("bob", serial=2)
    for conn in (alice, bob):
        assert world.router.crl_for(conn) is None  # due at login, but none held yet
        assert not conn.crl_due
    der = ca.crl(number=1)
    crl = world.router.take_crl(world.connect("ca", serial=3), PublishCrl(der), now)
    assert crl is not None
    assert world.router.hold_crl(der, crl) == []
    assert alice.crl_due and bob.crl_due and alice.wakes == bob.wakes == 1
    assert world.router.crl_for(alice) == der and not alice.crl_due
    assert not alice.outbox  # a flag, not a frame: a node that does not read holds one CRL at most


def test_a_crl_from_the_store_is_pushed_only_when_newer(world: World, ca: Any, now: datetime) -> None:
    alice = world.connect("alice")
    alice.crl_due = False
    assert world.router.adopt_crl(ca.crl(number=2), now) == []
    assert alice.crl_due
    alice.crl_due = False
    assert world.router.adopt_crl(ca.crl(number=2), now) == []  # the same number again
    assert world.router.adopt_crl(ca.crl(number=1), now) == []  # older: the feed never goes back
    assert not alice.crl_due and world.router.feed.highest_number == 2


def test_a_revoked_node_is_refused_at_login_with_the_words_of_the_crl(world: World, ca: Any, now: datetime) -> None:
    assert world.router.refusal("bob", 7, now) is None  # no CRL: the nodes decide, not the relay
    world.router.adopt_crl(ca.crl([7], number=3, reason="key-compromise"), now)
    words = world.router.refusal("bob", 7, now)
    assert words is not None and words.startswith("revoked (CRL #3, key-compromise, ")
    assert world.router.refusal("alice", 8, now) is None
    world.admitted.add("bob")  # a relay colluding with whoever holds bob's key
    assert world.router.refusal("bob", 7, now) is None


def test_a_new_crl_cuts_the_connections_it_revokes_once(world: World, ca: Any, now: datetime) -> None:
    alice, bob = world.connect("alice", serial=1), world.connect("bob", serial=2)
    assert world.router.adopt_crl(ca.crl([2], number=1), now) == [bob]
    assert bob.revoked and not alice.revoked
    assert errors(bob) == [(ErrorCode.REVOKED, None)]
    assert bob.crl_due  # the CRL goes first (the writer sends the flag before the queue), then REVOKED
    assert world.router.adopt_crl(ca.crl([2], number=2), now) == []  # cut already
    assert world.refused("revoked") == 1


def test_a_revoked_node_the_interceptor_admits_stays(world: World, ca: Any, now: datetime) -> None:
    bob = world.connect("bob", serial=2)
    world.admitted.add("bob")
    assert world.router.adopt_crl(ca.crl([2], number=1), now) == []
    assert not bob.revoked and not errors(bob)


def test_a_resync_reads_every_mailbox_from_the_store_again(world: World) -> None:
    alice, bob = world.connect("alice"), world.connect("bob")
    alice.behind = bob.behind = False
    world.router.resync()
    assert alice.behind and bob.behind and alice.wakes == bob.wakes == 1


# --- re-send bookkeeping --------------------------------------------------------------------------------


def push(world: World, conn: Conn, seqs: range, now: float = 0.0) -> None:
    for seq in seqs:
        world.router.pushed(conn, envelope(seq), 1, now)


def ack(world: World, conn: Conn, seq: int, now: float = 0.0) -> None:
    world.router.acknowledged(conn, envelope(seq).msg_id, now)


def test_a_deliver_is_awaited_for_resend_after_and_nothing_when_all_are_acknowledged(world: World) -> None:
    bob = world.connect("bob")
    assert world.router.resend_wait(bob, 0.0) is None
    push(world, bob, range(1, 3))
    assert world.router.resend_wait(bob, 1.0) == RESEND_AFTER - 1.0
    ack(world, bob, 1)
    ack(world, bob, 2)
    assert world.router.resend_wait(bob, 1.0) is None and not bob.resends  # stale entries dropped


def test_a_deliver_overtaken_by_a_later_ack_is_lost_once_due(world: World) -> None:
    bob = world.connect("bob")
    push(world, bob, range(1, 3))
    ack(world, bob, 2, now=1.0)
    assert world.router.lost(bob, 1.0) == []  # not due yet
    lost = world.router.lost(bob, RESEND_AFTER)
    assert [(m, s.seq, s.sends) for m, s in lost] == [(envelope(1).msg_id, 1, 1)]


def test_a_deliver_is_not_resent_to_a_node_busy_acknowledging_older_ones(world: World) -> None:
    bob = world.connect("bob")
    push(world, bob, range(1, 3))
    ack(world, bob, 1, now=RESEND_AFTER - 0.5)  # it keeps up, slowly; 2 may simply be next
    assert world.router.lost(bob, RESEND_AFTER) == []
    assert world.router.resend_wait(bob, RESEND_AFTER) == RESEND_AFTER  # looked at again later


def test_a_deliver_to_a_silent_node_is_resent_after_resend_after(world: World) -> None:
    bob = world.connect("bob")
    push(world, bob, range(1, 2))
    assert [s.seq for _, s in world.router.lost(bob, RESEND_AFTER)] == [1]


def test_a_deliver_resend_gap_behind_the_latest_ack_is_lost_at_once(world: World) -> None:
    bob = world.connect("bob")
    push(world, bob, range(1, RESEND_GAP + 2))
    for seq in range(2, RESEND_GAP + 1):
        ack(world, bob, seq)
    assert not bob.gap and bob.wakes == 0
    ack(world, bob, RESEND_GAP + 1)  # the RESEND_GAP-th acknowledged after 1
    assert bob.gap and bob.wakes == 1
    assert [s.seq for _, s in world.router.lost(bob, 0.0)] == [1]  # at once, not after resend_after
    assert not bob.gap


def test_a_gap_larger_than_a_batch_is_resent_over_several_turns(world: World) -> None:
    bob = world.connect("bob")
    total = RESEND_BATCH + 10
    push(world, bob, range(1, total + RESEND_GAP + 1))
    for seq in range(total + 1, total + RESEND_GAP + 1):
        ack(world, bob, seq)
    assert len(world.router.lost(bob, 0.0)) == RESEND_BATCH and bob.gap  # more on the next turn


def test_a_deliver_sent_again_waits_twice_as_long_up_to_the_bound(world: World) -> None:
    bob = world.connect("bob")
    for sends, factor in ((2, 2), (3, 4), (10, RESEND_BACKOFF_MAX)):
        world.router.pushed(bob, envelope(1), sends, 0.0)
        assert world.router.resend_wait(bob, 0.0) == RESEND_AFTER * factor
    assert list(bob.inflight) == [envelope(1).msg_id]  # one entry, whatever the pushes


def test_a_lost_deliver_gone_from_the_store_is_forgotten(world: World) -> None:
    bob = world.connect("bob")
    push(world, bob, range(1, 2))
    ((m, _),) = world.router.lost(bob, RESEND_AFTER)
    world.router.gone(bob, m)
    assert not bob.inflight and world.router.resend_wait(bob, RESEND_AFTER) is None
