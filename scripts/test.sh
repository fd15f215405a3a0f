#!/usr/bin/env bash
# Set up a virtual environment and run the whole test suite (CPU only; GPU tests skip).
# The README's second command and CI's .ci/run both run exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
# torch first, pinned to the CPU build: a bare "torch" requirement would pull the
# multi-GB CUDA build, which tests without a GPU do not need.
"$VENV/bin/pip" install -q --disable-pip-version-check torch==2.13.0
"$VENV/bin/pip" install -q --disable-pip-version-check -e '.[test]'
"$VENV/bin/ruff" check pool router workers gateway scripts tests
"$VENV/bin/mypy"
set +e
# Two test processes (pytest-xdist): most tests wait on real poolds and sockets, so two
# share a 2-core machine well. TEST_PROCS=0 runs in this process; extra arguments
# (e.g. -m "not slow" for the fast tier) pass through.
"$VENV/bin/python" -m pytest -n "${TEST_PROCS:-2}" "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests: that is a failure here" >&2
  exit 1
fi
exit "$status"
