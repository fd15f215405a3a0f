"""Call a gpu-pool fleet (several hosts) with nothing but pyzmq and msgpack.

usage: python raw_spread_client.py MODEL COUNT ENDPOINT [ENDPOINT ...]

One REQ socket per host, round robin over the hosts that are up. A host whose connection
drops under a request (seen on the socket's monitor), that does not answer in time, or
that says SHUTTING_DOWN is left out for a back-off and the request goes to another host:
inference is idempotent, so asking again is safe. Prints one "host version" line per call.
"""

import sys
import time

import msgpack
import zmq
from zmq.utils.monitor import recv_monitor_message

PROTOCOL = b"gpu-pool/1"
MODEL, COUNT, ENDPOINTS = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
TRY_TIMEOUT_MS, BACKOFF_S = 2000, 1.0
ctx = zmq.Context()


def open_socket(endpoint):
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IMMEDIATE, 1)  # queue only on a live connection,
    sock.setsockopt(zmq.SNDTIMEO, 1000)  # so a send to a dead host fails within 1 s
    sock.setsockopt(zmq.HEARTBEAT_IVL, 1000)  # a vanished host drops within 3 s
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3000)
    monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
    sock.connect(endpoint)
    return sock, monitor


hosts = {ep: open_socket(ep) for ep in ENDPOINTS}
out_until = dict.fromkeys(ENDPOINTS, 0.0)
turn = 0


def ask(endpoint, frames):
    """The reply frames, or None (and a fresh socket: a REQ without its reply is stuck)."""
    sock, monitor = hosts[endpoint]
    try:
        sock.send_multipart(frames)
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        ready = dict(poller.poll(TRY_TIMEOUT_MS))
        if sock in ready:
            return sock.recv_multipart()
        if monitor in ready:
            recv_monitor_message(monitor)  # the connection dropped under the request
    except zmq.Again:
        pass  # not connected
    sock.disable_monitor()
    sock.close()
    monitor.close()
    hosts[endpoint] = open_socket(endpoint)
    return None


def infer(data):
    global turn
    header = {"model": MODEL, "inputs": [{"dtype": "float32", "shape": [1, 16]}]}
    frames = [PROTOCOL, msgpack.packb(header), data]
    for _attempt in range(len(ENDPOINTS) + 1):
        up = [ep for ep in ENDPOINTS if out_until[ep] <= time.monotonic()] or ENDPOINTS
        turn += 1
        endpoint = up[turn % len(up)]
        reply = ask(endpoint, frames)
        if reply is not None:
            head = msgpack.unpackb(reply[1])
            code = None if head["ok"] else head["error"]["code"]
            if code not in ("SHUTTING_DOWN", "MODEL_UNAVAILABLE", "WORKER_LOST", "OVERLOADED"):
                return endpoint, head  # an answer (an error like MODEL_ERROR is one too)
        out_until[endpoint] = time.monotonic() + BACKOFF_S  # leave it out, ask another
    raise SystemExit("no host answered")


for _call in range(COUNT):
    endpoint, head = infer(bytes(64))  # 16 float32 zeros
    print(endpoint, head["version"] if head["ok"] else head["error"]["code"], flush=True)
