"""The lab harness: a CA, a relay and N nodes in one process on 127.0.0.1, with a clock the
scenario moves.

Everything is the real thing: the relay is `relay.server.Relay` (or, for the crash scenario, a
`kmsnet relay` subprocess that can be killed), nodes are `node.node.Node` with encrypted keystores
in a temporary directory, connections are WebSockets on loopback, certificates and CRLs come from
`protocol.certs` and `protocol.crl`, and the CA publishes CRLs over a link authenticated as
the node named "ca", as the CA node does. The only thing simulated is time: `LabClock` is the wall
clock plus an offset that `advance` moves (certificate validity, CRL nextUpdate, bundle age all
read it), passed to every node and to the in-process relay.

A scenario talks to the lab in its own words (`say`, `until`, `publish_crl`, `advance`); the lab
records what happened on the scenario's `Timeline`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding
from websockets.asyncio.client import connect

from node.clock import utcnow
from node.errors import NodeError
from node.events import Message, SecurityEvent
from node.home import provision_node
from node.keystore import Keystore
from node.node import Node, NodeOptions
from node.receipts import DeliveryPolicy
from protocol import certs, wire
from protocol.crl import RevokedEntry, issue_crl
from protocol.errors import ProtocolError
from protocol.identity import IdentityKey
from protocol.link import Auth, BundleReply, Challenge, Error, FetchBundle, PublishCrl, auth_signed_bytes
from relay.interceptor import Interceptor
from relay.server import Relay, RelayConfig
from scenarios.timeline import RELAY, Kind, Timeline

log = logging.getLogger("kmsnet.scenarios")

#: Security events that report something noticed rather than something refused.
NOTICES = frozenset({"session_established", "identity_changed", "session_reset", "state_rollback"})
#: How long a lab waits for a condition before the scenario fails as "did not happen".
DEFAULT_WAIT = 10.0
#: Seconds a node waits for the relay's ACCEPTED before `send` returns with the envelope queued.
SEND_TIMEOUT = 2.0
#: The scripted scenarios count envelopes as nodes sent them before receipts and re-sends (issue #14):
#: those stay off in the lab, so that each scenario shows the one defence it is about.
LAB_DELIVERY = DeliveryPolicy(active=False)


class LabTimeout(Exception):
    """Something the scenario waited for did not happen in time (the scenario fails)."""


class LabClock:
    """The lab's time: the wall clock plus an offset that only `advance` moves."""

    def __init__(self) -> None:
        self._offset = timedelta()

    def now(self) -> datetime:
        """What every node, the relay and the CA take to be the current time."""
        return utcnow() + self._offset

    def advance(self, delta: timedelta) -> None:
        """Move time forward (certificates age, CRLs go stale, prekeys come due for rotation)."""
        self._offset += delta


@dataclass(frozen=True)
class Enrolled:
    """What enrolment hands a node: its name, identity key, DER certificate and serial."""

    name: str
    identity: IdentityKey
    certificate: bytes
    serial: int


