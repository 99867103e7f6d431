"""The node package's exception hierarchy.

Every error `node` raises on purpose is a `NodeError`. The subclasses say what went wrong
precisely enough for the command line to pick an exit code and for a test or a scenario to
assert it, without parsing messages:

- `TrustError` (a mix-in): the input was refused as forged, tampered or untrusted, or a key
  must no longer be trusted. The command line exits 4 on these.
- `Unavailable` (a mix-in): the disk, the database or the relay could not be reached or failed
  underneath us. The command line exits 3.
- everything else: bad input or a state that does not allow the operation. Exit 1.

Messages never contain key material or plaintext.
"""

from __future__ import annotations

import socket

# One definition of an error code, the protocol's: node's own errors get theirs the same way.
from protocol.errors import code_of as code_of


class NodeError(Exception):
    """Base of every error raised on purpose by `node`."""


def network_words(error: BaseException | str) -> str:
    """Why a connection failed, in words for people: never an errno or a class name."""
    if isinstance(error, str):
        return error
    if isinstance(error, ConnectionRefusedError):
        return "nothing is listening there"
    if isinstance(error, TimeoutError):
        return "no answer in time"
    if isinstance(error, socket.gaierror):
        return "the host name is unknown"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror[0].lower() + error.strerror[1:]
    return str(error) or "the connection failed"


def words_of(error: BaseException | type[BaseException]) -> str:
    """The error's code in words, for a timeline or a check's name (`bad_signature` -> "bad signature")."""
    return code_of(error).replace("_", " ")


class TrustError(NodeError):
    """Input refused as forged, tampered or untrusted (mixed into the precise classes below)."""


class Unavailable(NodeError):
    """Storage or the network failed or could not be reached (mixed into the precise classes below)."""


# --- keystore -------------------------------------------------------------------------------------


class KeystoreError(NodeError):
    """The encrypted keystore could not be opened or used."""


class KeystoreNotFound(KeystoreError):
    """No keystore at the path, and the caller did not ask to create one."""


class WrongPassphrase(KeystoreError):
    """The passphrase (or key file) does not unwrap the keystore's data key; nothing was written."""


class KeystoreCorrupt(KeystoreError, TrustError):
    """A record or the header does not authenticate, or the file is not a kmsnet keystore."""


class StorageError(KeystoreError, Unavailable):
    """The database or the file system failed (locked, full, unreadable)."""


# --- one writer per home -------------------------------------------------------------------------


class HomeInUse(NodeError):
    """Another process holds the home's writer lock (`holder` says which, when it could be read)."""

    def __init__(self, message: str, holder: object = None) -> None:
        super().__init__(message)
        self.holder = holder


class ControlError(Unavailable):
    """The home's running writer could not be reached on its control socket, or broke off."""


# --- relay link and peers -------------------------------------------------------------------------


class LinkError(NodeError):
    """The link to the relay failed: a bad relay URL, or a relay that speaks out of protocol."""


class RelayUnreachable(LinkError, Unavailable):
    """The relay cannot be reached, or the connection to it was lost."""


class RelayRefused(LinkError):
    """The relay refused to authenticate this node."""


class NodeRevoked(LinkError, TrustError):
    """This node's own certificate is revoked: the relay refuses it, and it must not go on as if not."""


class RelayImpostor(LinkError, TrustError):
    """The relay we dialled gave another relay's name in its CHALLENGE (it may be passing that
    relay's challenge on, to log in there as us): we did not answer it."""


class PeerUnavailable(NodeError):
    """The peer cannot be reached through the relay (no prekey bundle, not enrolled)."""


class SelfSend(NodeError):
    """A message addressed to this node itself."""


class IdentityChanged(TrustError):
    """A verified peer's identity key changed: sending to it waits until the user accepts the new
    safety number (node/trust.py)."""


class SafetyNumberMismatch(TrustError):
    """The safety number given is not the one shared with the peer."""


# --- the certificate authority, as the node meets it (node/enrol.py) ------------------------------
# The CA (`ca.errors`) subclasses these for what it refuses; the node never imports the CA.


class CaError(NodeError):
    """Base of every error about the certificate authority: the node's dealings with it (below) and,
    subclassed in `ca.errors`, what the CA itself refuses."""


class EnrolmentInputError(CaError):
    """An argument of enrolment, renewal or re-keying is malformed or wrong for this home: a node name,
    the CA's URL, a fingerprint, the relay list."""


class EnrolmentError(CaError):
    """An enrolment request is malformed: a CSR that does not parse, an unsupported key type, a bad name."""


class EnrolmentRefused(EnrolmentError, TrustError):
    """The CA refused an enrolment: its token (unknown, expired, used, for another name) or its CSR."""


class RenewalRefused(CaError, TrustError):
    """A renewal was refused: the certificate is not the CA's, revoked, expired, or the CSR is not for its key."""


class CaUnreachable(CaError, Unavailable):
    """The CA cannot be reached (refused, timed out, bad address) or is temporarily refusing us (429, 5xx)."""


class CaProtocolError(CaError):
    """The CA answered something that is not what the enrolment protocol says."""


class FingerprintMismatch(CaError, TrustError):
    """The CA root's SHA-256 fingerprint is not the one the user said to expect."""


class CertificateRefused(CaError, TrustError):
    """The certificate or root the CA returned does not verify, or is not for our name or key."""


class AlreadyEnrolled(CaError):
    """The node home holds a keystore already: enrolment never overwrites one."""


class EnrolmentUnfinished(CaError, Unavailable):
    """The CA may have certified the node's key, but its answer was lost or could not be stored: the
    prepared keystore is kept in the home, and the same enrolment again finishes it (same certificate)."""


# --- audit log ------------------------------------------------------------------------------------


class AuditError(NodeError):
    """The audit log could not be written or read."""


class AuditChainBroken(AuditError, TrustError):
    """An audit entry was edited, removed, inserted or reordered; `seq` says where the chain breaks."""

    def __init__(self, seq: int, reason: str) -> None:
        super().__init__(f"audit log broken at seq {seq}: {reason}")
        self.seq = seq
        self.reason = reason


# --- key management -------------------------------------------------------------------------------


class KmsError(NodeError):
    """A key-management operation was refused."""


class InvalidRequest(KmsError):
    """The arguments are malformed (a key id with forbidden characters, a version out of range...)."""


class KeyNotFound(KmsError):
    """No key with this id."""


class KeyMismatch(KmsError):
    """The ciphertext or signature names another key than the one given."""


class KeyExists(KmsError):
    """A key with this id exists already (destroyed keys keep their id)."""


class KeyTypeError(KmsError):
    """The key's type does not support the operation (signing with an AES key...)."""


class KeyStateError(KmsError):
    """The key's state does not allow the operation or the transition (see node.kms)."""


class VersionNotFound(KmsError):
    """The key has no such version."""


class VersionTooOld(KmsError):
    """The ciphertext or signature is older than the key's minimum decryption version."""


class MessageTooLong(KmsError):
    """The plaintext is longer than RSA-OAEP can carry for this key size."""


class InvalidCiphertext(KmsError, TrustError):
    """The ciphertext is malformed or does not authenticate (tampered, truncated, wrong key)."""


class InvalidSignature(KmsError, TrustError):
    """The signature is malformed or does not verify."""


class CompromisedVersion(KmsError, TrustError):
    """The key version is flagged compromised: it refuses new use, and reading needs explicit consent."""


class WeakPeerKey(KmsError, TrustError):
    """An X25519 exchange gave the all-zero output (a low-order public key)."""
