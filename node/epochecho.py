"""The rollback epoch's copy held by the relay (PROTOCOL.md §8.2, §16.3).

The epoch file next to the keystore (node/epoch.py) catches a keystore restored on its own; a
restore of the whole home (a VM snapshot, a backup of the folder) brings back an older epoch file
too. So at each login the node also gives the relay its current epoch, signed with its identity
key; the relay keeps it and, at the next login, echoes it in WELCOME. A keystore whose epoch is
below that echo has been rolled back past a login.

The relay cannot forge a higher epoch (the node checks its own signature over its own name), so it
cannot raise a false alarm; it can withhold or replay an older copy, and so hide a rollback.
"""

from __future__ import annotations

from protocol.errors import BadSignature
from protocol.identity import IdentityKey, verify_signature
from protocol.link import epoch_signed_bytes, signed_epoch, split_signed_epoch


def sign_epoch(identity: IdentityKey, name: str, epoch: int) -> bytes:
    """The AUTH `epoch` field for `epoch`: signed by this node's identity key, for its name."""
    return signed_epoch(epoch, identity.sign(epoch_signed_bytes(name, epoch)))


def echoed_epoch(field: bytes | None, identity: IdentityKey, name: str) -> int:
    """The epoch a WELCOME echoes if this node signed it (under its current identity key), else 0:
    a copy from before a re-key, from another node or forged counts for nothing, never as an alarm."""
    if field is None:
        return 0
    epoch, signature = split_signed_epoch(field)
    try:
        verify_signature(identity.public, signature, epoch_signed_bytes(name, epoch))
    except BadSignature:
        return 0
    return epoch


def rollback_seen(echoed: bytes | None, sent: bytes | None, identity: IdentityKey, name: str) -> int:
    """The epoch the relay echoed if it is above the one this login sent (the keystore was rolled
    back past an earlier login), else 0."""
    previous = echoed_epoch(echoed, identity, name)
    now = split_signed_epoch(sent)[0] if sent is not None else 0
    return previous if previous > now else 0
