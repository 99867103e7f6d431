"""The chat UI (`kmsnet chat`): a Textual app around one already-constructed `node.node.Node`.

The app never waits on the network in a handler. The node is started without waiting for the
relay, every send runs in its own worker, and deliveries are read from `node.deliveries()` by a
worker too; everything the screen shows comes from the node's local state (`status()`, the inbox,
`outbox_size()`), which only touches the local keystore. A dead or slow relay therefore shows up
as "offline" and as queued messages, never as a frozen screen.

Only safety numbers are ever shown: no key, certificate or plaintext goes to logs.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, ClassVar, Literal

from cryptography import x509
from rich.text import Text
from textual import work
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, VerticalScroll
from textual.widgets import Input, OptionList, Static
from textual.widgets.option_list import Option

from node.errors import IdentityChanged, NodeError, PeerUnavailable
from node.history import SHOWN_ON_START, Entry, State
from node.node import Node
from node.trust import TrustState
from protocol.errors import ProtocolError
from protocol.safety import safety_number

#: Seconds the status bar says "connecting…" before it says "offline" (the node keeps retrying).
CONNECT_GRACE = 3.0
#: Seconds between two looks at the node's local state (connection, feed, outbox, sessions).
REFRESH_INTERVAL = 1.0
#: Our own certificate is flagged "expiring" in the last third of its life (the node renews itself
#: at two thirds: before that, there is nothing to warn about).
EXPIRING_FRACTION = 1 / 3
#: Below this many columns the contact list folds away (Ctrl+Up/Down still switch contacts).
NARROW_WIDTH = 70
#: Security banners kept on screen (newest last) until dismissed with Escape.
MAX_BANNERS = 4

SENDING = "sending…"
STORED = "✓ stored at relay"
DELIVERED = "✓✓ delivered"
QUEUED = "queued (relay unreachable)"
FAILED = "✗ failed"
HELD = "✗ held: identity changed"
#: What a line shows for each delivery state the history records (node/history.py).
STATE_MARKS = {State.SENDING: SENDING, State.STORED: STORED, State.DELIVERED: DELIVERED, State.FAILED: FAILED}

#: How the banner names a node's security events; others are shown by their event name.
EVENT_TITLES = {
    "revoked": "YOUR certificate is revoked: sending is disabled",
    "peer_revoked": "certificate revoked",
    "identity_changed": "identity key changed (check it with /verify)",
    "authentication_failed": "tampered message refused",
    "replay_refused": "replayed message refused",
    "frame_refused": "message refused",
    "session_refused": "session refused",
    "send_refused": "the relay refused a message",
    "stale_feed": "revocation feed stale",
    "crl_rollback": "old revocation list refused (rollback)",
}

#: Our own name in the conversation: a calm steel blue, whatever the terminal's palette (red is for failures).
YOU_STYLE = "bold #5f9fd7"

#: Contact badges and their colours. "new": no session yet; "closed": torn down for another reason.
BADGE_STYLES = {
    "valid": "green",
    "verified": "bold green",
    "changed": "bold red",
    "revoked": "bold red",
    "closed": "yellow",
    "new": "dim",
}

HELP = """\
Type a message and press Enter to send it to the selected contact.
/msg NAME [TEXT]   select contact NAME, and send TEXT if given (a new NAME joins with its first message)
/verify [NAME]     show the safety number shared with NAME: compare it out of band
/verify NAME yes   it matched: mark NAME verified (a later change of its key then holds sending)
/status            certificate, relay, revocation feed freshness, outbox
/help              this help        /quit   leave (also Ctrl+Q)
//TEXT             send TEXT starting with a slash
Ctrl+Up/Down: previous/next contact (Tab reaches the list too). Escape dismisses banners and this panel."""


@dataclass
class Line:
    """One line of a conversation: a message either way, or a note about the session."""

    kind: Literal["in", "out", "note"]
    text: str
    when: float
    state: str = ""  # delivery state of our own messages
    msg_id: str | None = None  # the message's id once known (its history record updates `state`)


@dataclass
class Contact:
    """A peer on the contact list, with what the UI knows about it."""

    name: str
    badge: str = "new"
    #: Set by a `peer_revoked` event (a refused handshake leaves no closed session to show it).
    revoked_event: bool = False
    lines: list[Line] = field(default_factory=list)
    unread: int = 0


class ChatApp(App[None]):
    """Contacts, a conversation, security banners and an input line for one node.

    The app owns the node's run: it starts it on mount (`wait=False`) and stops it on unmount.
    """

    TITLE = "kmsnet chat"
    CSS = """
    #main { height: 1fr; }
    #contacts { width: 28; height: 1fr; border: round $primary; }
    ChatApp.-narrow #contacts { display: none; }
    #conversation { width: 1fr; height: 1fr; border: round $primary; }
    #banner { height: auto; max-height: 6; background: $error 30%; color: $text; padding: 0 1; }
    #notice { height: auto; max-height: 12; border: round $secondary; padding: 0 1; }
    #statusbar { height: 1; background: $panel; padding: 0 1; }
    """
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "dismiss", "Dismiss banners", show=False),
        Binding("ctrl+down", "next_contact(1)", "Next contact", show=False, priority=True),
        Binding("ctrl+up", "next_contact(-1)", "Previous contact", show=False, priority=True),
    ]

    def __init__(
        self, node: Node, *, serve: Callable[[Node], contextlib.AbstractAsyncContextManager[None]] | None = None
    ) -> None:
        """`serve(node)`: held open while the node runs (the command line answers other commands in it)."""
        super().__init__()
        self.node = node
        self._serve = serve
        self._services = contextlib.AsyncExitStack()
        self.contacts: dict[str, Contact] = {}
        self.selected: str | None = None
        self.banners: list[Text] = []
        self._started_at = 0.0
        self._ever_connected = False
        self._start_error: str | None = None
        self._stale_warned = False
        self._shown_contacts: list[Text] = []
        #: (peer, message id) of every message on screen: a message is shown once, from the
        #: history or from the inbox, whichever brings it first.
        self._shown: set[tuple[str, str]] = set()

    # --- layout and lifecycle -------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        """Contacts left, the conversation right, banners and the input line below."""
        with Horizontal(id="main"):
            yield OptionList(id="contacts")
            with VerticalScroll(id="conversation"):
                yield Static(id="messages")
        yield Static(id="banner")
        yield Static(id="notice")
        yield Input(placeholder="Message, or /help", id="input")
        yield Static(id="statusbar")

    async def on_mount(self) -> None:
        """Start the node without waiting for the relay, then follow its deliveries."""
        self.query_one("#contacts", OptionList).border_title = "Contacts"
        self.query_one("#banner").display = False
        self.query_one("#notice").display = False
        self._started_at = time.monotonic()
        try:
            await self.node.start(wait=False)
        except NodeError as exc:  # a malformed relay URL: nothing to retry
            self._start_error = str(exc)
        else:
            if self._serve is not None:
                await self._services.enter_async_context(self._serve(self.node))
        # The conversations so far, then whatever arrived while no application was looking, then
        # each delivery as it lands.
        self._load_history()
        self.node.history.listeners.append(self._on_history)
        self._follow_deliveries()
        self._refresh()
        self.set_interval(REFRESH_INTERVAL, self._refresh)
        self._render_conversation()
        self.query_one("#input", Input).focus()

    async def on_unmount(self) -> None:
        """Close the relay link; every state the node holds is on disk already."""
        with contextlib.suppress(ValueError):
            self.node.history.listeners.remove(self._on_history)
        await self._services.aclose()
        await self.node.stop()

    # --- the node's deliveries ------------------------------------------------------------------------

    @work(group="events", exclusive=True)
    async def _follow_deliveries(self) -> None:
        # Each item is taken from the on-disk inbox as it is handed out, so that a later
        # `kmsnet receive` does not print it again.
        async for item in self.node.deliveries():
            if item.get("type") == "message":
                self._add_message(item)
            else:
                self._add_event(item)
            # Status bar, badges and banners from one look at the node's state, at once: a banner
            # never shows a revocation that the status bar and contact list do not yet.
            self._refresh()
            self._render_conversation()

    def _load_history(self) -> None:
        """The newest messages of every conversation kept in the keystore (node/history.py)."""
        history = self.node.history
        for peer in history.peers():
            contact = self._contact(peer)
            for entry in history.conversation(peer, SHOWN_ON_START):
                self._shown.add((peer, entry.msg_id))
                state = _mark(entry) if entry.direction == "out" else ""
                contact.lines.append(Line(entry.direction, entry.text, entry.sent_at, state, entry.msg_id))
        if self.selected is None and self.contacts:
            self.selected = max(self.contacts.values(), key=lambda c: c.lines[-1].when if c.lines else 0).name

    def _on_history(self, entry: Entry) -> None:
        """A delivery state changed (✓ stored, ✓✓ delivered, failed): the line that shows it follows."""
        if entry.direction != "out":
            return
        contact = self.contacts.get(entry.peer)
        for line in reversed(contact.lines if contact is not None else []):
            if line.msg_id == entry.msg_id:
                mark = _mark(entry)
                if line.state != mark and not (line.state == QUEUED and entry.state is State.SENDING):
                    line.state = mark
                    self._render_conversation()
                return

    def _add_message(self, item: dict[str, Any]) -> None:
        if (item["from"], item["id"]) in self._shown:
            return  # shown from the history already
        self._shown.add((item["from"], item["id"]))
        contact = self._contact(item["from"])
        sent_at = datetime.fromisoformat(item["sent_at"]).timestamp()
        contact.lines.append(Line("in", item["text"], sent_at, msg_id=item["id"]))
        if self.selected is None:
            self.selected = contact.name
        if contact.name != self.selected:
            contact.unread += 1

    def _add_event(self, item: dict[str, Any]) -> None:
        event, peer, reason = item["event"], item.get("peer"), item["reason"]
        contact = self._contact(peer) if peer else None
        if event == "session_established":
            # Routine, not an alert: a note in that conversation (the reason names the safety number).
            if contact is not None:
                contact.revoked_event = False
                contact.badge = "valid"
                contact.lines.append(Line("note", f"session {reason}", time.time()))
            return
        if event == "peer_revoked" and contact is not None:
            contact.revoked_event = True
            contact.badge = "revoked"
        self._banner(EVENT_TITLES.get(event, event.replace("_", " ")), peer, reason)

    def _banner(self, title: str, peer: str | None, reason: str) -> None:
        line = Text.assemble(("⚠ ", "bold"), (title, "bold"), (f" — {peer}" if peer else "", "bold"), f": {reason}")
        self.banners = [*self.banners, line][-MAX_BANNERS:]
        banner = self.query_one("#banner", Static)
        banner.update(Text("\n").join(self.banners))
        banner.display = True

    # --- periodic look at the node's local state ------------------------------------------------------

    def _refresh(self) -> None:
        """Status bar, contact badges and delivery states from `node.status()` (local, no network)."""
        status = self.node.status()
        for session in status["sessions"]:
            contact = self._contact(session["peer"])
            if session["state"] == "closed":
                contact.badge = "revoked" if "revoked" in (session["closed_reason"] or "") else "closed"
            elif contact.revoked_event:
                contact.badge = "revoked"
            else:
                record = self.node.peer(session["peer"])
                trust = self.node.trust.state(session["peer"], record.identity if record is not None else None)
                contact.badge = "valid" if trust is TrustState.UNVERIFIED else trust.value
        delivered = False
        if status["outbox"] == 0:
            # An empty outbox means the relay accepted everything we queued (the node resends on reconnect).
            for contact in self.contacts.values():
                for line in contact.lines:
                    if line.state == QUEUED:
                        line.state = STORED
                        delivered = True
        feed = status["feed"]
        if feed["stale"] and feed["crl_number"] is not None and not self._stale_warned:
            reason = f"CRL #{feed['crl_number']} is past its next update: new sessions fail closed"
            self._banner("revocation feed stale", None, reason)
        self._stale_warned = bool(feed["stale"])
        self.query_one("#statusbar", Static).update(self._status_line(status))
        self._render_contacts()
        if delivered:
            # Only on change: re-rendering scrolls to the end, which would fight a reader scrolling up.
            self._render_conversation()

    def _connection(self) -> tuple[str, str]:
        if self._start_error is not None:
            return f"offline: {self._start_error}", "bold red"
        if self.node.connected:
            self._ever_connected = True
            return "connected", "green"
        if self.node.revoked is not None:
            # The relay closed us for good: "retrying" would promise a reconnect that never comes.
            return "offline: the relay refuses a revoked node", "bold red"
        if self._ever_connected or time.monotonic() - self._started_at > CONNECT_GRACE:
            return "offline (relay unreachable, retrying)", "bold red"
        return "connecting…", "yellow"

    def _status_line(self, status: dict[str, Any]) -> Text:
        feed = status["feed"]
        if feed["crl_number"] is None:
            freshness: tuple[str, str] = ("no CRL yet", "yellow")
        elif feed["stale"]:
            freshness = (f"CRL #{feed['crl_number']} STALE", "bold red")
        else:
            freshness = (f"CRL #{feed['crl_number']} fresh", "green")
        left = status["certificate"]["expires_in_seconds"]
        if status.get("revoked"):
            cert: tuple[str, str] = (f"certificate {status['revoked']['text']}", "bold red")
        elif left <= 0:
            cert = ("certificate EXPIRED", "bold red")
        elif left < self._lifetime() * EXPIRING_FRACTION:
            cert = (f"certificate expiring in {_duration(left)}", "yellow")
        else:
            cert = ("certificate valid", "green")
        name: tuple[str, str] = (status["name"], "bold")
        connection = self._connection()
        if not self.has_class("-narrow"):
            outbox = f" · outbox {status['outbox']}"
            return Text.assemble(name, " · ", connection, " · feed ", freshness, " · ", cert, outbox)
        # A narrow terminal: the essentials in short words, and the rest only when something is wrong.
        word = connection[0].split(" (")[0].split(":")[0]
        short = ("online" if word == "connected" else word, connection[1])
        feed_short = (freshness[0].removesuffix(" fresh"), freshness[1])
        parts: list[str | tuple[str, str]] = [name, " · ", short, " · ", feed_short]
        if cert[1] != "green":
            parts += [" · ", cert]
        if status["outbox"]:
            parts.append(f" · {status['outbox']} queued")
        return Text.assemble(*parts)

    # --- rendering ------------------------------------------------------------------------------------

    def _contact(self, name: str) -> Contact:
        contact = self.contacts.get(name)
        if contact is None:
            contact = self.contacts[name] = Contact(name)
        return contact

    def _render_all(self) -> None:
        self._render_contacts()
        self._render_conversation()

    def _render_contacts(self) -> None:
        names = sorted(self.contacts)
        prompts = []
        for name in names:
            contact = self.contacts[name]
            prompt = Text.assemble(
                ("▶ " if name == self.selected else "  "),
                (name, "bold" if name == self.selected else ""),
                " ",
                (contact.badge, BADGE_STYLES.get(contact.badge, "")),
                (f" ({contact.unread})" if contact.unread else "", "bold cyan"),
            )
            prompts.append(prompt)
        if prompts == self._shown_contacts:
            return  # re-setting the options every second would reset the list's scroll and highlight
        self._shown_contacts = prompts
        contacts = self.query_one("#contacts", OptionList)
        contacts.set_options(Option(prompt, id=name) for name, prompt in zip(names, prompts, strict=True))
        if self.selected in self.contacts:
            contacts.highlighted = names.index(self.selected)

    def _render_conversation(self) -> None:
        pane = self.query_one("#conversation", VerticalScroll)
        messages = self.query_one("#messages", Static)
        if self.selected is None:
            pane.border_title = "Conversation"
            messages.update(Text("No contact selected: /msg NAME to start, /help for commands.", style="dim"))
            return
        contact = self.contacts.get(self.selected)
        if contact is None:
            pane.border_title = f"Conversation with {self.selected} (new)"
            messages.update(Text(f"No messages yet: the first one adds {self.selected} to your contacts.", style="dim"))
            return
        contact.unread = 0
        pane.border_title = f"Conversation with {contact.name}"
        lines = [_render_line(contact.name, line) for line in contact.lines]
        messages.update(Text("\n").join(lines) if lines else Text("No messages yet.", style="dim"))
        pane.scroll_end(animate=False)

    def _show_notice(self, text: str | Text) -> None:
        notice = self.query_one("#notice", Static)
        notice.update(text if isinstance(text, Text) else Text(text))
        notice.display = True

    # --- input ----------------------------------------------------------------------------------------

    def on_input_submitted(self, event: Input.Submitted) -> None:
        """A command (`/...`) or a message for the selected contact."""
        text = event.value.strip()
        event.input.clear()
        if not text:
            return
        if text.startswith("/") and not text.startswith("//"):
            self._command(text)
        else:
            self._send_text(text.removeprefix("/"))

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        """A contact clicked (or chosen with Enter in the list) becomes the conversation."""
        if event.option.id is not None:
            self._select(event.option.id)
        self.query_one("#input", Input).focus()

    def _command(self, text: str) -> None:
        command, _, rest = text[1:].partition(" ")
        name, _, message = rest.strip().partition(" ")
        if command == "msg":
            if not name:
                self._show_notice("usage: /msg NAME [TEXT]")
            elif name == self.node.name:
                self._show_notice("that is you: pick another contact")
            else:
                self._select(name)
                if message.strip():
                    self._send_text(message.strip())
        elif command == "verify":
            self._verify(name or self.selected, message.strip())
        elif command == "status":
            self._show_status()
        elif command == "help":
            self._show_notice(HELP)
        elif command == "quit":
            self.exit()
        else:
            self._show_notice(f"unknown command /{command}: /help lists the commands")

    def _select(self, name: str) -> None:
        # A new name is only selected: it joins the contacts with a first message the relay can route,
        # so that a typo leaves no contact behind.
        self.selected = name
        self._render_all()

    def _verify(self, name: str | None, answer: str = "") -> None:
        if name is None:
            self._show_notice("usage: /verify NAME")
            return
        record = self.node.peer(name)
        held = self.node.trust.record(name)
        key = held.held if held is not None and held.held is not None else record.identity if record else None
        if key is None:
            self._show_notice(f"no session with {name} yet: send a message first, then /verify {name}")
            return
        number = safety_number(self.node.identity.public_bytes, key)
        if answer:
            # "yes" confirms the number shown; digits are checked against it (node/trust.py).
            try:
                self.node.trust.verify(name, number if answer == "yes" else answer, key, self.node.clock())
            except NodeError as exc:
                self._show_notice(Text(str(exc), style="bold red"))
                return
            self._show_notice(f"{name} is verified: if its identity key ever changes, sending to it is held")
            self._refresh()
            return
        state = self.node.trust.state(name, key)
        said = {
            TrustState.VERIFIED: f"{name} is verified.",
            TrustState.CHANGED: f"{name}'s identity key CHANGED since you verified it: sending is held.",
            TrustState.UNVERIFIED: f"{name} is not verified yet.",
        }[state]
        self._show_notice(
            Text.assemble(
                f"Safety number with {name}:\n  ",
                (number, "bold"),
                f"\n{said} Compare it with what {name} sees (in person or by phone). If they match, "
                f"nobody sits in the middle: /verify {name} yes. If they differ, do not trust this session.",
            )
        )

    def _show_status(self) -> None:
        status = self.node.status()
        feed = status["feed"]
        if feed["crl_number"] is None:
            freshness = "no CRL received yet: new sessions fail closed"
        else:
            freshness = f"CRL #{feed['crl_number']}, next update {feed['next_update']}"
            freshness += " (STALE: new sessions fail closed)" if feed["stale"] else ""
        cert = status["certificate"]
        lines = [
            f"node        {status['name']}",
            f"certificate serial {cert['serial']}, valid until {cert['not_after']}",
            f"relay       {status['relay']} ({self._connection()[0]})",
            f"feed        {freshness}",
            f"outbox      {status['outbox']} waiting for the relay",
            f"sessions    {len(status['sessions'])}",
        ]
        self._show_notice("\n".join(lines))

    def _send_text(self, text: str) -> None:
        if self.selected is None:
            self._show_notice("no contact selected: /msg NAME first")
            return
        if self.node.revoked is not None:  # issue #13: a revoked node sends nothing
            self._show_notice(f"not sent: this node's certificate is {self.node.revoked.words()}")
            return
        line = Line("out", text, time.time(), SENDING)
        self._contact(self.selected).lines.append(line)
        self._render_conversation()
        self._send(self.selected, line)

    @work(group="send")
    async def _send(self, peer: str, line: Line) -> None:
        # One worker per message: a slow relay holds this message, never the screen or the next one.
        try:
            line.msg_id = await self.node.send(peer, line.text)
        except IdentityChanged as exc:
            line.state = HELD
            self._banner("identity key changed: sending held", peer, f"{exc} (in the chat: /verify {peer})")
        except PeerUnavailable as exc:
            line.state = f"✗ not sent: {exc}"
            contact = self.contacts.get(peer)
            only_failed = contact is not None and all(o.state.startswith("✗") for o in contact.lines)
            if only_failed:
                # A name nobody answers to (a typo): no contact is left behind for it.
                del self.contacts[peer]
                self.selected = next(iter(sorted(self.contacts)), None)
                self._show_notice(str(exc))
        except (NodeError, ProtocolError) as exc:
            line.state = f"✗ not sent: {exc}"
        else:
            # `send` returns queued when the relay did not confirm in time; the outbox tells which.
            entry = self.node.history.sent(line.msg_id)
            if entry is not None and entry.state is not State.SENDING:
                line.state = _mark(entry)
            else:
                line.state = QUEUED if self.node.outbox_size() else STORED
        self._render_all()

    def on_resize(self) -> None:
        """Fold the contact list away on a narrow terminal, so the conversation keeps its width."""
        self.set_class(self.size.width < NARROW_WIDTH, "-narrow")
        if self._started_at:  # mounted: the status bar too takes the new width
            self._refresh()
        self._render_conversation()

    def action_next_contact(self, step: int) -> None:
        """Select the next (1) or previous (-1) contact, from the keyboard, whatever has the focus."""
        names = sorted(self.contacts)
        if not names:
            return
        at = names.index(self.selected) if self.selected in names else -1 if step > 0 else 0
        self._select(names[(at + step) % len(names)])

    def _lifetime(self) -> float:
        """Seconds from our certificate's notBefore to its notAfter."""
        cert = x509.load_der_x509_certificate(self.node.certificate)
        return (cert.not_valid_after_utc - cert.not_valid_before_utc).total_seconds()

    def action_dismiss(self) -> None:
        """Hide the security banners and the notice panel."""
        self.banners = []
        self.query_one("#banner").display = False
        self.query_one("#notice").display = False


def _render_line(peer: str, line: Line) -> Text:
    stamp = datetime.fromtimestamp(line.when).strftime("%H:%M")
    if line.kind == "note":
        return Text(f"{stamp} · {line.text}", style="dim italic")
    if line.kind == "in":
        return Text.assemble((f"{stamp} ", "dim"), (f"{peer}: ", "bold cyan"), line.text)
    style = "green" if line.state in (STORED, DELIVERED) else "red" if line.state.startswith("✗") else "yellow"
    # Our own name in a calm colour: red is kept for what went wrong.
    return Text.assemble((f"{stamp} ", "dim"), ("you: ", YOU_STYLE), line.text, "  ", (line.state, style))


def _mark(entry: Entry) -> str:
    """How a line shows the delivery state of our message `entry`."""
    return STATE_MARKS[entry.state] + (f": {entry.reason}" if entry.reason else "")


def _duration(seconds: int) -> str:
    days, rest = divmod(seconds, 86400)
    return f"{days}d {rest // 3600}h" if days else f"{rest // 3600}h {rest % 3600 // 60}m"
