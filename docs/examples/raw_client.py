"""Call gpu-pool with nothing but pyzmq and msgpack (no gpu-pool import).

usage: python raw_client.py [ENDPOINT] [MODEL]
"""

import struct
import sys

import msgpack
import zmq

ENDPOINT = sys.argv[1] if len(sys.argv) > 1 else "tcp://127.0.0.1:5555"
MODEL = sys.argv[2] if len(sys.argv) > 2 else "demo"
PROTOCOL = b"gpu-pool/1"

ctx = zmq.Context()
sock = ctx.socket(zmq.REQ)
sock.setsockopt(zmq.LINGER, 0)
sock.connect(ENDPOINT)

# One float32 input of shape [1, 16]: its bytes go in their own frame after the header.
values = [0.5] * 16
data = struct.pack("<16f", *values)
header = {"model": MODEL, "inputs": [{"dtype": "float32", "shape": [1, 16]}],
          "timeout_ms": 5000, "id": "example-1"}
sock.send_multipart([PROTOCOL, msgpack.packb(header), data])

if not sock.poll(10_000):
    sys.exit("no reply within 10 s")
frames = sock.recv_multipart()
assert frames[0] == PROTOCOL
reply = msgpack.unpackb(frames[1])
if not reply["ok"]:
    sys.exit(f"error {reply['error']['code']}: {reply['error']['message']}")

next_frame = 2
for out in reply["outputs"]:
    raw = out.get("data")  # small outputs come inline, large ones in the next frame
    if raw is None:
        raw = frames[next_frame]
        next_frame += 1
    count = len(raw) // 4
    floats = struct.unpack(f"<{count}f", raw)  # assumes dtype float32, as this model returns
    print(f"version {reply['version']}: {out['dtype']} {out['shape']} {floats[:4]}")

# Errors are replies too, with a stable code.
sock.send_multipart([PROTOCOL, msgpack.packb({"model": "no-such-model", "inputs": []})])
reply = msgpack.unpackb(sock.recv_multipart()[1])
print(reply["error"]["code"])
