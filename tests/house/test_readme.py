"""The README's examples run as written.

Every ```sh block is a transcript a reader can paste: it runs here with bash -e in a temporary
directory that is also $HOME, with `kmsnet` on the PATH. Every ```python block runs too, and each
`print(...)  # EXPECTED` prints EXPECTED. Untagged blocks (terminals to keep open, `make` targets,
start-up files) are not run.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent.parent
BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)


def blocks(language: str) -> list[str]:
    found = [body for lang, body in BLOCK.findall((ROOT / "README.md").read_text(encoding="utf-8")) if lang == language]
    assert found, f"the README has no {language} block"
    return found


def environment(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KMSNET_")}
    bin_dir = str(Path(sys.executable).parent)
    return {**env, "HOME": str(home), "PATH": f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
            "KMSNET_ARGON2_PROFILE": "test", "NO_COLOR": "1"}  # fmt: skip


@pytest.mark.parametrize("script", blocks("sh"), ids=lambda s: s.split("\n")[0][:40])
def test_every_shell_example_runs_as_written(script: str, tmp_path: Path) -> None:
    result = subprocess.run(
        ["bash", "-e", "-o", "pipefail", "-c", script], cwd=tmp_path, env=environment(tmp_path),
        capture_output=True, text=True, timeout=120, start_new_session=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    for line in script.splitlines():
        # `cmd  # Hello World` promises that output: a comment that is one plain phrase, not a note.
        expected = re.search(r"#\s+(Hello \w+)$", line)
        if expected:
            assert expected[1] in result.stdout


@pytest.mark.parametrize("code", blocks("python"))
def test_every_python_example_prints_what_its_comments_say(code: str, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=environment(tmp_path),
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    expected = [m[1] for m in re.finditer(r"^print\(.*\)\s+#\s*(.+)$", code, re.MULTILINE)]
    assert expected and result.stdout.splitlines() == expected
