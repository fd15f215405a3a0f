"""The gateway keeps freed tensor buffers for reuse (gateway.main.keep_freed_memory):
without it glibc maps and unmaps every buffer of a few hundred KiB, a page fault per
4 KiB on every request."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Allocates, fills and frees a 294 KiB buffer 200 times; prints the minor faults taken.
CHURN = """
import resource, sys
from gateway.main import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
src = b"x" * 301056
for _ in range(20):
    bytes(bytearray(src))
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(200):
    bytes(bytearray(src))
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", CHURN, mode], cwd=ROOT, capture_output=True,
                         text=True, timeout=60, check=True)  # fmt: skip
    return int(out.stdout.strip())


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_tensor_buffers_are_reused_not_faulted_in_again() -> None:
    kept, default = _faults("keep"), _faults("default")
    assert kept < 200  # not one fault per buffer, let alone 74 (one per page)
    assert default > 20 * max(kept, 1)  # what the default costs, so the test can tell
