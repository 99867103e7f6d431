"""The seam where a scenario plays a malicious relay.

The relay calls these hooks on everything it routes; the default passes everything through
unchanged. An attacker subclass may read, drop, delay, duplicate, reorder, rewrite or replay
— and the nodes must detect it. Attack code itself lives only in `scenarios/`.
"""

from __future__ import annotations

from protocol.link import Deliver, Send


class Interceptor:
    """Pass-through hooks; override to attack."""

    async def on_send(self, sender: str, send: Send) -> list[Send]:
        """An envelope from `sender`, before it is stored: return what to store instead (or nothing)."""
        return [send]

    async def on_deliver(self, recipient: str, deliver: Deliver) -> list[Deliver]:
        """An envelope about to be pushed to `recipient`: return what to push instead."""
        return [deliver]

    async def on_bundle(self, requester: str, name: str, bundle: bytes | None) -> bytes | None:
        """A prekey bundle of `name` about to be handed to `requester`."""
        return bundle

    def admits_revoked(self, name: str) -> bool:
        """Whether to let a node the CRL revokes log in and stay (an honest relay never does; a relay
        colluding with whoever holds a revoked key does, and the nodes must refuse that key themselves)."""
        return False

    async def on_crl(self, recipient: str, crl: bytes) -> bytes | None:
        """The CRL about to be pushed to `recipient` (None: withhold it)."""
        return crl
