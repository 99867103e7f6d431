"""The attack lab's door into protocol state: secrets no node ever exports (PROTOCOL.md §12).

Hazardous by design. The attacker toolkit (`scenarios/`) plays malware that has copied a node's
memory or its unlocked keystore; what such malware would read (a ratchet's sending chain, the
private prekeys, a message key) it reads here, by name, instead of unpacking private
serialisations field by field or reaching into underscore attributes. A change to a private layout
then breaks this module's tests, not a scenario silently.

Nothing in `node/` or `relay/` uses this module: a peer never hands its keys out.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from protocol.errors import LocalError
from protocol.identity import KemKeyPair, X25519KeyPair
from protocol.keyschedule import kdf_ck
from protocol.messages import RatchetMessage
from protocol.prekeys import PrekeySecrets
from protocol.ratchet import Ratchet, _open, header_bytes
from protocol.session import _KINDS, Received, Session, _check_content


@dataclass(frozen=True, slots=True)
class SendingChain:
    """A ratchet's sending side at one point: its ratchet key pair, the chain key (None before the
    first DH step of a responder that has not sent) and the number of the next message on it."""

    ratchet_key: X25519KeyPair
    chain_key: bytes | None = field(repr=False)
    next_n: int


def live_sending_chain(ratchet: Ratchet) -> SendingChain:
    """The sending chain as it stands in memory (what a memory dump gives)."""
    return SendingChain(ratchet._dhs, ratchet._cks, ratchet._ns)


def stored_sending_chain(ratchet: Ratchet) -> SendingChain:
    """The sending chain as `Ratchet.to_bytes` stores it: at the end of the current reservation of
    message numbers (PROTOCOL.md §6.4a), or as in memory when nothing is reserved."""
    ns, cks = ratchet._reserved if ratchet._reserved is not None else (ratchet._ns, ratchet._cks)
    return SendingChain(ratchet._dhs, cks, ns)


def message_key(chain: SendingChain, n: int) -> bytes:
    """The key of message `n` of `chain` (chain steps from `chain.next_n`). Raises LocalError when
    the chain holds no key for it: no chain key, or `n` was sent before the chain's position."""
    if chain.chain_key is None:
        raise LocalError("the chain holds no chain key")
    if n < chain.next_n:
        raise LocalError("that message key was used and deleted before this chain position")
    ck = chain.chain_key
    for _ in range(n - chain.next_n):
        ck, _ = kdf_ck(ck)
    return kdf_ck(ck)[1]


def open_with_message_key(key: bytes, message: RatchetMessage, session: Session) -> Received:
    """Decrypt `message` of `session` with a message key found elsewhere (no ratchet state moves).
    Raises AuthenticationFailed when the key does not open it, DecodeError on unknown content."""
    aad = header_bytes(message.dh, message.pn, message.n) + session.transcript
    plaintext = _open(key, message.n, message.ciphertext, aad)
    _check_content(plaintext)
    return Received(_KINDS[plaintext[0]], plaintext[1:])


def prekey_private_keys(prekeys: PrekeySecrets) -> list[X25519KeyPair]:
    """Every X25519 private prekey held: the signed prekeys, then the one-time prekeys."""
    return [*prekeys._spk.values(), *prekeys._onetime.values()]


def kem_prekey(prekeys: PrekeySecrets, kem_id: int) -> KemKeyPair:
    """The ML-KEM private prekey `kem_id`. Raises KeyError when it is not held."""
    return prekeys._kem[kem_id]