class LabCA:
    """A certificate authority: an Ed25519 root, node certificates, numbered CRLs.

    Two of them with the same `name` are a CA and its lookalike: only the key tells them apart,
    which is what the rogue-CA scenario is about.
    """

    def __init__(self, clock: LabClock, name: str = "kmsnet-lab-ca") -> None:
        self.clock = clock
        self.key = Ed25519PrivateKey.generate()
        now = clock.now()
        self.root = certs.make_root(
            key=self.key, name=name, serial=1, not_before=now - timedelta(days=1), not_after=now + timedelta(days=3650)
        )
        self._serials = itertools.count(0x1001)
        self._revoked: dict[int, RevokedEntry] = {}
        self._names: dict[int, str] = {}
        self.crl_number = 0

    def enrol(
        self, name: str, *, identity: IdentityKey | None = None, lifetime: timedelta = timedelta(days=90)
    ) -> Enrolled:
        """Issue a certificate for `name` (a fresh identity key unless one is given)."""
        identity = identity or IdentityKey.generate()
        serial = next(self._serials)
        now = self.clock.now()
        cert = certs.issue(
            ca_key=self.key,
            ca_cert=self.root,
            subject_name=name,
            public_key=identity.public,
            serial=serial,
            not_before=now - timedelta(minutes=10),
            not_after=now + lifetime,
        )
        self._names[serial] = name
        return Enrolled(name, identity, cert.public_bytes(Encoding.DER), serial)

    def revoke(self, serial: int, reason: str = "key-compromise") -> None:
        """List `serial` in every CRL issued from now on."""
        self._revoked[serial] = RevokedEntry(serial, self.clock.now(), reason)

    @property
    def revoked_names(self) -> list[str]:
        """Who the next CRL revokes, by name."""
        return [self._names.get(serial, f"serial {serial:x}") for serial in sorted(self._revoked)]

    def issue_crl(self, *, valid_for: timedelta = timedelta(hours=24)) -> bytes:
        """The next CRL (number one higher), valid from now for `valid_for`."""
        self.crl_number += 1
        now = self.clock.now()
        return issue_crl(
            ca_key=self.key,
            ca_cert=self.root,
            number=self.crl_number,
            this_update=now - timedelta(seconds=1),
            next_update=now + valid_for,
            revoked=self._revoked.values(),
        )


@dataclass
class Sent:
    """One message a scenario had a node send, and whether the node got it out."""

    index: int
    sender: str
    recipient: str
    text: str
    ok: bool = False


@dataclass(eq=False)
class LabNode:
    """A running node, with everything its application received so far."""

    enrolled: Enrolled
    node: Node
    keystore: Keystore
    path: Path
    options: NodeOptions
    lane: str
    messages: list[Message] = field(default_factory=list)
    events: list[SecurityEvent] = field(default_factory=list)
    pump: asyncio.Task[None] | None = None

    @property
    def name(self) -> str:
        """The node's name (its certificate's CN)."""
        return self.enrolled.name

    def texts(self, sender: str | None = None) -> list[str]:
        """Texts received, oldest first (from `sender` only, if given)."""
        return [m.text for m in self.messages if sender is None or m.sender == sender]

    def refusals(self, *names: str) -> list[SecurityEvent]:
        """Security events that refused something (only those named, if any are given)."""
        return [e for e in self.events if e.event not in NOTICES and (not names or e.event in names)]

    def notices(self, name: str) -> list[SecurityEvent]:
        """Security events named `name` (e.g. "peer_revoked")."""
        return [e for e in self.events if e.event == name]


class RelayProcess:
    """A `kmsnet relay` subprocess with a SQLite store on disk: the one relay that can be killed."""

    def __init__(self, workdir: Path, ca_root_pem: bytes) -> None:
        self.workdir = workdir
        self.ca_path = workdir / "ca.pem"
        self.ca_path.write_bytes(ca_root_pem)
        self.store = workdir / "relay-process.db"
        self.proc: asyncio.subprocess.Process | None = None
        self.port = 0
        self.url = ""

    async def start(self) -> str:
        """Start on the port of the last run (any free port the first time); return its URL."""
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "kmsnet", "relay", "--port", str(self.port), "--store", str(self.store),
            "--ca-cert", str(self.ca_path),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
            env={**os.environ, "KMSNET_LOG_LEVEL": "WARNING"},
        )  # fmt: skip
        assert self.proc.stdout is not None
        async with asyncio.timeout(30):
            self.url = (await self.proc.stdout.readline()).decode().strip()
        if not self.url.startswith("ws://"):
            raise LabTimeout(f"the relay process did not start (said {self.url!r})")
        self.port = int(self.url.rsplit(":", 1)[1])
        return self.url

    async def kill(self) -> None:
        """SIGKILL: no flush, no goodbye, exactly what a power cut does to the process."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGKILL)
            await self.proc.wait()

    async def stop(self) -> None:
        """SIGTERM and wait."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(10):
                    await self.proc.wait()
            except TimeoutError:
                await self.kill()


