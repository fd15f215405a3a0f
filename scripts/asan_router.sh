#!/usr/bin/env bash
# Run the router's C core under AddressSanitizer: build an instrumented copy of
# router/fastlane.c, preload libasan, and run the tests that drive the core in-process
# (no torch is imported there, whose own C++ runtime does not mix with a preloaded ASAN),
# the lanes' tests included.
# usage: bash scripts/asan_router.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp -r router workers tests "$work/"  # workers/: the lane's Python end (no torch)
rm -f "$work"/router/_fastlane*.so
python -m router.genheader "$work/router/fastlane_protocol.h" >/dev/null  # from protocol.py
gcc -O1 -g -fsanitize=address,undefined -fno-omit-frame-pointer -shared -fPIC \
    -o "$work/router/_fastlane.so" "$work/router/fastlane.c"
# run from the copy, so `router` is the instrumented one (python -m puts the cwd first)
cd "$work"
python -c "from router import fastlane; print('core:', fastlane._library_path())"
PYTHONPATH="$work${PYTHONPATH:+:$PYTHONPATH}" \
LD_PRELOAD="$(gcc -print-file-name=libasan.so):$(gcc -print-file-name=libubsan.so)" \
ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=1" \
UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1" \
    python -m pytest -q -p no:cacheprovider -o addopts="" \
    tests/test_router_core.py tests/test_fastlane.py tests/test_lane.py -m "not slow" \
    -W ignore::pytest.PytestUnknownMarkWarning "$@"
