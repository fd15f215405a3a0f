"""pool.logs: line formats, structured fields, idempotent setup."""

from __future__ import annotations

import io
import json
import logging
import os
import re
from collections.abc import Iterator

import pytest

from pool.logs import setup_logging

TS = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"


@pytest.fixture(autouse=True)
def restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
    root.setLevel(level)


def ours() -> list[logging.Handler]:
    return [h for h in logging.getLogger().handlers if getattr(h, "_gpupool_handler", False)]


def test_text_format() -> None:
    out = io.StringIO()
    setup_logging("text", "INFO", stream=out)
    logging.getLogger("pool.supervisor").info("worker %d ready", 42)
    logging.getLogger("pool.supervisor").debug("not shown at INFO")
    line = out.getvalue()
    assert re.fullmatch(
        TS + rf" INFO pool\.supervisor \[pid {os.getpid()}\] worker 42 ready\n", line
    ), line


def test_json_lines_with_structured_fields() -> None:
    out = io.StringIO()
    setup_logging("json", "debug", stream=out)
    log = logging.getLogger("pool.upgrade")
    log.debug(
        "switched %s to %s",
        "resnet",
        "4",
        extra={
            "model": "resnet",
            "version": "4",
            "generation": 2,
            "worker_pid": 77,
            "device": "cuda:0",
            "code": "OK",
            "unrelated": "dropped",
        },
    )
    try:
        raise RuntimeError("bad\nthing")
    except RuntimeError:
        log.exception("upgrade failed", extra={"model": "resnet"})

    lines = out.getvalue().splitlines()
    assert len(lines) == 2  # the traceback stays inside its line
    first, second = (json.loads(x) for x in lines)
    assert re.fullmatch(TS, first.pop("ts"))
    assert first == {
        "level": "DEBUG",
        "logger": "pool.upgrade",
        "pid": os.getpid(),
        "msg": "switched resnet to 4",
        "model": "resnet",
        "version": "4",
        "generation": 2,
        "worker_pid": 77,
        "device": "cuda:0",
        "code": "OK",
    }
    assert second["level"] == "ERROR" and second["model"] == "resnet"
    assert "version" not in second
    assert "RuntimeError: bad" in second["exc"]


def test_json_survives_unserialisable_extra() -> None:
    out = io.StringIO()
    setup_logging("json", stream=out)
    logging.getLogger("pool").warning("x", extra={"device": object()})
    assert json.loads(out.getvalue())["device"].startswith("<object")


def test_setup_twice_replaces_handler() -> None:
    first, second = io.StringIO(), io.StringIO()
    setup_logging("text", stream=first)
    setup_logging("json", "WARNING", stream=second)
    assert len(ours()) == 1
    logging.getLogger("pool").warning("once")
    logging.getLogger("pool").info("filtered")
    assert first.getvalue() == ""
    assert [json.loads(x)["msg"] for x in second.getvalue().splitlines()] == ["once"]
    assert logging.getLogger().level == logging.WARNING


def test_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="format"):
        setup_logging("xml")
    with pytest.raises(ValueError, match="level"):
        setup_logging("text", "LOUD")
    assert ours() == []
