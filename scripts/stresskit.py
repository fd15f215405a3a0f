"""What ``scripts/stress.py`` stands on: model files, a private poold, process probes,
the in-process runner, and the CSV / JSON / chart outputs.

The stress driver itself never imports torch: models are written by a child process
(``python stresskit.py make-models DIR SIZE``) and the classic in-process swap runs in a
child too (``python stresskit.py inproc ...``), so the driver's own process never holds a
CUDA context or any ``/dev/nvidia*`` descriptor beyond NVML's.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import psutil

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:  # run as a plain script from anywhere: find pool/, router/, workers/
    sys.path.insert(0, ROOT)

MiB = 1 << 20
SIZES = {"small": (16, 32, 4, 1), "1gib": (4096, 4096, 4096, 16)}  # in, hidden, out, layers
VERSIONS = ("1", "2")


# --------------------------------------------------------------------------- samples
@dataclass
class Sample:
    """One row of samples.csv: the state of things right after one update cycle."""

    cycle: int
    t_s: float  # since the first cycle began
    action: str  # upgrade | rollback | swap
    strategy: str  # what the pool chose (auto resolves), "in-process" for swaps
    version: str  # the version this cycle moved to
    committed: bool
    elapsed_s: float | None  # the upgrade's own elapsed_s (unload + load for swaps)
    call_s: float | None  # wall time of the command as the caller saw it (digest included)
    sample_s: float  # wall time this script spent sampling after the command
    bytes_freed: int | None  # sum over devices, from the upgrade result
    device_used: int | None  # NVML used bytes after the cycle (None on CPU)
    device_retired: int | None  # NVML used bytes at the moment the old copy was gone
    residue: int | None  # device_retired - baseline - bytes of the serving copy
    workers_gpu_bytes: int | None  # the live workers' GPU bytes, summed
    workers: int  # live workers (1 for the in-process server)
    rss: int | None  # poold's (in-process: the server's) resident set
    fds: int | None
    threads: int | None
    children: int | None  # poold's direct children (in-process: the server's)
    spawner_children: int | None
    zombies: int
    orphans: int
    requests: int  # answered during this cycle
    failed_total: int  # failed requests since the start
    p50_ms: float | None
    p99_ms: float | None
    max_ms: float | None  # the slowest of them: in drain-first, the wait through the gap
    error: str = ""


COLUMNS = [f.name for f in fields(Sample)]
_INT = {"cycle", "bytes_freed", "device_used", "device_retired", "residue",
        "workers_gpu_bytes", "workers", "rss", "fds", "threads", "children",
        "spawner_children", "zombies", "orphans", "requests", "failed_total"}
_FLOAT = {"t_s", "elapsed_s", "call_s", "sample_s", "p50_ms", "p99_ms", "max_ms"}


def write_csv(path: str, samples: Sequence[Sample]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        for s in samples:
            w.writerow(["" if v is None else v for v in asdict(s).values()])


def read_csv(path: str) -> list[Sample]:
    out = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            vals: dict[str, Any] = {}
            for k in COLUMNS:
                raw = row.get(k, "")
                if k in _INT:
                    vals[k] = int(float(raw)) if raw else None
                elif k in _FLOAT:
                    vals[k] = float(raw) if raw else None
                elif k == "committed":
                    vals[k] = raw == "True"
                else:
                    vals[k] = raw
            out.append(Sample(**vals))
    return out


def percentile(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if len(values) else None


def slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of ys over xs (0.0 with fewer than two points)."""
    if len(xs) < 2:
        return 0.0
    x = np.asarray(xs, dtype=float)
    y = np.asarray(ys, dtype=float)
    dx = x - x.mean()
    den = float((dx * dx).sum())
    return float((dx * (y - y.mean())).sum() / den) if den else 0.0


# --------------------------------------------------------------------------- probes
def proc_stats(pid: int | None) -> tuple[int | None, int | None, int | None]:
    """(RSS bytes, open fds, threads) of one process; Nones when it cannot be read."""
    if pid is None:
        return None, None, None
    try:
        p = psutil.Process(pid)
        with p.oneshot():
            return int(p.memory_info().rss), int(p.num_fds()), int(p.num_threads())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None, None, None


