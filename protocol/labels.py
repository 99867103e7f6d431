"""Every label of the protocol: HKDF infos, HMAC inputs and signature domain separators (PROTOCOL.md §5).

All labels are versioned (`kmsnet/v1/...`), distinct, and no signing label is a prefix of another,
so a key derived or a signature made for one purpose can never pass for another. One module holds
them all so that a reader, a reviewer or a new frame finds them in one place, and so that code
needing only a label (the relay's challenge signature, say) need not import the key schedule.
"""

from __future__ import annotations

#: HKDF info for the handshake's root key (salt: the transcript hash).
LABEL_ROOT = b"kmsnet/v1/root"
#: HKDF info of the insecure (unsigned) suite's root key: distinct so it can never pass as a real one.
LABEL_ROOT_INSECURE = b"kmsnet/v1/root-insecure-unsigned"
#: HKDF info for a DH-ratchet step (salt: the current root key).
LABEL_RATCHET = b"kmsnet/v1/ratchet"
#: HMAC input for a symmetric chain step.
LABEL_CHAIN = b"kmsnet/v1/chain"
#: Domain separator of the handshake transcript hash.
LABEL_TRANSCRIPT = b"kmsnet/v1/transcript"
#: Domain separator of a prekey-bundle signature.
LABEL_BUNDLE = b"kmsnet/v1/bundle"
#: Domain separator of a one-time-prekey signature.
LABEL_ONETIME = b"kmsnet/v1/onetime"
#: Domain separator of the initiator's transcript signature.
LABEL_INIT_SIGNATURE = b"kmsnet/v1/init-signature"
#: Domain separator of the safety number.
LABEL_SAFETY = b"kmsnet/v1/safety-number"
#: Domain separator of a node's signature over a relay's challenge (protocol.link).
LABEL_RELAY_AUTH = b"kmsnet/v1/relay-auth"

ALL_LABELS = (
    LABEL_ROOT,
    LABEL_RATCHET,
    LABEL_CHAIN,
    LABEL_TRANSCRIPT,
    LABEL_BUNDLE,
    LABEL_ONETIME,
    LABEL_INIT_SIGNATURE,
    LABEL_SAFETY,
    LABEL_RELAY_AUTH,
    LABEL_ROOT_INSECURE,
)
#: The labels the identity key signs behind (LABEL || data): none may be a prefix of another.
SIGNING_LABELS = (LABEL_BUNDLE, LABEL_ONETIME, LABEL_INIT_SIGNATURE, LABEL_RELAY_AUTH)
