#!/usr/bin/env bash
# Regenerate gateway/proto/grpc_predict_v2_pb2*.py from grpc_predict_v2.proto.
# The generated modules are checked in, so `pip install -e .` needs no protoc; rerun this
# after editing the .proto (needs grpcio-tools: pip install grpcio-tools) and commit both.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
"$PY" -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. \
  gateway/proto/grpc_predict_v2.proto
