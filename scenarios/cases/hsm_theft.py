"""hsm-theft: identity-compromise against a node whose identity key is in an HSM, beside a file-backed one."""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from node.home import NS_NODE
from node.keystore import Keystore
from node.pkcs11 import TokenIdentityKey, TokenKeyRef, TokenSession, TokenSlot
from protocol import wire
from protocol.identity import IdentityKey
from protocol.link import Auth, Challenge, Welcome, auth_signed_bytes
from scenarios.attacker import steal_identity
from scenarios.lab import DEFAULT_WAIT, Enrolled, Lab, LabNode
from scenarios.registry import Context, scenario
from scenarios.timeline import ATTACKER, Kind

#: Where Debian and others put SoftHSM's PKCS#11 module.
SOFTHSM_MODULES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
)
TOKEN_LABEL = "kmsnet-lab"  # noqa: S105 - a token's name, not a secret


class SoftHsmMissing(RuntimeError):
    """SoftHSM (Debian's softhsm2) is not installed."""


def softhsm_module() -> str | None:
    """The SoftHSM PKCS#11 module's path, if SoftHSM is installed."""
    if shutil.which("softhsm2-util") is None:
        return None
    return next((path for path in SOFTHSM_MODULES if Path(path).exists()), None)


def make_softhsm_token(directory: Path, label: str, pin: str) -> tuple[TokenSlot, Path]:
    """Initialise a SoftHSM token in its own token directory under `directory`; return (slot, its
    configuration file). Point SOFTHSM2_CONF at that file to use it (`node.pkcs11` finds it then)."""
    module = softhsm_module()
    if module is None:
        raise SoftHsmMissing("SoftHSM is not installed (apt-get install softhsm2)")
    (directory / "tokens").mkdir(parents=True)
    conf = directory / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {directory / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n")
    so_pin = secrets.token_hex(8)
    subprocess.run(  # noqa: S603 - a fixed program and our own arguments
        ["softhsm2-util", "--init-token", "--free", "--label", label, "--pin", pin, "--so-pin", so_pin],  # noqa: S607
        check=True,
        capture_output=True,
        env={**os.environ, "SOFTHSM2_CONF": str(conf)},
    )
    return TokenSlot(module, label), conf


@contextmanager
def _softhsm_configuration(conf: Path) -> Iterator[None]:
    """SOFTHSM2_CONF pointing at `conf` for the scenario's duration (restored afterwards)."""
    before = os.environ.get("SOFTHSM2_CONF")
    os.environ["SOFTHSM2_CONF"] = str(conf)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("SOFTHSM2_CONF", None)
        else:
            os.environ["SOFTHSM2_CONF"] = before


def private_keys_in_copy(victim: LabNode) -> int:
    """How many copies of the victim's identity private key a thief finds in its copied keystore
    (unlocked: the device was): every 32-byte window of every record tried as an Ed25519 key."""
    wanted = victim.enrolled.identity.public_bytes
    found = 0
    keystore: Keystore = victim.keystore
    for name in keystore.names(NS_NODE):
        blob = keystore.get(NS_NODE, name) or b""
        for i in range(len(blob) - 31):
            if Ed25519PrivateKey.from_private_bytes(blob[i : i + 32]).public_key().public_bytes_raw() == wanted:
                found += 1
    return found


async def relay_login(url: str, certificate: bytes, signer: IdentityKey) -> bool:
    """One attempt to log in to the relay as the node `certificate` names, answering its challenge
    with `signer`; True if the relay let it in."""
    async with connect(url, compression=None, max_size=None) as ws:
        challenge = wire.decode_link(bytes(await ws.recv()))  # type: ignore[arg-type]
        if not isinstance(challenge, Challenge):
            return False
        signature = signer.sign(auth_signed_bytes(challenge.nonce, challenge.relay, url))
        await ws.send(wire.encode_link(Auth(certificate, signature)))
        try:
            async with asyncio.timeout(DEFAULT_WAIT):
                frames = wire.decode_link_frames(bytes(await ws.recv()))  # type: ignore[arg-type]
        except ConnectionClosed:
            return False
        return any(isinstance(frame, Welcome) for frame in frames)


@scenario(
    "hsm-theft",
    attack="a thief copies Bob's home (key in a file) and Carol's (key in an HSM), then holds Carol's device a while",
    expected="Bob's copy is Bob until revocation; Carol's copy is nothing: only her device signs, while held",
    story="""The identity-compromise theft, twice: against Bob, whose identity key is sealed in his
    keystore, and against Carol, whose identity key was generated in a PKCS#11 token (an HSM;
    SoftHSM here) and never left it. The thief copies both homes from the unlocked devices. In
    Bob's copy it finds his key and is Bob to everyone. In Carol's it finds only where her key is
    (module, token, key id): the relay refuses every login it signs without the token. Then the
    thief takes over Carol's running device (malware, with her PIN) and can sign as Carol, but only
    while it holds the device: once she has it back, the thief is left with the useless copy,
    while Bob's thief goes on. Revocation ends what remains: Bob's thief, and the device too.""",
)
async def hsm_theft(ctx: Context) -> None:
    pin = secrets.token_hex(8)
    slot, conf = make_softhsm_token(ctx.workdir / "softhsm", TOKEN_LABEL, pin)
    with _softhsm_configuration(conf), TokenSession.open(slot, pin) as token:
        await _play(ctx, token, pin)


async def _play(ctx: Context, token: TokenSession, pin: str) -> None:
    lab = Lab(ctx.timeline, ctx.workdir, ctx.clock)
    try:
        async with lab:
            await _scenes(ctx, lab, token, pin)
    finally:
        for lab_node in lab.nodes.values():  # no token session may outlive the scenario
            _close(lab_node)


async def _scenes(ctx: Context, lab: Lab, token: TokenSession, pin: str) -> None:
    def act(text: str, peer: str) -> None:
        ctx.timeline.add(Kind.ATTACK, ATTACKER, f"attacker {text}", peer=peer)

    await lab.publish_crl()
    alice, dave, bob = [await lab.add_node(name) for name in ("alice", "dave", "bob")]
    carol_key = TokenIdentityKey(token.generate_ed25519("kmsnet-node-carol"))
    carol = await lab.add_node("carol", enrolled=lab.ca.enrol("carol", identity=carol_key), pin=pin)
    await lab.open_session(alice, bob)
    await lab.open_session(alice, carol)

    ctx.story("the thief copies Bob's and Carol's homes from their unlocked devices")
    found = {"bob": private_keys_in_copy(bob), "carol": private_keys_in_copy(carol)}
    act(f"searches Bob's copied keystore: {found['bob']} copy of his identity key", "bob")
    ref = TokenKeyRef.from_record(carol.keystore.get(NS_NODE, "identity_token") or b"")
    act(f"searches Carol's: {found['carol']} keys, only where hers is (token {ref.slot.token!r}, {ref.label!r})",
        "carol")  # fmt: skip
    stolen = steal_identity(bob)
    await lab.stop_node(bob)
    as_bob = Enrolled("bob", stolen, bob.enrolled.certificate, bob.enrolled.serial)
    thief_bob = await lab.add_node("bob", enrolled=as_bob, lane="attacker-as-bob")

    ctx.story("from the copies alone: the thief is Bob, and cannot even log in as Carol")
    await lab.chat(thief_bob, alice, "bob here, new laptop: what's the vault code?")
    # Without the token, the thief can only answer Carol's challenges with keys it has.
    copy_logins = [await relay_login(lab.url, carol.enrolled.certificate, IdentityKey.generate())]
    act(f"signs the relay's challenge as carol without her token: {'let in' if copy_logins[0] else 'refused'}",
        "carol")  # fmt: skip

    ctx.story("the thief takes over Carol's running device: her token signs for it while it holds it")
    await lab.stop_node(carol)
    _close(carol)
    # Malware on the device, which knows the PIN: its node opens Carol's token as hers did.
    as_carol = Enrolled("carol", carol_key, carol.enrolled.certificate, carol.enrolled.serial)
    thief_carol = await lab.add_node("carol", enrolled=as_carol, lane="attacker-as-carol", pin=pin)
    await lab.chat(thief_carol, alice, "carol here: please resend the report")
    with_device = len([t for t in alice.texts("carol") if t == "carol here: please resend the report"])

    ctx.story("Carol gets her device back: the thief keeps only the copy; Bob's thief goes on")
    await lab.stop_node(thief_carol)
    _close(thief_carol)
    act("loses Carol's device", "carol")
    copy_logins.append(await relay_login(lab.url, carol.enrolled.certificate, IdentityKey.generate()))
    await lab.chat(thief_bob, alice, "bob again: and the safe combination?")
    bob_before = ["bob here, new laptop: what's the vault code?", "bob again: and the safe combination?"]

    ctx.story("Bob and Carol report the thefts: the CA revokes both certificates")
    lab.ca.revoke(bob.enrolled.serial, "key-compromise")
    lab.ca.revoke(carol.enrolled.serial, "key-compromise")
    await lab.publish_crl()
    await lab.until(lambda: bool(alice.notices("peer_revoked")), "Alice tears down her session with bob")
    bob_after = ["ignore the revocation, it's really me", "hi dave, it's bob"]
    await lab.say(thief_bob, "alice", bob_after[0])
    await lab.say(thief_bob, "dave", bob_after[1])
    # The thief gets hold of Carol's device once more: the token still signs, nobody listens.
    again = TokenSession.open(token.slot, pin)
    try:
        device_after = await relay_login(lab.url, carol.enrolled.certificate, TokenIdentityKey(again.ed25519(ref)))
    finally:
        again.close()
    act(f"logs in as carol with her device after the revocation: {'let in' if device_after else 'refused'}",
        "carol")  # fmt: skip
    await lab.settle()

    accepted_bob = [t for n in (alice, dave) for t in n.texts("bob")]
    ctx.figure("identity keys in the copied home (file-backed bob / HSM-backed carol)",
               f"{found['bob']} / {found['carol']}")  # fmt: skip
    ctx.check("file-backed bob: identity keys found in the copied home", 1, found["bob"])
    ctx.check("HSM-backed carol: identity keys found in the copied home", 0, found["carol"])
    ctx.check("file-backed bob: thief's messages accepted as bob before revocation (copy only)", 2,
              len([t for t in accepted_bob if t in bob_before]))  # fmt: skip
    ctx.check("HSM-backed carol: relay logins as carol from the copy (before and after the device)", [False, False],
              copy_logins)  # fmt: skip
    ctx.check("HSM-backed carol: thief's messages accepted as carol while it held her device", 1, with_device)
    ctx.check("file-backed bob: thief's messages accepted after revocation", 0,
              len([t for t in accepted_bob if t in bob_after]))  # fmt: skip
    ctx.check("HSM-backed carol: relay login with her device after revocation", False, device_after)
    ctx.conclude(
        f"copied homes: bob's held {found['bob']} identity key and his thief was accepted 2 of 2 times until "
        f"revocation; carol's held {found['carol']}: 0 of 2 logins from the copy, 1 message only while the "
        "thief held her device, 0 after revocation"
    )


def _close(lab_node: LabNode) -> None:
    """End the token session a stopped node's identity holds (its node no longer signs)."""
    identity = lab_node.node.identity
    if isinstance(identity, TokenIdentityKey):
        identity.close()
