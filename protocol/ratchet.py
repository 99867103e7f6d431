"""The Double Ratchet with AES-256-GCM (PROTOCOL.md §6).

A symmetric chain step per message and a DH ratchet step per round trip, as in the Signal
specification, with these choices:

* A chain step is one HMAC-SHA512 (`keyschedule.kdf_ck`); the message key is the AES-256 key
  and the nonce is the message number, so no (key, nonce) pair can repeat.
* The associated data is the exact fixed-layout header (`HEADER`) followed by the caller's
  associated data (the session's transcript hash).
* Authenticate first, commit last: `decrypt` computes every new value on the side and
  changes the state only after the AES-GCM tag verifies. A refused frame never alters state.
* Everything an attacker can make us compute is bounded: at most MAX_SKIP skipped message
  keys (plus the message's own) are derived for one frame, at most MAX_SKIPPED_KEYS are
  stored (oldest evicted), and they belong to at most MAX_OLD_CHAINS earlier receiving chains.
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from collections.abc import Callable

import msgpack
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from protocol.errors import (
    AuthenticationFailed,
    DecodeError,
    DuplicateMessage,
    LocalError,
    TooManySkipped,
)
from protocol.identity import X25519KeyPair
from protocol.keyschedule import KEY_LEN, kdf_ck, kdf_rk, message_nonce
from protocol.messages import MAX_PLAINTEXT, VERSION, X25519_LEN, FrameType, RatchetMessage

#: Most message keys derived while handling one frame (skipped ones included).
MAX_SKIP = 1000
#: Most skipped message keys stored per session; the oldest are evicted past it.
MAX_SKIPPED_KEYS = 2000
#: Most earlier receiving chains whose skipped keys are kept.
MAX_OLD_CHAINS = 5
#: Header layout in the associated data: version, type, ratchet key, previous chain length, number.
HEADER = struct.Struct(">BB32sII")

KeyGen = Callable[[], X25519KeyPair]


def header_bytes(dh: bytes, pn: int, n: int) -> bytes:
    """The exact header bytes that the AEAD authenticates (PROTOCOL.md §6.3)."""
    return HEADER.pack(VERSION, FrameType.MESSAGE, dh, pn, n)


class Ratchet:
    """One side of a Double Ratchet session. Not thread-safe; serialise with `to_bytes`."""

    __slots__ = (
        "_ckr",
        "_cks",
        "_dhr",
        "_dhs",
        "_keygen",
        "_nr",
        "_ns",
        "_old_chains",
        "_pn",
        "_reserved",
        "_rk",
        "_skipped",
    )

    def __init__(
        self,
        *,
        root_key: bytes,
        dhs: X25519KeyPair,
        dhr: bytes | None,
        cks: bytes | None,
        ckr: bytes | None,
        ns: int = 0,
        nr: int = 0,
        pn: int = 0,
        skipped: OrderedDict[tuple[bytes, int], bytes] | None = None,
        old_chains: list[bytes] | None = None,
        keygen: KeyGen = X25519KeyPair.generate,
    ) -> None:
        self._rk = root_key
        self._dhs = dhs
        self._dhr = dhr
        self._cks = cks
        self._ckr = ckr
        self._ns = ns
        self._nr = nr
        self._pn = pn
        self._skipped: OrderedDict[tuple[bytes, int], bytes] = skipped if skipped is not None else OrderedDict()
        self._old_chains: list[bytes] = old_chains if old_chains is not None else []
        self._keygen = keygen
        # (message number, chain key) up to which the sending chain is reserved: see `reserve`.
        self._reserved: tuple[int, bytes] | None = None

    # --- construction -------------------------------------------------------------------------------

    @classmethod
    def initiator(
        cls,
        root_key: bytes,
        *,
        ours: X25519KeyPair,
        theirs: bytes,
        dh_output: bytes,
        keygen: KeyGen = X25519KeyPair.generate,
    ) -> Ratchet:
        """The initiator's side after the handshake: its ephemeral `ours` is its first ratchet key and
        the responder's signed prekey `theirs` the peer's; `dh_output` is X25519(ours, theirs), which
        the handshake already computed (DH1), so it is not computed twice."""
        rk, cks = kdf_rk(root_key, dh_output)
        return cls(root_key=rk, dhs=ours, dhr=theirs, cks=cks, ckr=None, keygen=keygen)

    @classmethod
    def responder(
        cls, root_key: bytes, *, theirs: bytes, dh_output: bytes, keygen: KeyGen = X25519KeyPair.generate
    ) -> Ratchet:
        """The responder's side after the handshake, with the first DH-ratchet step already taken:
        the receiving chain from `dh_output` (DH1, as the initiator derived its sending chain), and a
        fresh key pair for our sending chain. The signed prekey's private key stays out of the state."""
        rk, ckr = kdf_rk(root_key, dh_output)
        dhs = keygen()
        rk, cks = kdf_rk(rk, dhs.exchange(theirs))
        return cls(root_key=rk, dhs=dhs, dhr=theirs, cks=cks, ckr=ckr, keygen=keygen)

    # --- observation (for policy, status and tests; never key material) --------------------------------

    @property
    def ratchet_public(self) -> bytes:
        """Our current ratchet public key."""
        return self._dhs.public

    @property
    def sent_in_chain(self) -> int:
        """Messages sent on the current sending chain."""
        return self._ns

    @property
    def received_in_chain(self) -> int:
        """Messages received on the current receiving chain (highest number + 1)."""
        return self._nr

    @property
    def skipped_count(self) -> int:
        """Skipped message keys currently stored."""
        return len(self._skipped)

    @property
    def can_send(self) -> bool:
        """True once a sending chain exists (always, for states built by `initiator`/`responder`)."""
        return self._cks is not None

    # --- sending --------------------------------------------------------------------------------------

    def reserve(self, ahead: int) -> bool:
        """Reserve the next `ahead` message numbers of the sending chain; True if a new reservation
        was made, which the caller must make durable (`to_bytes`) before anything is sent.

        `to_bytes` then records the chain as if those messages were already sent: after a crash at
        any point, sending resumes past everything that may have left, so no message key or nonce
        is ever used twice — with one durable write per `ahead` messages instead of one per
        message. The peer sees the numbers a crash skipped as a gap (within MAX_SKIP).
        """
        if self._cks is None:
            raise LocalError("no sending chain yet: the responder must receive first")
        if not 1 <= ahead <= MAX_SKIP // 2:
            raise LocalError(f"reserve between 1 and {MAX_SKIP // 2} messages ahead")
        if self._reserved is not None and self._ns < self._reserved[0]:
            return False
        ck = self._cks
        for _ in range(ahead):
            ck, _ = kdf_ck(ck)
        self._reserved = (self._ns + ahead, ck)
        return True

    def encrypt(self, plaintext: bytes, ad: bytes) -> RatchetMessage:
        """Encrypt one message; the sending chain steps forward."""
        cks = self._cks
        if cks is None:
            raise LocalError("no sending chain yet: the responder must receive first")
        if len(plaintext) > MAX_PLAINTEXT:
            raise LocalError(f"plaintext over {MAX_PLAINTEXT} bytes")
        n = self._ns
        if n > 0xFFFFFFFF - 1:  # 4 billion messages in one chain
            raise LocalError("sending chain exhausted")
        if self._reserved is not None and n >= self._reserved[0]:
            raise LocalError("reservation used up: reserve (and persist) before sending more")
        ck, mk = kdf_ck(cks)
        dh = self._dhs.public
        ct = AESGCM(mk).encrypt(message_nonce(n), plaintext, header_bytes(dh, self._pn, n) + ad)
        self._cks = ck
        self._ns = n + 1
        return RatchetMessage(dh, self._pn, n, ct)

    # --- receiving ------------------------------------------------------------------------------------

    def decrypt(self, msg: RatchetMessage, ad: bytes, accept: Callable[[bytes], None] | None = None) -> bytes:
        """Decrypt one message. On any error the state is exactly as before the call.

        `accept`, if given, sees the authenticated plaintext before anything is committed and may
        raise to refuse it (the session refuses content it cannot interpret this way).
        """
        aad = header_bytes(msg.dh, msg.pn, msg.n) + ad
        if self._skipped:
            slot = (msg.dh, msg.n)
            mk = self._skipped.get(slot)
            if mk is not None:
                plaintext = _open(mk, msg.n, msg.ciphertext, aad)
                if accept is not None:
                    accept(plaintext)
                del self._skipped[slot]
                return plaintext
        if msg.dh == self._dhr:
            ckr = self._ckr
            if ckr is None:
                # The initiator's peer key is the responder's signed prekey, which never sends: only a
                # forger uses it (it is public, in the bundle).
                raise AuthenticationFailed("no receiving chain for this ratchet key")
            if msg.n == self._nr:  # the common case: in order, nothing to skip
                ck, mk = kdf_ck(ckr)
                plaintext = _open(mk, msg.n, msg.ciphertext, aad)
                if accept is not None:
                    accept(plaintext)
                self._ckr = ck
                self._nr = msg.n + 1
                return plaintext
            return self._decrypt_current(msg, ckr, aad, accept)
        if msg.dh in self._old_chains:
            raise DuplicateMessage("message of an earlier chain already received, or its key evicted")
        return self._decrypt_new_chain(msg, aad, accept)

    def _decrypt_current(
        self, msg: RatchetMessage, ckr: bytes, aad: bytes, accept: Callable[[bytes], None] | None
    ) -> bytes:
        if msg.n < self._nr:
            raise DuplicateMessage(f"message {msg.n} of the current chain already received")
        if msg.n - self._nr > MAX_SKIP:
            raise TooManySkipped(f"header skips {msg.n - self._nr} messages (max {MAX_SKIP})")
        ck, skipped = _advance(ckr, msg.dh, self._nr, msg.n)
        ck, mk = kdf_ck(ck)
        plaintext = _open(mk, msg.n, msg.ciphertext, aad)
        if accept is not None:
            accept(plaintext)
        self._ckr = ck
        self._nr = msg.n + 1
        self._store_skipped(skipped, new_chain=None)
        return plaintext

    def _decrypt_new_chain(self, msg: RatchetMessage, aad: bytes, accept: Callable[[bytes], None] | None) -> bytes:
        # Keys left in the current receiving chain, up to the sender's previous chain length.
        to_skip_old = max(0, msg.pn - self._nr) if self._ckr is not None else 0
        if to_skip_old + msg.n > MAX_SKIP:
            raise TooManySkipped(f"header skips {to_skip_old + msg.n} messages (max {MAX_SKIP})")
        skipped: list[tuple[tuple[bytes, int], bytes]] = []
        if self._ckr is not None and self._dhr is not None and to_skip_old:
            _, skipped = _advance(self._ckr, self._dhr, self._nr, msg.pn)
        rk, ckr = kdf_rk(self._rk, self._dhs.exchange(msg.dh))
        ckr, new_skipped = _advance(ckr, msg.dh, 0, msg.n)
        ckr, mk = kdf_ck(ckr)
        plaintext = _open(mk, msg.n, msg.ciphertext, aad)
        if accept is not None:
            accept(plaintext)
        # Authenticated and accepted: now step our own side and commit everything.
        dhs = self._keygen()
        rk, cks = kdf_rk(rk, dhs.exchange(msg.dh))
        # A chain we never received on (the initiator's first peer key) leaves nothing to remember.
        old = self._dhr if self._ckr is not None else None
        self._rk, self._dhs, self._dhr, self._cks, self._ckr = rk, dhs, msg.dh, cks, ckr
        self._reserved = None  # a new sending chain: nothing reserved on it yet
        self._pn, self._ns, self._nr = self._ns, 0, msg.n + 1
        self._store_skipped(skipped, new_chain=old)
        self._store_skipped(new_skipped, new_chain=None)
        return plaintext

    def _store_skipped(self, keys: list[tuple[tuple[bytes, int], bytes]], new_chain: bytes | None) -> None:
        if new_chain is not None:
            self._old_chains.append(new_chain)
            if len(self._old_chains) > MAX_OLD_CHAINS:
                dropped = self._old_chains.pop(0)
                for slot in [s for s in self._skipped if s[0] == dropped]:
                    del self._skipped[slot]
        for slot, mk in keys:
            self._skipped[slot] = mk
        while len(self._skipped) > MAX_SKIPPED_KEYS:
            self._skipped.popitem(last=False)

    # --- persistence ----------------------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        """The whole state, for the keystore (it is secret: seal it); with a reservation, the
        sending chain as it stands at the reservation's end."""
        ns, cks = self._reserved if self._reserved is not None else (self._ns, self._cks)
        return msgpack.packb(
            [
                1,
                self._rk,
                self._dhs.private_bytes(),
                self._dhr,
                cks,
                self._ckr,
                ns,
                self._nr,
                self._pn,
                [[dh, n, mk] for (dh, n), mk in self._skipped.items()],
                list(self._old_chains),
            ]
        )

    @classmethod
    def from_bytes(cls, data: bytes, *, keygen: KeyGen = X25519KeyPair.generate) -> Ratchet:
        """Restore a state written by `to_bytes`. Raises DecodeError on anything malformed."""
        try:
            obj = msgpack.unpackb(data, raw=False, max_str_len=0, max_map_len=0)
            fmt, rk, dhs, dhr, cks, ckr, ns, nr, pn, skipped, old = obj
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            raise DecodeError("malformed ratchet state") from exc
        ok = (
            type(fmt) is int
            and fmt == 1
            and _is_key(rk)
            and _is_key(dhs)
            and (dhr is None or _is_key(dhr))
            and (cks is None or _is_key(cks))
            and (ckr is None or _is_key(ckr))
            and not (dhr is None and ckr is not None)
            and all(type(v) is int and 0 <= v <= 0xFFFFFFFF for v in (ns, nr, pn))
            and type(skipped) is list
            and len(skipped) <= MAX_SKIPPED_KEYS
            and all(
                type(e) is list and len(e) == 3 and _is_key(e[0]) and type(e[1]) is int and _is_key(e[2])
                for e in skipped
            )
            and type(old) is list
            and len(old) <= MAX_OLD_CHAINS
            and all(_is_key(k) for k in old)
        )
        if not ok:
            raise DecodeError("malformed ratchet state")
        return cls(
            root_key=rk,
            dhs=X25519KeyPair.from_private_bytes(dhs),
            dhr=dhr,
            cks=cks,
            ckr=ckr,
            ns=ns,
            nr=nr,
            pn=pn,
            skipped=OrderedDict(((dh, n), mk) for dh, n, mk in skipped),
            old_chains=old,
            keygen=keygen,
        )

    def __repr__(self) -> str:
        return f"Ratchet(ns={self._ns}, nr={self._nr}, pn={self._pn}, skipped={len(self._skipped)})"


def _is_key(value: object) -> bool:
    return type(value) is bytes and len(value) == KEY_LEN == X25519_LEN


def _advance(ck: bytes, dh: bytes, start: int, stop: int) -> tuple[bytes, list[tuple[tuple[bytes, int], bytes]]]:
    """Step a receiving chain from `start` to `stop`, collecting the skipped keys (no state touched)."""
    keys = []
    for i in range(start, stop):
        ck, mk = kdf_ck(ck)
        keys.append(((dh, i), mk))
    return ck, keys


def _open(mk: bytes, n: int, ciphertext: bytes, aad: bytes) -> bytes:
    try:
        return AESGCM(mk).decrypt(message_nonce(n), ciphertext, aad)
    except InvalidTag as exc:
        raise AuthenticationFailed("message authentication failed") from exc
