"""One worker, driven directly over its DEALER protocol: host CPU per request.

Starts ``workers.main.run`` in a child process (what the spawner's fork runs), binds
the ROUTER the worker connects to (the router's side of ``router.protocol``'s internal
framing) and keeps ``--inflight`` requests outstanding: closed loop, each reply sends
the next request. After ``--warmup-s`` it measures for ``--seconds`` and reports
requests/s, rows per forward (from the worker's heartbeats), the worker's CPU per
request (all threads; the serving thread; libzmq's I/O thread) and this driver's own,
so that a saturated driver shows. No router is involved: the figure is the worker's
ceiling, receive to reply. ``--reference`` then times the same model called in-process
at batch ``--max-batch`` (as ``scripts/bench.py --batching`` does) and prints the ratio.

CPU (a tiny scripted model, [N,3,224,224] fp16 -> [N,1000] fp16; ~25 s)::

    PYTHONPATH=. python scripts/bench_worker_host.py

GPU, scripted resnet50 fp16 (built here with torchvision, random weights; or --model)::

    PYTHONPATH=. python scripts/bench_worker_host.py --device cuda:0 --resnet --reference
    PYTHONPATH=. python scripts/bench_worker_host.py --device cuda:0 --model net.pt --reference

``--via-spawner`` forks the worker from ``workers.spawner`` as poold does, instead of
starting a fresh interpreter. ``--cuda-graphs`` replays the forward as CUDA graphs
(``cuda_graphs = true``). ``--profile FILE`` runs the worker under cProfile (the
serving thread's CPU time) and prints its top functions. ``GPU_POOL_STAGE_ON_ARRIVAL=1``
in the environment makes a CPU worker stage requests as a GPU worker does (see
``workers/serve.py``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import struct
import subprocess
import sys
import tempfile
import time
from typing import Any

import msgpack
import zmq

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "uint8": 1, "int64": 8}
WID = b"bench-w0"


# ----------------------------------------------------------------- the worker
def worker_main(spec_json: str, profile: str) -> int:
    """Child process: the worker itself, optionally under cProfile."""
    from workers.main import WorkerSpec, run

    spec = WorkerSpec.from_dict(json.loads(spec_json))
    if not profile:
        return run(spec)
    import cProfile

    # CPU time of the serving thread (where cProfile runs): waits in poll() do not count.
    prof = cProfile.Profile(time.thread_time_ns, 1e-9)
    try:
        return prof.runcall(run, spec)
    finally:
        prof.dump_stats(profile)


def tiny_model(directory: str, shape: list[int], dtype: str, max_batch: int) -> str:
    """A scripted model whose forward costs next to nothing: host work dominates."""
    import torch

    from workers.manifest import write_manifest

    class Head(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.flatten(1)[:, :1000] * 2  # [N, 1000]: a classifier's output shape

    path = os.path.join(directory, "tiny.pt")
    torch.jit.script(Head()).save(path)
    write_manifest(
        os.path.join(directory, "tiny.toml"),
        inputs=[(dtype, tuple(shape))],
        warmup_batch_sizes=sorted({1, max_batch}),
    )
    return path


def resnet_model(directory: str) -> str:
    from benchmodels import make_image_model  # scripts/ is on sys.path (this file's dir)

    return make_image_model(os.path.join(directory, "resnet.pt"), resnet=True, half=True, image=224)


# ----------------------------------------------------------------- measuring
def cpu_ticks(pid: int) -> dict[str, int]:
    """utime+stime per thread group: "main" (the serving thread), "zmq" (libzmq's
    threads), "other" (torch's pools, the lifeline watcher, the CUDA waiter...)."""
    out = {"main": 0, "zmq": 0, "other": 0}
    base = f"/proc/{pid}/task"
    for tid in os.listdir(base):
        try:
            with open(f"{base}/{tid}/stat", "rb") as f:
                raw = f.read()
        except OSError:
            continue  # the thread ended meanwhile
        comm = raw[raw.index(b"(") + 1 : raw.rindex(b")")]
        fields = raw[raw.rindex(b")") + 2 :].split()
        ticks = int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
        group = "main" if int(tid) == pid else "zmq" if comm.startswith(b"ZMQbg") else "other"
        out[group] += ticks
    return out


def us_per_request(start: dict[str, int], end: dict[str, int], served: int) -> dict[str, float]:
    """CPU microseconds per request in each thread group between two ``cpu_ticks``."""
    hz = os.sysconf("SC_CLK_TCK")
    return {k: (end[k] - start[k]) / hz * 1e6 / max(1, served) for k in end}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default="", help="model file (default: a tiny scripted model)")
    ap.add_argument("--resnet", action="store_true", help="build scripted resnet50 fp16")
    ap.add_argument("--inflight", type=int, default=64, help="requests kept outstanding")
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--max-delay-ms", type=float, default=2.0, help="pool default: 2.0")
    ap.add_argument("--shape", default="1,3,224,224", help="one request's input shape")
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--cuda-graphs", action="store_true", help="replay the forward as CUDA graphs")
    ap.add_argument(
        "--via-spawner",
        action="store_true",
        help="fork the worker from workers.spawner, as poold does (default: a fresh process)",
    )
    ap.add_argument("--threads", type=int, default=0, help="worker torch threads (0: its own)")
    ap.add_argument("--seconds", type=float, default=10.0, help="measured time")
    ap.add_argument("--warmup-s", type=float, default=2.0)
    ap.add_argument("--profile", default="", help="cProfile the worker into this file")
    ap.add_argument("--json", action="store_true", help="also print the result as JSON")
    ap.add_argument(
        "--reference",
        action="store_true",
        help="then time the same model in-process at batch --max-batch (rows/s), for the ratio",
    )
    ap.add_argument("--reference-s", type=float, default=3.0)
    ap.add_argument("--worker", default="", help=argparse.SUPPRESS)
    ap.add_argument("--reference-role", default="", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return worker_main(a.worker, a.profile)
    if a.reference_role:
        return reference_main(a.reference_role)

    shape = [int(s) for s in a.shape.split(",")]
    tmp = tempfile.TemporaryDirectory(prefix="bench-worker-")
    t_build = time.monotonic()
    if a.resnet:
        path = resnet_model(tmp.name)
    elif a.model:
        path = a.model
    else:
        path = tiny_model(tmp.name, shape, a.dtype, a.max_batch)
    build_s = time.monotonic() - t_build

    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.setsockopt(zmq.LINGER, 0)
    backend = f"ipc://{tmp.name}/backend.sock"
    sock.bind(backend)
    spec = {
        "wid": WID.decode(),
        "backend": backend,
        "model": "net",
        "path": path,
        "version": "1",
        "device": a.device,
        "generation": 1,
        "max_batch": a.max_batch,
        "max_delay_ms": a.max_delay_ms,
        "heartbeat_interval_s": 0.5,
        "threads": a.threads or None,
        "cuda_graphs": a.cuda_graphs,
    }
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)]
    if a.profile:
        cmd += ["--profile", os.path.abspath(a.profile)]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc: Any = SpawnedWorker(spec, env) if a.via_spawner else subprocess.Popen(cmd, env=env)
    try:
        result = drive(a, sock, proc, shape, build_s)
        result["via_spawner"] = a.via_spawner
        result["worker_pid"] = proc.pid
        if isinstance(proc, SpawnedWorker):
            result["spawner_pid"] = proc.spawner.pid
        rows = result["requests_per_s"] * math.prod(shape[:1])
        result["rows_per_s"] = round(rows, 1)
        if a.reference:
            result["reference"] = reference(a, path, shape, env)
        report(a, result)
        if a.json:
            print(json.dumps(result), flush=True)
        if a.profile:
            import pstats

            print("worker profile (serving thread CPU time):")
            pstats.Stats(a.profile).sort_stats("tottime").print_stats(25)
        return 1 if result["errors"] else 0
    finally:
        if proc.poll() is None or isinstance(proc, SpawnedWorker):
            proc.kill()
            proc.wait()
        sock.close()
        ctx.term()
        tmp.cleanup()


