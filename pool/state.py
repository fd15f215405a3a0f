"""What survives a restart: each model's committed version and its history.

One JSON file per model under ``<state_dir>/models/``, replaced atomically (temporary
file, fsync, rename, fsync of the directory), so a crash leaves the old file or the new
one, never half of either. A content digest is recorded with every version: a model file
replaced on disk later does not rewrite what the history says was deployed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any

log = logging.getLogger(__name__)

HISTORY_KEPT = 500
DIR_KEY = "(state_dir)"  # StateStore.unsaved's key for the directory itself
CONTRACTS_KEPT = 64


@dataclass(frozen=True)
class Deployed:
    version: str
    path: str
    digest: str


@dataclass
class ModelState:
    model: str
    config_path: str = ""  # the path the config named when this state began
    current: Deployed | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    # content digest -> that version's contract (pool.contract, as JSON), once learned
    contracts: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["current"] = asdict(self.current) if self.current else None
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ModelState:
        cur = d.get("current")
        return cls(
            model=str(d["model"]),
            config_path=str(d.get("config_path", "")),
            current=Deployed(**cur) if isinstance(cur, dict) else None,
            history=list(d.get("history", [])),
            contracts=dict(d.get("contracts") or {}),
        )

    def versions(self) -> list[Deployed]:
        """Committed versions, most recent first, each once."""
        seen: set[tuple[str, str]] = set()
        out: list[Deployed] = []
        for h in reversed(self.history):
            if h.get("outcome") != "committed":
                continue
            d = Deployed(h["version"], h["path"], h["digest"])
            if (d.version, d.digest) not in seen:
                seen.add((d.version, d.digest))
                out.append(d)
        return out


_digest_cache: dict[tuple[str, int, int, int, int], str] = {}


def file_digest(path: str, done: list[int] | None = None) -> str:
    """sha256 of a file, remembered while its inode, size, mtime and ctime are unchanged.

    ctime cannot be set from user space and changes on every write, so a file rewritten
    in place (even with its mtime restored, as ``cp -p`` does) is hashed again. With
    ``done``, ``done[0]`` counts the bytes hashed so far (read from another thread for a
    progress bar; one list slot, so a reader never sees a torn value).
    """
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        key = (os.path.realpath(path), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        cached = _digest_cache.get(key)
        if cached is not None:
            return cached
        if done is None:
            digest = "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()
        else:
            h = hashlib.sha256()
            while chunk := f.read(8 << 20):
                h.update(chunk)
                done[0] += len(chunk)
            digest = "sha256:" + h.hexdigest()
    if len(_digest_cache) > 256:
        _digest_cache.clear()
    _digest_cache[key] = digest
    return digest


def write_atomic(path: str, data: bytes) -> None:
    directory = os.path.dirname(path)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    dfd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dfd)  # make the rename itself durable
    finally:
        os.close(dfd)


class StateStore:
    """Reads and writes the model files. A write that fails (a full or read-only disk)
    does not stop the pool: the state stays in memory, ``unsaved`` says why, health
    reports it, and ``retry`` (each tick) writes it once the disk takes it again. Only
    ``commit_current`` raises: traffic must not move to what the disk does not say."""

    def __init__(self, state_dir: str) -> None:
        self.dir = os.path.join(state_dir, "models")
        self.unsaved: dict[str, str] = {}  # model -> why its latest state is not on disk
        self._pending: dict[str, ModelState] = {}
        self._probe()

    def _probe(self) -> None:
        """Can the state directory take a write? Said once at start and until it can."""
        try:
            os.makedirs(self.dir, mode=0o700, exist_ok=True)
            write_atomic(os.path.join(self.dir, ".probe"), b"ok\n")
        except OSError as exc:
            why = f"cannot write in {self.dir}: {exc.strerror or exc}"
            if DIR_KEY not in self.unsaved:
                log.error(
                    "state directory not writable (%s); serving the last committed "
                    "versions; upgrades are refused until it is",
                    why,
                )
            self.unsaved[DIR_KEY] = why
            return
        if self.unsaved.pop(DIR_KEY, None) is not None:
            log.info("state directory %s writable again", self.dir)

    def _path(self, model: str) -> str:
        return os.path.join(self.dir, f"{model}.json")

    def load(self, model: str) -> ModelState:
        try:
            with open(self._path(model), "rb") as f:
                return ModelState.from_json(json.loads(f.read()))
        except FileNotFoundError:
            return ModelState(model=model)
        except (ValueError, KeyError, TypeError) as exc:
            log.error("state file of %s is unreadable (%s); starting from the config", model, exc)
            return ModelState(model=model)

    def save(self, state: ModelState, *, must: bool = False) -> None:
        """Write ``state``; on failure keep it for ``retry`` (and raise only if ``must``)."""
        state.history = state.history[-HISTORY_KEPT:]
        for digest in list(state.contracts)[:-CONTRACTS_KEPT]:  # oldest first
            del state.contracts[digest]
        try:
            write_atomic(self._path(state.model), json.dumps(state.to_json(), indent=1).encode())
        except OSError as exc:
            why = f"cannot write {self._path(state.model)}: {exc.strerror or exc}"
            if state.model not in self.unsaved:
                log.error("state of %s not saved: %s; retrying", state.model, why)
            self.unsaved[state.model] = why
            self._pending[state.model] = state
            if must:
                raise
            return
        if self.unsaved.pop(state.model, None) is not None:
            log.info("state of %s saved again", state.model)
        self._pending.pop(state.model, None)

    def commit_current(self, state: ModelState, deployed: Deployed) -> None:
        """Make ``deployed`` current on disk before traffic moves to it. Raises OSError,
        with ``state`` as it was, when the disk cannot take it."""
        before = state.current
        state.current = deployed
        try:
            self.save(state, must=True)
        except OSError:
            state.current = before
            raise

    def retry(self) -> None:
        if DIR_KEY in self.unsaved:
            self._probe()
        for state in list(self._pending.values()):
            self.save(state)

    def problem(self) -> str:
        """ "" when every model's state is on disk, else what is not (for health)."""
        return "; ".join(f"{m}: {why}" for m, why in sorted(self.unsaved.items()))

    def record(
        self, state: ModelState, deployed: Deployed, action: str, outcome: str, **extra: Any
    ) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "seq": (state.history[-1]["seq"] + 1) if state.history else 1,
            "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "action": action,
            "outcome": outcome,
            **asdict(deployed),
            **extra,
        }
        state.history.append(entry)
        if outcome == "committed":
            state.current = deployed
        self.save(state)
        return entry
