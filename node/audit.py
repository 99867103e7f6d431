"""Append-only, hash-chained audit logs in the keystore's SQLite file.

Used by the KMS now and by the CA later: each names its log (`"kms"`, `"ca"`), and all logs share
the table `audit_log`, keyed by (log, seq). Each entry is

    (seq, time, actor, action, fields, prev_hash, hash[, signature])

- `seq` counts from 1 without gaps; `time` is UTC, ISO 8601 with microseconds, from the clock
  the log was given (default `node.clock.utcnow`) or passed to `append`;
- `fields` is a flat dict of str, int, bool or None values: metadata such as a key id and a
  version, never key material or plaintext (the log is not encrypted);
- `hash = SHA-256(b"kmsnet-audit/1\\n" || canonical JSON of {seq, time, actor, action, fields,
  prev_hash})`, canonical meaning sorted keys, no spaces, UTF-8; `prev_hash` is the previous
  entry's hash (32 zero bytes before the first);
- `signature`, when the log has a signing key, is Ed25519 over `b"kmsnet-audit/1 sig" || hash`.

`verify()` walks the chain and raises `AuditChainBroken` naming the first seq that does not fit:
an edited entry (its hash no longer matches, or its signature fails), a removed, inserted or
reordered one (`prev_hash` or `seq` out of line). A plain hash chain cannot see its tail cut off
or the whole chain recomputed, so after every append the head (seq, hash) is also written to the
keystore, sealed: cutting the tail or rewriting the chain without the keystore's key shows as a
head mismatch. (Someone holding an older copy of the sealed head could roll both back together;
a signing key, or publishing the head elsewhere, closes that.)
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from node.clock import utcnow
from node.errors import AuditChainBroken, AuditError
from node.home import NS_AUDIT
from node.keystore import Keystore
from protocol.certs import CaKey

AuditValue = str | int | bool | None
Clock = Callable[[], datetime]

GENESIS = bytes(32)
_HASH_DOMAIN = b"kmsnet-audit/1\n"
_SIG_DOMAIN = b"kmsnet-audit/1 sig"
_LOG_NAME = re.compile(r"[a-z][a-z0-9_-]{0,31}")


@dataclass(frozen=True)
class AuditEntry:
    """One entry of the log, as stored."""

    seq: int
    time: str
    actor: str
    action: str
    fields: Mapping[str, AuditValue]
    prev_hash: bytes = field(repr=False)
    hash: bytes
    signature: bytes | None = field(default=None, repr=False)

    def to_json(self) -> dict[str, object]:
        """A JSON-ready dict (hashes and signature in hex)."""
        out = asdict(self)
        out["fields"] = dict(self.fields)
        for name in ("prev_hash", "hash", "signature"):
            value = getattr(self, name)
            out[name] = value.hex() if value is not None else None
        return out


def entry_hash(seq: int, time: str, actor: str, action: str, fields: Mapping[str, AuditValue], prev: bytes) -> bytes:
    """The hash an entry must carry (module docstring)."""
    body = {"seq": seq, "time": time, "actor": actor, "action": action, "fields": dict(fields), "prev_hash": prev.hex()}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return hashlib.sha256(_HASH_DOMAIN + canonical).digest()


class AuditLog:
    """The audit log called `name` in `store`'s file; optionally signing each entry with `signer`.

    `verify_key` checks signatures (defaults to `signer`'s public key); when a key is known,
    every entry must be signed. `clock` gives the time of entries appended without `at`.
    """

    def __init__(
        self,
        store: Keystore,
        *,
        name: str,
        signer: CaKey | None = None,
        verify_key: Ed25519PublicKey | None = None,
        clock: Clock = utcnow,
    ) -> None:
        if not _LOG_NAME.fullmatch(name):
            raise ValueError(f"bad audit log name {name!r}")
        self._store = store
        self._name = name
        self._signer = signer
        self._verify_key = verify_key or (signer.public_key() if signer else None)
        self._clock = clock
        store.connection.execute(
            "CREATE TABLE IF NOT EXISTS audit_log ("
            "log TEXT NOT NULL, seq INTEGER NOT NULL, time TEXT NOT NULL, actor TEXT NOT NULL, action TEXT NOT NULL, "
            "fields TEXT NOT NULL, prev_hash BLOB NOT NULL, hash BLOB NOT NULL, signature BLOB, "
            "PRIMARY KEY (log, seq)) WITHOUT ROWID"
        )

    def append(
        self, actor: str, action: str, fields: Mapping[str, AuditValue] | None = None, *, at: datetime | None = None
    ) -> AuditEntry:
        """Add an entry after the last one (atomically, also inside a caller's transaction) and return it."""
        fields = dict(fields or {})
        for name, value in fields.items():
            if not isinstance(name, str) or not isinstance(value, str | int | bool | type(None)):
                raise TypeError(f"audit field {name!r} must map a str to a str, int, bool or None")
        when = at if at is not None else self._clock()
        if when.tzinfo is None:
            raise ValueError("audit time must be timezone-aware")
        time = when.astimezone(UTC).isoformat(timespec="microseconds")
        with self._store.transaction():
            last = self._store.connection.execute(
                "SELECT seq, hash FROM audit_log WHERE log = ? ORDER BY seq DESC LIMIT 1", (self._name,)
            ).fetchone()
            seq, prev = (last[0] + 1, last[1]) if last else (1, GENESIS)
            # Append only to the tail the sealed head vouches for: sealing a new head over a cut
            # (rows deleted at the end) would make the cut undetectable.
            self._check_head(seq - 1, prev)
            digest = entry_hash(seq, time, actor, action, fields, prev)
            signature = self._signer.sign(_SIG_DOMAIN + digest) if self._signer else None
            entry = AuditEntry(seq, time, actor, action, fields, prev, digest, signature)
            self._store.connection.execute(
                "INSERT INTO audit_log (log, seq, time, actor, action, fields, prev_hash, hash, signature) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (self._name, seq, time, actor, action, _canonical(fields), prev, digest, signature),
            )
            self._store.put(NS_AUDIT, self._name, _canonical({"seq": seq, "hash": digest.hex()}).encode())
        return entry

    def entries(self, *, after: int = 0, limit: int | None = None) -> Iterator[AuditEntry]:
        """Stored entries with seq > `after`, in seq order (as stored: `verify()` says whether to trust them)."""
        rows = self._store.connection.execute(
            "SELECT seq, time, actor, action, fields, prev_hash, hash, signature FROM audit_log "
            "WHERE log = ? AND seq > ? ORDER BY seq LIMIT ?",
            (self._name, after, -1 if limit is None else limit),
        )
        for seq, time, actor, action, fields, prev, digest, signature in rows:
            try:
                parsed = json.loads(fields)
            except ValueError:
                # An unparseable row is still listed, so that verify() can name its seq.
                parsed = {"unparseable": True}
            yield AuditEntry(seq, time, actor, action, parsed, prev, digest, signature)

    def verify(self) -> int:
        """Check the whole chain and the sealed head; return the number of entries, or raise `AuditChainBroken`."""
        prev, expected = GENESIS, 1
        for entry in self.entries():
            if entry.seq != expected:
                raise AuditChainBroken(expected, f"entry missing (next stored seq is {entry.seq})")
            recomputed = entry_hash(entry.seq, entry.time, entry.actor, entry.action, entry.fields, entry.prev_hash)
            if not hmac.compare_digest(recomputed, entry.hash):
                raise AuditChainBroken(entry.seq, "entry edited (its hash does not match its contents)")
            if not hmac.compare_digest(entry.prev_hash, prev):
                raise AuditChainBroken(entry.seq, "does not follow the previous entry (removed, inserted or reordered)")
            self._check_signature(entry)
            prev, expected = entry.hash, expected + 1
        self._check_head(expected - 1, prev)
        return expected - 1

    def _check_signature(self, entry: AuditEntry) -> None:
        if self._verify_key is None:
            return
        if entry.signature is None:
            raise AuditChainBroken(entry.seq, "entry is not signed")
        try:
            self._verify_key.verify(entry.signature, _SIG_DOMAIN + entry.hash)
        except InvalidSignature:
            raise AuditChainBroken(entry.seq, "signature does not verify") from None

    def _check_head(self, last_seq: int, last_hash: bytes) -> None:
        raw = self._store.get(NS_AUDIT, self._name)
        if raw is None:
            if last_seq:
                raise AuditChainBroken(1, "entries exist but the sealed head is missing")
            return
        try:
            head = json.loads(raw)
            head_seq, head_hash = int(head["seq"]), bytes.fromhex(head["hash"])
        except (ValueError, KeyError, TypeError) as exc:
            raise AuditError("the sealed audit head is unreadable") from exc
        if head_seq > last_seq:
            raise AuditChainBroken(last_seq + 1, f"entries {last_seq + 1}..{head_seq} were removed")
        if head_seq < last_seq:
            raise AuditChainBroken(head_seq + 1, "entry written outside the keystore (not covered by the sealed head)")
        if not hmac.compare_digest(head_hash, last_hash):
            raise AuditChainBroken(head_seq, "chain rewritten (last hash differs from the sealed head)")


def _canonical(value: Mapping[str, object]) -> str:
    return json.dumps(dict(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
