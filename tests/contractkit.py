"""Models for the contract tests that modelkit does not build: versions of the
two-input pair model (``modelkit.make_pair``) that break it in one way each, and a
factory model whose worker fails after warm-up with an error of its own."""

from __future__ import annotations

import os

import torch
from modelkit import make_factory_model


class _PairRaising(torch.nn.Module):
    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x1.numel() >= 0:  # always true; TorchScript needs a reachable return below
            raise RuntimeError("contractkit: this pair model fails on every call")
        return x1, x2


class _PairFloat64(torch.nn.Module):
    """The pair's shapes, but the first output in float64."""

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (x1 + x2).double(), x1 - x2


def _save(module: torch.nn.Module, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.jit.script(module).save(path)
    return path


def make_pair_raising(path: str) -> str:
    """TorchScript forward(x1, x2) that raises on every call; no manifest."""
    return _save(_PairRaising(), path)


def make_pair_float64(path: str) -> str:
    """TorchScript forward(x1, x2) -> (float64, float32), same shapes; no manifest."""
    return _save(_PairFloat64(), path)


# Appended to a factory model's net.py: building the module replaces a step the worker
# runs after warm-up with one that raises, as a bug of ours (or of torch's) would. The
# model's own code runs in the worker, so this is a real exception in a real worker.
_BREAK_WORKER = """

def _broken_staging(self, sets):
    raise RuntimeError("contractkit: the worker broke after warm-up")


_build = build


def build():
    import workers.serve

    workers.serve.Worker.prepare_staging = _broken_staging
    return _build()
"""


def make_internal_error(dirpath: str, seed: int) -> str:
    """A factory model (manifest, golden cases) whose worker exits 71 after warm-up."""
    path = make_factory_model(dirpath, seed)
    with open(os.path.join(dirpath, "net.py"), "a", encoding="utf-8") as f:
        f.write(_BREAK_WORKER)
    return path
