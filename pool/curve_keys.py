"""The CURVE keys poold admits, re-read on reload: revocation without a restart.

libzmq asks the ZAP handler (pyzmq's ThreadAuthenticator, in its own thread) about
every new CURVE connection. pyzmq's ``configure_curve(location=...)`` reads the
authorized keys directory once, so removing a key file changed nothing until a restart.
Here the handler asks this provider instead, whose set of keys ``reload`` replaces
(one assignment: the ZAP thread sees the old set or the new one, never half of each).

A revoked key is refused on its next connection (or reconnection); a connection
already up stays until it closes: ZAP runs at the handshake only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import zmq.auth

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KeysChange:
    """What a reload did to the admitted keys."""

    admitted: int  # keys in the directory now
    added: int
    removed: int
    problem: str = ""  # the directory could not be read: the previous keys stay


class AuthorizedKeys:
    """A ZAP credentials provider: the public keys in ``directory``, plus keys poold
    made for its own processes this run (the OIP gateways')."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.keys: frozenset[bytes] = frozenset(self._read())
        self.own: frozenset[bytes] = frozenset()

    def _read(self) -> set[bytes]:
        return {k for k, ok in zmq.auth.load_certificates(self.directory).items() if ok}

    def admit_own(self, public: bytes) -> None:
        self.own = self.own | {public}

    def callback(self, domain: str, key: bytes) -> bool:
        return key in self.keys or key in self.own

    def reload(self) -> KeysChange:
        try:
            fresh = frozenset(self._read())
        except (OSError, ValueError) as exc:
            log.error("CURVE keys not reloaded from %s: %s", self.directory, exc)
            return KeysChange(len(self.keys), 0, 0, f"{self.directory}: {exc}")
        change = KeysChange(len(fresh), len(fresh - self.keys), len(self.keys - fresh))
        self.keys = fresh
        log.info(
            "CURVE keys reloaded from %s: %d admitted (%d added, %d removed)",
            self.directory,
            change.admitted,
            change.added,
            change.removed,
        )
        return change
