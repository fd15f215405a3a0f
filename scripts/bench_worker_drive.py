"""Driving one worker over its DEALER protocol, closed loop: ``--inflight`` requests kept
outstanding, each reply sending the next; the measured window's requests/s, rows per
forward, and CPU per request of the worker and of this driver.
"""

from __future__ import annotations

import argparse
import struct
import time
from typing import Any

import msgpack
import zmq
from bench_worker_cpu import cpu_ticks, self_ticks, us_per_request

ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "uint8": 1, "int64": 8}
WID = b"bench-w0"


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
