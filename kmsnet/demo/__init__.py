"""`kmsnet demo`: a CA, a relay and N nodes as real `kmsnet` processes on 127.0.0.1, a scripted
conversation, a revocation, and a transcript of every message and security event.

Three rooms: `processes` (the supervisor of the child processes), `transcript` (what is shown)
and `script` (what is done, and what the children report); `options` is what was asked for.

Orchestration only. Every step is a `kmsnet` command in a child process, run as the README's
"Chat by hand" walkthrough runs it; the demo reads what those commands print (`--json` on stdout,
and the relay's structured log on stderr) and shows it. It decides nothing a node decides: each
session, safety number and refusal in the transcript was reported by a node.

One home, one writer (kmsnet.writer). A `kmsnet send` next to the same node's `kmsnet receive
--follow` goes out through that follower; the demo still pauses a node's receiving process while
that node sends, and resumes it when the script wants the node listening again, so that the
transcript shows the offline and catch-up cases of store-and-forward as well.
"""

from kmsnet.demo.options import MAX_NODES, MIN_NODES, DemoFailure, DemoOptions
from kmsnet.demo.script import run_demo

__all__ = ["MAX_NODES", "MIN_NODES", "DemoFailure", "DemoOptions", "run_demo"]