def child_stats(pid: int | None) -> tuple[int | None, set[int]]:
    """(number of direct children, pids of the zombies among them)."""
    if pid is None:
        return None, set()
    try:
        kids = psutil.Process(pid).children()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None, set()
    zombies = set()
    for k in kids:
        try:
            if k.status() == psutil.STATUS_ZOMBIE:
                zombies.add(k.pid)
        except psutil.NoSuchProcess:
            pass
    return len(kids), zombies


def nvidia_holders() -> set[int]:
    """Pids with an open ``/dev/nvidia*`` descriptor; processes we may not read are skipped.

    (psutil's ``open_files()`` lists regular files only, so the fd links are read here.)
    """
    out: set[int] = set()
    try:
        pids = [int(d) for d in os.listdir("/proc") if d.isdigit()]
    except OSError:
        return out
    for pid in pids:
        fd_dir = f"/proc/{pid}/fd"
        try:
            names = os.listdir(fd_dir)
        except OSError:  # gone, or not ours to read
            continue
        for name in names:
            try:
                if os.readlink(f"{fd_dir}/{name}").startswith("/dev/nvidia"):
                    out.add(pid)
                    break
            except OSError:
                continue
    return out


class Leftovers:
    """Finds zombies and orphans: every worker pid ever seen is remembered (with its
    start time, so a reused pid is not mistaken for it); one still running after it left
    the pool is an orphan. Anything else holding ``/dev/nvidia*`` that is not a live
    worker, an expected process or there before the run is an orphan too."""

    def __init__(self, expected: Iterable[int]) -> None:
        self.baseline = nvidia_holders()
        self.expected = set(expected) | {os.getpid()}
        self.seen: dict[int, psutil.Process] = {}

    def remember(self, pids: Iterable[int | None]) -> None:
        for pid in pids:
            if pid is not None and pid not in self.seen:
                try:
                    self.seen[pid] = psutil.Process(pid)
                except psutil.NoSuchProcess:
                    pass

    def check(self, live: set[int], expected: Iterable[int] = ()) -> tuple[set[int], set[int]]:
        """(zombies, orphans) among the processes that are not ``live`` workers."""
        zombies, orphans = set(), set()
        for pid, proc in list(self.seen.items()):
            if pid in live:
                continue
            try:
                running = proc.is_running()
                status = proc.status() if running else None
            except psutil.NoSuchProcess:
                running, status = False, None
            if not running:
                del self.seen[pid]
            elif status == psutil.STATUS_ZOMBIE:
                zombies.add(pid)
            else:
                orphans.add(pid)
        skip = live | self.expected | set(expected) | self.baseline
        orphans |= nvidia_holders() - skip
        return zombies, orphans


# --------------------------------------------------------------------------- models
@dataclass
class ModelSet:
    dir: str
    paths: tuple[str, str]
    versions: tuple[str, str]
    x: np.ndarray  # the input every client sends
    refs: dict[str, np.ndarray]  # version -> expected output for x


def model_set(directory: str, size: str) -> ModelSet:
    """Two versions of a model in ``directory``, written by a child unless already there."""
    marker = os.path.join(directory, "stress-models.json")
    try:
        with open(marker) as f:
            fresh = json.load(f).get("size") != size
    except (OSError, ValueError):
        fresh = True
    if fresh:
        os.makedirs(directory, exist_ok=True)
        subprocess.run([sys.executable, os.path.abspath(__file__), "make-models", directory,
                        size], check=True)
    with np.load(os.path.join(directory, "refs.npz")) as refs:
        x, outs = refs["x"], {v: refs[f"out{v}"] for v in VERSIONS}
    paths = (os.path.join(directory, "v1.pt"), os.path.join(directory, "v2.pt"))
    return ModelSet(directory, paths, VERSIONS, x, outs)


