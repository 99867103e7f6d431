"""Helpers and fixtures of tests/protocol/test_handshake.py that other test modules use too."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import msgpack
import pytest

from protocol import handshake
from protocol.handshake import PrekeySecrets, decode_init
from protocol.messages import InitMessage, PrekeyBundle, Suite
from tests.support.pki import ALICE, CA, NOW, Node, Prekeys, stored


def initiate(
    bundle: PrekeyBundle,
    *,
    initiator: Node = ALICE,
    revocation: Any = None,
    suite: Suite = Suite.HYBRID,
    expected: str = "bob",
    now: datetime = NOW,
    first: bytes = b"hello",
    **seams: Any,
) -> handshake.Initiated:
    return handshake.initiate(
        identity=initiator.identity,
        certificate=initiator.cert,
        bundle=bundle,
        root=CA.root,
        revocation=revocation if revocation is not None else CA.revocation(),
        now=now,
        expected_name=expected,
        first_message=first,
        suite=suite,
        **seams,
    )


def respond(
    init: InitMessage | bytes,
    prekeys: Prekeys,
    *,
    responder: Node | None = None,
    revocation: Any = None,
    allowed: tuple[Suite, ...] = (Suite.HYBRID,),
    now: datetime = NOW,
    bundle: PrekeyBundle | None = None,
) -> handshake.Responded:
    owner = responder or prekeys.owner
    return handshake.respond(
        init if isinstance(init, InitMessage) else decode_init(init),
        identity=owner.identity,
        certificate_fingerprint=owner.fingerprint,
        bundle=bundle or prekeys.bundle,
        prekeys=prekeys.secrets,
        root=CA.root,
        revocation=revocation if revocation is not None else CA.revocation(),
        now=now,
        allowed_suites=allowed,
    )


def refused_by_responder(init: InitMessage | bytes, prekeys: Prekeys, exc: type[Exception], **kw: Any) -> Exception:
    """Assert `respond` refuses with `exc` and that the prekey state (one-time keys, replay cache) is unchanged."""
    before = stored(prekeys.secrets)
    with pytest.raises(exc) as info:
        respond(init, prekeys, **kw)
    assert stored(prekeys.secrets) == before
    return info.value


def init_of(initiated: handshake.Initiated) -> InitMessage:
    return decode_init(initiated.frame)


def v1_record(secrets: PrekeySecrets) -> list[Any]:
    """The format-1 account record of `secrets` (the replay cache and its quota counts inside, PROTOCOL.md
    Appendix A): what a node wrote before the cache had records of its own."""
    _fmt, spk, kem, onetime, issued, schedule = msgpack.unpackb(secrets.to_bytes())
    cache = [[i, sorted(seen), sorted(secrets._quota.get(i, {}).items())] for i, seen in secrets._seen.items()]
    return [1, spk, kem, onetime, issued, cache, schedule]
