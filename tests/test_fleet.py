"""pool-ctl fleet's decisions (issue 21), against simulated hosts that answer the control
commands the way poold does; tests/test_fleet_netns.py runs the same against real poolds
on three network namespaces."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest

from pool.ctl import fleet_history
from pool.ctl.cli import main as pool_ctl
from pool.ctl.client import Unreachable
from pool.ctl.fleet_bake import BakeRules, Window, judge, window
from pool.ctl.fleet_hosts import HostsError, hosts_from_dns, parse_hosts_file
from pool.ctl.fleet_run import TRANSITIONS, FleetPhase, IllegalTransition, Rollout, in_waves


class SimHost:
    def __init__(self, version: str = "1") -> None:
        self.version = version
        self.versions = [version]
        self.reachable = True
        self.fail_upgrade = ""  # the reason a per-host upgrade rolls back
        self.busy: str | None = None
        self.requests: dict[tuple[str, str], int] = {}
        self.latency_sum = 0.0
        self.latency_count = 0

    def serve(self, n: int, code: str = "OK", latency_s: float = 0.001) -> None:
        key = (self.version, code)
        self.requests[key] = self.requests.get(key, 0) + n
        self.latency_sum += n * latency_s
        self.latency_count += n


class SimFleet:
    def __init__(self, n: int) -> None:
        self.hosts = {f"tcp://10.0.0.{i + 1}:5556": SimHost() for i in range(n)}
        self.log: list[tuple[str, str, dict[str, Any]]] = []
        self.lock = threading.Lock()
        self.in_flight = 0
        self.max_in_flight = 0

    @property
    def names(self) -> list[str]:
        return list(self.hosts)

    def __call__(
        self, host: str, cmd: str, args: dict[str, Any], timeout_s: float | None
    ) -> dict[str, Any]:
        h = self.hosts[host]
        with self.lock:
            self.log.append((host, cmd, args))
        if not h.reachable:
            raise Unreachable(f"poold at {host} did not answer within 5s")
        if cmd == "status":
            model = {"name": "m", "version": h.version, "status": "serving", "operation": h.busy}
            return {"ok": True, "data": {"models": [model]}}
        if cmd == "stats":
            rows = [[v, c, n] for (v, c), n in h.requests.items()]
            latency = {"counts": [h.latency_count], "sum_s": h.latency_sum}
            return {"ok": True, "data": {"models": {"m": {"requests": rows, "latency": latency}}}}
        if cmd == "health":
            return {"ok": True, "data": {}}
        if cmd in ("upgrade", "rollback"):
            with self.lock:
                self.in_flight += 1
                self.max_in_flight = max(self.max_in_flight, self.in_flight)
            try:
                threading.Event().wait(0.02)  # let a wave overlap
                if cmd == "upgrade" and h.fail_upgrade:
                    return {"ok": False, "error": h.fail_upgrade, "data": {}}
                target = args.get("version") or args.get("to")
                h.version = str(target)
                h.versions.append(h.version)
                return {"ok": True, "data": {"target_version": h.version}}
            finally:
                with self.lock:
                    self.in_flight -= 1
        raise AssertionError(cmd)

    def changes(self) -> list[tuple[str, str]]:
        return [(h, c) for h, c, _ in self.log if c in ("upgrade", "rollback")]


def rollout(fleet: SimFleet, **kw: Any) -> Rollout:
    kw.setdefault("rules", BakeRules(seconds=0))
    return Rollout(fleet.names, "m", fleet, **kw)


def test_upgrade_goes_canary_first_then_every_host() -> None:
    fleet = SimFleet(4)
    result = rollout(fleet).upgrade("/srv/m2.pt", "2")
    assert result.outcome is FleetPhase.COMMITTED and result.ok
    assert [h.version for h in fleet.hosts.values()] == ["2"] * 4
    assert fleet.changes()[0] == (fleet.names[0], "upgrade")
    assert result.canary == fleet.names[0]
    assert result.before == dict.fromkeys(fleet.names, "1")


def test_a_failing_canary_leaves_the_others_untouched() -> None:
    fleet = SimFleet(3)
    canary = fleet.names[0]
    fleet.hosts[canary].fail_upgrade = "validation failed: golden case 0 differs"
    result = rollout(fleet).upgrade("/srv/m2.pt", "2")
    assert result.outcome is FleetPhase.ROLLED_BACK
    assert "validation failed" in result.reason and canary in result.reason
    assert fleet.changes() == [(canary, "upgrade")]  # nobody else was asked to change
    assert [h.version for h in fleet.hosts.values()] == ["1"] * 3


def test_a_failure_mid_rollout_rolls_back_every_changed_host_newest_first() -> None:
    fleet = SimFleet(4)
    a, b, c, d = fleet.names
    fleet.hosts[c].fail_upgrade = "boot failed: out of memory"
    result = rollout(fleet).upgrade("/srv/m2.pt", "2")
    assert result.outcome is FleetPhase.ROLLED_BACK
    assert c in result.reason and "out of memory" in result.reason
    assert result.rolled_back == [b, a]
    assert (d, "upgrade") not in fleet.changes()  # it stopped at the failure
    assert [h.version for h in fleet.hosts.values()] == ["1"] * 4
    rollbacks = [args for h, cmd, args in fleet.log if cmd == "rollback"]
    assert all(args["to"] == "1" for args in rollbacks)


def test_an_unreachable_host_refuses_before_anything_changes() -> None:
    fleet = SimFleet(3)
    fleet.hosts[fleet.names[2]].reachable = False
    result = rollout(fleet).upgrade("/srv/m2.pt", "2")
    assert result.outcome is FleetPhase.REFUSED and result.unreachable == [fleet.names[2]]
    assert "nothing was changed" in result.reason and fleet.changes() == []


def test_a_busy_host_refuses() -> None:
    fleet = SimFleet(2)
    fleet.hosts[fleet.names[1]].busy = "upgrade"
    result = rollout(fleet).upgrade("/srv/m2.pt", "2")
    assert result.outcome is FleetPhase.REFUSED and "busy" in result.reason


def test_max_unavailable_bounds_the_hosts_changed_at_once() -> None:
    fleet = SimFleet(7)
    result = rollout(fleet, max_unavailable=3).upgrade("/srv/m2.pt", "2")
    assert result.ok
    assert fleet.max_in_flight == 3  # canary alone, then waves of 3 and 3
    assert list(in_waves(list("abcdefg"), 3)) == [list("abc"), list("def"), ["g"]]


def test_hosts_already_at_the_version_are_skipped() -> None:
    fleet = SimFleet(3)
    fleet.hosts[fleet.names[0]].version = "2"
    result = rollout(fleet).upgrade("/srv/m2.pt", "2")
    assert result.ok and result.canary == fleet.names[1]
    assert (fleet.names[0], "upgrade") not in fleet.changes()


def bake_fleet(canary_code: str, canary_latency: float) -> tuple[SimFleet, Any]:
    fleet = SimFleet(3)
    canary = fleet.names[0]

    def traffic(_seconds: float) -> None:  # the bake window: everybody serves
        fleet.hosts[canary].serve(100, "OK", canary_latency)
        fleet.hosts[canary].serve(20, canary_code, canary_latency)
        for h in fleet.names[1:]:
            fleet.hosts[h].serve(120, "OK", 0.002)

    rules = BakeRules(seconds=5, max_error_rate_increase=0.01, max_latency_ratio=1.5)
    return fleet, rollout(fleet, rules=rules, sleep=traffic).upgrade("/srv/m2.pt", "2")


def test_a_canary_with_more_errors_fails_its_bake_and_is_rolled_back() -> None:
    fleet, result = bake_fleet("MODEL_ERROR", 0.002)
    assert result.outcome is FleetPhase.ROLLED_BACK
    assert "error rate" in result.reason and result.rolled_back == [fleet.names[0]]
    assert result.bake["canary"]["errors"] == 20 and result.bake["rest"]["errors"] == 0
    assert [h.version for h in fleet.hosts.values()] == ["1"] * 3
    assert [(h, c) for h, c in fleet.changes()] == [
        (fleet.names[0], "upgrade"),
        (fleet.names[0], "rollback"),
    ]


def test_a_slower_canary_fails_its_bake() -> None:
    _fleet, result = bake_fleet("OK", 0.050)
    assert result.outcome is FleetPhase.ROLLED_BACK and "latency" in result.reason


def test_a_canary_as_good_as_the_rest_passes() -> None:
    fleet, result = bake_fleet("BAD_REQUEST", 0.002)  # the callers' fault, not the version's
    assert result.ok and result.bake["ok"]


def test_the_bake_judges_only_the_new_version_on_the_canary() -> None:
    before = {"models": {"m": {"requests": [["1", "OK", 10], ["1", "MODEL_ERROR", 5]]}}}
    after = {
        "models": {"m": {"requests": [["1", "OK", 10], ["1", "MODEL_ERROR", 9], ["2", "OK", 30]]}}
    }
    assert window(before, after, "m", {"2"}) == Window(30, 0, 0, 0.0)
    assert window(before, after, "m", None).errors == 4
    assert not judge(Window(10, 0, 0, 0.0), Window(0, 0, 0, 0.0), BakeRules(min_requests=50)).ok


def test_rollback_returns_each_host_to_its_version_before_the_fleet_upgrade(
    tmp_path: Path,
) -> None:
    fleet = SimFleet(3)
    fleet.hosts[fleet.names[2]].version = "0"  # one host was behind
    history = str(tmp_path / "h.jsonl")
    up = rollout(fleet).upgrade("/srv/m2.pt", "2")
    fleet_history.append(history, up.to_dict())
    rec = fleet_history.last_committed_upgrade(fleet_history.read(history), "m")
    assert rec is not None
    targets = {h: str(v) for h, v in rec["before"].items()}
    back = rollout(fleet).rollback(targets)
    assert back.ok
    assert [h.version for h in fleet.hosts.values()] == ["1", "1", "0"]


def test_illegal_fleet_transitions_raise() -> None:
    fleet = SimFleet(1)
    r = rollout(fleet)
    for src, allowed in TRANSITIONS.items():
        for dst in set(FleetPhase) - allowed:
            r.phase = src
            with pytest.raises(IllegalTransition):
                r.move(dst)


def test_hosts_files_and_dns() -> None:
    text = "# fleet\ntcp://10.0.0.1:5556\n\n  tcp://10.0.0.2:5556  # rack 2\n"
    assert parse_hosts_file(text) == ["tcp://10.0.0.1:5556", "tcp://10.0.0.2:5556"]
    for bad in ("10.0.0.1:5556", "tcp://a:1\ntcp://a:1", "# nothing\n"):
        with pytest.raises(HostsError):
            parse_hosts_file(bad)
    assert hosts_from_dns("pool.test:5556", lambda n, p: ["10.1.0.2", "10.1.0.1"]) == [
        "tcp://10.1.0.2:5556",
        "tcp://10.1.0.1:5556",
    ]
    with pytest.raises(HostsError):
        hosts_from_dns("no-port")


# ---------------------------------------------------------------------- the command
@pytest.mark.slow
def test_cli_exit_codes_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    hosts = tmp_path / "hosts.txt"
    hosts.write_text("tcp://127.0.0.1:9\n")  # nothing listens on the discard port
    history = str(tmp_path / "h.jsonl")
    base = ["--connect-timeout", "0.3", "fleet"]
    code = pool_ctl(
        [*base, "upgrade", "--hosts", str(hosts), "--history", history, "--json", "m", "/srv/m.pt"]
    )
    assert code == 3
    out = json.loads(capsys.readouterr().out)
    assert out["outcome"] == "refused" and out["unreachable"] == ["tcp://127.0.0.1:9"]
    assert fleet_history.read(history) == []  # a refusal changed nothing: not history
    assert pool_ctl([*base, "status", "--hosts", str(hosts)]) == 3
    assert pool_ctl([*base, "status", "--hosts", str(tmp_path / "missing")]) == 2
    assert pool_ctl([*base, "rollback", "--hosts", str(hosts), "--history", history, "m"]) == 2
    assert "pass --to VERSION" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        pool_ctl(["fleet", "upgrade", "m", "/srv/m.pt"])  # no --hosts / --dns
    assert info.value.code == 2
    assert pool_ctl(["fleet", "history", "--history", history]) == 0