def _make_models(directory: str, size: str) -> None:
    """Child process: write v1.pt / v2.pt (TorchScript), their manifests and refs.npz."""
    import torch

    from workers.manifest import GoldenCase, InputSpec, write_manifest

    n_in, hidden, n_out, layers = SIZES[size]
    os.makedirs(directory, exist_ok=True)
    x = np.random.default_rng(0).random((1, n_in), dtype=np.float32)
    refs: dict[str, np.ndarray] = {"x": x}
    for i, version in enumerate(VERSIONS):
        gen = torch.Generator().manual_seed(1000 + i)
        blocks: list[torch.nn.Module] = []
        dims = [n_in] + [hidden] * layers + [n_out] if size == "small" else [hidden] * (layers + 1)
        with torch.no_grad():
            for j, (a, b) in enumerate(zip(dims, dims[1:], strict=False)):
                with torch.device("meta"):  # no default init over a GiB of weights
                    lin = torch.nn.Linear(a, b)
                lin = lin.to_empty(device="cpu")
                lin.weight.normal_(0.0, (2.0 / a) ** 0.5, generator=gen)
                lin.bias.normal_(0.0, 0.1, generator=gen)
                blocks.append(lin)
                if size == "1gib" or j < len(dims) - 2:
                    blocks.append(torch.nn.ReLU())
        net = torch.nn.Sequential(*blocks).eval()
        path = os.path.join(directory, f"v{version}.pt")
        torch.jit.script(net).save(path)
        with torch.inference_mode():
            out = net(torch.from_numpy(x)).numpy()
        refs[f"out{version}"] = out
        golden = None
        if size == "small":
            golden = [GoldenCase([x], [out])]
        write_manifest(os.path.join(directory, f"v{version}.toml"),
                       inputs=[InputSpec("float32", (1, n_in))],
                       warmup_batch_sizes=(1, 4) if size == "small" else (1,), golden=golden)
        del net, blocks
    np.savez(os.path.join(directory, "refs.npz"), **refs)  # type: ignore[arg-type]
    with open(os.path.join(directory, "stress-models.json"), "w") as f:
        json.dump({"size": size, "torch": torch.__version__}, f)


def output_problem(refs: dict[str, np.ndarray], version: str, out: np.ndarray) -> str | None:
    """Why an answer is wrong for the version that claims it, or None."""
    if not version:
        return "the answer names no version"
    ref = refs.get(version)
    if ref is None:
        return f"unknown version {version!r}"
    # Loose enough for a GPU's arithmetic, far too tight for the other version's weights.
    tol = 1e-2 * (float(np.abs(ref).max()) + 1e-6)
    if out.shape != ref.shape or not np.allclose(out, ref, rtol=1e-2, atol=tol):
        return f"output does not match version {version}"
    return None


