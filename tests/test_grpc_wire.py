"""ModelInfer's own deserializer (gateway/grpc_wire.py) reads every request as protobuf
does, hands the raw inputs out as views of the received bytes, and refuses what protobuf
refuses."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# In a child: our generated protobuf module would clash with tritonclient's in this
# process (both define inference.* in protobuf's default pool).
CHECK = r"""
import random
from google.protobuf.message import DecodeError
from gateway.grpc_wire import WireError, parse_infer_request, split_raw
from gateway.proto import grpc_predict_v2_pb2 as pb

R = pb.ModelInferRequest
T = R.InferInputTensor


def fields(m):
    # one encoding per top-level field entry: what a client may send in any order
    out = []
    for f, value in m.ListFields():
        items = value.items() if f.message_type and f.message_type.GetOptions().map_entry \
            else (value if f.label == f.LABEL_REPEATED else [value])
        for item in items:
            one = R()
            if f.message_type and f.message_type.GetOptions().map_entry:
                getattr(one, f.name)[item[0]].CopyFrom(item[1])
            elif f.label == f.LABEL_REPEATED:
                getattr(one, f.name).append(item) if f.type == f.TYPE_BYTES \
                    else getattr(one, f.name).add().CopyFrom(item)
            elif f.message_type:
                getattr(one, f.name).CopyFrom(item)
            else:
                setattr(one, f.name, item)
            out.append(one.SerializeToString())
    return out


def same(wire):
    want = R.FromString(wire)
    got = parse_infer_request(wire)
    assert [bytes(r) for r in got.raw] == list(want.raw_input_contents)
    assert not got.message.raw_input_contents
    want.ClearField("raw_input_contents")
    assert got.message == want
    return got


big = bytes(range(256)) * 1200  # 300 KiB: long lengths (3-byte varints)
m = R(model_name="m", model_version="2", id="r1",
      inputs=[T(name="a", datatype="FP16", shape=[1, 3, 224, 224]),
              T(name="b", datatype="INT64", shape=[2], contents={"int64_contents": [1, -2]})],
      outputs=[R.InferRequestedOutputTensor(name="o")],
      raw_input_contents=[big, b"", b"x" * 200])
m.parameters["timeout"].int64_param = 5
m.inputs[0].parameters["p"].string_param = "s"
parts = fields(m)
rng = random.Random(7)
for _ in range(200):  # any field order, raw entries anywhere (their order kept)
    rng.shuffle(parts)
    same(b"".join(parts))
# unknown fields of every wire type (varint, fixed64, length, fixed32; a 2-byte key)
unknown = bytes([0xF8, 0x06, 0x96, 0x01, 0xF9, 0x06]) + bytes(8) + bytes([0xFA, 0x06, 3]) \
    + b"abc" + bytes([0xFD, 0x06]) + bytes(4)
same(unknown + m.SerializeToString() + unknown)
same(R(model_name="typed", inputs=[T(name="a", datatype="FP32", shape=[1])]).SerializeToString())
same(b"")
# raw inputs are views of the bytes gRPC handed us, not copies
wire = m.SerializeToString()
got = parse_infer_request(wire)
assert got.raw[0].obj is wire and len(got.raw) == 3
# what protobuf refuses is refused (truncated anywhere, a bad varint); a group is
# protobuf's to judge, as before
for bad in (wire[:-1], wire[:5], wire[:len(wire) // 2], bytes([0x3A, 0xFF]),
            bytes([0x08] + [0xFF] * 11), bytes([0x3B, 0x3C])):
    try:
        R.FromString(bad)
    except DecodeError:
        try:
            parse_infer_request(bad)
        except DecodeError:
            continue
        raise AssertionError(f"accepted what protobuf refuses: {bad[:16]!r}")
    same(bad)
rest, raw = split_raw(wire)
assert len(rest) < 300 and [bytes(r) for r in raw] == list(m.raw_input_contents)
# the walk itself on what it cannot follow (small requests are protobuf's alone)
for bad in (bytes([0x3A, 0xFF]), bytes([0x3A, 0x05, 1]), bytes([0x08] + [0xFF] * 11),
            bytes([0x3B, 0x3C]), bytes([0x0D, 1, 2])):
    try:
        split_raw(bad)
    except WireError:
        continue
    raise AssertionError(f"walked past a malformed field: {bad!r}")
small = R(model_name="s", inputs=[T(name="a", datatype="FP32", shape=[1])],
          raw_input_contents=[b"abcd"]).SerializeToString()
assert split_raw(small)[1][0] == b"abcd" and same(small).raw == [b"abcd"]
print("ok")
"""


def test_the_split_request_is_protobuf_s_own() -> None:
    done = subprocess.run([sys.executable, "-c", CHECK], cwd=ROOT, timeout=120,
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
