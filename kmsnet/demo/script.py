"""The demo's script: set up a CA, a relay and the nodes, converse, revoke, shut down; and what the
children report, shown on the transcript as it comes."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import secrets
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from ca.admin import code_at, secret_from_uri
from kmsnet.demo.options import MAX_NODES, MIN_NODES, DemoFailure, DemoOptions, node_names
from kmsnet.demo.processes import Child, Line, Processes
from kmsnet.demo.transcript import Transcript
from kmsnet.exits import TRUST, UNREACHABLE
from node.clock import utcnow

#: Seconds a step may wait for what it expects to see.
STEP_TIMEOUT = 30.0
#: The stages of the script, as the transcript counts them.
STEPS = 6
#: The relay's log events worth a line in the transcript (connections come and go with every command).
RELAY_SHOWN = {"crl_published", "auth_refused", "frame_refused"}
LOG_KEYS = ("time", "level", "event")


@dataclass(frozen=True)
class Sent:
    """A message the script sent, to tell its delivery and the ratchet steps it caused."""

    sender: str
    to: str
    text: str


def _listed(names: list[str]) -> str:
    """alice, bob, carol; or alice, bob, … node20 (20) when there are many."""
    if len(names) <= 4:
        return ", ".join(names)
    return f"{names[0]}, {names[1]}, … {names[-1]} ({len(names)})"


def _quote(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def _json(result: subprocess.CompletedProcess[str]) -> Any:
    return json.loads(result.stdout.strip().splitlines()[-1])


class Demo:
    """The script: set up, converse, revoke, shut down; with the transcript of what the nodes report."""

    def __init__(self, workspace: Path, options: DemoOptions) -> None:
        self.ws = workspace
        self.options = options
        self.names = node_names(options.nodes)
        self.passphrase = secrets.token_urlsafe(24)
        env = {k: v for k, v in os.environ.items() if not k.startswith("KMSNET_")}
        # Fast Argon2 keeps each command's keystore unlock short; the transcript says so.
        env.update(
            KMSNET_PASSPHRASE=self.passphrase, KMSNET_ARGON2_PROFILE="test", KMSNET_LOG_JSON="1",
            PYTHONUNBUFFERED="1",
        )  # fmt: skip
        self.procs = Processes(env, workspace)
        self.out = Transcript(options, self.names, steps=STEPS)
        self.relay: Child | None = None
        self.ca: Child | None = None
        self.relay_url = ""
        self.ca_url = ""
        self.fingerprint = ""
        self.otpauth = ""
        self.followers: dict[str, Child] = {}
        self.paused: set[str] = set()
        # What the children reported, for the script's waits and the summary.
        self.relay_log: list[dict[str, Any]] = []
        self.received: dict[str, list[dict[str, Any]]] = {name: [] for name in self.names}
        self.first_lines: dict[Child, Line] = {}
        self.sent: dict[str, Sent] = {}
        self.delivered: set[str] = set()
        self.events: Counter[str] = Counter()
        self.safety: dict[tuple[str, str], str] = {}
        # (initiator, peer) of sessions whose initiator has not yet shown its session_established:
        # a `send` stores that event, and the node's next `receive` prints it.
        self.unreported: set[tuple[str, str]] = set()
        self.last_sender: dict[frozenset[str], str] = {}
        self.dh_steps = 0
        self.refused = 0

    # --- running ---

    def run(self) -> None:
        """The whole demo; every child is stopped on the way out, also after a failure or Ctrl-C."""
        try:
            self._headline()
            self._ca()
            self._enrol(self._service())
            self._conversation()
            self._revocation()
            self._shutdown()
            self._summary()
        finally:
            self.procs.stop_everything()

    @property
    def late(self) -> str:
        """The node that is offline while others write to it, and is revoked: carol (bob with two nodes)."""
        return self.names[2] if len(self.names) > 2 else self.names[1]

    def home(self, name: str) -> str:
        """The home directory of node `name` (or "ca")."""
        return str(self.ws / name)

    def _headline(self) -> None:
        where = f"in {self.ws}" + (" (kept)" if self.options.keep else " (removed at the end)")
        self.out.plain(
            f"kmsnet demo: a CA, a relay and {len(self.names)} nodes as real processes on 127.0.0.1, {where}",
            bold=True,
        )
        self.out.plain("demo keystores use fast key derivation (KMSNET_ARGON2_PROFILE=test): a lab, not real keys")
        if self.options.keep:
            # Written first, so that a kept workspace opens even after a failed run.
            _write_secret(self.ws / "passphrase", self.passphrase)

    def _ca(self) -> None:
        self.out.step(1, "CA and relay")
        step = "CA"
        created = _json(self._run(step, "ca", "init", "--home", self.home("ca"), "--json"))
        self.fingerprint = created["fingerprint"]
        self.otpauth = created["admin"]["otpauth"]
        if self.options.keep:
            _write_secret(self.ws / "admin.otpauth", self.otpauth)
        self.out.line("ca", "info", f"root key and certificate created; root fingerprint {self.fingerprint[:16]}…")
        # The relay needs only the root certificate: it starts while the administrator logs in.
        self.relay = self.procs.start(
            "relay", "relay", "--port", "0", "--store", str(self.ws / "relay.db"),
            "--ca-cert", str(self.ws / "ca" / "ca.pem"),
        )  # fmt: skip
        # The administrator's authenticator app, computed from the otpauth:// URI `ca init` printed.
        code = code_at(secret_from_uri(self.otpauth), utcnow())
        session = _json(self._run(step, "ca", "login", "--home", self.home("ca"), "--otp", code, "--json"))
        who = f"admin {session['admin']!r} (role {session['role']})"
        self.out.line("ca", "secure", f"{who} logged in with TOTP code {code}, a 15-minute session")
        listening = self._first_line("relay", self.relay)
        self.relay_url = listening.text
        self.out.line(
            "relay", "info", f"listening on {self.relay_url} (untrusted: it only ever sees ciphertext)", at=listening.at
        )

    def _service(self) -> list[str]:
        """Start the CA's service; the enrolment tokens, one per node."""
        self.out.step(2, "CA service and enrolment tokens")
        step = "CA service"
        self.ca = self.procs.start(
            "ca", "ca", "serve", "--home", self.home("ca"), "--http", "127.0.0.1:0", "--relay", self.relay_url
        )
        # Tokens need only the admin session: they are made while the service starts.
        tokens = self.procs.run_all(step, [["ca", "token", "--home", self.home("ca"), name] for name in self.names])
        serving = self._first_line(step, self.ca)
        self.ca_url = serving.text
        self.out.line("ca", "info", f"serving enrolment, CRL and OCSP on {self.ca_url}", at=serving.at)
        self._wait(step, lambda: self._relay_logged("crl_published"), "the CA's CRL never reached the relay")
        self.out.line("ca", "info", f"one-time enrolment tokens for {_listed(self.names)}")
        return [token.stdout.strip() for token in tokens]

    def _enrol(self, tokens: list[str]) -> None:
        self.out.step(3, f"enrolment of {len(self.names)} nodes (identity key, certificate, keystore)")
        inits = [
            ["node", "init", name, "--home", self.home(name), "--ca", self.ca_url, "--token", token,
             "--relay", self.relay_url, "--ca-fingerprint", self.fingerprint, "--json"]
            for name, token in zip(self.names, tokens, strict=True)
        ]  # fmt: skip
        enrolled = self.procs.run_all("enrolment", inits)
        self._drain()
        for name, result in zip(self.names, enrolled, strict=True):
            record = _json(result)
            self.out.line(
                name, "secure", f"enrolled: certificate {record['serial']} until {record['not_after'][:16]}, "
                "CA root pinned by fingerprint", data=record,
            )  # fmt: skip

    def _conversation(self) -> None:
        self.out.step(4, "conversation")
        alice, bob, late = self.names[0], self.names[1], self.late
        step = "conversation"
        self.out.line(
            "demo", "note", "a node listens with `kmsnet receive --follow`, paused while `kmsnet send` uses its home"
        )
        mark = len(self.relay_log)
        self._listen([bob])
        online = [bob]
        if late != bob:
            # Carol connects once, publishing her prekeys, and goes away again (while bob starts).
            self.out.line(late, "note", "connects once to publish her prekeys, then goes offline")
            self._run(step, "receive", "--home", self.home(late), "--timeout", "15")
            online.append(late)
        self._until_published(step, online, mark)
        writes = [Sent(alice, bob, f"Hi {bob}, it's {alice}.")]
        if late != bob:
            writes.append(Sent(alice, late, f"{late.capitalize()}, call me when you're back."))
        self._send(step, writes)
        self._resume(step, [alice])
        writes = [Sent(bob, alice, f"Hi {alice}! Got it, the session works.")]
        if late != bob:
            writes.append(Sent(bob, late, f"{late.capitalize()}, {alice} and I are chatting, join us."))
        self._send(step, writes)
        if late == bob:
            self._send(step, [Sent(alice, bob, f"{bob}, are you still there?")])
        extras = self.names[3:]
        if extras:
            self.out.line("demo", "note", f"{len(extras)} more nodes each write to {alice}")
            self._send(step, [Sent(name, alice, f"Hello {alice}, {name} here.") for name in extras])
        self.out.line(late, "note", "comes back online and catches up with what waited at the relay")
        self._resume(step, [late, *sorted(self.paused - {late})])
        self._wait_delivered(step, [msg_id for msg_id, sent in self.sent.items() if sent.to == late])

    def _revocation(self) -> None:
        self.out.step(5, "revocation")
        step = "revocation"
        alice, late = self.names[0], self.late
        watchers = [name for name in self.names[:2] if name != late]
        mark = {name: len(self.received[name]) for name in watchers}
        revoke = ["ca", "revoke", "--home", self.home("ca"), late, "--reason", "key-compromise", "--json"]
        revoked = _json(self._run(step, *revoke))
        serials = ", ".join(cert["serial"] for cert in revoked["revoked"])
        crl = f"CRL #{revoked['crl_number']} issued"
        self.out.line("ca", "alert", f"{late} revoked (key-compromise): certificate {serials}; {crl}", data=revoked)
        self._wait(
            step,
            lambda: all(self._event_seen(name, "peer_revoked", late, mark[name]) for name in watchers),
            f"{' and '.join(watchers)} did not report {late}'s revocation",
        )
        if late != self.names[1]:
            bob = self.names[1]
            self._send(step, [Sent(alice, bob, f"{late.capitalize()}'s key was compromised: the CA revoked her.")])
        # The feed cut the session; a new attempt must be refused too, with a trust failure.
        text = f"{late}, are you there?"
        self._pause([alice])
        self.out.line(alice, "send", f"to {late}: {_quote(text)}")
        result = self._run(step, "send", "--home", self.home(alice), "--to", late, text, check=False)
        if result.returncode != TRUST:
            raise DemoFailure(step, f"{alice}'s send to revoked {late} exited {result.returncode}, not {TRUST}")
        self.refused += 1
        error = result.stderr.strip().splitlines()[-1]
        self.out.line(alice, "alert", f"refused (exit {result.returncode}): {error}")

    def _shutdown(self) -> None:
        self.out.step(6, "shutdown")
        codes = self.procs.stop(self.followers.values())
        self.followers.clear()
        # The CA before the relay: it would otherwise retry its relay link.
        for service in (self.ca, self.relay):
            if service is not None:
                codes |= self.procs.stop([service])
        self._drain()
        unclean = [f"{child.name} exited {code}" for child, code in codes.items() if code != 0]
        if unclean:
            raise DemoFailure("shutdown", ", ".join(unclean))
        self.out.line("demo", "info", f"clean shutdown: {len(codes)} processes stopped, every one exited 0")

    def _summary(self) -> None:
        delivered = len(self.delivered & set(self.sent))
        events = ", ".join(f"{name} ×{count}" for name, count in sorted(self.events.items()))
        summary = {
            "nodes": len(self.names),
            "messages_sent": len(self.sent),
            "messages_delivered": delivered,
            "dh_ratchet_steps": self.dh_steps,
            "sends_refused": self.refused,
            "events": dict(self.events),
            "seconds": round(self.out.elapsed(), 1),
        }
        if self.options.as_json:
            click.echo(json.dumps({"kind": "summary", **summary}))
        else:
            self.out.plain()
            self.out.plain(
                f"summary: {len(self.sent)} messages sent, {delivered} delivered; DH ratchet steps: {self.dh_steps}; "
                f"sends refused: {self.refused}; events: {events}; {summary['seconds']} s",
                bold=True,
            )
        if self.options.keep:
            self._instructions()

    def _instructions(self) -> None:
        """How to go on by hand in the kept workspace."""
        secret = self.ws / "passphrase"
        relay_port = self.relay_url.rsplit(":", 1)[1]
        ca_listen = self.ca_url.removeprefix("http://")
        bin_dir = Path(sys.executable).parent
        q = shlex.quote
        setup = f'export PATH={q(str(bin_dir))}:"$PATH" KMSNET_PASSPHRASE="$(cat {q(str(secret))})"'
        lines = [
            "",
            f"Workspace kept in {self.ws}. The demo stopped its relay and CA: restart them with the commands",
            "below (same ports: the nodes stored these URLs). In every terminal first:",
            f"  {setup}",
            "terminal 1, the relay:",
            f"  kmsnet relay --port {relay_port} --store {q(str(self.ws / 'relay.db'))} "
            f"--ca-cert {q(str(self.ws / 'ca' / 'ca.pem'))}",
            "terminal 2, the CA:",
            f"  kmsnet ca serve --home {q(self.home('ca'))} --http {ca_listen} --relay {self.relay_url}",
            f"terminals 3 and 4, {self.names[0]} and {self.names[1]} chat:",
            f"  kmsnet chat --home {q(self.home(self.names[0]))}",
            f"  kmsnet chat --home {q(self.home(self.names[1]))}",
            f"or script it: kmsnet send --home {q(self.home(self.names[1]))} --to {self.names[0]} 'hi'; "
            f"kmsnet receive --home {q(self.home(self.names[0]))} --follow; kmsnet status --home ...",
            f"The administrator's TOTP URI (for `kmsnet ca login`) is in {q(str(self.ws / 'admin.otpauth'))}.",
        ]
        for line in lines:
            self.out.plain(line)

    # --- the script's verbs ---

    def _run(self, step: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """One command to its end, then what the other processes printed meanwhile (the transcript
        stays in time order)."""
        result = self.procs.run(step, *args, check=check)
        self._drain()
        return result

    def _send(self, step: str, writes: list[Sent]) -> None:
        """Send each message with its own `kmsnet send`; senders side by side, one sender's in order."""
        self._pause(sorted({w.sender for w in writes}))
        talked = {frozenset((s.sender, s.to)) for s in self.sent.values()}
        for w in writes:
            if frozenset((w.sender, w.to)) not in talked:
                self.unreported.add((w.sender, w.to))
            offline = " (offline: the relay keeps it)" if w.to not in self.followers else ""
            self.out.line(w.sender, "send", f"to {w.to}: {_quote(w.text)}{offline}")
        by_sender: dict[str, list[Sent]] = {}
        for w in writes:
            by_sender.setdefault(w.sender, []).append(w)

        def send_in_order(mine: list[Sent]) -> list[tuple[Sent, Any]]:
            return [
                (w, _json(self.procs.run(step, "send", "--home", self.home(w.sender), "--to", w.to, w.text, "--json")))
                for w in mine
            ]

        results = [pair for done in self.procs.parallel(send_in_order, by_sender.values()) for pair in done]
        for w, record in results:
            self.sent[record["id"]] = w
            if record["queued"]:
                self.out.line(w.sender, "note", f"queued in its outbox: the relay has not confirmed {record['id']}")
        live = [msg_id for msg_id, w in self.sent.items() if w.to in self.followers]
        self._wait_delivered(step, live)

    def _pause(self, names: Iterable[str]) -> None:
        """Stop these nodes' receiving processes so that another command may use their homes."""
        children = [self.followers.pop(name) for name in names if name in self.followers]
        codes = self.procs.stop(children)
        self.paused.update(child.name for child in children)
        self._drain()
        for child, code in codes.items():
            if code != 0:
                raise DemoFailure("conversation", f"{child.name}'s receive exited {code}: {child.last_error()}")

    def _resume(self, step: str, names: list[str]) -> None:
        """Have these nodes listen again, and wait until they are online."""
        mark = len(self.relay_log)
        self._listen(names)
        self._until_published(step, names, mark)

    def _listen(self, names: list[str]) -> None:
        """Start `kmsnet receive --follow --json` for these nodes."""
        for name in names:
            self.out.line(name, "note", "listening: kmsnet receive --follow")
            self.followers[name] = self.procs.start(name, "receive", "--home", self.home(name), "--follow", "--json")
            self.paused.discard(name)

    def _until_published(self, step: str, names: list[str], mark: int) -> None:
        """Wait until the relay logged, after entry `mark`, a prekey bundle from each node (it is online),
        and each has shown the sessions it started while it was not listening."""
        self._wait(
            step,
            lambda: (
                all(self._relay_logged("bundle_published", name, mark) for name in names)
                and not any(initiator in names for initiator, _ in self.unreported)
            ),
            f"{_listed(names)} did not come online",
        )

    def _wait_delivered(self, step: str, ids: list[str]) -> None:
        self._wait(step, lambda: self.delivered.issuperset(ids), "a message was not delivered")

    # --- reading what the children print ---

    def _first_line(self, step: str, child: Child) -> Line:
        """The line a service prints once it listens: its URL."""
        self._wait(step, lambda: child in self.first_lines, f"{child.name} printed no URL")
        return self.first_lines[child]

    def _relay_logged(self, event: str, node: str | None = None, since: int = 0) -> bool:
        return any(
            entry.get("event") == event and (node is None or entry.get("node") == node)
            for entry in self.relay_log[since:]
        )

    def _event_seen(self, name: str, event: str, peer: str, since: int) -> bool:
        return any(
            item.get("type") == "event" and item.get("event") == event and item.get("peer") == peer
            for item in self.received[name][since:]
        )

    def _wait(self, step: str, done: Callable[[], bool], what: str) -> None:
        """Show what the children print until `done()`; fail `step` on timeout or if a child dies."""
        deadline = time.monotonic() + STEP_TIMEOUT
        while not done():
            left = deadline - time.monotonic()
            if left <= 0:
                raise DemoFailure(step, f"{what} within {STEP_TIMEOUT:.0f} s", UNREACHABLE)
            try:
                line = self.procs.lines.get(timeout=left)
            except queue.Empty:
                continue
            self._handle(line)

    def _drain(self) -> None:
        """Show whatever the children printed so far."""
        while True:
            try:
                self._handle(self.procs.lines.get_nowait())
            except queue.Empty:
                return

    def _handle(self, line: Line) -> None:
        child = line.child
        if line.stream == "exit":
            if not child.stopping:
                raise DemoFailure(child.name, f"`kmsnet` stopped unexpectedly: {child.last_error()}")
            return
        if line.stream == "err":
            self._handle_log(line)
            return
        if child in (self.relay, self.ca):
            self.first_lines.setdefault(child, line)
            return
        try:
            item = json.loads(line.text)
        except json.JSONDecodeError:
            self.out.line(child.name, "info", line.text, at=line.at)
            return
        self.received[child.name].append(item)
        if item.get("type") == "message":
            self._show_message(child.name, item, line.at)
        else:
            self._show_event(child.name, item, line.at)

    def _handle_log(self, line: Line) -> None:
        child = line.child
        try:
            entry = json.loads(line.text)
        except json.JSONDecodeError:
            entry = None
        if not isinstance(entry, dict):
            # Not a structured log line: an error or warning a person should see.
            child.errors.append(line.text)
            self.out.line(child.name, "error", line.text, at=line.at)
            return
        # A log line as `kmsnet` prints it without KMSNET_LOG_JSON: "event key=value ...".
        text = " ".join([str(entry.get("event"))] + [f"{k}={v}" for k, v in entry.items() if k not in LOG_KEYS])
        if entry.get("level") in ("warning", "error"):
            child.errors.append(text)
        if child is self.relay:
            self.relay_log.append(entry)
            if entry.get("event") in RELAY_SHOWN:
                kind = "secure" if entry["event"] == "crl_published" else "alert"
                self.out.line("relay", kind, text, at=line.at, data=entry)

    def _show_message(self, name: str, item: dict[str, Any], at: float) -> None:
        sender = item["from"]
        self.out.line(name, "message", f"from {sender}: {_quote(item['text'])}", at=at, data=item)
        if item["id"] in self.sent:
            self.delivered.add(item["id"])
        pair = frozenset((sender, name))
        previous = self.last_sender.get(pair)
        self.last_sender[pair] = sender
        if previous is not None and previous != sender:
            # A reply carries the sender's new ratchet key: both sides take a DH ratchet step.
            self.dh_steps += 1
            self.out.line(name, "note", f"{sender} answered {name}: a DH ratchet step, fresh keys from here on", at=at)

    def _show_event(self, name: str, item: dict[str, Any], at: float) -> None:
        event, peer = item.get("event", "?"), item.get("peer")
        self.events[event] += 1
        kind = "secure" if event == "session_established" else "alert"
        about = f" {peer}" if peer else ""
        self.out.line(name, kind, f"{event}{about}: {item.get('reason')}", at=at, data=item)
        number = item.get("safety_number")
        if event != "session_established" or peer is None or number is None:
            return
        self.unreported.discard((name, peer))
        self.safety[(name, peer)] = number
        theirs = self.safety.get((peer, name))
        if theirs is not None:
            same = theirs == number
            verdict = "the same safety number: compare it out of band" if same else "DIFFERENT safety numbers"
            self.out.line(name, "note" if same else "alert", f"{name} and {peer} see {verdict}", at=at)


def _write_secret(path: Path, text: str) -> None:
    """A file only its owner can read (the passphrase and the admin's TOTP URI of a kept workspace)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as file:
        file.write(text + "\n")


@contextlib.contextmanager
def _workspace(keep: Path | None) -> Iterator[Path]:
    """The kept directory (created, and refused unless empty), or a temporary one removed at the end."""
    if keep is None:
        with tempfile.TemporaryDirectory(prefix="kmsnet-demo-") as tmp:
            yield Path(tmp)
        return
    keep = keep.resolve()
    if keep.exists() and any(keep.iterdir()):
        raise DemoFailure("workspace", f"{keep} is not empty: --keep needs a new or empty directory")
    keep.mkdir(parents=True, exist_ok=True)
    yield keep


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM to the demo ends it like Ctrl-C: through the `finally` that stops every child."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_demo(options: DemoOptions) -> None:
    """Run the demo; raises DemoFailure (one line, a step's name) if anything is not as scripted."""
    if not MIN_NODES <= options.nodes <= MAX_NODES:
        raise DemoFailure("options", f"--nodes must be {MIN_NODES}..{MAX_NODES}")
    with _sigterm_interrupts(), _workspace(options.keep) as workspace:
        Demo(workspace, options).run()
