"""`kmsnet` as a whole: how every command fails, is interrupted, meets a closed pipe, completes."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kmsnet import passphrases

ROOT = Path(__file__).resolve().parent.parent.parent


def env(**extra: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("KMSNET_")}
    return {**base, "KMSNET_ARGON2_PROFILE": "test", **extra}


def kmsnet(*args: str, **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kmsnet", *args], capture_output=True, text=True, timeout=60, cwd=ROOT,
        env=env(**extra), start_new_session=True, check=False,
    )  # fmt: skip


def test_with_json_an_error_is_one_json_record_on_stderr(tmp_path: Path) -> None:
    result = kmsnet("kms", "decrypt", "--home", str(tmp_path), "k", "junk", "--json")
    assert result.returncode == 1 and result.stdout == ""
    record = json.loads(result.stderr)
    assert record == {"type": "error", "code": "bad_input", "message": record["message"], "exit": 1}
    assert "no keystore" in record["message"]


def test_with_json_a_usage_error_is_json_too() -> None:
    result = kmsnet("kms", "decrypt", "--json")
    assert result.returncode == 2
    assert json.loads(result.stderr) == {
        "type": "error", "code": "usage", "message": "Missing argument 'NAME'.", "exit": 2,
    }  # fmt: skip


def test_without_json_an_error_is_one_plain_line() -> None:
    result = kmsnet("scenario", "run", "--all", "nonsense")
    assert result.returncode == 2 and result.stderr.strip().endswith("give one scenario NAME, or --all")
    assert "{" not in result.stderr


@pytest.mark.parametrize("command", [["completion", "bash"], ["kms", "audit"]])
def test_a_closed_pipe_ends_quietly_with_exit_0(command: list[str], tmp_path: Path) -> None:
    secret = {"KMSNET_HOME": str(tmp_path), "KMSNET_PASSPHRASE": "a passphrase for the pipe"}
    assert kmsnet("kms", "create", "k", **secret).returncode == 0  # something for `kms audit` to print
    proc = subprocess.Popen(
        [sys.executable, "-m", "kmsnet", *command], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        cwd=ROOT, env=env(**secret), start_new_session=True,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # the reader is gone before the command writes a byte (`| head` that has had enough)
    assert proc.wait(timeout=60) == 0
    assert proc.stderr.read() == b""
    proc.stderr.close()


class Terminal:
    """`kmsnet ARGS` on a terminal of its own (a pty), to answer its prompts as a person would."""

    def __init__(self, *args: str, **extra: str) -> None:
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child
            os.chdir(ROOT)
            os.execve(sys.executable, [sys.executable, "-m", "kmsnet", *args], env(**extra))
        self.seen = b""

    def expect(self, text: str, timeout: float = 60) -> None:
        """Read until `text` (case-insensitive) has appeared since the last expect."""
        deadline = time.monotonic() + timeout
        while text.lower().encode() not in self.seen.lower():
            assert time.monotonic() < deadline, self.seen
            if select.select([self.fd], [], [], 1)[0]:
                self.seen += os.read(self.fd, 1024)
        self.seen = self.seen[self.seen.lower().index(text.lower().encode()) + len(text) :]

    def send(self, data: bytes) -> None:
        os.write(self.fd, data)

    def end(self) -> tuple[int, bytes]:
        """Wait for the exit code; return it with what was printed after the last expect."""
        while select.select([self.fd], [], [], 5)[0]:
            try:
                chunk = os.read(self.fd, 1024)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            self.seen += chunk
        _, status = os.waitpid(self.pid, 0)
        os.close(self.fd)
        return os.waitstatus_to_exitcode(status), self.seen


def test_ctrl_c_at_a_passphrase_prompt_exits_130(tmp_path: Path) -> None:
    term = Terminal("kms", "create", "k", "--home", str(tmp_path))
    term.expect("passphrase")
    term.send(b"\x03")  # Ctrl-C, as the terminal sends it
    code, seen = term.end()
    assert code == 130, seen
    assert b"Traceback" not in seen and b"interrupted" in seen


def test_a_new_passphrase_must_be_strong_and_typed_twice_three_tries_in_all(tmp_path: Path) -> None:
    term = Terminal("kms", "create", "k", "--home", str(tmp_path))
    term.expect("New keystore passphrase")
    term.send(b"abc\n")
    term.expect("needs 12 or more")
    term.expect("2 more tries")
    term.expect("New keystore passphrase")  # getpass drops what is typed before its prompt
    term.send(b"aaaaaaaaaaaaaaaa\n")
    term.expect("too easy to guess")
    term.expect("New keystore passphrase")
    term.send(b"four unrelated words here\n")
    term.expect("Repeat it")
    term.send(b"four unrelated words hear\n")
    term.expect("the two entries differ")
    code, seen = term.end()
    assert code == 1 and b"no acceptable keystore passphrase after 3 tries" in seen, seen
    assert not (tmp_path / "keystore.db").exists()


def test_an_empty_new_passphrase_takes_a_generated_one_that_then_opens_the_keystore(tmp_path: Path) -> None:
    term = Terminal("kms", "create", "k", "--home", str(tmp_path))
    term.expect("New keystore passphrase")
    term.send(b"\n")
    term.expect("not shown again:")
    code, seen = term.end()
    generated = re.search(rb"([a-z2-9]{5}(?:-[a-z2-9]{5}){5})", seen)
    assert code == 0 and generated, seen
    listed = kmsnet("kms", "list", "--home", str(tmp_path), KMSNET_PASSPHRASE=generated[1].decode())
    assert listed.returncode == 0 and listed.stdout.startswith("k"), listed.stderr


def test_a_wrong_passphrase_at_the_prompt_is_asked_again(tmp_path: Path) -> None:
    made = kmsnet("kms", "create", "k", "--home", str(tmp_path), KMSNET_PASSPHRASE="the right passphrase")
    assert made.returncode == 0, made.stderr
    term = Terminal("kms", "list", "--home", str(tmp_path))
    term.expect("Keystore passphrase")
    term.send(b"wrong one\n")
    term.expect("Wrong passphrase, try again")
    term.expect("Keystore passphrase")
    term.send(b"the right passphrase\n")
    code, seen = term.end()
    assert code == 0 and b"aes256-gcm" in seen, seen

    term = Terminal("kms", "list", "--home", str(tmp_path))
    for _ in range(3):
        term.expect("Keystore passphrase")
        term.send(b"wrong one\n")
    code, seen = term.end()
    assert code == 1 and b"error: " in seen and b"Traceback" not in seen, seen


def test_ca_login_asks_the_passphrase_before_the_totp_code(tmp_path: Path) -> None:
    home = str(tmp_path / "ca")
    made = kmsnet("ca", "init", "--home", home, KMSNET_PASSPHRASE="a long enough CA passphrase")
    assert made.returncode == 0, made.stderr
    term = Terminal("ca", "login", "--home", home)
    term.expect("Keystore passphrase")
    assert b"TOTP" not in term.seen
    term.send(b"a long enough CA passphrase\n")
    term.expect("TOTP code")
    term.send(b"000000\n")
    code, seen = term.end()
    assert code == 4, seen  # a wrong code, refused: but only once the passphrase was in


def test_ctrl_c_while_a_command_runs_exits_130(tmp_path: Path) -> None:
    # `kms decrypt` with no argument waits for stdin: interrupt it there.
    proc = subprocess.Popen(
        [sys.executable, "-m", "kmsnet", "kms", "decrypt", "k", "--home", str(tmp_path)], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, stdin=subprocess.PIPE, text=True, cwd=ROOT, env=env(), start_new_session=True,
    )  # fmt: skip
    wchan = Path(f"/proc/{proc.pid}/wchan")
    started = time.monotonic()
    # Until it blocks reading stdin (Python is up, main runs); a kernel that hides wchan ("0") gets 5 s.
    while "pipe_read" not in (where := wchan.read_text()):
        assert time.monotonic() - started < 60 and proc.poll() is None
        if where == "0" and time.monotonic() - started > 5:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.strip().endswith("error: interrupted") and "Traceback" not in err


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_completion_scripts_for_each_shell(shell: str) -> None:
    result = kmsnet("completion", shell)
    assert result.returncode == 0 and "_KMSNET_COMPLETE" in result.stdout


def test_completion_of_a_subcommand(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "kmsnet"], capture_output=True, text=True, timeout=60, cwd=ROOT, check=False,
        env=env(_KMSNET_COMPLETE="bash_complete", COMP_WORDS="kmsnet kms de", COMP_CWORD="2"),
    )  # fmt: skip
    assert result.stdout.split() == ["plain,decrypt", "plain,destroy"]


def test_without_home_a_profile_in_the_user_data_directory_is_used(tmp_path: Path) -> None:
    data = {"XDG_DATA_HOME": str(tmp_path), "KMSNET_PASSPHRASE": "a passphrase for profiles"}
    profiles = tmp_path / "kmsnet" / "profiles"
    assert kmsnet("kms", "create", "k", **data).returncode == 0
    assert (profiles / "default" / "keystore.db").exists()
    assert kmsnet("kms", "create", "k", "--profile", "alice", **data).returncode == 0
    assert kmsnet("kms", "create", "k", **data, KMSNET_PROFILE="bob").returncode == 0
    assert sorted(p.name for p in profiles.iterdir()) == ["alice", "bob", "default"]
    # A flag beats the other's environment variable; both flags at once contradict each other.
    assert kmsnet("kms", "list", "--profile", "alice", **data, KMSNET_HOME=str(tmp_path / "none")).returncode == 0
    both = kmsnet("kms", "list", "--profile", "alice", "--home", str(profiles / "bob"), **data)
    assert both.returncode == 2 and "give --home or --profile, not both" in both.stderr
    bad = kmsnet("kms", "list", "--profile", "../etc", **data)
    assert bad.returncode == 2 and "is not a profile name" in bad.stderr


def test_a_weak_passphrase_from_the_environment_is_taken_with_a_warning(tmp_path: Path) -> None:
    made = kmsnet("kms", "create", "k", "--home", str(tmp_path), KMSNET_PASSPHRASE="abc")
    assert made.returncode == 0
    assert "warning: a weak passphrase for a new keystore: it is 3 characters long" in made.stderr
    ca = kmsnet("ca", "init", "--home", str(tmp_path / "ca"), KMSNET_PASSPHRASE="twelve chars")
    assert ca.returncode == 0 and "for a new CA root key" in ca.stderr and "needs 16 or more" in ca.stderr


@pytest.mark.parametrize(
    ("passphrase", "weak"),
    [("abc", True), ("password1234", True), ("aaaaaaaaaaaaaaaa", True), ("abcdefghijklmnop", True),
     ("correct horse battery staple", False), ("Tr0ub4dor&3-xkcd-936", False)],
)  # fmt: skip
def test_the_strength_estimate(passphrase: str, weak: bool) -> None:
    assert (passphrases.weakness(passphrase, passphrases.NODE) is not None) == weak
    made = passphrases.generate()
    assert len(made) == 35 and passphrases.weakness(made, passphrases.CA_ROOT) is None
