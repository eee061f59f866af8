"""Child processes of the daemon (vLLM, a bake) end themselves when the daemon is gone.

The daemon passes its pid in AGENT_MEMORY_PARENT_PID; a watcher thread in the child sends the
child SIGTERM once its parent has changed (the daemon died, even by kill -9, and the child was
re-parented). Not PR_SET_PDEATHSIG: that fires when the *thread* that forked the child exits,
and the daemon starts children from short-lived threads.
"""

from __future__ import annotations

import os
import signal
import threading
import time

ENV = "AGENT_MEMORY_PARENT_PID"


def child_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a child that should not outlive this process."""
    return {**(os.environ if env is None else env), ENV: str(os.getpid())}


def stop_when_orphaned() -> None:
    """Call early in a child's main(); does nothing unless the daemon started us."""
    parent = os.environ.get(ENV)
    if not parent:
        return

    def watch():
        while os.getppid() == int(parent):
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)  # the child's own graceful shutdown

    threading.Thread(target=watch, name="orphan-watch", daemon=True).start()
