"""Key theft: what malware on a device reads from a node's unlocked keystore or its memory (its
identity key, a live session, its X25519 private keys), through the hazmat doors
(`node.hazmat`, `protocol.hazmat`); and reading recorded traffic with a stolen or rebuilt session,
in both directions, exactly as far as the keys reach."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from cryptography import x509
from cryptography.x509.oid import NameOID

from node import hazmat as node_hazmat
from protocol import handshake, hazmat
from protocol.errors import ProtocolError
from protocol.hazmat import SendingChain
from protocol.identity import IdentityKey, X25519KeyPair
from protocol.keyschedule import root_key
from protocol.messages import InitMessage, PrekeyBundle, RatchetMessage, Suite
from protocol.ratchet import Ratchet
from protocol.session import Session
from scenarios.attacker.credentials import AnyRevocation, Credentials
from scenarios.lab import LabNode


def steal_identity(victim: LabNode) -> IdentityKey:
    """Copy a node's identity key out of its unlocked keystore."""
    return node_hazmat.stored_identity(victim.keystore)


@dataclass(frozen=True)
class StolenSession:
    """A live session copied out of a node's memory: its state, and the sending chain as it stands
    in memory (the keystore holds that chain only as of the end of the node's current reservation
    of message numbers, PROTOCOL.md §6.4a, so the live chain key is what a memory dump adds)."""

    state: bytes
    chain: SendingChain

    def copy(self) -> Session:
        """A working copy of the victim's session."""
        return Session.from_bytes(self.state)


def steal_session(victim: LabNode, peer: str) -> StolenSession:
    """Copy a node's live session with `peer` (its whole ratchet state) out of its memory, as malware
    on the device would."""
    session = node_hazmat.live_session(victim.node, peer)
    assert session is not None, f"no session with {peer}"
    return StolenSession(session.to_bytes(), hazmat.live_sending_chain(session.ratchet))


def x25519_keys(victim: LabNode) -> dict[bytes, X25519KeyPair]:
    """Every X25519 private key a node holds right now (prekeys and each session's ratchet key), by public key."""
    pairs = hazmat.prekey_private_keys(node_hazmat.stored_prekeys(victim.keystore))
    for session in node_hazmat.stored_sessions(victim.keystore).values():
        pairs.append(hazmat.stored_sending_chain(session.ratchet).ratchet_key)
    return {pair.public: pair for pair in pairs}


class StateReader:
    """Reads recorded frames of one session with a copy of one side's state (`owner`'s).

    Frames *to* the owner go through the real `Session.decrypt` of the copy, which steps its ratchet
    as the owner did. Frames *from* the owner are opened with keys derived from the sending chain:
    possible while the owner still sends under the ratchet key the copy holds, from the chain
    position the copy holds onwards. The copy's own DH steps draw keys from its keygen: random
    ones, unless the attacker somehow knows the owner's (harvest-now's broken X25519)."""

    def __init__(self, owner: str, session: Session, live: StolenSession | None = None) -> None:
        self.owner = owner
        self.session = session
        # The sending chain as it was in memory when stolen (the state's own is reservation-ahead).
        self._live = live.chain if live else None

    def read(self, sender: str, message: RatchetMessage) -> tuple[bytes | None, str]:
        """The message body if the copy reaches it, else None; and why, in words."""
        if sender != self.owner:
            try:
                got = self.session.decrypt_message(message)
            except ProtocolError as exc:
                return None, str(exc)
            return got.data, "decrypted with the copy's receiving chain"
        chain = hazmat.stored_sending_chain(self.session.ratchet)
        if self._live is not None and self._live.ratchet_key.public == chain.ratchet_key.public:
            chain = self._live
        if message.dh != chain.ratchet_key.public or chain.chain_key is None:
            return None, "sent under a ratchet key the attacker never held"
        if message.n < chain.next_n:
            return None, "its key was used and deleted before the copy was taken"
        try:
            got = hazmat.open_with_message_key(hazmat.message_key(chain, message.n), message, self.session)
        except ProtocolError:
            return None, "authentication failed: the derived key does not open it"
        return got.data, "decrypted with the copy's sending chain"


def replaying(keys: Iterator[X25519KeyPair]) -> Callable[[], X25519KeyPair]:
    """A keygen that hands out known keys in order, then random ones."""

    def keygen() -> X25519KeyPair:
        return next(keys, None) or X25519KeyPair.generate()

    return keygen


def rebuild_initiator(
    init: InitMessage,
    bundle: PrekeyBundle,
    *,
    keys: dict[bytes, X25519KeyPair],
    later: list[bytes],
    root: x509.Certificate,
    kem_secret: bytes | None,
) -> Session | None:
    """The initiator's session rebuilt from a recorded INIT, the bundle it was made from, and X25519
    private keys (`keys`, by public key): the ephemeral, and the ratchet keys the initiator used
    `later`, in order. Suite 1 also needs the ML-KEM shared secret; pass the attacker's best guess.
    None if the ephemeral key is not known."""
    ephemeral = keys.get(init.ephemeral)
    if ephemeral is None:
        return None
    suite = Suite(init.suite)
    creds = Credentials.claimed(init.certificate)
    ciphertext = init.kem_ciphertext
    guess = kem_secret or bytes(32)
    # `initiate` gives the transcript hash (the same bundle, identities, ephemeral, KEM ciphertext and
    # creation time give the same hash); the root key is then derived here from what the attacker knows.
    started = handshake.initiate(
        identity=creds.identity, certificate=init.certificate, bundle=bundle, root=root, revocation=AnyRevocation(),
        now=handshake.from_millis(init.created), expected_name=_common_name(bundle.certificate), suite=suite,
        keygen=lambda: ephemeral,
        kem_encaps=lambda _: (guess, ciphertext or b""),
    )  # fmt: skip
    dh1 = ephemeral.exchange(bundle.spk)
    secrets = dh1 + (ephemeral.exchange(bundle.otpk) if bundle.otpk is not None else b"")
    if suite is Suite.HYBRID:
        secrets += guess
    rk = root_key(secrets, started.session.transcript, insecure=suite is Suite.INSECURE_UNSIGNED)
    replay = replaying(keys[k] for k in later if k in keys)
    ratchet = Ratchet.initiator(rk, ours=ephemeral, theirs=bundle.spk, dh_output=dh1, keygen=replay)
    return Session(
        ratchet,
        transcript=started.session.transcript,
        peer=started.session.peer,
        peer_fingerprint=started.session.peer_fingerprint,
        suite=suite,
    )


def _common_name(certificate: bytes) -> str:
    cert = x509.load_der_x509_certificate(certificate)
    return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)
