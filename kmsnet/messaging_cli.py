"""`kmsnet send`, `kmsnet receive` and `kmsnet status`: a node's everyday commands."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator, Callable
from typing import Any

import click

from kmsnet import logs
from kmsnet.exits import EPILOG, TRUST, UNREACHABLE, USAGE, CliFailure
from kmsnet.history_cli import MARKS, history_work
from kmsnet.options import Output, StoreOptions, json_option, node_failures, read_input, store_options
from kmsnet.trust_cli import trust_work
from kmsnet.writer import LocalSink, Sink, Work, dispatch, open_node, serving
from node.control import Handler, Handover, Reply
from node.errors import RelayUnreachable
from node.history import Entry, State
from node.homelock import HomeLock
from node.node import Node
from protocol.errors import ProtocolError

#: Seconds `receive` waits after the last delivery before deciding the mailbox is empty.
QUIET = 0.5
#: Seconds between looks at the connection while `receive --follow` reports it.
CONNECTION_POLL = 0.2

SEND_EXAMPLES = """
Examples:

\b
  kmsnet send --home alice --to bob 'hello bob'
  echo 'from a pipe' | kmsnet send --home alice --to bob -
  kmsnet send --home alice --to bob --json 'hi'    # {"type": "sent", "id", "to", "queued", "state": "stored"}
  kmsnet send --home alice --to bob --wait delivered --timeout 30 'are you there?'
"""

RECEIVE_EXAMPLES = """
Examples:

\b
  kmsnet receive --home bob                        # what is waiting, then exit
  kmsnet receive --home bob --follow               # keep printing until Ctrl-C
  kmsnet receive --home bob --json --timeout 10    # {"type": "message", "id", "from", "text", "sent_at"} per line
