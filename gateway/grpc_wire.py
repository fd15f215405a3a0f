"""ModelInfer's request read without copying its tensors: the raw inputs stay views.

A resnet50 input is 294 KiB. Parsed as a whole, protobuf copies it into its arena, and
``raw_input_contents[i]`` copies it again into new bytes at each access: two copies,
20-35 us of a gateway's CPU per request on the 2-core VM, before the ZMTP link writes
it to the router from whatever buffer it is given. So the deserializer walks the top
level of the message (tag, length, skip: the wire format's own rule, no schema), takes
every ``raw_input_contents`` entry as a memoryview of the bytes gRPC received, and
hands protobuf the other fields (a few hundred bytes: names, shapes, parameters) to
parse as usual. Protobuf encodings of fields concatenate (a message is the sequence of
its fields), so what protobuf sees is exactly the request minus its raw inputs; any
byte string this walk cannot follow is given to protobuf whole, which then accepts or
refuses it as it always did; so is a request under 16 KiB, whose copies cost less than
the walk.
"""

from __future__ import annotations

from typing import Final, NamedTuple

from gateway.proto import grpc_predict_v2_pb2 as pb

# ModelInferRequest.raw_input_contents = 7, length-delimited (wire type 2)
RAW_INPUT_KEY: Final = 7 << 3 | 2
# Below this a request is parsed whole: protobuf's copies of a few KiB cost less than
# the walk in Python (1 KiB: 4.2 us whole, 6.5 us split; 294 KiB: 18 us, 6.7 us).
SPLIT_FROM: Final = 16384


class InferCall(NamedTuple):  # a tuple: made per request, cheaper than a dataclass
    """A ModelInferRequest as the service reads it: every field but the raw inputs in
    ``message``; the raw inputs, in order, in ``raw`` (views of the received bytes, or
    bytes when the request was parsed whole)."""

    message: pb.ModelInferRequest
    raw: list[memoryview] | list[bytes]


class WireError(ValueError):
    """Bytes the walk cannot follow (truncated, a group, a bad varint)."""


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= len(data) or shift > 63:
            raise WireError("truncated or overlong varint")
        b = data[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7


def split_raw(data: bytes) -> tuple[bytes, list[memoryview]]:
    """(the message's other fields, the raw inputs as views of ``data``)."""
    raw: list[memoryview] = []
    keep: list[memoryview] = []
    view = memoryview(data)
    pos, end, kept_from = 0, len(data), 0
    while pos < end:
        start = pos
        key, pos = _varint(data, pos)
        kind = key & 7
        if kind == 0:
            _, pos = _varint(data, pos)
        elif kind == 1:
            pos += 8
        elif kind == 5:
            pos += 4
        elif kind == 2:
            size, pos = _varint(data, pos)
            body = pos
            pos += size
            if pos <= end and key == RAW_INPUT_KEY:
                if kept_from < start:
                    keep.append(view[kept_from:start])
                raw.append(view[body:pos])
                kept_from = pos
        else:  # groups (3, 4) and the undefined 6, 7: protobuf's to judge
            raise WireError(f"wire type {kind}")
        if pos > end:
            raise WireError("a field runs past the message")
    if not raw:
        return data, raw
    keep.append(view[kept_from:])
    return b"".join(keep), raw


def parse_infer_request(data: bytes) -> InferCall:
    """gRPC's request deserializer for ModelInfer."""
    if len(data) >= SPLIT_FROM:
        try:
            rest, views = split_raw(data)
        except WireError:
            pass  # protobuf's to accept or refuse, below
        else:
            return InferCall(pb.ModelInferRequest.FromString(rest), views)
    whole = pb.ModelInferRequest.FromString(data)  # raises as protobuf always did
    raw = list(whole.raw_input_contents)
    if raw:
        whole.ClearField("raw_input_contents")
    return InferCall(whole, raw)
