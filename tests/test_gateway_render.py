"""The gateway's hand-built answers are byte for byte what the generic encoders make."""

from __future__ import annotations

import json

from gateway import grpc_api, http_api, inference
from gateway.proto import grpc_predict_v2_pb2 as pb
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


def test_grpc_answer_is_the_generated_constructor_s() -> None:
    got = grpc_api._response(ANSWER, "id1", ANSWER.outputs)
    want = pb.ModelInferResponse(
        model_name=ANSWER.model,
        model_version=ANSWER.version,
        id="id1",
        outputs=[
            pb.ModelInferResponse.InferOutputTensor(
                name=o.name, datatype=oip_datatype(o.tensor.dtype), shape=list(o.tensor.shape)
            )
            for o in ANSWER.outputs
        ],
        raw_output_contents=[bytes(o.tensor.data) for o in ANSWER.outputs],
    )
    assert got.SerializeToString() == want.SerializeToString()
