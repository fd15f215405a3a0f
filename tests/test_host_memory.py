"""poold asks glibc for huge pages in the spawner's processes (pool.host_memory)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from pool import host_memory
from pool.host_memory import HUGEPAGES_ENV, TUNABLES, with_host_hugepages


@pytest.fixture
def capable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(host_memory, "glibc_version", lambda: (2, 39))
    monkeypatch.setattr(host_memory, "thp_possible", lambda path="": True)


def test_added_when_glibc_and_the_kernel_can(capable: None) -> None:
    env = with_host_hugepages({"PATH": "/bin"})
    assert env[TUNABLES] == "glibc.malloc.hugetlb=1"
    assert env["PATH"] == "/bin"


def test_appended_to_the_operators_other_tunables(capable: None) -> None:
    env = with_host_hugepages({TUNABLES: "glibc.malloc.arena_max=2"})
    assert env[TUNABLES] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"


def test_the_operators_own_hugetlb_setting_wins(capable: None) -> None:
    env = with_host_hugepages({TUNABLES: "glibc.malloc.hugetlb=0"})
    assert env[TUNABLES] == "glibc.malloc.hugetlb=0"


def test_switched_off_by_the_environment(capable: None) -> None:
    assert TUNABLES not in with_host_hugepages({HUGEPAGES_ENV: "0"})


def test_left_alone_on_an_old_glibc_or_without_thp(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(host_memory, "thp_possible", lambda path="": True)
    monkeypatch.setattr(host_memory, "glibc_version", lambda: (2, 31))
    assert TUNABLES not in with_host_hugepages({})
    monkeypatch.setattr(host_memory, "glibc_version", lambda: None)  # musl, say
    assert TUNABLES not in with_host_hugepages({})
    monkeypatch.setattr(host_memory, "glibc_version", lambda: (2, 39))
    monkeypatch.setattr(host_memory, "thp_possible", lambda path="": False)
    assert TUNABLES not in with_host_hugepages({})


@pytest.mark.parametrize(
    ("text", "possible"),
    [("always [madvise] never\n", True), ("[always] madvise never\n", True),
     ("always madvise [never]\n", False)],
)
def test_thp_modes(tmp_path: Path, text: str, possible: bool) -> None:
    f = tmp_path / "enabled"
    f.write_text(text)
    assert host_memory.thp_possible(str(f)) is possible
    assert host_memory.thp_possible(str(tmp_path / "missing")) is False


def test_this_glibc_takes_the_tunable_it_is_given() -> None:
    # glibc ignores a tunable it does not know without a word: ask its loader which
    # values a process started with the spawner's environment really gets.
    loader = "/lib64/ld-linux-x86-64.so.2"
    version = host_memory.glibc_version()
    if version is None or version < (2, 35) or not os.path.exists(loader):
        pytest.skip("no glibc 2.35+ loader here (glibc.malloc.hugetlb is new in 2.35)")
    env = with_host_hugepages(os.environ)
    if "hugetlb" not in env.get(TUNABLES, ""):
        pytest.skip("transparent huge pages are off on this kernel")
    out = subprocess.run([loader, "--list-tunables"], env=env, capture_output=True,
                         text=True, check=True, timeout=60)
    assert "glibc.malloc.hugetlb: 0x1" in out.stdout
