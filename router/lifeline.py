"""A death watch on poold's lifeline pipe, for every child that must not outlive it.

poold holds the only write end of the pipe; the kernel closes it however poold dies
(SIGKILL included), so a blocking read of the inherited read end returns EOF then.
The read runs on its own thread and blocks: never hand this fd to an event loop's
reader (uvloop sets O_NONBLOCK on it, a flag every process sharing the pipe sees, and
the other children's blocking reads would then fail at once). It proves nothing about a
serving loop's progress: it is not a heartbeat.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable


def watch_lifeline(fd: int, on_death: Callable[[], None]) -> threading.Thread:
    """Start a daemon thread that calls ``on_death`` once ``fd`` reads EOF (or fails)."""

    def wait() -> None:
        while True:
            try:
                if os.read(fd, 1) == b"":
                    break
            except InterruptedError:
                continue
            except OSError:
                break
        on_death()

    thread = threading.Thread(target=wait, name="lifeline", daemon=True)
    thread.start()
    return thread
