"""A ``pool.standby.Standbys`` over fakes: the spawner port, the core's clock, its outbox.

``Kit.standbys`` is the real class; ``Kit.asked`` is every fork spec the spawner was asked
for (token = position + 1), ``Kit.commands`` every command it left (``Signal`` for a
standby let go, ``RemoveDir`` for a run directory), ``Kit.now`` the time it reads.
"""

from __future__ import annotations

from typing import Any

from pool.commands import Command, Signal
from pool.standby import Standbys


class Kit:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now
        self.asked: list[dict[str, Any]] = []
        self.commands: list[Command] = []
        self.standbys = Standbys(self, -1, lambda: self.now, self.commands.append)

    def standby(self, spec: dict[str, Any]) -> int:
        """The spawner port: the token of the fork."""
        self.asked.append(spec)
        return len(self.asked)

    def signalled(self) -> list[int]:
        """The pids of the standbys let go (SIGTERM to their group), in order."""
        return [c.pid for c in self.commands if isinstance(c, Signal)]
