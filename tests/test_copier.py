"""The staging copiers (workers/copier.py, workers/copier.c): every byte lands where it
was sent, tickets complete only once their copies are done, failures are reported."""

from __future__ import annotations

import ctypes
import os
import threading

import numpy as np
import pytest

from workers.copier import (
    THREADS_ENV,
    CopierUnavailable,
    NativeCopier,
    ThreadCopier,
    copy_threads,
    new_copier,
)


def _native(threads: int = 3, ring: int = 8192) -> NativeCopier:
    try:
        return NativeCopier(threads, ring)
    except CopierUnavailable as exc:  # the package installs it: a missing build is a bug
        pytest.fail(f"the C copier is not built: {exc}")


def _address(buf: np.ndarray) -> int:
    return int(buf.ctypes.data)


@pytest.fixture(params=["native", "thread"])
def copier(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    c = _native() if request.param == "native" else ThreadCopier()
    yield c
    c.close()


def test_sizes_from_empty_to_many_chunks_arrive_whole(copier) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(1)
    sizes = [0, 1, 7, 4096, 128 * 1024 - 1, 128 * 1024, 128 * 1024 + 1, 300 * 1024, 3 << 20]
    dst = np.zeros(sum(sizes) + 64 * len(sizes), dtype=np.uint8)
    items, expect, at = [], [], 0
    for n in sizes:
        src = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        items.append((_address(dst) + at, src))
        expect.append((at, src))
        at += n + 64
    ticket = copier.submit(items)
    ticket.wait()
    assert ticket.is_set() and copier.failure is None
    for at, src in expect:
        assert dst[at : at + len(src)].tobytes() == src
    # The gaps between the destinations were never written.
    for at, src in expect:
        assert not dst[at + len(src) : at + len(src) + 64].any()


def test_each_ticket_covers_its_own_submission(copier) -> None:  # type: ignore[no-untyped-def]
    dst = np.zeros(64 << 20, dtype=np.uint8)
    big = b"\x01" * (32 << 20)
    first = copier.submit([(_address(dst), big)])
    second = copier.submit([(_address(dst) + (32 << 20), b"\x02" * 16)])
    second.wait()
    # In order: a later ticket done means the earlier copies are done as well.
    assert first.is_set()
    assert dst[(32 << 20) - 1] == 1 and dst[32 << 20] == 2


def test_a_copy_of_something_not_a_buffer_is_reported(copier) -> None:  # type: ignore[no-untyped-def]
    dst = np.zeros(16, dtype=np.uint8)
    ticket = copier.submit([(_address(dst), object()), (_address(dst) + 8, b"\x05" * 8)])
    ticket.wait()
    assert copier.failure is not None
    assert dst[8:].tolist() == [5] * 8  # the good copy still happened


def test_the_ring_wraps_under_many_submitters_and_threads() -> None:
    copier = _native(threads=4, ring=16)  # far fewer slots than chunks in flight
    try:
        dst = np.zeros(4 * 200 * 256, dtype=np.uint8)
        errors: list[str] = []

        def submitter(k: int) -> None:
            for i in range(200):
                at = (k * 200 + i) * 256
                value = (k * 200 + i) % 251 + 1
                t = copier.submit([(_address(dst) + at, bytes([value]) * 256)])
                if i % 50 == 49:
                    t.wait()
                    if dst[at] != value:
                        errors.append(f"{k}/{i}")

        threads = [threading.Thread(target=submitter, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        copier.submit([]).wait()
        last = copier.submit([(_address(dst), dst[:256].tobytes())])
        last.wait()
        assert not errors
        for j in range(4 * 200):
            assert dst[j * 256] == j % 251 + 1 and dst[j * 256 + 255] == j % 251 + 1
    finally:
        copier.close()


@pytest.mark.parametrize("kind", ["native", "thread"])
def test_close_finishes_what_was_queued(kind: str) -> None:
    copier: NativeCopier | ThreadCopier = _native(threads=2) if kind == "native" else ThreadCopier()
    dst = np.zeros(8 << 20, dtype=np.uint8)
    ticket = copier.submit([(_address(dst), b"\x09" * (8 << 20))])
    copier.close()
    ticket.wait()  # returns: the threads copied everything before they stopped
    assert dst[0] == 9 and dst[-1] == 9
    with pytest.raises(RuntimeError, match="closed"):
        copier.submit([(_address(dst), b"x")])
    copier.close()  # twice is harmless


def test_thread_count_comes_from_the_environment_or_the_cpus(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(THREADS_ENV, "3")
    assert copy_threads() == 3
    monkeypatch.setenv(THREADS_ENV, "999")
    assert copy_threads() == 16
    monkeypatch.delenv(THREADS_ENV)
    assert copy_threads() == (2 if len(os.sched_getaffinity(0)) >= 8 else 1)


def test_new_copier_is_the_c_one_when_built() -> None:
    copier = new_copier(2)
    try:
        assert isinstance(copier, NativeCopier) and copier.handover == 1
    finally:
        copier.close()


def test_the_copier_holds_the_frames_until_copied_not_the_ticket() -> None:
    copier = _native(threads=1)
    try:
        dst = (ctypes.c_char * (4 << 20))()
        copier.submit([(ctypes.addressof(dst), bytearray(b"\x03" * (4 << 20)))])  # dropped
        assert copier.inflight or copier.done() >= 1
        copier.submit([]).wait()
        last = copier.submit([(ctypes.addressof(dst), b"\x04")])
        last.wait()
        assert dst.raw[:2] == b"\x04\x03" and dst.raw[-1:] == b"\x03"
        copier.submit([])
        assert not copier.inflight  # released once done
    finally:
        copier.close()
