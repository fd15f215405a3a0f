"""``pool-ctl fleet upgrade|rollback``: one model across many hosts, canary first.

Every host's own ``upgrade`` is zero-loss, so the fleet's is too; what this adds is the
order and the judgement::

    PREFLIGHT --> CANARY --> BAKING --> ROLLING --> COMMITTED
        |            |          |          |
        v            +----------+----------+--> ROLLING_BACK --> ROLLED_BACK | FAILED
     REFUSED         (a fleet rollback that fails goes to FAILED: nothing to undo it with)

- preflight: ``status`` on every host; any unreachable, busy or without the model, and
  nothing is touched (REFUSED; exit 3 when a host is unreachable, else 1).
- canary: the first host (or ``--canary``) through its own upgrade. Its failure (a failed
  validation, say) is rolled back by the host itself; nothing else is touched.
- bake: ``stats`` from every host at the start and the end of the window; the canary's
  error rate and latency on the new version against the rest's (pool/ctl/fleet_bake.py),
  and its ``health`` at the end.
- rolling: the other hosts, ``max_unavailable`` at a time.
- on any failure: stop, and roll back every host this run changed (to the version it had
  before), newest first; the result says which hosts, and why.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any, Protocol

from pool.ctl.client import Unreachable
from pool.ctl.fleet_bake import EMPTY, BakeRules, judge, window


class Call(Protocol):
    def __call__(
        self, host: str, cmd: str, args: dict[str, Any], timeout_s: float | None
    ) -> dict[str, Any]: ...


class FleetPhase(StrEnum):
    PREFLIGHT = "preflight"
    CANARY = "canary"
    BAKING = "baking"
    ROLLING = "rolling"
    COMMITTED = "committed"
    ROLLING_BACK = "rolling_back"
    ROLLED_BACK = "rolled_back"
    FAILED = "failed"
    REFUSED = "refused"


P = FleetPhase
TRANSITIONS: dict[FleetPhase, frozenset[FleetPhase]] = {
    P.PREFLIGHT: frozenset({P.CANARY, P.COMMITTED, P.REFUSED}),
    P.CANARY: frozenset({P.BAKING, P.ROLLING, P.COMMITTED, P.ROLLING_BACK, P.FAILED}),
    P.BAKING: frozenset({P.ROLLING, P.COMMITTED, P.ROLLING_BACK, P.FAILED}),
    P.ROLLING: frozenset({P.COMMITTED, P.ROLLING_BACK, P.FAILED}),
    P.ROLLING_BACK: frozenset({P.ROLLED_BACK, P.FAILED}),
    P.COMMITTED: frozenset(),
    P.ROLLED_BACK: frozenset(),
    P.FAILED: frozenset(),
    P.REFUSED: frozenset(),
}


@dataclass
class HostStep:
    host: str
    action: str  # upgrade | rollback | skip
    ok: bool
    version_before: str | None
    version_after: str | None
    seconds: float
    reason: str = ""
    uncertain: bool = False  # the host stopped answering mid-call: it may have changed


@dataclass
class FleetResult:
    action: str
    model: str
    hosts: list[str]
    target: str = ""
    outcome: FleetPhase = FleetPhase.PREFLIGHT
    reason: str = ""
    canary: str | None = None
    steps: list[HostStep] = field(default_factory=list)
    bake: dict[str, Any] | None = None
    changed: list[str] = field(default_factory=list)
    rolled_back: list[str] = field(default_factory=list)
    not_rolled_back: dict[str, str] = field(default_factory=dict)
    unreachable: list[str] = field(default_factory=list)
    before: dict[str, str | None] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.outcome is FleetPhase.COMMITTED

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["outcome"] = self.outcome.value
        d["ok"] = self.ok
        return d


class IllegalTransition(RuntimeError):
    pass


def in_waves(items: list[str], size: int) -> Iterator[list[str]]:
    for i in range(0, len(items), max(1, size)):
        yield items[i : i + max(1, size)]


class Rollout:
    def __init__(
        self,
        hosts: list[str],
        model: str,
        call: Call,
        *,
        max_unavailable: int = 1,
        canary: str | None = None,
        rules: BakeRules | None = None,
        strategy: str = "auto",
        timeout_s: float | None = None,
        say: Callable[[str], None] = lambda line: None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if canary is not None and canary not in hosts:
            raise ValueError(f"--canary {canary} is not one of the hosts")
        self.hosts = hosts
        self.model = model
        self.call = call
        self.max_unavailable = max(1, max_unavailable)
        self.canary = canary
        self.rules = rules or BakeRules()
        self.strategy = strategy
        self.timeout_s = timeout_s
        self.say = say
        self.sleep = sleep
        self.phase = FleetPhase.PREFLIGHT
        self.result = FleetResult("", model, list(hosts))

    # ----------------------------------------------------------------- plumbing
    def move(self, new: FleetPhase) -> None:
        if new not in TRANSITIONS[self.phase]:
            raise IllegalTransition(f"fleet {self.phase.value} -> {new.value}")
        self.phase = self.result.outcome = new

    def on_all(self, hosts: Iterable[str], fn: Callable[[str], Any]) -> dict[str, Any]:
        hosts = list(hosts)
        if not hosts:
            return {}
        with ThreadPoolExecutor(max_workers=min(32, len(hosts))) as ex:
            return dict(zip(hosts, ex.map(fn, hosts), strict=True))

    def ask(self, host: str, cmd: str, args: dict[str, Any] | None = None) -> Any:
        """A quick command's data, or the exception that stopped it."""
        try:
            res = self.call(host, cmd, {"model": self.model, **(args or {})}, None)
        except (Unreachable, TimeoutError, OSError) as exc:
            return exc
        if not res.get("ok"):
            return RuntimeError(res.get("error") or f"{cmd} failed")
        return res.get("data") or {}

    def finish(self, outcome: FleetPhase, reason: str, t0: float) -> FleetResult:
        self.move(outcome)
        self.result.reason = reason
        self.result.seconds = round(time.monotonic() - t0, 3)
        self.say(f"fleet {self.result.action} of {self.model}: {outcome.value}: {reason}")
        return self.result

    # ---------------------------------------------------------------- preflight
    def preflight(self) -> str | None:
        """Every host's current version into result.before; the refusal reason, if any."""
        statuses = self.on_all(self.hosts, lambda h: self.ask(h, "status"))
        problems = []
        for host, data in statuses.items():
            if isinstance(data, Exception):
                self.result.unreachable.append(host)
                problems.append(f"{host} unreachable ({data})")
                continue
            model = next((m for m in data.get("models", []) if m["name"] == self.model), None)
            if model is None:
                problems.append(f"{host} does not serve {self.model!r}")
            elif model.get("operation"):
                problems.append(f"{host} is busy ({model['operation']})")
            else:
                self.result.before[host] = model.get("version")
        if problems:
            return "; ".join(problems) + "; nothing was changed"
        return None

    # ------------------------------------------------------------------- steps
    def step(self, host: str, action: str, args: dict[str, Any]) -> HostStep:
        before = self.result.before.get(host)
        t0 = time.monotonic()
        target = args.get("version") or args.get("to") or "?"
        self.say(f"{host}: {action} {self.model} ({before} -> {target})")
        timeout = (self.timeout_s or 3600.0) + 120.0
        payload = {"model": self.model, "strategy": self.strategy, **args}
        if self.timeout_s:
            payload["timeout_s"] = self.timeout_s
        try:
            res = self.call(host, action, payload, timeout)
        except Unreachable as exc:
            step = HostStep(host, action, False, before, before, 0.0, f"unreachable: {exc}")
        except (TimeoutError, OSError) as exc:
            # It may have committed after we stopped listening: treat it as changed.
            step = HostStep(host, action, False, before, None, 0.0, str(exc), uncertain=True)
        else:
            data = res.get("data") or {}
            ok = bool(res.get("ok"))
            after = data.get("target_version") if ok else before
            step = HostStep(
                host, action, ok, before, after, 0.0, "" if ok else res.get("error", "")
            )
        step.seconds = round(time.monotonic() - t0, 3)
        self.result.steps.append(step)
        verdict = "done" if step.ok else f"FAILED: {step.reason}"
        self.say(f"{host}: {action} {verdict} in {step.seconds:.1f}s")
        return step

    def wave(self, hosts: list[str], action: str, args: Callable[[str], dict[str, Any]]) -> bool:
        steps = self.on_all(hosts, lambda h: self.step(h, action, args(h)))
        for host, s in steps.items():
            if s.ok or s.uncertain:
                self.result.changed.append(host)
        return all(s.ok for s in steps.values())

    def bake(self, canary: str, rest: list[str], version: str) -> str | None:
        """The bake window; the failure reason, or None when the canary passes."""
        if self.rules.seconds <= 0:
            return None
        everyone = [canary, *rest]
        start = self.on_all(everyone, lambda h: self.ask(h, "stats"))
        if isinstance(start[canary], Exception):
            return f"cannot read the canary's stats: {start[canary]}"
        self.say(f"baking {canary} for {self.rules.seconds:g}s against {len(rest)} other host(s)")
        self.sleep(self.rules.seconds)
        end = self.on_all(everyone, lambda h: self.ask(h, "stats"))
        if isinstance(end[canary], Exception):
            return f"cannot read the canary's stats: {end[canary]}"
        mine = window(start[canary], end[canary], self.model, {version, ""})
        others = EMPTY
        for h in rest:
            if not isinstance(start[h], Exception) and not isinstance(end[h], Exception):
                others = others + window(start[h], end[h], self.model, None)
        verdict = judge(mine, others, self.rules)
        self.result.bake = verdict.describe()
        self.say(f"bake: {verdict.reason}; canary {mine.describe()}, rest {others.describe()}")
        if not verdict.ok:
            return verdict.reason
        health = self.ask(canary, "health")
        if isinstance(health, Exception):
            return f"canary unhealthy after the bake: {health}"
        return None

    def undo(self, t0: float, why: str) -> FleetResult:
        """Roll back every host this run changed, newest first, to its version before."""
        self.move(FleetPhase.ROLLING_BACK)
        changed = list(reversed(self.result.changed))
        if changed:
            self.say(f"rolling back {', '.join(changed)}")
        for group in in_waves(changed, self.max_unavailable):
            now = self.on_all(group, lambda h: self.ask(h, "status"))
            todo = []
            for host in group:
                before = self.result.before.get(host)
                cur = now[host]
                if not isinstance(cur, Exception):
                    models: list[dict[str, Any]] = cur.get("models", [])
                    m = next((m for m in models if m["name"] == self.model), {})
                    if m.get("version") == before:
                        self.result.rolled_back.append(host)  # never changed after all
                        continue
                todo.append(host)
            steps = self.on_all(
                todo, lambda h: self.step(h, "rollback", {"to": self.result.before.get(h)})
            )
            for host, s in steps.items():
                if s.ok:
                    self.result.rolled_back.append(host)
                else:
                    self.result.not_rolled_back[host] = s.reason
        if self.result.not_rolled_back:
            left = ", ".join(f"{h} ({r})" for h, r in self.result.not_rolled_back.items())
            return self.finish(FleetPhase.FAILED, f"{why}; NOT rolled back: {left}", t0)
        back = ", ".join(self.result.rolled_back) or "none had changed"
        return self.finish(FleetPhase.ROLLED_BACK, f"{why}; rolled back: {back}", t0)

    # ---------------------------------------------------------------- commands
    def upgrade(self, path: str, version: str | None) -> FleetResult:
        t0 = time.monotonic()
        self.result.action, self.result.target = "upgrade", version or path
        refusal = self.preflight()
        if refusal:
            return self.finish(FleetPhase.REFUSED, refusal, t0)
        todo = [h for h in self.hosts if version is None or self.result.before[h] != version]
        for h in self.hosts:
            if h not in todo:
                self.result.steps.append(
                    HostStep(h, "skip", True, version, version, 0.0, "already at this version")
                )
        if not todo:
            return self.finish(FleetPhase.COMMITTED, f"every host already runs {version}", t0)
        canary = self.canary if self.canary in todo else todo[0]
        rest = [h for h in todo if h != canary]
        self.result.canary = canary
        args: dict[str, Any] = {"path": path, **({"version": version} if version else {})}
        self.move(FleetPhase.CANARY)
        first = self.step(canary, "upgrade", args)
        if first.ok or first.uncertain:
            self.result.changed.append(canary)
        if not first.ok:
            return self.undo(t0, f"canary {canary} failed: {first.reason}")
        new_version = first.version_after or version or ""
        if not rest:
            return self.finish(FleetPhase.COMMITTED, f"{canary} runs {new_version}", t0)
        if self.rules.seconds > 0:
            self.move(FleetPhase.BAKING)
            why = self.bake(canary, rest, new_version)
            if why:
                return self.undo(t0, f"canary {canary} failed its bake: {why}")
        self.move(FleetPhase.ROLLING)
        args["version"] = new_version  # every host gets the canary's label
        for group in in_waves(rest, self.max_unavailable):
            if not self.wave(group, "upgrade", lambda h: args):
                bad = [f"{s.host}: {s.reason}" for s in self.result.steps if not s.ok]
                return self.undo(t0, "upgrade failed on " + "; ".join(bad))
        return self.finish(FleetPhase.COMMITTED, f"{len(todo)} host(s) now run {new_version}", t0)

    def rollback(self, targets: dict[str, str]) -> FleetResult:
        """Each host to ``targets[host]``; canary first, then waves. No undo on failure:
        a rollback is already the way back."""
        t0 = time.monotonic()
        self.result.action = "rollback"
        self.result.target = ",".join(sorted(set(targets.values())))
        refusal = self.preflight()
        if refusal:
            return self.finish(FleetPhase.REFUSED, refusal, t0)
        todo = [h for h in self.hosts if self.result.before[h] != targets.get(h)]
        if not todo:
            return self.finish(FleetPhase.COMMITTED, "every host already runs its target", t0)
        canary = self.canary if self.canary in todo else todo[0]
        self.result.canary = canary
        self.move(FleetPhase.CANARY)
        order = [canary, *(h for h in todo if h != canary)]
        for i, group in enumerate([[canary], *in_waves(order[1:], self.max_unavailable)]):
            if i == 1:
                self.move(FleetPhase.ROLLING)
            if not self.wave(group, "rollback", lambda h: {"to": targets[h]}):
                bad = [f"{s.host}: {s.reason}" for s in self.result.steps if not s.ok]
                return self.finish(FleetPhase.FAILED, "rollback failed on " + "; ".join(bad), t0)
        return self.finish(FleetPhase.COMMITTED, f"{len(todo)} host(s) rolled back", t0)