# --------------------------------------------------------------------------- poold
class PoolProcess:
    """A private poold in ``directory``: its own session, ipc sockets and state."""

    def __init__(self, directory: str, model: dict[str, Any], **pool_opts: Any) -> None:
        os.makedirs(directory, exist_ok=True)
        self.dir = directory
        self.frontend = f"ipc://{directory}/front.sock"
        self.control = f"ipc://{directory}/ctl.sock"
        pool = {"frontend": self.frontend, "control": self.control,
                "state_dir": f"{directory}/state", "metrics": "",
                "heartbeat_interval_s": 0.5, "heartbeat_timeout_s": 30.0,
                "drain_timeout_s": 10.0, "stop_timeout_s": 5.0, **pool_opts}
        from pool.tomlwrite import write_config

        self.config = write_config(os.path.join(directory, "pool.toml"), pool, [model])
        self.log_path = os.path.join(directory, "poold.log")
        env = dict(os.environ)
        env.pop("NOTIFY_SOCKET", None)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "pool.poold", "--config", self.config],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)

    def wait_serving(self, ctl: Any, timeout_s: float = 180.0) -> dict[str, Any]:
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"poold exited {self.proc.returncode}; see {self.log_path}")
            try:
                data = ctl.call("status")["data"]
            except Exception:
                data = None
            if data and all(m["status"] == "serving" and m["workers"]
                            and all(w["state"] == "ready" for w in m["workers"])
                            for m in data["models"]):
                return dict(data)
            time.sleep(0.2)
        raise RuntimeError(f"poold not serving after {timeout_s:.0f}s; see {self.log_path}")

    def stop(self, timeout_s: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # whatever is left of its session
        except (ProcessLookupError, PermissionError):
            pass
        return self.proc.wait()


# --------------------------------------------------------------------------- in-process
class InProcess:
    """The classic way, for comparison: one long-lived server process that swaps its
    model in place (``to("cpu")``, ``del``, ``gc.collect()``, ``empty_cache()``) while
    its own client threads call it. Commands go over stdin, answers come back as JSON
    lines on stdout."""

    def __init__(self, device: str, clients: int, refs_dir: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "inproc", device, str(clients),
             refs_dir], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            start_new_session=True)
        self.pid = self.proc.pid

    def call(self, cmd: str, **args: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"cmd": cmd, **args}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"in-process server exited ({self.proc.wait()})")
        return dict(json.loads(line))

    def stop(self) -> None:
        try:
            self.call("quit")
        except (RuntimeError, OSError, ValueError):
            pass
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def _inproc_server(device: str, clients: int, refs_dir: str) -> None:
    """Child process: serve from threads, swap the model in place on command."""
    import gc
    import threading

    import torch

    refs = np.load(os.path.join(refs_dir, "refs.npz"))
    expect = {v: refs[f"out{v}"] for v in VERSIONS}
    dev = torch.device(device)
    x = torch.from_numpy(refs["x"]).to(dev)
    cond = threading.Condition()
    state: dict[str, Any] = {"model": None, "version": "", "inflight": 0, "stop": False}
    lat: list[float] = []
    failures: list[str] = []

    def client() -> None:
        if dev.type == "cuda":
            torch.cuda.set_device(dev)  # make the context current in this thread too
        while True:
            t0 = time.perf_counter()
            with cond:
                while state["model"] is None and not state["stop"]:
                    cond.wait(0.1)
                if state["stop"]:
                    return
                model, version = state["model"], state["version"]
                state["inflight"] += 1
            try:
                with torch.inference_mode():
                    out = model(x).cpu().numpy()
                problem = output_problem(expect, version, out)
            except Exception as exc:  # a failed request is counted, never fatal
                problem = f"{type(exc).__name__}: {exc}"
            finally:
                model = None  # drop the reference, or an old copy outlives its swap
                with cond:
                    state["inflight"] -= 1
                    cond.notify_all()
            with cond:
                lat.append(time.perf_counter() - t0)
                if problem:
                    failures.append(problem)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    for line in sys.stdin:
        msg = json.loads(line)
        cmd, reply = msg.get("cmd"), dict[str, Any](ok=True)
        t0 = time.perf_counter()
        if cmd == "load":
            model = torch.jit.load(msg["path"], map_location=dev).eval()
            with torch.inference_mode():
                model(x)
            sync()
            with cond:
                state["model"], state["version"] = model, msg["version"]
                cond.notify_all()
            del model
            reply["load_s"] = time.perf_counter() - t0
        elif cmd == "unload":
            with cond:
                old, state["model"] = state["model"], None
                while state["inflight"]:
                    cond.wait()
            if old is not None:  # the classic swap: everything one is told to do
                old.to("cpu")
                del old
            gc.collect()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            sync()
            reply["unload_s"] = time.perf_counter() - t0
        elif cmd == "stats":
            with cond:
                done, lat[:] = list(lat), []
                failed, failures[:] = list(failures), []
            ms = [round(d * 1e3, 3) for d in done]
            reply.update(requests=len(ms), failed=len(failed), errors=failed[:5],
                         latencies_ms=ms, p50_ms=percentile(ms, 50), p99_ms=percentile(ms, 99))
        elif cmd == "quit":
            break
        print(json.dumps(reply), flush=True)
    with cond:
        state["stop"] = True
        cond.notify_all()
    for t in threads:
        t.join(30)


