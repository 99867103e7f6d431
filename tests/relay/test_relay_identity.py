"""Identity changes reach the relay (issue #13 part 5, the relay's half): a node that logs in with
another identity key than last time (re-keyed, or renewed offline) has the one-time prekeys stored
under its old key dropped, so that initiators are not handed prekeys signed by a key it no longer
has. The store half runs on SQLite, Redis and a Redis Cluster."""

from __future__ import annotations

from protocol.identity import IdentityKey
from relay.server import Relay
from tests.support.lab import raw_client, relay_config
from tests.support.pki import BOB, CA
from tests.support.redis_fixtures import redis_cluster_url, redis_shards, redis_single, redis_url  # noqa: F401 - fixtures
from tests.support.relay_helpers import publish_bundle
from tests.support.store import Opener, opener, prekey  # noqa: F401 - the backends fixture


async def test_another_identity_key_drops_the_stored_one_time_prekeys(opener: Opener) -> None:
    store = opener()
    await store.open()
    try:
        assert not await store.note_identity("bob", b"A" * 32)  # the first one is only recorded
        await store.put_bundle("bob", b"bundle", [prekey(1), prekey(2)], False)
        assert not await store.note_identity("bob", b"A" * 32)
        assert await store.onetime_left("bob") == 2
        assert await store.note_identity("bob", b"B" * 32)
        assert await store.onetime_left("bob") == 0
        assert await store.known("bob")  # the bundle stays: the node replaces it as it publishes
    finally:
        await store.close()


async def test_a_node_back_with_a_new_key_is_welcomed_with_no_one_time_prekeys() -> None:
    async with Relay(relay_config(CA)) as relay:
        ws, _ = await raw_client(relay, BOB)
        async with ws:
            await publish_bundle(ws, BOB, onetime=5)
        ws, welcome = await raw_client(relay, BOB)
        async with ws:
            assert welcome.onetime == 5  # the same key: kept
        rekeyed = CA.enrol("bob", 0x2002, identity=IdentityKey.generate())
        ws, welcome = await raw_client(relay, rekeyed)
        async with ws:
            assert welcome.onetime == 0
