"""The soak's Open Inference Protocol part (``soak.py --oip``): HTTP clients whose answers
are checked like the ZeroMQ clients', peers that misbehave at the HTTP level, and the
gateway process's own figures.

An HTTP client speaks OIP/HTTP with the binary tensor extension over one keep-alive
connection (``http.client``, nothing of ours), and every answer is checked against the
version its ``model_version`` names. The hostile peer takes turns at what a slow or
broken client does to an HTTP server: a head sent a byte a second (slowloris), a body
trickled in, requests sent and never read, bytes that are not HTTP, connections opened
and dropped half way. None of it may cost an honest client an answer, grow the gateway's
descriptors, or make poold restart the gateway.
"""

from __future__ import annotations

import http.client
import json
import socket
import time
from typing import Any

import numpy as np
import psutil
from soak_tally import Tally
from soak_traffic import MODEL
from stresskit import ModelSet, output_problem

HOSTILE_TURN_S = 3.0  # how long each kind of misbehaviour runs before the next, except
SLOW_TURN_S = 35.0  # the slow ones: long enough to meet the server's timeouts (10 s for a
# head, 30 s then 1 KiB/s for a body), which cut them off


def gateway_pid(poold_pid: int, protocol: str = "http") -> int | None:
    """The pid of poold's ``protocol`` gateway process, or None."""
    try:
        kids = psutil.Process(poold_pid).children(recursive=True)
    except psutil.Error:
        return None
    for k in kids:
        try:
            cmd = k.cmdline()
        except psutil.Error:
            continue
        if "gateway" in " ".join(cmd) and protocol in cmd:
            return int(k.pid)
    return None


def input_name(at: str) -> str:
    """The model's input name, from its OIP metadata (the forward signature's)."""
    conn = http.client.HTTPConnection(at, timeout=10)
    try:
        conn.request("GET", f"/v2/models/{MODEL}")
        meta = json.loads(conn.getresponse().read())
    finally:
        conn.close()
    return str(meta["inputs"][0]["name"])


def _request(name: str, x: np.ndarray, timeout_s: float = 10.0) -> tuple[bytes, dict[str, str]]:
    data = np.ascontiguousarray(x, dtype=np.float32).tobytes()
    head = json.dumps({
        "parameters": {"timeout": int(timeout_s * 1e6)},  # the pool's deadline, in us
        "inputs": [{"name": name, "shape": list(x.shape), "datatype": "FP32",
                    "parameters": {"binary_data_size": len(data)}}],
        "outputs": [{"name": "output0", "parameters": {"binary_data": True}}],
    }).encode()  # fmt: skip
    headers = {"Content-Type": "application/octet-stream",
               "Inference-Header-Content-Length": str(len(head))}  # fmt: skip
    return head + data, headers


def _answer(resp: http.client.HTTPResponse, body: bytes) -> tuple[str, str, np.ndarray | None]:
    """(code, version, output) of one answer; code is OK or the error's code."""
    if resp.status != 200:
        try:
            text = str(json.loads(body)["error"])
        except (ValueError, KeyError, TypeError):
            return f"HTTP {resp.status}", "", None
        return text.split(":", 1)[0], "", None
    n = int(resp.getheader("Inference-Header-Content-Length") or len(body))
    head = json.loads(body[:n])
    out = head["outputs"][0]
    arr = np.frombuffer(body[n:], dtype=np.float32).reshape(out["shape"])
    return "OK", str(head.get("model_version", "")), arr


def oip_client(tally: Tally, at: str, models: ModelSet, timeout_s: float, idx: int) -> None:
    """OIP/HTTP requests without pause on one keep-alive connection; every answer checked.
    A request with no answer within its deadline and a margin is LOST; a connection the
    gateway closed is opened again (and counted)."""
    name = input_name(at)
    body, headers = _request(name, models.x, timeout_s)
    conn: http.client.HTTPConnection | None = None
    try:
        while not tally.stop.is_set():
            if conn is None:
                conn = http.client.HTTPConnection(at, timeout=timeout_s + 5)
            try:
                conn.request("POST", f"/v2/models/{MODEL}/infer", body, headers)
                resp = conn.getresponse()
                code, version, out = _answer(resp, resp.read())
            except TimeoutError:
                tally.answer("LOST")
                tally.problem(f"OIP client {idx}: no answer in {timeout_s + 5:.0f} s")
                conn.close()
                conn = None
                continue
            except (ConnectionError, http.client.HTTPException, OSError) as exc:
                # The request may not have reached the gateway: counted, not an answer.
                tally.note("OIP connections reopened")
                tally.problem(f"OIP client {idx}: {type(exc).__name__}: {exc}")
                conn.close()
                conn = None
                continue
            if out is not None:
                wrong = output_problem(models.refs, version, out)
                if wrong:
                    code = "WRONG"
                    tally.problem(f"OIP client {idx}: {wrong}")
            tally.answer(code)
            tally.note("OIP requests")
    finally:
        if conn is not None:
            conn.close()


