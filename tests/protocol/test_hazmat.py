"""protocol.hazmat: the attack lab's named reads of protocol secrets, checked against the real objects."""

from __future__ import annotations

from typing import Any

import pytest

from protocol import hazmat
from protocol.errors import AuthenticationFailed, DecodeError, LocalError
from protocol.handshake import Initiated, Responded
from protocol.session import Kind, Received, Session

Pair = tuple[Initiated, Responded]


def test_live_chain_is_memory_and_stored_chain_is_what_to_bytes_keeps(established: Pair) -> None:
    alice = established[0].session
    live = hazmat.live_sending_chain(alice.ratchet)
    assert hazmat.stored_sending_chain(alice.ratchet) == live  # nothing reserved: the same chain
    assert live.next_n == 1 and live.chain_key is not None  # message 0 went with the INIT
    assert live.ratchet_key.public == alice.ratchet.ratchet_public

    assert alice.reserve(5)
    stored = hazmat.stored_sending_chain(alice.ratchet)
    assert hazmat.live_sending_chain(alice.ratchet) == live  # reserving sends nothing
    assert (stored.next_n, stored.ratchet_key) == (6, live.ratchet_key)
    assert stored.chain_key != live.chain_key
    restored = Session.from_bytes(alice.to_bytes())
    again = hazmat.live_sending_chain(restored.ratchet)  # the keystore holds the reservation's end
    assert (again.ratchet_key.public, again.chain_key, again.next_n) == (live.ratchet_key.public, stored.chain_key, 6)


def test_message_keys_from_a_chain_open_what_its_owner_sends_later(established: Pair) -> None:
    alice, bob = established[0].session, established[1].session
    chain = hazmat.live_sending_chain(alice.ratchet)
    texts = [b"m0", b"m1", b"m2"]
    sent = [alice.encrypt_message(text) for text in texts]
    for text, message in zip(texts, sent, strict=True):
        key = hazmat.message_key(chain, message.n)
        assert hazmat.open_with_message_key(key, message, alice) == Received(Kind.DATA, text)
    # Opening moves no state: Bob still reads all three in order.
    assert [bob.decrypt_message(m).data for m in sent] == texts


def test_a_chain_reaches_no_key_before_its_position_nor_without_a_chain_key(established: Pair) -> None:
    alice = established[0].session
    chain = hazmat.live_sending_chain(alice.ratchet)
    with pytest.raises(LocalError, match="used and deleted"):
        hazmat.message_key(chain, 0)
    empty = hazmat.SendingChain(chain.ratchet_key, None, 0)
    with pytest.raises(LocalError, match="no chain key"):
        hazmat.message_key(empty, 0)
    assert "chain_key" not in repr(chain) and chain.chain_key is not None  # the key never prints
    assert chain.chain_key.hex() not in repr(chain)


def test_a_wrong_key_or_unknown_content_is_refused(established: Pair) -> None:
    alice = established[0].session
    chain = hazmat.live_sending_chain(alice.ratchet)
    message = alice.encrypt_message(b"text")
    with pytest.raises(AuthenticationFailed):
        hazmat.open_with_message_key(bytes(32), message, alice)
    # Authentic bytes that are no session content (kind 9): refused as a session would refuse them.
    odd = alice.ratchet.encrypt(b"\x09odd", alice.transcript)
    with pytest.raises(DecodeError, match="unknown content kind"):
        hazmat.open_with_message_key(hazmat.message_key(chain, odd.n), odd, alice)


def test_prekey_reads(bob_prekeys: Any) -> None:
    secrets, bundle = bob_prekeys.secrets, bob_prekeys.bundle
    keys = hazmat.prekey_private_keys(secrets)
    assert keys[0].public == bundle.spk  # the signed prekey first, then the three one-time prekeys
    assert [k.public for k in keys[1:]] == [k.public for k in bob_prekeys.onetime_keys.values()]
    assert hazmat.kem_prekey(secrets, bundle.kem_id).public == bundle.kem
    with pytest.raises(KeyError):
        hazmat.kem_prekey(secrets, 99)
