"""pool-ctl's output where nothing ran or nobody reads: an upgrade cancelled while its
file hashed says only why, and a closed stdout (``pool-ctl status | head``) ends quietly."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pool.ctl.render import print_upgrade
from pool.op_result import OpFailed, result_message

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_an_upgrade_cancelled_while_hashing_says_why_and_nothing_about_versions(
    capsys: pytest.CaptureFixture[str],
) -> None:
    msg = result_message(OpFailed("demo", "cancelled by pool-ctl cancel (uid 0)", "cancelled"))
    print_upgrade(msg["data"], msg["error"])
    out = capsys.readouterr().out
    assert "not applied: cancelled by pool-ctl cancel (uid 0)" in out
    assert "None" not in out and "to ?" not in out


# A command that prints more than a pipe holds, as ``status`` or ``history`` of a big
# pool do, with its reader gone: the write itself fails (EPIPE).
_BIG_OUTPUT = """
import sys
from pool.ctl import cli
def talk(argv):
    for _ in range(20000):
        print("worker row " * 10)
    return 0
cli._main = talk
sys.exit(cli.main([]))
"""


def test_a_reader_that_left_costs_no_traceback() -> None:
    r, w = os.pipe()
    os.close(r)  # the reader is gone before pool-ctl writes a byte
    try:
        done = subprocess.run([sys.executable, "-c", _BIG_OUTPUT], stdout=w,
                              stderr=subprocess.PIPE, text=True, cwd=ROOT, timeout=60)  # fmt: skip
    finally:
        os.close(w)
    assert "Traceback" not in done.stderr and "BrokenPipeError" not in done.stderr, done.stderr
    assert done.returncode == 0