def _connect(at: str) -> socket.socket:
    host, port = at.rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=5)


def _drip(tally: Tally, at: str, until: float, what: str, start: bytes, drop: bytes,
          every_s: float) -> None:
    """``start``, then ``drop`` every ``every_s`` until ``until`` or the server cuts it off."""
    with _connect(at) as s:
        s.sendall(start)
        while time.monotonic() < until and not tally.stop.is_set():
            try:
                s.sendall(drop)
            except OSError:
                tally.note(f"OIP {what} cut off")
                return
            time.sleep(every_s)


def _slowloris(tally: Tally, at: str, until: float) -> None:
    """A head a header a second: cut off by the server's head_s (10 s)."""
    _drip(tally, at, until, "slowloris", b"GET /v2/health/live HTTP/1.1\r\nHost: soak\r\n",
          b"X-Slow: 1\r\n", 1.0)  # fmt: skip


def _trickle(tally: Tally, at: str, until: float) -> None:
    """A body two bytes a second, never silent for long: cut off by the minimum rate."""
    _drip(tally, at, until, "trickle", b"POST /v2/models/soak/infer HTTP/1.1\r\nHost: soak"
          b"\r\nContent-Length: 100000\r\n\r\n", b"{", 0.5)  # fmt: skip


def _never_reads(tally: Tally, at: str, until: float, name: str, x: np.ndarray) -> None:
    body, headers = _request(name, x)
    req = (b"POST /v2/models/soak/infer HTTP/1.1\r\nHost: soak\r\n"
           + b"".join(f"{k}: {v}\r\n".encode() for k, v in headers.items())
           + b"Content-Length: %d\r\n\r\n" % len(body) + body)  # fmt: skip
    with _connect(at) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.setblocking(False)
        while time.monotonic() < until and not tally.stop.is_set():
            try:
                s.send(req)
                tally.note("OIP never-read sent")
            except BlockingIOError:
                time.sleep(0.05)  # the gateway stopped reading us: as it should
            except OSError:
                tally.note("OIP never-read dropped")
                return
            time.sleep(0.002)


def _garbage(tally: Tally, at: str, until: float) -> None:
    rng = np.random.default_rng(5)
    while time.monotonic() < until and not tally.stop.is_set():
        try:
            with _connect(at) as s:
                s.sendall(rng.integers(0, 256, int(rng.integers(1, 2000)), dtype=np.uint8)
                          .tobytes())  # fmt: skip
                s.settimeout(2)
                if s.recv(4096).startswith(b"HTTP/1.1 400"):
                    tally.note("OIP garbage answered 400")
        except OSError:
            pass
        time.sleep(0.05)


def _half_requests(tally: Tally, at: str, until: float) -> None:
    while time.monotonic() < until and not tally.stop.is_set():
        try:
            with _connect(at) as s:
                s.sendall(b"POST /v2/models/soak/infer HTTP/1.1\r\nContent-Length: 50\r\n\r\n{")
        except OSError:
            pass
        tally.note("OIP half requests")
        time.sleep(0.02)


def hostile(tally: Tally, at: str, models: ModelSet) -> None:
    """Each misbehaviour in turn, ``HOSTILE_TURN_S`` at a time, until the soak stops."""
    name = input_name(at)
    turns = [
        lambda until: _slowloris(tally, at, until),
        lambda until: _trickle(tally, at, until),
        lambda until: _never_reads(tally, at, until, name, models.x),
        lambda until: _garbage(tally, at, until),
        lambda until: _half_requests(tally, at, until),
    ]
    i = 0
    while not tally.stop.is_set():
        turn = i % len(turns)
        try:
            turns[turn](time.monotonic() + (SLOW_TURN_S if turn < 2 else HOSTILE_TURN_S))
        except OSError as exc:
            tally.note("OIP hostile connect failed")
            tally.problem(f"OIP hostile peer: {type(exc).__name__}: {exc}")
            tally.stop.wait(0.5)
        i += 1


def gateway_sample(pid: int | None) -> dict[str, Any]:
    """The gateway's RSS, descriptors and pid (None where it is gone)."""
    if pid is None:
        return {"pid": None, "rss": None, "fds": None}
    try:
        p = psutil.Process(pid)
        return {"pid": pid, "rss": int(p.memory_info().rss), "fds": int(p.num_fds())}
    except psutil.Error:
        return {"pid": None, "rss": None, "fds": None}