class Lab:
    """One scenario's world. Use as `async with Lab(timeline, workdir, interceptor=...) as lab:`.

    `relay_process=True` runs the relay as a subprocess (`lab.relay_process`) instead of in this
    process (`lab.relay`); an interceptor needs the in-process relay.
    """

    def __init__(
        self,
        timeline: Timeline,
        workdir: Path,
        clock: LabClock,
        *,
        interceptor: Interceptor | None = None,
        relay_process: bool = False,
    ) -> None:
        self.timeline = timeline
        self.workdir = workdir
        self.clock = clock
        self.ca = LabCA(clock)
        self.interceptor = interceptor
        self.relay: Relay | None = None
        self.relay_process = RelayProcess(workdir, certs.certificate_pem(self.ca.root)) if relay_process else None
        self.url = ""
        self.nodes: dict[str, LabNode] = {}
        self.sent: list[Sent] = []
        self._ca_node = self.ca.enrol("ca")
        self._key_file = workdir / "keystore.key"
        self._key_file.write_bytes(os.urandom(32))
        self._key_file.chmod(0o600)
        self._quiet_texts: set[str] = set()
        #: The nodes' pumps run in the lab's TaskGroup: one that breaks cancels the scenario at once,
        #: and the lab fails with its error as it closes.
        self._tasks: asyncio.TaskGroup | None = None
        self._exits = contextlib.AsyncExitStack()

    async def __aenter__(self) -> Lab:
        self._tasks = await self._exits.enter_async_context(asyncio.TaskGroup())
        try:
            await self._start_relay()
        except BaseException:
            await self._exits.aclose()
            raise
        log.info("lab_started", extra={"fields": {"relay": self.url, "workdir": str(self.workdir)}})
        return self

    async def _start_relay(self) -> None:
        if self.relay_process is not None:
            self.url = await self.relay_process.start()
        else:
            config = RelayConfig(
                ca_root=self.ca.root, port=0, store_path=str(self.workdir / "relay.db"), clock=self.clock.now
            )
            self.relay = Relay(config, interceptor=self.interceptor)
            await self.relay.start()
            self.url = self.relay.url
            bind = getattr(self.interceptor, "bind", None)
            if bind is not None:
                bind(self.relay)  # an attacker that wants the relay's store (to take bundles as it does)

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            for lab_node in list(self.nodes.values()):
                await self.stop_node(lab_node)
            if self.relay is not None:
                await self.relay.close()
            if self.relay_process is not None:
                await self.relay_process.stop()
        finally:
            # The pumps are cancelled by now; the group reaps them. Only a cancellation is handed to
            # it (the one it sent when a pump broke is then swallowed): a scenario's own failure
            # passes through the lab as it is.
            cancelled = exc if isinstance(exc, asyncio.CancelledError) else None
            try:
                await self._exits.__aexit__(type(cancelled) if cancelled else None, cancelled, None)
            except ExceptionGroup as broken:
                # A broken pump is a broken lab: say why, in its own words.
                raise broken.exceptions[0] from broken
            finally:
                self._tasks = None
        log.info("lab_stopped", extra={"fields": {"workdir": str(self.workdir)}})

    # --- the CA -----------------------------------------------------------------------------------------

    async def publish_crl(self, *, valid_for: timedelta = timedelta(hours=24)) -> bytes:
        """Issue the CA's next CRL and publish it to the relay as the CA node does; return its DER."""
        der = self.ca.issue_crl(valid_for=valid_for)
        revoked = ", ".join(self.ca.revoked_names) or "nobody"
        self.timeline.add(
            Kind.SEND,
            "ca",
            f"CA publishes CRL #{self.ca.crl_number} (revokes {revoked}; next update in {_hours(valid_for)})",
            peer=RELAY,
            number=self.ca.crl_number,
        )
        await self.push_crl(der)
        return der

    async def push_crl(self, der: bytes) -> None:
        """Send a CRL to the relay over a link authenticated as the CA node, and wait until the relay
        has handled it (a bundle request after it is answered only once it is)."""
        who = self._ca_node
        async with connect(self.url, compression=None, max_size=None) as ws:
            challenge = wire.decode_link(_bytes(await ws.recv()))
            assert isinstance(challenge, Challenge)
            signature = who.identity.sign(auth_signed_bytes(challenge.nonce, challenge.relay, self.url))
            await ws.send(wire.encode_link(Auth(who.certificate, signature)))
            await ws.send(wire.encode_link(PublishCrl(der)))
            await ws.send(wire.encode_link(FetchBundle(1, "ca")))
            async with asyncio.timeout(DEFAULT_WAIT):
                while True:
                    for frame in wire.decode_link_frames(_bytes(await ws.recv())):
                        if isinstance(frame, Error):
                            self.timeline.add(Kind.REFUSE, RELAY, f"relay refused the CRL: {frame.text}", peer="ca")
                        if isinstance(frame, BundleReply):
                            return

    # --- nodes --------------------------------------------------------------------------------------------

    async def add_node(
        self, name: str, *, enrolled: Enrolled | None = None, lane: str | None = None, **options: Any
    ) -> LabNode:
        """Enrol `name` (or use `enrolled`), write its keystore (what `kmsnet node init` writes) and
        start it with `NodeOptions(**options)`. `lane` names it on the timeline when its certificate's
        name is taken (a thief running a node with a stolen identity)."""
        who = enrolled or self.ca.enrol(name)
        lane = lane or name
        path = self.workdir / f"{lane}.keystore"
        keystore = Keystore.open(path, key_file=self._key_file, create=True)
        provision_node(keystore, who.identity, certificate=who.certificate, root=self.ca.root, relays=[self.url])
        settings = NodeOptions(**{"send_timeout": SEND_TIMEOUT, **options})
        lab_node = LabNode(who, Node(keystore, options=settings, clock=self.clock.now), keystore, path, settings, lane)
        lab_node.node.delivery.policy = LAB_DELIVERY
        self.nodes[lane] = lab_node
        await self._start(lab_node)
        return lab_node

    async def restart_node(
        self,
        lab_node: LabNode,
        *,
        relay_url: str | None = None,
        while_stopped: Callable[[], None] | None = None,
        **options: Any,
    ) -> None:
        """Stop a node and start it again from its keystore file (what survives a restart is on disk),
        dialling `relay_url` instead of its own relay if given, with `options` changed if given.
        `while_stopped` runs in between (a scenario that restores the file from a copy, say)."""
        await self.stop_node(lab_node)
        if while_stopped is not None:
            while_stopped()
        lab_node.keystore = Keystore.open(lab_node.path, key_file=self._key_file)
        if options:
            lab_node.options = dataclasses.replace(lab_node.options, **options)
        lab_node.node = Node(lab_node.keystore, relay_url=relay_url, options=lab_node.options, clock=self.clock.now)
        lab_node.node.delivery.policy = LAB_DELIVERY
        await self._start(lab_node)

    async def _start(self, lab_node: LabNode) -> None:
        await lab_node.node.start()
        assert self._tasks is not None, "the lab is not running"
        lab_node.pump = self._tasks.create_task(self._pump(lab_node), name=f"lab-pump-{lab_node.name}")
        # The bundle goes out as the node connects; wait until the relay has it, so that a session
        # can start at once (the relay process cannot be asked: give it a moment instead).
        if self.relay is None:
            await asyncio.sleep(0.2)
            return
        deadline = asyncio.get_running_loop().time() + DEFAULT_WAIT
        while not await self.relay.store.known(lab_node.name):
            if asyncio.get_running_loop().time() > deadline:
                raise LabTimeout(f"the relay never received {lab_node.name}'s bundle")
            await asyncio.sleep(0.01)

    async def stop_node(self, lab_node: LabNode) -> None:
        """Stop a node and close its keystore."""
        if lab_node.pump is not None:
            lab_node.pump.cancel()  # the lab's TaskGroup reaps it
            lab_node.pump = None
        await lab_node.node.stop()
        lab_node.keystore.close()

    async def _pump(self, lab_node: LabNode) -> None:
        """Move what a node hands its application into the lab's records and the timeline."""
        while True:
            item = await lab_node.node.events.get()
            if isinstance(item, Message):
                lab_node.messages.append(item)
                self.timeline.add(
                    Kind.ACCEPT,
                    lab_node.lane,
                    f"{lab_node.lane} accepted from {item.sender}: {item.text!r}",
                    peer=item.sender,
                    detail=item.text in self._quiet_texts,
                    message=item.text,
                )
                continue
            lab_node.events.append(item)
            refused = item.event not in NOTICES
            verb = "REFUSED" if refused else "noticed"
            towards = f" from {item.peer}" if refused and item.peer else (f" with {item.peer}" if item.peer else "")
            self.timeline.add(
                Kind.REFUSE if refused else Kind.NOTICE,
                lab_node.lane,
                f"{lab_node.lane} {verb} {item.event}{towards}: {item.reason}",
                peer=item.peer,
                event=item.event,
                reason=item.reason,
            )

    # --- talking ------------------------------------------------------------------------------------------

    async def say(self, sender: LabNode, recipient: str, text: str, *, detail: bool = False) -> bool:
        """Have `sender` send `text` to `recipient`; False if its node refused to (e.g. a bad bundle:
        the node reports that itself as a security event)."""
        record = Sent(len(self.sent) + 1, sender.name, recipient, text)
        self.sent.append(record)
        if detail:
            self._quiet_texts.add(text)
        self.timeline.add(
            Kind.SEND, sender.lane, f"{sender.lane} → {recipient}: {text!r}", peer=recipient, detail=detail
        )
        try:
            await sender.node.send(recipient, text)
        except (ProtocolError, NodeError) as exc:
            log.info("send_refused", extra={"fields": {"node": sender.name, "to": recipient, "error": str(exc)}})
            return False
        record.ok = True
        return True

    async def chat(self, sender: LabNode, recipient: LabNode, text: str, *, detail: bool = False) -> None:
        """`sender` sends `text` and the scenario waits until `recipient`'s application has it."""
        await self.say(sender, recipient.name, text, detail=detail)
        await self.until(lambda: text in recipient.texts(sender.name), f"{recipient.name} has {text!r}")

    async def open_session(self, a: LabNode, b: LabNode) -> None:
        """`a` starts a session with `b` and `b` answers, so both hold it and both have stepped the ratchet."""
        await self.chat(a, b, f"hello {b.name}")
        await self.chat(b, a, f"hi {a.name}")

    def forged(self, lab_node: LabNode) -> list[Message]:
        """Messages `lab_node` accepted that their claimed sender never sent (through `say`)."""
        genuine = {(s.sender, s.text) for s in self.sent}
        return [m for m in lab_node.messages if (m.sender, m.text) not in genuine]

    # --- waiting --------------------------------------------------------------------------------------------

    async def until(self, condition: Callable[[], bool], what: str, timeout: float = DEFAULT_WAIT) -> None:
        """Wait until `condition()` holds; the scenario fails with `what` if it does not in time."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            if condition():
                return
            if asyncio.get_running_loop().time() > deadline:
                raise LabTimeout(f"timed out after {timeout:g} s waiting until {what}")
            await asyncio.sleep(0.01)

    async def wait_for(self, condition: Callable[[], bool], timeout: float = 2.0) -> bool:
        """Like `until`, but say whether it happened instead of failing (for outcomes a broken
        defence would change: the check reports them)."""
        try:
            await self.until(condition, "", timeout)
        except LabTimeout:
            return False
        return True

    async def settle(self, quiet: float = 0.15, timeout: float = DEFAULT_WAIT) -> None:
        """Wait until nothing has happened for `quiet` seconds (stray refusals and deliveries land)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while asyncio.get_running_loop().time() < deadline:
            count = len(self.timeline.events)
            await asyncio.sleep(quiet)
            if len(self.timeline.events) == count:
                return

    def advance(self, delta: timedelta) -> None:
        """Move the lab clock forward and say so on the timeline."""
        self.clock.advance(delta)
        self.timeline.add(Kind.STORY, "lab", f"the clock moves forward {delta}")


def _hours(delta: timedelta) -> str:
    hours = delta.total_seconds() / 3600
    return f"{hours:g} h"


def _bytes(raw: object) -> bytes:
    if not isinstance(raw, bytes):
        raise ProtocolError("the relay sent a text frame")
    return raw
