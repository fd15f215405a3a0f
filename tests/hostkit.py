"""Fake gpu-pool hosts for the many-host client's tests: a real ROUTER socket on a real
tcp port, answering in the wire format with its own name as the version, or misbehaving
on demand (silent, SHUTTING_DOWN, an error, or dying with the request in flight)."""

from __future__ import annotations

import socket
import threading
from typing import Any

import msgpack
import zmq

PROTOCOL = b"gpu-pool/1"
MODES = ("ok", "silent", "shutting_down", "model_error", "die")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class FakeHost:
    def __init__(self, name: str, address: str = "127.0.0.1", port: int | None = None) -> None:
        self.name = name
        self.address = address
        self.port = port or free_port(address)
        self.endpoint = f"tcp://{address}:{self.port}"
        self.mode = "ok"
        self.received = 0
        self.answered = 0
        self.stop_flag = threading.Event()
        self.bound = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()
        if not self.bound.wait(5):
            raise RuntimeError(f"{self.endpoint} did not bind")

    def _serve(self) -> None:
        ctx = zmq.Context.instance()
        sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(self.endpoint)
        self.bound.set()
        try:
            while not self.stop_flag.is_set():
                if not sock.poll(20):
                    continue
                frames = sock.recv_multipart()
                self.received += 1
                if self.mode == "die":
                    return  # the socket closes with the request unanswered
                if self.mode == "silent":
                    continue
                envelope = frames[: frames.index(b"") + 1]
                header = msgpack.unpackb(frames[envelope.__len__() + 1])
                sock.send_multipart([*envelope, PROTOCOL, msgpack.packb(self.reply(header))])
                self.answered += 1
        finally:
            sock.close(linger=0)

    def reply(self, header: dict[str, Any]) -> dict[str, Any]:
        base = {"model": header.get("model", ""), "version": self.name}
        if self.mode == "shutting_down":
            return {
                **base,
                "ok": False,
                "version": "",
                "error": {"code": "SHUTTING_DOWN", "message": "poold is stopping"},
            }
        if self.mode == "model_error":
            return {**base, "ok": False, "error": {"code": "MODEL_ERROR", "message": "boom"}}
        out = {"dtype": "uint8", "shape": [len(self.name)], "data": self.name.encode()}
        return {**base, "ok": True, "outputs": [out]}

    def close(self) -> None:
        self.stop_flag.set()
        self.thread.join(5)