class SpawnedWorker:
    """The worker forked from ``workers.spawner``, as poold starts it (a process that
    imported torch before the fork), behind the few calls ``drive`` makes of a Popen."""

    def __init__(self, spec: dict[str, Any], env: dict[str, str]) -> None:
        from workers.spawner import MessageReader, write_message

        self.spawner = subprocess.Popen(
            [sys.executable, "-m", "workers.spawner"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            cwd=ROOT,
        )
        assert self.spawner.stdin is not None and self.spawner.stdout is not None
        self.out = self.spawner.stdout.fileno()
        self.reader = MessageReader()
        self.returncode: int | None = None
        self._next("hello", 120)
        write_message(self.spawner.stdin.fileno(), {"t": "spawn", "token": 1, "spec": spec})
        self.pid = int(self._next("spawned", 30)["pid"])

    def _pump(self, timeout: float) -> list[dict[str, Any]]:
        """Messages the spawner sent within ``timeout`` (noting the worker's exit)."""
        import select

        got: list[dict[str, Any]] = []
        if select.select([self.out], [], [], timeout)[0]:
            data = os.read(self.out, 65536)
            got = self.reader.feed(data) if data else []
        for msg in got:
            if msg.get("t") == "exited" and msg.get("pid") == getattr(self, "pid", None):
                self.returncode = os.waitstatus_to_exitcode(int(msg["status"]))
        return got

    def _next(self, kind: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for msg in self._pump(0.1):
                if msg.get("t") == kind:
                    return msg
        raise SystemExit(f"spawner: no {kind!r} within {timeout:.0f} s")

    def poll(self) -> int | None:
        if self.returncode is None:
            self._pump(0.0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int | None:
        deadline = time.monotonic() + (timeout or 30.0)
        while self.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.returncode

    def kill(self) -> None:
        """The worker if alive, then the spawner (it exits when its stdin closes)."""
        if self.returncode is None:
            try:
                os.kill(self.pid, 9)
            except ProcessLookupError:
                pass
            self.returncode = -9
        if self.spawner.poll() is None:
            assert self.spawner.stdin is not None
            self.spawner.stdin.close()
            self.spawner.wait(30)


def reference_main(cfg_json: str) -> int:
    """Child process: the same model called in-process at one batch size (images/s)."""
    import torch

    from workers.loader import load_model
    from workers.warmup import TORCH_DTYPES

    cfg = json.loads(cfg_json)
    dev = torch.device(cfg["device"])
    model = load_model(cfg["path"], dev)
    x = torch.ones(cfg["batch"], *cfg["shape"][1:], dtype=TORCH_DTYPES[cfg["dtype"]], device=dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    for _ in range(5):
        model.forward([x])
    sync()
    n, t0 = 0, time.monotonic()
    while True:
        model.forward([x])
        n += 1
        if n % 5 == 0:
            sync()
            if time.monotonic() - t0 >= cfg["seconds"]:
                break
    dt = time.monotonic() - t0
    print(json.dumps({"images_per_s": n * cfg["batch"] / dt, "ms_per_batch": dt / n * 1e3}))
    return 0


def reference(a: argparse.Namespace, path: str, shape: list[int], env: dict[str, str]) -> Any:
    cfg = {"device": a.device, "path": path, "shape": shape, "dtype": a.dtype,
           "batch": a.max_batch, "seconds": a.reference_s}  # fmt: skip
    cmd = [sys.executable, os.path.abspath(__file__), "--reference-role", json.dumps(cfg)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    if out.returncode:
        raise SystemExit(f"in-process reference failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def self_ticks() -> dict[str, int]:
    return cpu_ticks(os.getpid())


def drive(
    a: argparse.Namespace,
    sock: zmq.Socket[Any],
    proc: Any,
    shape: list[int],
    build_s: float,
) -> dict[str, Any]:
    batches: dict[int, int] = {}
    counting = False

    def on_event(frames: list[bytes]) -> dict[str, Any]:
        event = msgpack.unpackb(frames[2], raw=False)
        if event.get("t") == "failed":
            raise SystemExit(f"worker failed: {event.get('stage')}: {event.get('reason')}")
        if event.get("t") == "hb" and counting:
            for size, n in event.get("batches", []):
                batches[size] = batches.get(size, 0) + n
        return event

    t0 = time.monotonic()
    while True:  # until "ready": import, load, warm-up
        if not sock.poll(120_000):
            raise SystemExit("worker sent nothing for 120 s")
        frames = sock.recv_multipart()
        if frames[1] == b"E" and on_event(frames).get("t") == "ready":
            break
    ready_s = time.monotonic() - t0

    n = 1
    for d in shape:
        n *= d
    data = b"\x00\x3c" * (n * ITEMSIZE[a.dtype] // 2)  # fp16 1.0 (any bit pattern will do)
    header = msgpack.packb({"model": "net", "inputs": [{"dtype": a.dtype, "shape": shape}]})
    # Frames built once and resent (libzmq refcounts a resent frame's bytes): the driver
    # must cost far less per request than the worker it measures.
    header_frame, data_frame = zmq.Frame(header), zmq.Frame(data)
    send, recv = sock.send, sock.recv
    more, noblock = int(zmq.SNDMORE), int(zmq.NOBLOCK)
    pack = struct.Struct("<Q").pack
    seq = 0

    def send_one() -> None:
        nonlocal seq
        seq += 1
        send(WID, more)
        send(b"R", more)
        send(pack(seq), more)
        send(header_frame, more)
        send(data_frame, 0)

    for _ in range(a.inflight):
        send_one()
    done = errors = 0
    first_error = ""
    phase_end = time.monotonic() + a.warmup_s
    measure: dict[str, Any] = {}
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    now = time.monotonic()
    while True:
        if not poller.poll(30_000):
            raise SystemExit(f"no reply for 30 s ({done} done)")
        while True:
            try:
                frame = recv(noblock, False)  # the worker's identity
            except zmq.Again:
                break
            parts = [frame]
            while frame.more:
                frame = recv(0, False)
                parts.append(frame)
            kind_in = parts[1].bytes
            if kind_in == b"E":
                on_event([f.bytes for f in parts[:3]])
                continue
            if kind_in != b"R":
                continue
            done += 1
            if parts[3].bytes != b"OK":
                errors += 1
                first_error = first_error or str(msgpack.unpackb(parts[4].bytes))
            send_one()
        now = time.monotonic()
        if now >= phase_end:
            if counting:
                break
            counting = True
            measure = {"t": now, "done": done, "cpu": cpu_ticks(proc.pid), "self": self_ticks()}
            phase_end = now + a.seconds
    elapsed = now - measure["t"]
    cpu_end, self_end = cpu_ticks(proc.pid), self_ticks()
    served = done - measure["done"]
    sock.send_multipart([WID, b"C", msgpack.packb({"t": "stop"})])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and proc.poll() is None:
        if sock.poll(100):
            frames = sock.recv_multipart()
            if frames[1] == b"E":
                on_event(frames)
    proc.wait(30)

    us = us_per_request(measure["cpu"], cpu_end, served)
    drv = us_per_request(measure["self"], self_end, served)
    total_us = sum(us.values())
    rows = sum(s * c for s, c in batches.items())
    forwards = sum(batches.values())
    return {
        "device": a.device,
        "model": "resnet50" if a.resnet else (a.model or "tiny"),
        "inflight": a.inflight,
        "max_batch": a.max_batch,
        "max_delay_ms": a.max_delay_ms,
        "cuda_graphs": a.cuda_graphs,
        "request_bytes": len(data),
        "build_s": round(build_s, 2),
        "ready_s": round(ready_s, 2),
        "seconds": round(elapsed, 2),
        "requests": served,
        "errors": errors,
        "first_error": first_error,
        "requests_per_s": round(served / elapsed, 1),
        "worker_cpu_us_per_request": round(total_us, 1),
        "worker_main_thread_us": round(us["main"], 1),
        "worker_zmq_io_us": round(us["zmq"], 1),
        "worker_other_threads_us": round(us["other"], 1),
        "worker_cpu_cores_busy": round(total_us * served / elapsed / 1e6, 2),
        "worker_main_thread_busy": round(us["main"] * served / elapsed / 1e6, 2),
        "rows_per_forward": round(rows / forwards, 1) if forwards else None,
        "driver_main_thread_us": round(drv["main"], 1),
        "driver_zmq_io_us": round(drv["zmq"], 1),
        "driver_main_thread_busy": round(drv["main"] * served / elapsed / 1e6, 2),
    }


def report(a: argparse.Namespace, r: dict[str, Any]) -> None:
    print(
        f"{r['model']} on {a.device}, {a.inflight} in flight, {r['request_bytes']} B requests, "
        f"max_batch {a.max_batch}, max_delay_ms {a.max_delay_ms:g}"
        f"{', CUDA graphs' if a.cuda_graphs else ''}\n"
        f"  {r['requests']} requests in {r['seconds']:.2f} s: {r['requests_per_s']:,.0f} req/s, "
        f"{r['rows_per_forward']} rows per forward, {r['errors']} errors\n"
        f"  worker CPU per request: {r['worker_cpu_us_per_request']:.1f} us (serving thread "
        f"{r['worker_main_thread_us']:.1f}, zmq I/O {r['worker_zmq_io_us']:.1f}, other "
        f"threads {r['worker_other_threads_us']:.1f}); serving thread "
        f"{r['worker_main_thread_busy']:.0%} busy\n"
        f"  driver CPU per request: main thread {r['driver_main_thread_us']:.1f} us "
        f"({r['driver_main_thread_busy']:.0%} busy), zmq I/O {r['driver_zmq_io_us']:.1f} us "
        f"(worker ready after {r['ready_s']:.1f} s)",
        flush=True,
    )
    if r["driver_main_thread_busy"] > 0.85:
        print("  NOTE: the driver's thread is nearly saturated: it may be what limits req/s")
    if r["first_error"]:
        print(f"  first error: {r['first_error']}", flush=True)
    ref = r.get("reference")
    if ref:
        print(
            f"  in-process reference, batch {a.max_batch}: {ref['images_per_s']:,.0f} rows/s "
            f"({ref['ms_per_batch']:.2f} ms a forward); this worker: "
            f"{r['rows_per_s'] / ref['images_per_s']:.2f}x",
            flush=True,
        )


if __name__ == "__main__":
    sys.exit(main())
