"""The node's direct CRL fetch (issue #13 part 2): when its newest CRL is `crl_max_age` old, a node
fetches /crl from the CA itself (a real `CaService`), so that a relay withholding the feed delays a
revocation by at most that. The full story, with a controllable clock, is scenario crl-withholding."""

# The fixtures of test_ca are imported, and pytest passes them back as same-named parameters.

from __future__ import annotations

from datetime import timedelta

import pytest

from ca import CaService, CertificateAuthority
from node import crlfetch
from protocol.crl import verify_crl
from tests.support.ca_helpers import authority, clock, home, otp_secret, root_in  # noqa: F401 - shared fixtures
from tests.support.pki import NOW


def test_a_fetch_is_due_once_the_crl_held_is_old_enough(authority: CertificateAuthority) -> None:
    crl = verify_crl(authority.current_crl(), authority.root, NOW)
    age = crlfetch.DEFAULT_MAX_AGE
    assert age == timedelta(minutes=20)
    assert crlfetch.due(None, NOW, age)
    assert not crlfetch.due(crl, crl.this_update + age - timedelta(seconds=1), age)
    assert crlfetch.due(crl, crl.this_update + age, age)


async def test_the_node_fetches_the_cas_crl_and_says_so_when_it_cannot(authority: CertificateAuthority) -> None:
    async with CaService(authority, port=0) as service:
        assert await crlfetch.fetch(service.url) == authority.current_crl()
        assert await crlfetch.fetch(service.url + "/") == authority.current_crl()
        port = service.http.url.rsplit(":", 1)[1]
    with pytest.raises(crlfetch.CrlFetchFailed, match="cannot fetch the CRL"):
        await crlfetch.fetch(f"http://127.0.0.1:{port}")