"""


def relay_option(command: Any) -> Any:
    """--relay URL: overrides the relay stored at `node init`."""
    return click.option("--relay", "relay_url", help="Relay URL (ws:// or wss://); default: the one from node init.")(
        command
    )


@contextlib.asynccontextmanager
async def online(node: Node, *, or_offline: bool = False) -> AsyncIterator[Node]:
    """The node connected to its relay (exit 3 if it cannot be reached). With `or_offline`, an
    unreachable relay is no failure here: the node runs, and keeps trying to connect."""
    try:
        with node_failures():
            await node.start()
    except CliFailure as failure:
        if not (or_offline and failure.exit_code == UNREACHABLE):
            raise
        await node.start(wait=False)
    try:
        yield node
    finally:
        await node.stop()


# --- the work of each command, on a running node: here, or for another terminal (kmsnet.writer) ----------


async def _send_work(node: Node, args: dict[str, Any], sink: Sink) -> None:
    peer = args["peer"]
    with node_failures():
        try:
            msg_id = await node.send(peer, args["text"])
        except ProtocolError as exc:
            raise CliFailure(f"cannot start a session with {peer}: {exc}", TRUST) from exc
        except RelayUnreachable as exc:
            if node.connected:
                raise
            raise CliFailure(
                f"cannot reach the relay at {node.relay_url}: nothing was sent or queued (a first message to "
                f"{peer} needs {peer}'s prekeys from the relay)",
                UNREACHABLE,
                name="relay_unreachable",
            ) from exc
    queued = node.is_queued(msg_id)
    if queued and not node.connected:
        # Sealed and kept in the outbox (on disk): it leaves by itself once this home is online again.
        sink.emit(
            {"type": "sent", "id": msg_id, "to": peer, "queued": True, "relay_reachable": False},
            f"queued {msg_id} for {peer} (relay unreachable)",
        )
        raise CliFailure(
            f"the relay cannot be reached: message {msg_id} waits in the outbox and goes out when any kmsnet "
            "command or the chat for this home next connects",
            UNREACHABLE,
            name="queued_relay_unreachable",
        )
    entry = node.history.sent(msg_id)
    state = entry.state if entry is not None else State.SENDING
    if args.get("wait") == "delivered" and not queued:
        state = await _delivered(node, msg_id, peer, args.get("timeout"), sink)
    said = " (queued: the relay has not confirmed it yet)" if queued else f" ({MARKS[state]})"
    record = {"type": "sent", "id": msg_id, "to": peer, "queued": queued, "state": state.value}
    sink.emit(record, f"sent {msg_id} to {peer}{said}")


async def _delivered(node: Node, msg_id: str, peer: str, timeout: float | None, sink: Sink) -> State:
    """Wait until `peer`'s receipt for `msg_id` comes (`send --wait delivered`); exit 3 if it fails or
    the wait times out (the message stays pending, and is re-sent while this home is online)."""
    settled: asyncio.Future[Entry] = asyncio.get_running_loop().create_future()

    def listen(entry: Entry) -> None:
        if entry.msg_id == msg_id and entry.state in (State.DELIVERED, State.FAILED) and not settled.done():
            settled.set_result(entry)

    node.history.listeners.append(listen)
    try:
        current = node.history.sent(msg_id)
        if current is not None:
            listen(current)
        async with asyncio.timeout(timeout):
            entry = await settled
    except TimeoutError:
        now = node.history.sent(msg_id)
        state = now.state if now is not None else State.SENDING
        record = {"type": "sent", "id": msg_id, "to": peer, "queued": False, "state": state.value}
        sink.emit(record, f"sent {msg_id} to {peer} ({MARKS[state]})")
        raise CliFailure(
            f"{peer}'s node has not confirmed message {msg_id} within {timeout:g} s: it stays pending "
            f"(`kmsnet history --with {peer}` shows when it is delivered)",
            UNREACHABLE,
            name="not_delivered_yet",
        ) from None
    finally:
        node.history.listeners.remove(listen)
    if entry.state is State.FAILED:
        raise CliFailure(f"message {msg_id} to {peer} failed: {entry.reason}", UNREACHABLE, name="delivery_failed")
    return entry.state


async def _receive_work(node: Node, args: dict[str, Any], sink: Sink, *, take: bool) -> None:
    """Print what arrives. With `take`, this request reads the node's inbox itself; without, another
    reader of the same node (the holder's own `receive` or chat) does, and we print what it took.

    Ends when `sink.closing` is set: here by Ctrl-C, for another terminal by this process leaving
    (then the request is handed back, and that terminal goes on by itself).
    """
    follow, timeout = bool(args.get("follow")), args.get("timeout")
    taken: asyncio.Queue[list[dict[str, Any]]] = asyncio.Queue()
    # Either we take the node's deliveries (one channel, in commit order), or another reader does and
    # tells its listeners what it took.
    reader = asyncio.create_task(_read_deliveries(node, taken)) if take else None
    if reader is None:
        node.inbox_listeners.append(taken.put_nowait)
    notes = asyncio.create_task(_connection_notes(node, sink)) if follow else None
    try:
        # --timeout ends the wait; what arrived until then was printed.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while not sink.closing.is_set():
                    _print_all(_drain(taken), sink)
                    getter = asyncio.create_task(taken.get())
                    closer = asyncio.create_task(sink.closing.wait())
                    done, pending = await asyncio.wait(
                        {getter, closer}, timeout=None if follow else QUIET, return_when=asyncio.FIRST_COMPLETED
                    )
                    for task in pending:
                        task.cancel()
                    if getter in done:
                        _print_all(getter.result() + _drain(taken), sink)
                    if not done and not follow and node.idle():
                        break
    finally:
        if reader is not None:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
        else:
            node.inbox_listeners.remove(taken.put_nowait)
        if notes is not None:
            notes.cancel()
    # What was committed and not yet handed out is printed too.
    _print_all(_drain(taken) + (node.take_inbox() if take else []), sink)
    if sink.closing.is_set() and not isinstance(sink, LocalSink):
        raise Handover


async def _read_deliveries(node: Node, taken: asyncio.Queue[list[dict[str, Any]]]) -> None:
    async for item in node.deliveries():
        taken.put_nowait([item])


async def _connection_notes(node: Node, sink: Sink) -> None:
    """While following: say on stderr when the node connects, loses its relay, and is back."""
    was: bool | None = None
    while True:
        connected = node.connected
        if connected != was:
            if connected:
                sink.note(f"connected to {node.relay_url} as {node.name}")
            elif was is None:
                sink.note(f"cannot reach the relay at {node.relay_url} yet: trying again, and again")
            else:
                sink.note(f"lost the relay at {node.relay_url}: reconnecting")
            was = connected
        await asyncio.sleep(CONNECTION_POLL)


def _print_all(items: list[dict[str, Any]], sink: Sink) -> None:
    for item in items:
        if item.get("type") == "message":
            text = f"[{item['from']}] {item['text']}"
        else:
            who = f" {item['peer']}" if item.get("peer") else ""
            text = f"! {item['event']}{who}: {item['reason']}"
        sink.emit(item, text)


def _drain(queue: asyncio.Queue[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    while not queue.empty():
        items.extend(queue.get_nowait())
    return items


async def _status_work(node: Node, args: dict[str, Any], sink: Sink) -> None:
    info = node.status()
    info["unreceipted"] = node.delivery.waiting()  # sent, neither receipted nor failed (node/receipts.py)
    for s in info["sessions"]:  # what the user checked of each peer (node/trust.py)
        record = node.peer(s["peer"])
        s["trust"] = node.trust.state(s["peer"], record.identity if record is not None else None).value
    feed = info["feed"]
    freshness = (
        "no CRL yet: new sessions fail closed"
        if feed["crl_number"] is None
        else f"CRL #{feed['crl_number']}, next update {feed['next_update']}" + (" (STALE)" if feed["stale"] else "")
    )
    revoked = info.get("revoked")
    validity = f"REVOKED: {revoked['text']}" if revoked else f"valid until {info['certificate']['not_after']}"
    lines = [
        f"node        {info['name']}",
        f"fingerprint {info['fingerprint']}",
        f"certificate serial {info['certificate']['serial']}, {validity}",
        f"relay       {info['relay']}",
        f"feed        {freshness}",
        f"outbox      {info['outbox']} waiting",
        f"delivery    {info['unreceipted']} sent message(s) waiting for a receipt",
    ]
    for s in info["sessions"]:
        state = s["state"] + (f" ({s['closed_reason']})" if s["closed_reason"] else "")
        lines.append(f"session     {s['peer']}: {state}; safety number {s['safety_number']} ({s['trust']})")
    sink.emit(info, "\n".join(lines))
    if revoked:  # issue #13: a revoked node is told, and exits 4
        raise CliFailure(f"this node's certificate is {revoked['text']}", TRUST, name="node_revoked")


def control_handlers(node: Node, *, reads_inbox: bool) -> dict[str, Handler]:
    """What this process answers on its home's control socket while it runs `node`.

    `reads_inbox`: this process shows what arrives itself (a followed receive, the chat), so a
    `receive` from another terminal prints what it took instead of taking it away.
    """

    def bind(work: Work) -> Handler:
        async def handler(args: dict[str, Any], reply: Reply) -> None:
            await work(node, args, reply)

        return handler

    async def receive_for(node: Node, args: dict[str, Any], sink: Sink) -> None:
        await _receive_work(node, args, sink, take=not reads_inbox)

    return {
        "send": bind(_send_work),
        "receive": bind(receive_for),
        "status": bind(_status_work),
        "history": bind(history_work),
        "trust": bind(trust_work),
    }


def _run_online(
    store: StoreOptions,
    relay_url: str | None,
    out: Output,
    work: Work,
    args: dict[str, Any],
    *,
    reads_inbox: bool,
    or_offline: bool = False,
) -> Callable[[HomeLock | None, str], None]:
    """`run_here` for `dispatch`: the node online, answering on the control socket, doing `work`.

    `or_offline`: work with the relay unreachable too (a send seals its message into the outbox).
    """

    def run_here(lock: HomeLock | None, passphrase: str) -> None:
        assert lock is not None
        with open_node(store, relay_url, passphrase) as node:
            asyncio.run(_online_work(node, lock, work, args, out, reads_inbox=reads_inbox, or_offline=or_offline))

    return run_here


async def _online_work(
    node: Node, lock: HomeLock, work: Work, args: dict[str, Any], out: Output, *, reads_inbox: bool, or_offline: bool
) -> None:
    sink = LocalSink(out)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, sink.closing.set)
    handlers = control_handlers(node, reads_inbox=reads_inbox)
    async with online(node, or_offline=or_offline), serving(node, lock, handlers):
        await work(node, args, sink)


@click.command(epilog=SEND_EXAMPLES + "\n" + EPILOG)
@click.option("--to", "peer", required=True, help="Name of the node to send to.")
@click.argument("text")
@click.option(
    "--wait",
    type=click.Choice(["stored", "delivered"]),
    default="stored",
    show_default=True,
    help="Return once the relay stores the message, or once the peer's node confirms it has it.",
)
@click.option("--timeout", type=click.FloatRange(min=0), help="With --wait delivered: give up waiting after S seconds.")
@relay_option
@json_option
@store_options
def send(
    peer: str,
    text: str,
    wait: str,
    timeout: float | None,
    relay_url: str | None,
    out: Output,
    store: StoreOptions,
) -> None:
    """Send TEXT ('-' reads stdin) to node --to, end to end encrypted.

    Returns once the relay has stored the message (with --wait delivered: once the peer's node
    confirms it has it; exit 3 if that does not happen within --timeout, the message staying
    pending). Until its receipt comes, a message is kept sealed in the history and sent again
    when needed (`kmsnet history`). If the relay stops answering, the message
    stays in the outbox (sealed, on disk) and goes out when this home next connects; if the relay
    cannot be reached at all, the message is queued the same way ("queued ... (relay
    unreachable)") and the command exits 3, unless this is a first message to NODE (that needs
    NODE's prekeys from the relay: nothing is queued). While another kmsnet process uses this
    home (`receive --follow`, `chat`), the message goes out through it.
    """
    if text == "-":
        text = read_input("-").decode("utf-8", errors="replace")
    logs.configure("WARNING")
    if timeout is not None and wait != "delivered":
        raise CliFailure("--timeout goes with --wait delivered", USAGE)
    args = {"peer": peer, "text": text, "wait": wait, "timeout": timeout}
    run_here = _run_online(store, relay_url, out, _send_work, args, reads_inbox=False, or_offline=True)
    dispatch(store, out, "send", args, run_here)


@click.command(epilog=RECEIVE_EXAMPLES + "\n" + EPILOG)
@click.option("--follow", is_flag=True, help="Keep receiving until interrupted (or --timeout).")
@click.option("--timeout", type=click.FloatRange(min=0), help="Stop after this many seconds.")
@relay_option
@json_option
@store_options
def receive(follow: bool, timeout: float | None, relay_url: str | None, out: Output, store: StoreOptions) -> None:
    """Print messages and security events addressed to this node.

    A refused input (tampered, replayed, revoked, stale) is printed as an event, never as a
    message. Without --follow, exits once the mailbox is empty. With --follow, the state of the
    connection (connected, lost, reconnecting) goes to stderr, and a relay that is down is waited
    for. While another kmsnet process
    uses this home, prints what that process receives from now on.
    """
    logs.configure("WARNING")
    args = {"follow": follow, "timeout": timeout}

    async def work(node: Node, args: dict[str, Any], sink: Sink) -> None:
        await _receive_work(node, args, sink, take=True)

    # Following, a relay that is down at the start is waited for, as one that goes down later is.
    run_here = _run_online(store, relay_url, out, work, args, reads_inbox=True, or_offline=follow)
    dispatch(store, out, "receive", args, run_here, extra=("--follow",) if follow else ())


@click.command(epilog=EPILOG)
@relay_option
@json_option
@store_options
def status(relay_url: str | None, out: Output, store: StoreOptions) -> None:
    """Identity, certificate, revocation-feed freshness, sessions and safety numbers (offline;
    while another kmsnet process uses this home, as that process sees it)."""

    def run_here(lock: HomeLock | None, passphrase: str) -> None:
        with open_node(store, relay_url, passphrase) as node:
            asyncio.run(_status_work(node, {}, LocalSink(out)))

    dispatch(store, out, "status", {}, run_here, read_only=True)
