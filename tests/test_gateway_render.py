"""The gateway's hand-built answers are byte for byte what the generic encoders make."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from gateway import http_api, inference
from gateway.tensors import WireTensor, oip_datatype

ANSWER = inference.Answer(
    'm"\u00e9',
    "v1",
    (
        inference.NamedTensor("out\n0", WireTensor("float32", (1, 2), b"x" * 8)),
        inference.NamedTensor("b", WireTensor("bfloat16", (3,), memoryview(b"y" * 6))),
    ),
)


def test_binary_http_answer_is_the_json_encoder_s() -> None:
    for request in ({"parameters": {"binary_data_output": True}, "id": "r\u00e91"},
                    {"parameters": {"binary_data_output": True}, "id": 7}):  # fmt: skip
        r = http_api._render(request, ANSWER)
        n = int(dict(r.headers)[b"inference-header-content-length"])
        want: dict[str, object] = {"model_name": ANSWER.model, "model_version": ANSWER.version}
        if isinstance(request["id"], str):
            want["id"] = request["id"]
        want["outputs"] = [
            {"name": o.name, "datatype": oip_datatype(o.tensor.dtype),
             "shape": list(o.tensor.shape), "parameters": {"binary_data_size": len(o.tensor.data)}}
            for o in ANSWER.outputs
        ]  # fmt: skip
        assert r.body[:n] == json.dumps(want, separators=(",", ":")).encode()
        assert r.body[n:] == b"x" * 8 + b"y" * 6


# Our generated protobuf module is imported in a child: in this process it would clash
# with tritonclient's (both define inference.* in protobuf's default pool).
GRPC_CHECK = """
from gateway import grpc_api, inference
from gateway.proto import grpc_predict_v2_pb2 as pb
from gateway.tensors import WireTensor, oip_datatype
answer = inference.Answer("m", "v1", (
    inference.NamedTensor("out0", WireTensor("float32", (1, 2), b"x" * 8)),
    inference.NamedTensor("b", WireTensor("bfloat16", (3,), memoryview(b"y" * 6)))))
got = grpc_api._response(answer, "id1", answer.outputs)
want = pb.ModelInferResponse(
    model_name="m", model_version="v1", id="id1",
    outputs=[pb.ModelInferResponse.InferOutputTensor(
        name=o.name, datatype=oip_datatype(o.tensor.dtype), shape=list(o.tensor.shape))
        for o in answer.outputs],
    raw_output_contents=[bytes(o.tensor.data) for o in answer.outputs])
assert got.SerializeToString() == want.SerializeToString()
"""


@pytest.mark.slow
def test_grpc_answer_is_the_generated_constructor_s() -> None:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", GRPC_CHECK], cwd=root, timeout=60,
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr
