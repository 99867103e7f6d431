"""Safety numbers: a short fingerprint of two identities to compare out of band (PROTOCOL.md §11).

    digest = SHA-512(LABEL_SAFETY || min(A, B) || max(A, B))      A, B: raw Ed25519 identity keys

The first 40 bytes of the digest, read as eight big-endian 5-byte integers, each taken
mod 100000, give eight groups of five digits. Sorting the keys makes the number the same
on both sides; eight groups keep it short enough to read aloud while each group still
carries 16.6 bits (about 133 bits in all), far beyond what a second-preimage search could
hit for a chosen pair of keys.
"""

from __future__ import annotations

import hashlib

from protocol.errors import LocalError
from protocol.labels import LABEL_SAFETY
from protocol.messages import ED25519_LEN

GROUPS = 8
_GROUP_BYTES = 5


def safety_number(ours: bytes, theirs: bytes) -> str:
    """The safety number of two raw Ed25519 identity public keys, as "12345 67890 ..." (8 groups)."""
    if len(ours) != ED25519_LEN or len(theirs) != ED25519_LEN:
        raise LocalError("identity public keys are 32 bytes")
    low, high = sorted((ours, theirs))
    digest = hashlib.sha512(LABEL_SAFETY + low + high).digest()
    groups = (int.from_bytes(digest[i * _GROUP_BYTES : (i + 1) * _GROUP_BYTES], "big") % 100_000 for i in range(GROUPS))
    return " ".join(f"{g:05d}" for g in groups)
