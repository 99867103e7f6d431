"""A node's policy knobs (the command line and the lab set them)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta

from node import crlfetch
from node.pkcs11 import Pin
from protocol.messages import Suite


@dataclass(frozen=True)
class NodeOptions:
    """Policy knobs (the command line and the lab set them)."""

    #: Signed prekeys rotate this often; the old one is kept for `prekey_grace` so that INITs in flight open.
    prekey_rotation: timedelta = timedelta(days=7)
    prekey_grace: timedelta = timedelta(days=2)
    #: Handshake suite we initiate with and suites we accept.
    suite: Suite = Suite.HYBRID
    accept_suites: tuple[Suite, ...] = (Suite.HYBRID,)
    #: Publish an ML-KEM prekey (False only for the harvest-now scenario's classic variant).
    publish_kem: bool = True
    #: Seconds to wait for the relay to accept a sent envelope before `send` returns queued.
    send_timeout: float = 10.0
    #: Check peers by OCSP at this URL (the CA's responder) instead of the CRL feed.
    ocsp_url: str | None = None
    #: Keep what arrives in the keystore's inbox until `take_inbox` (the `receive` and `chat` commands
    #: read it). An application that reads only `events` turns it off, or the inbox only grows.
    inbox: bool = True
    #: The PIN of the PKCS#11 token holding a token-backed node's identity key (None: from the
    #: environment, `node.pkcs11.environment_pin`). Never stored.
    pin: Pin | None = field(default=None, repr=False)
    #: INSECURE when False (only for the relay-forwarding scenario's "before"): answer a CHALLENGE
    #: naming another relay than the one dialled (node/link.py).
    check_relay_name: bool = True
    #: Fetch the CRL from the CA directly when the newest one held is older than this (node/crlfetch.py).
    crl_max_age: timedelta = crlfetch.DEFAULT_MAX_AGE
