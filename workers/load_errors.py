"""The errors of loading a model, and how any exception is put in one line."""

from __future__ import annotations

import torch


class ModelLoadError(Exception):
    """The model file could not be turned into a runnable module."""


class ModelOutputError(TypeError):
    """forward() returned something other than a tensor or a tuple/list of tensors."""


def describe_error(e: BaseException, limit: int = 600) -> str:
    """``Type: message`` on one line, bounded, for logs, events and error replies.

    A TorchScript error carries both tracebacks in its message; its last line names the
    original exception, which is what a reader needs.
    """
    text = str(e).strip()
    scripted = isinstance(e, torch.jit.Error) or "Traceback of TorchScript" in text
    if scripted and text:
        last = [line.strip() for line in text.splitlines() if line.strip()][-1]
        return _bounded(last if ":" in last else f"{type(e).__name__}: {last}", limit)
    # torch messages often span lines; one line keeps a reply or log line readable.
    text = " ".join(text.split())
    return _bounded(f"{type(e).__name__}: {text}" if text else type(e).__name__, limit)


def _bounded(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