# --------------------------------------------------------------------------- charts
def _series(samples: Sequence[Sample], key: str,
            scale: float = 1.0) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for s in samples:
        v = getattr(s, key)
        if v is not None:
            xs.append(s.cycle)
            ys.append(v / scale)
    return xs, ys


def plot_run(samples: Sequence[Sample], path: str, title: str,
             server: str = "poold") -> None:
    """Memory per series over cycles; failures and upgrade times beneath."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(10, 7),
                                      gridspec_kw={"height_ratios": [2, 1]})
    for key, label, style in (("device_used", "device used (NVML)", "-"),
                              ("workers_gpu_bytes", "worker GPU bytes", "-"),
                              ("residue", "residue at retire", "--"),
                              ("rss", f"{server} RSS", "-")):
        xs, ys = _series(samples, key, MiB)
        if xs:
            top.plot(xs, ys, style, label=label, marker="." if len(xs) < 60 else None)
    top.set_ylabel("MiB")
    top.set_title(title)
    top.legend(loc="best", fontsize="small")
    top.grid(alpha=0.3)
    xs, ys = _series(samples, "failed_total")
    bottom.step(xs, ys, where="post", color="tab:red", label="failed requests (total)")
    bottom.set_ylabel("failed requests", color="tab:red")
    bottom.set_ylim(bottom=0, top=max([1.0, *ys]) * 1.1)
    bottom.yaxis.get_major_locator().set_params(integer=True)
    bottom.set_xlabel("cycle")
    right = bottom.twinx()
    xs, ys = _series(samples, "elapsed_s")
    right.plot(xs, ys, ".", color="tab:blue", label="update time (s)")
    xs, ys = _series(samples, "call_s")
    if xs:
        right.plot(xs, ys, "x", color="tab:cyan", label="command time (s), digest included")
    right.set_ylabel("update time (s)", color="tab:blue")
    right.set_ylim(bottom=0)
    lines = bottom.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    bottom.legend(lines, [ln.get_label() for ln in lines], loc="upper left", fontsize="small")
    bottom.xaxis.get_major_locator().set_params(integer=True)
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_compare(runs: Sequence[tuple[str, Sequence[Sample]]], path: str) -> None:
    """Device memory (or server RSS on CPU) of several runs on one chart."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    has_device = any(s.device_used is not None for _, samples in runs for s in samples)
    key, what = ("device_used", "device used") if has_device else ("rss", "server RSS")
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(10, 7),
                                      gridspec_kw={"height_ratios": [2, 1]})
    for i, (label, samples) in enumerate(runs):
        color = f"C{i}"
        xs, ys = _series(samples, key, MiB)
        top.plot(xs, ys, "-", color=color, label=f"{label}: {what}")
        xs, ys = _series(samples, "residue", MiB)
        if xs:
            top.plot(xs, ys, "--", color=color, label=f"{label}: residue at retire")
        xs, ys = _series(samples, "elapsed_s")
        bottom.plot(xs, ys, ".", color=color, label=label)
    top.set_ylabel("MiB")
    top.set_title(f"{what} over update cycles")
    top.legend(loc="best", fontsize="small")
    top.grid(alpha=0.3)
    bottom.set_ylabel("update time (s)")
    bottom.set_ylim(bottom=0)
    bottom.set_xlabel("cycle")
    bottom.xaxis.get_major_locator().set_params(integer=True)
    bottom.legend(loc="best", fontsize="small")
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str]) -> int:
    if argv[:1] == ["make-models"] and len(argv) == 3:
        _make_models(argv[1], argv[2])
        return 0
    if argv[:1] == ["inproc"] and len(argv) == 4:
        _inproc_server(argv[1], int(argv[2]), argv[3])
        return 0
    print("usage: stresskit.py make-models DIR small|1gib | inproc DEVICE CLIENTS DIR",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
