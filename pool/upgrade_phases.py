"""An upgrade's phases, the one table of moves between them, and the plans that use them.

An upgrade (also a rollback or a recycle: ``pool.upgrade.Upgrade``) is always in one
phase; ``PhaseTrack.enter`` moves it along ``TRANSITIONS`` and times each phase, so an
illegal move raises in a test instead of leaving an operation in a state nobody named.
The strategies are plans over these phases::

    surge        PLANNING -> STARTING -> [WATCHING] -> RETIRING -> COMMITTED
                 (a new worker fails: STARTING -> ABANDONING -> ROLLED_BACK;
                  the watch fails: WATCHING -> RETIRING (the new ones) -> ROLLED_BACK)
    drain-first  PLANNING -> per slot: DRAINING -> STARTING (or STAGING -> DRAINING ->
                 STARTING through a standby), [WATCHING] after the first -> COMMITTED
                 (a failure: ABANDONING -> ROLLING_BACK -> ROLLED_BACK | RESTORE_FAILED)
    recycle      STARTING -> RETIRING -> COMMITTED (or STARTING -> ABANDONING -> ROLLED_BACK)

A new phase (say, a standby takeover) is one enum value and one row.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import StrEnum

from pool.lifecycle import IllegalTransition


class UpgradePhase(StrEnum):
    PLANNING = "planning"  # choosing the strategy; nothing started yet
    STAGING = "staging"  # drain-first through a standby: new weights staged on the host
    DRAINING = "draining"  # drain-first: the old worker of one slot drains and exits
    STARTING = "starting"  # new workers boot (load, warm up, validate)
    WATCHING = "watching"  # the canary window after the switch (pool.watch)
    RETIRING = "retiring"  # a generation drains, exits, and its GPU memory comes back
    ABANDONING = "abandoning"  # the new workers that failed are killed
    ROLLING_BACK = "rolling_back"  # the old version is put back where it was replaced
    COMMITTED = "committed"  # terminal: the new version serves
    ROLLED_BACK = "rolled_back"  # terminal: the old version serves as before
    RESTORE_FAILED = "restore_failed"  # terminal: the old version is not back everywhere

    @property
    def terminal(self) -> bool:
        return not TRANSITIONS[self]


P = UpgradePhase
TRANSITIONS: dict[UpgradePhase, frozenset[UpgradePhase]] = {
    P.PLANNING: frozenset({P.STARTING, P.DRAINING, P.STAGING}),
    P.STAGING: frozenset({P.DRAINING, P.STARTING}),  # STARTING: staging failed; boot says why
    P.DRAINING: frozenset({P.STARTING}),
    P.STARTING: frozenset(
        {P.WATCHING, P.RETIRING, P.DRAINING, P.STAGING, P.ABANDONING, P.COMMITTED}
    ),
    P.WATCHING: frozenset({P.RETIRING, P.DRAINING, P.STAGING, P.ABANDONING, P.COMMITTED}),
    P.RETIRING: frozenset({P.COMMITTED, P.ROLLED_BACK}),
    P.ABANDONING: frozenset({P.ROLLING_BACK, P.ROLLED_BACK}),
    P.ROLLING_BACK: frozenset({P.ROLLED_BACK, P.RESTORE_FAILED}),
    P.COMMITTED: frozenset(),
    P.ROLLED_BACK: frozenset(),
    P.RESTORE_FAILED: frozenset(),
}


class PhaseTrack:
    """The phase an operation is in, the path it took, and the seconds spent in each."""

    def __init__(self, clock: Callable[[], float], start: UpgradePhase = P.PLANNING) -> None:
        self.clock = clock
        self.phase = start
        self.path = [start]
        self.since = clock()
        self.seconds: dict[UpgradePhase, float] = {}

    def enter(self, new: UpgradePhase) -> None:
        """Move to ``new`` (staying is allowed: drain-first drains slot after slot)."""
        if new is self.phase:
            return
        if new not in TRANSITIONS[self.phase]:
            raise IllegalTransition(f"upgrade: {self.phase.value} -> {new.value}")
        now = self.clock()
        self.seconds[self.phase] = self.seconds.get(self.phase, 0.0) + now - self.since
        self.phase, self.since = new, now
        self.path.append(new)
