"""The attacker toolkit: a malicious relay, a passive recorder, key theft and a rogue CA.

One module per part: `malicious_relay` (the recorder and the relay that attacks), `tactics`, `mitm`,
`credentials` (who the attacker can claim to be) and `theft`; their public names are listed here.

The relay is the network attacker of PROTOCOL.md §12: `MaliciousRelay` is an `Interceptor` (the
seam `relay.server.Relay` calls on everything it routes) that records every envelope (the passive
recorder) and runs a chain of `Tactic`s over it: read, drop, hold and release later (delay,
reorder), duplicate, replay, flip bits, rewrite headers, substitute bundles, withhold or roll back
the CRL feed. `Mitm` is the full man in the middle: it poses as each side to the other with
whatever credentials it has (a real certificate with a key it does not hold, a rogue CA's
certificate, a stolen identity key) and re-encrypts both ways when the handshake lets it.

Key theft reads a node's unlocked keystore or its memory, as malware on the device would: its
identity key, a live session, its X25519 private keys. `StateReader` then reads recorded traffic
with a stolen (or rebuilt) session, in both directions, exactly as far as the keys reach. Nothing
here weakens a node: every refusal a scenario shows is the real node refusing.
"""

from scenarios.attacker.credentials import AnyRevocation, Credentials, Impostor
from scenarios.attacker.malicious_relay import Captured, ColludingRelay, MaliciousRelay, body_text, describe
from scenarios.attacker.mitm import Mitm
from scenarios.attacker.tactics import (
    BundleSwap,
    FeedControl,
    FlipBit,
    Replay,
    Rewrite,
    Select,
    Shuffle,
    Tactic,
    messages,
)
from scenarios.attacker.theft import (
    StateReader,
    StolenSession,
    rebuild_initiator,
    replaying,
    steal_identity,
    steal_session,
    x25519_keys,
)

__all__ = [
    "AnyRevocation",
    "BundleSwap",
    "Captured",
    "ColludingRelay",
    "Credentials",
    "FeedControl",
    "FlipBit",
    "Impostor",
    "MaliciousRelay",
    "Mitm",
    "Replay",
    "Rewrite",
    "Select",
    "Shuffle",
    "StateReader",
    "StolenSession",
    "Tactic",
    "body_text",
    "describe",
    "messages",
    "rebuild_initiator",
    "replaying",
    "steal_identity",
    "steal_session",
    "x25519_keys",
]
