"""`kmsnet status --json`: what a node says about itself and its sessions."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cryptography import x509

from protocol.errors import RevocationError
from protocol.safety import safety_number

if TYPE_CHECKING:
    from node.node import Node


def status(node: Node) -> dict[str, Any]:
    """Identity, certificate, feed freshness, sessions and safety numbers."""
    now = node.clock()
    cert = x509.load_der_x509_certificate(node.certificate)
    feed: dict[str, Any]
    try:
        fresh = node.revocation.freshness(now)
        feed = {
            "crl_number": fresh.number,
            "next_update": fresh.next_update.isoformat(),
            "stale": fresh.stale,
            "seconds_left": fresh.seconds_left,
        }
    except RevocationError:
        feed = {"crl_number": None, "stale": True, "reason": "no CRL received yet"}
    sessions = []
    for name in node.sessions.peer_names():
        record = node.peer(name)
        if record is None:
            continue
        session = node.sessions.session(name)
        sessions.append(
            {
                "peer": name,
                "state": "closed" if session is not None and session.closed else record.state,
                "closed_reason": session.closed if session is not None else None,
                "safety_number": safety_number(node.identity.public_bytes, record.identity),
            }
        )
    return {
        "name": node.name,
        "fingerprint": node.fingerprint.hex(),
        "certificate": {
            "serial": format(cert.serial_number, "x"),
            "not_after": cert.not_valid_after_utc.isoformat(),
            "expires_in_seconds": int((cert.not_valid_after_utc - now).total_seconds()),
        },
        "relay": node.relay_url,
        "connected": node.connected,
        "revoked": node.revoked.to_json() if node.revoked is not None else None,
        "feed": feed,
        "outbox": node.outbox_size(),
        "sessions": sessions,
    }
