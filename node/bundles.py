"""Our published prekeys: the prekey account kept in the keystore (protocol/prekeys.py decides
rotation and consumption), the signed bundles we made, and publishing them to the relay.

Records: `node/prekeys` (the account, its rotation schedule included), `replay/<spk id>:<EK hex>`
(one per replay-cache entry, holding the initiator's identity key: an accepted INIT writes one),
`bundle/<spk id>` (our signed bundles, encoded), `node/onetime_certificate` (the certificate the
relay's one-time prekeys are signed over).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Coroutine
from datetime import datetime
from typing import Any

from node.errors import NodeError, RelayUnreachable
from node.home import NS_BUNDLE, NS_NODE
from node.journal import Journal, Key, log_failure
from node.keystore import Keystore
from node.options import NodeOptions
from protocol import handshake, wire
from protocol.errors import ProtocolError, UnknownPrekey
from protocol.identity import IdentityKey, KemKeyPair, X25519KeyPair
from protocol.link import LinkFrame, PublishBundle
from protocol.messages import PrekeyBundle
from protocol.prekeys import NS_REPLAY, PrekeySecrets

log = logging.getLogger("kmsnet.node")

#: One-time prekeys uploaded per batch, and the level below which the node tops up.
ONETIME_BATCH = 100
ONETIME_LOW = 25


class Bundles:
    """The prekey account and our signed bundles, persisted; `publish` brings the relay up to date."""

    def __init__(self, keystore: Keystore, journal: Journal, options: NodeOptions, *, node: str) -> None:
        self._keystore = keystore
        self._node = node
        self._journal = journal
        self._options = options
        packed = keystore.get(NS_NODE, "prekeys")
        #: The responder's prekey account (private keys, replay cache, rotation schedule).
        self.account = PrekeySecrets.from_bytes(packed, keystore.items(NS_REPLAY)) if packed else PrekeySecrets()
        # An early signed-prekey rotation is under way (one at a time).
        self._rotating = False
        # An account written before the cache had records of its own moves it out now (once), and
        # entries of a prekey already destroyed go.
        self._write_changes()

    def current(self) -> PrekeyBundle:
        """Our newest signed bundle."""
        ids = sorted(int(n) for n in self._keystore.names(NS_BUNDLE))
        return self._load(ids[-1])

    def by_id(self, spk_id: int) -> PrekeyBundle:
        """Our bundle of signed prekey `spk_id`, which an INIT names (UnknownPrekey if we do not hold it)."""
        if self._keystore.get(NS_BUNDLE, str(spk_id)) is None:
            raise UnknownPrekey(f"signed prekey {spk_id} is not ours (rotated out?)")
        return self._load(spk_id)

    def stage(self, puts: dict[Key, bytes], deletes: list[Key]) -> None:
        """Add what changed in the prekey account to a commit being prepared (an INIT consumed from
        it): a replay-cache entry, or the account record when a one-time prekey went."""
        changes = self.account.take_changes()
        if changes.account is not None:
            puts[(NS_NODE, "prekeys")] = changes.account
        puts.update(changes.puts)
        deletes.extend(changes.deletes)

    def _write_changes(self) -> None:
        """Write what changed in the prekey account at once (in the caller's transaction, if any)."""
        puts: dict[Key, bytes] = {}
        deletes: list[Key] = []
        self.stage(puts, deletes)
        if not puts and not deletes:
            return
        with self._keystore.transaction():
            for (namespace, name), value in puts.items():
                self._keystore.put(namespace, name, value)
            for namespace, name in deletes:
                self._keystore.delete(namespace, name)

    def _load(self, spk_id: int) -> PrekeyBundle:
        packed = self._keystore.get(NS_BUNDLE, str(spk_id))
        assert packed is not None
        frame = wire.decode(packed)
        assert isinstance(frame, PrekeyBundle)
        return frame

    def early_rotation_wanted(self) -> bool:
        """The account wants its signed prekey rotated before its schedule (protocol/prekeys.py), and
        no early rotation is under way."""
        return not self._rotating and self.account.rotation_wanted()

    def rotate_early(self, publish: Callable[[], Awaitable[None]]) -> Coroutine[Any, Any, None]:
        """Rotate and publish now (`publish` does it with our current identity), in the coroutine
        returned; marked under way at once, so that the next delivery does not start another. A
        failure is logged, and the next INIT that finds the rotation still wanted tries again."""
        self._rotating = True
        return self._rotate_early(publish)

    async def _rotate_early(self, publish: Callable[[], Awaitable[None]]) -> None:
        try:
            await publish()
        except (RelayUnreachable, ProtocolError, NodeError) as exc:
            log.info("early_rotation_failed", extra={"fields": {"node": self._node, "reason": str(exc)}})
        finally:
            self._rotating = False

    def rotation_due(self, now: datetime, certificate: bytes) -> bool:
        """Due by the prekey account's schedule, or our newest bundle is signed over another
        certificate than ours (after a renewal or a re-key: it verifies for nobody)."""
        if self.account.rotation_due(now.timestamp()) or not self._keystore.names(NS_BUNDLE):
            return True
        return self.current().certificate != certificate

    async def publish(
        self,
        send: Callable[[LinkFrame], Awaitable[None]],
        *,
        identity: IdentityKey,
        certificate: bytes,
        fingerprint: bytes,
        now: datetime,
        onetime_left: int,
        rotate: bool = False,
    ) -> None:
        """Rotate the signed prekey if due (or `rotate`), top up one-time prekeys, and publish."""
        rotated = self._rotate_signed(now, identity, certificate, force=rotate)
        new_onetime = []
        # One-time prekeys are signed over our certificate: after a renewal or a re-key (online or
        # not, in this process or another) the relay's stock verifies for nobody, and is replaced.
        replace = self._keystore.get(NS_NODE, "onetime_certificate") != fingerprint
        if onetime_left < ONETIME_LOW or rotated or replace:
            start = self.account.next_onetime_id
            for key_id in range(start, start + ONETIME_BATCH):
                key = X25519KeyPair.generate()
                self.account.add_onetime(key_id, key)
                new_onetime.append(handshake.make_onetime(identity, certificate, key_id, key))
        current = self.current()
        self._write_changes()
        upload = [[o.key_id, o.public, o.signature] for o in new_onetime]
        await send(PublishBundle(wire.encode(current), upload, int(replace)))
        if replace:
            self._journal.commit({(NS_NODE, "onetime_certificate"): fingerprint}).add_done_callback(log_failure)

    def _rotate_signed(self, now: datetime, identity: IdentityKey, certificate: bytes, *, force: bool) -> bool:
        """Make a new signed prekey when due (or `force`d); destroy ones past their grace period. True if rotated."""
        if not force and not self.rotation_due(now, certificate):
            return False
        ids = self.account.signed_ids()
        spk_id = (ids[-1] + 1) if ids else 1
        spk = X25519KeyPair.generate()
        kem = KemKeyPair.generate() if self._options.publish_kem else None
        bundle = handshake.make_bundle(
            identity,
            certificate,
            created=int(now.timestamp()),
            spk_id=spk_id,
            spk=spk,
            kem_id=spk_id if kem else None,
            kem=kem,
        )
        self.account.add_signed(spk_id, spk)
        if kem is not None:
            self.account.add_kem(spk_id, kem)
        # The schedule lives in the prekey account (protocol/prekeys.py); old prekeys stay for the
        # grace period after the rotation that replaced them.
        destroyed = self.account.rotated(
            spk_id,
            now.timestamp(),
            every=self._options.prekey_rotation.total_seconds(),
            grace=self._options.prekey_grace.total_seconds(),
        )
        with self._keystore.transaction():
            for old in destroyed:
                self._keystore.delete(NS_BUNDLE, str(old))
            # Records of the schedule kept outside the account by earlier versions.
            for name in ("next_prekey_rotation", *self._keystore.names(NS_NODE, "spk_expiry/")):
                self._keystore.delete(NS_NODE, name)
            self._keystore.put(NS_BUNDLE, str(spk_id), wire.encode(bundle))
            self._write_changes()
        log.info("signed_prekey_rotated", extra={"fields": {"node": self._node, "spk_id": spk_id}})
        return True
