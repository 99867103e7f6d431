"""Bytes a node writes to its keystore per accepted INIT, with a large replay cache (issue #12).

Before, the prekey account was one record holding the replay cache (format 1, PROTOCOL.md
Appendix A): every accepted INIT re-sealed and rewrote all of it. Now each cache entry is a record
of its own (`replay/<spk id>:<EK hex>`): an INIT without a one-time prekey writes one entry, and
one with a one-time prekey rewrites the account record (private prekeys and schedule, no cache).

The figures are sealed bytes (what SQLite stores: namespace, name and AES-GCM sealed value) for
the records the account hands the node after the consumption `handshake.respond` makes once
message 0 authenticated (`remember` or `take_onetime`).

    .venv/bin/python bench/prekey_write_bench.py [--entries 10000]
"""

from __future__ import annotations

import argparse
import os

import msgpack

from node.keystore import Keystore
from protocol.identity import X25519KeyPair
from protocol.prekeys import MAX_REPLAY_PER_INITIATOR, PrekeySecrets

ONETIME = 100


def sealed_size(keystore: Keystore, puts: dict[tuple[str, str], bytes]) -> int:
    return sum(len(ns) + len(name) + len(sealed) for ns, name, sealed in keystore.seal_many(puts))


def format_1(account: PrekeySecrets) -> bytes:
    """The account as the node wrote it before: the format-2 fields with the cache inside."""
    _fmt, spk, kem, onetime, issued, schedule = msgpack.unpackb(account.to_bytes())
    cache = [[i, sorted(seen), sorted(account._quota.get(i, {}).items())] for i, seen in account._seen.items()]
    return msgpack.packb([1, spk, kem, onetime, issued, cache, schedule])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=10_000, help="replay-cache entries already held")
    entries = parser.parse_args().entries
    keystore = Keystore.memory()
    account = PrekeySecrets()
    account.add_signed(1, X25519KeyPair.generate())
    for key_id in range(1, ONETIME + 1):
        account.add_onetime(key_id, X25519KeyPair.generate())
    initiators = [os.urandom(32) for _ in range(entries // MAX_REPLAY_PER_INITIATOR + 1)]
    for i in range(entries):
        account.remember(1, os.urandom(32), initiators[i // MAX_REPLAY_PER_INITIATOR])
    account.take_changes()

    print(f"replay cache: {entries} entries; {ONETIME} one-time prekeys held")
    before = sealed_size(keystore, {("node", "prekeys"): format_1(account)})
    print(f"  before (format 1, whole account per INIT): {before:>10,} bytes per accepted INIT")

    account.remember(1, os.urandom(32), initiators[-1])
    changes = account.take_changes()
    assert changes.account is None and not changes.deletes
    print(f"  now, INIT without a one-time prekey:      {sealed_size(keystore, changes.puts):>10,} bytes")

    account.take_onetime(1)
    changes = account.take_changes()
    assert changes.account is not None and not changes.puts
    written = sealed_size(keystore, {("node", "prekeys"): changes.account})
    print(f"  now, INIT with a one-time prekey:         {written:>10,} bytes")


if __name__ == "__main__":
    main()
