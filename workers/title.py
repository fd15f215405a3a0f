"""Process titles, so ``ps``, ``top`` and ``systemctl status`` say what each process is.

setproctitle (PyPI) rather than a hand-written prctl: ``PR_SET_NAME`` alone changes only
the 15-byte ``comm`` (``top``, ``_COMM`` in the journal), while ``ps`` and ``systemctl
status`` print ``/proc/PID/cmdline``, which only rewriting the argv area changes;
setproctitle does that safely (it moves environ out of the way first) and, with
``setthreadtitle``, sets ``comm`` too. Missing or failing, the title is cosmetic: skip.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def set_title(title: str, short: str = "") -> None:
    try:
        import setproctitle
    except ImportError:  # an optional nicety, never a reason not to serve
        return
    try:
        setproctitle.setproctitle(title)
        setproctitle.setthreadtitle((short or title)[:15])
    except Exception as exc:  # noqa: BLE001  cosmetic: log and carry on
        log.debug("cannot set the process title: %s", exc)


def worker_title(model: str, version: str, device: str, wid: str) -> tuple[str, str]:
    """(``gpu-pool worker resnet v3 cuda:0 [resnet.g2.s0.w7]``, ``gp:resnet``)."""
    return f"gpu-pool worker {model} v{version} {device} [{wid}]", f"gp:{model}"
