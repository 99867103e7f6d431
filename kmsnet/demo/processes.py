"""The demo's process supervisor: every `kmsnet` child it runs, one-shot or long-running, each in its
own session so that one signal reaches its whole group, their output lines as they come, and all of
them stopped on the way out, whatever happened."""

from __future__ import annotations

import contextlib
import itertools
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from kmsnet.demo.options import DemoFailure
from kmsnet.exits import BAD_INPUT, UNREACHABLE

T = TypeVar("T")
R = TypeVar("R")

#: Seconds a one-shot command may take.
COMMAND_TIMEOUT = 60.0
#: Seconds a stopped process gets between SIGTERM and SIGKILL.
STOP_GRACE = 10.0


@dataclass(eq=False)
class Child:
    """A long-running `kmsnet` process whose output lines are read as they come."""

    name: str
    proc: subprocess.Popen[str]
    stopping: bool = False
    errors: deque[str] = field(default_factory=lambda: deque(maxlen=3))

    def last_error(self) -> str:
        """What the process last said on stderr, for a one-line failure."""
        return self.errors[-1] if self.errors else f"exit code {self.proc.poll()}"


@dataclass(frozen=True)
class Line:
    """One line a child printed (`stream` "out" or "err"), or its exit ("exit", the code as text)."""

    at: float
    child: Child
    stream: str
    text: str


class Processes:
    """Every child of the demo, each in its own session so that one signal reaches its whole group,
    and all of them stopped on the way out, whatever happened."""

    def __init__(self, env: dict[str, str], cwd: Path) -> None:
        self.env = env
        self.cwd = cwd
        self.lines: queue.Queue[Line] = queue.Queue()
        self._live: set[subprocess.Popen[str]] = set()
        self._lock = threading.Lock()

    def _popen(self, args: Iterable[str]) -> subprocess.Popen[str]:
        # S603: the argv is this interpreter running kmsnet with the demo's own arguments, no shell.
        proc = subprocess.Popen(  # noqa: S603
            [sys.executable, "-m", "kmsnet", *args], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, env=self.env, cwd=self.cwd, start_new_session=True,
        )  # fmt: skip
        with self._lock:
            self._live.add(proc)
        return proc

    def run(self, step: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run one command to its end; with `check`, a non-zero exit fails `step` with its error line."""
        proc = self._popen(args)
        try:
            out, err = proc.communicate(timeout=COMMAND_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise DemoFailure(step, f"`kmsnet {args[0]}` took over {COMMAND_TIMEOUT:.0f} s", UNREACHABLE) from None
        finally:
            self._end(proc)
        if check and proc.returncode != 0:
            lines = err.strip().splitlines() or [f"exit code {proc.returncode}"]
            command = " ".join(itertools.takewhile(lambda arg: not arg.startswith("-"), args))
            detail = f"`kmsnet {command}` failed: {lines[-1].removeprefix('error: ')}"
            # A negative code is a signal, not one of the documented exit codes.
            raise DemoFailure(step, detail, proc.returncode if proc.returncode > 0 else BAD_INPUT)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    def run_all(self, step: str, commands: list[list[str]]) -> list[subprocess.CompletedProcess[str]]:
        """Run independent commands side by side, their results in order."""
        return self.parallel(lambda args: self.run(step, *args), commands)

    def parallel(self, work: Callable[[T], R], items: Iterable[T]) -> list[R]:
        """`work` on each item, as many at a time as there are cores (starting a `kmsnet` process is
        CPU-bound), results in order. On any failure or Ctrl-C every child is stopped first, so that
        no worker waits for a command nobody needs any more."""
        pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 2)
        try:
            return list(pool.map(work, items))
        except BaseException:
            self.stop_everything()
            raise
        finally:
            pool.shutdown(cancel_futures=True)

    def start(self, name: str, *args: str) -> Child:
        """Start a long-running command; its lines arrive on `self.lines`, then its exit."""
        child = Child(name, self._popen(args))
        assert child.proc.stdout is not None and child.proc.stderr is not None
        threading.Thread(target=self._read, args=(child, "err", child.proc.stderr), daemon=True).start()
        threading.Thread(target=self._read, args=(child, "out", child.proc.stdout), daemon=True).start()
        return child

    def _read(self, child: Child, stream: str, pipe: Any) -> None:
        for text in pipe:
            self.lines.put(Line(time.monotonic(), child, stream, text.rstrip("\n")))
        if stream == "out":
            code = child.proc.wait()
            self.lines.put(Line(time.monotonic(), child, "exit", str(code)))

    def stop(self, children: Iterable[Child]) -> dict[Child, int]:
        """Stop these long-running children; their exit codes (0 is a clean stop)."""
        children = list(children)
        for child in children:
            child.stopping = True
        return dict(zip(children, self._terminate([child.proc for child in children]), strict=True))

    def stop_everything(self) -> None:
        """On the way out: nothing may outlive the demo."""
        with self._lock:
            live = list(self._live)
        self._terminate(live)

    def _terminate(self, procs: list[subprocess.Popen[str]]) -> list[int]:
        """SIGTERM to all, then wait for each (SIGKILL after STOP_GRACE); their exit codes."""
        for proc in procs:
            self._signal(proc, signal.SIGTERM)
        codes = []
        for proc in procs:
            try:
                codes.append(proc.wait(timeout=STOP_GRACE))
            except subprocess.TimeoutExpired:
                self._signal(proc, signal.SIGKILL)
                codes.append(proc.wait())
            self._end(proc)
        return codes

    @staticmethod
    def _signal(proc: subprocess.Popen[str], sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)

    def _end(self, proc: subprocess.Popen[str]) -> None:
        if proc.poll() is None:
            self._signal(proc, signal.SIGKILL)
            proc.wait()
        with self._lock:
            self._live.discard(proc)
