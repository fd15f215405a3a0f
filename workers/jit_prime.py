"""Pay TorchScript's one-time setup before any model needs it.

The first call of any scripted module in a process costs 60-100 ms that the second
model's first call does not: the JIT registers its passes and operators and builds its
executor machinery once per process. A worker that loads a TorchScript model paid it
inside its warm-up, on the path of every spawn, crash replacement and drain-first hold.
The spawner primes on the CPU before it forks (every child inherits the set-up state,
and the spawner is still single-threaded afterwards); a CUDA standby primes once more on
its device, for the parts that only a device run sets up.
"""

from __future__ import annotations

import time

import torch

__all__ = ["prime_torchscript"]

PRIME_WIDTH = 8
PRIME_CALLS = 3  # the profiling run, the optimising run, one optimised run


class _Prime(torch.nn.Module):
    """A matmul and an elementwise chain: what the JIT's executor and fuser handle."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(PRIME_WIDTH, PRIME_WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.linear(x)) * 2.0 + x


def prime_torchscript(device: torch.device | str = "cpu") -> float:
    """Script a tiny module and call it as a worker calls its model; return the seconds."""
    t0 = time.monotonic()
    dev = torch.device(device)
    module = torch.jit.script(_Prime()).to(dev)
    x = torch.rand(1, PRIME_WIDTH, device=dev)
    with torch.inference_mode():  # the mode workers.loader.LoadedModel.forward serves in
        for _ in range(PRIME_CALLS):
            module(x)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return time.monotonic() - t0
