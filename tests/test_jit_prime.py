"""TorchScript's one-time setup is paid by the spawner before it forks."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code: str) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=True,
    )
    return out.stdout


@pytest.mark.slow  # imports torch in a child and forks
def test_priming_leaves_the_spawner_single_threaded_and_a_forked_child_scripts() -> None:
    # The spawner forks after priming: a second thread there could hold a lock in a child.
    out = _run(
        """
        import os, torch
        from workers.jit_prime import prime_torchscript
        prime_torchscript()
        print("threads", len(os.listdir("/proc/self/task")))
        pid = os.fork()
        if pid == 0:
            m = torch.jit.script(torch.nn.Linear(3, 2))
            with torch.inference_mode():
                y = m(torch.ones(1, 3))
            os._exit(0 if tuple(y.shape) == (1, 2) else 1)
        _, status = os.waitpid(pid, 0)
        print("child", os.waitstatus_to_exitcode(status))
        """
    )
    assert "threads 1" in out
    assert "child 0" in out

