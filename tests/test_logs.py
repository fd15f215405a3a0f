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


@pytest.mark.slow
def test_journal_priorities_and_only_json_from_a_real_pool(tmp_path: object) -> None:
    """poold with log_format=json and stderr as "the journal": every line is <N>{json};
    a worker's faulthandler dump (raw stderr of a child) arrives as records too."""
    import signal
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    from modelkit import make_mlp
    from poolkit import start_pool, wait_for

    d = str(tmp_path)
    m = make_mlp(os.path.join(d, "m", "m.pt"), seed=1)
    log_path = os.path.join(d, "poold.log")
    open(log_path, "wb").close()
    st = os.stat(log_path)  # start_pool appends to this file: poold's stderr is it
    env = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
    pool = start_pool(
        d, [{"name": "m", "path": m, "devices": ["cpu"]}], log_format="json", env_extra=env
    )
    try:
        pid = pool.model("m")["workers"][0]["pid"]
        os.kill(pid, signal.SIGABRT)  # faulthandler writes a stack dump to raw stderr
        wait_for(lambda: "child.stderr" in pool.log(), 30, "the dump relayed")
        wait_for(lambda: "died" in pool.log(), 30, "the death logged")
        wait_for(lambda: pool.model("m")["status"] == "serving", 60, "a replacement")
    finally:
        pool.stop()
    records = []
    for line in pool.log().splitlines():
        if not line.strip():
            continue
        match = re.match(r"<([0-7])>(\{.*\})$", line)
        assert match, f"not <N>{{json}}: {line!r}"
        rec = json.loads(match.group(2))
        rec["prio"] = int(match.group(1))
        records.append(rec)
    by_level = {r["level"]: r["prio"] for r in records}
    assert by_level["INFO"] == 6 and by_level["ERROR"] == 3, by_level
    dump = [r for r in records if r["logger"] == "child.stderr"]
    assert dump and all(r["prio"] == 4 for r in dump)
    assert any("Fatal Python error" in r["msg"] or "most recent call" in r["msg"] for r in dump)
