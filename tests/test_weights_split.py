"""The split load of workers.weights (the mapped path on the front of the file in a
thread, the ring on the rest): on a CPU the page-locking is skipped, so these check that
the two halves meet bit for bit wherever the cut falls, that progress counts each byte
once, and that a mapped half the driver refuses is read again by the ring."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import safetensors.torch
import torch

from workers import weights, weights_mapped, weights_split


def _file(tmp_path: Any) -> tuple[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(5)
    state = {
        "a": torch.randn(333, 17, generator=g),
        "empty": torch.empty(0, 3),
        "b": torch.randint(0, 255, (5,), dtype=torch.uint8, generator=g),
        "c": torch.randn(64, 1024, generator=g).to(torch.bfloat16),
        "d": torch.randn(3000, generator=g).double(),
        "s": torch.tensor(1.5),
    }
    path = str(tmp_path / "w.safetensors")
    safetensors.torch.save_file(state, path)
    return path, safetensors.torch.load_file(path)


def _same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(want)  # the header's order
    for k, w in want.items():
        assert got[k].dtype == w.dtype and got[k].shape == w.shape, k
        assert torch.equal(got[k].reshape(-1).view(torch.uint8), w.reshape(-1).view(torch.uint8))
    ptrs = [t.untyped_storage().data_ptr() for t in got.values() if t.numel()]
    assert len(set(ptrs)) == len(ptrs)  # each tensor its own storage


@pytest.mark.parametrize("share", [0.01, 0.3, 0.55, 0.9, 1.0])
@pytest.mark.parametrize("chunk", [1000, 4096, 1 << 20])
def test_split_load_is_bit_identical_wherever_the_cut_falls(
    tmp_path: Any, share: float, chunk: int
) -> None:
    path, want = _file(tmp_path)
    seen: list[int] = []
    got = weights.load_file(path, "cpu", chunk_bytes=chunk, threads=3, share=share,
                            progress=seen.append)  # fmt: skip
    _same(got, want)
    assert sum(seen) == weights.read_header(path).data_size


def test_the_cut_falls_on_a_page_of_the_file() -> None:
    page = weights_mapped.PAGE
    for start, size, share in [(8, 10 * page, 0.5), (1000, 3 * page + 7, 0.55), (8, 100, 0.5)]:
        cut = weights_split.cut_point(start, size, share)
        assert 0 <= cut <= size
        assert cut == 0 or (start + cut) % page == 0
        assert cut <= size * share
    assert weights_split.cut_point(8, 100, 1.0) == 100  # all of it: no page rounding


def test_a_refused_mapped_half_is_read_again_by_the_ring(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, want = _file(tmp_path)
    real = weights_mapped.stream_mapped
    threads: list[str] = []

    def fail_halfway(fd: int, targets: Any, span: tuple[int, int], chunk: int, defer: bool,
                     progress: Any = None) -> None:  # fmt: skip
        threads.append(threading.current_thread().name)
        half = (span[0] + span[1]) // 2
        real(fd, targets, (span[0], half), chunk, defer, progress)  # some bytes reported
        raise weights_mapped.HostRegisterError("cudaHostRegister failed: error 801")

    monkeypatch.setattr(weights_mapped, "stream_mapped", fail_halfway)
    seen: list[int] = []
    got = weights.load_file(path, "cpu", chunk_bytes=4096, share=0.6, progress=seen.append)
    _same(got, want)
    assert sum(seen) == weights.read_header(path).data_size  # not counted twice
    assert threads and threads[0].startswith("weights-mapped")  # beside the ring, not before


def test_an_error_in_the_ring_half_waits_for_the_mapped_half(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, _ = _file(tmp_path)
    done = threading.Event()
    real = weights_mapped.stream_mapped

    def slow(*args: Any) -> None:
        real(*args)
        done.set()

    def bad_read(*args: Any) -> None:
        raise weights.SafetensorsError("file ended at byte 9 (truncated while being read)")

    monkeypatch.setattr(weights_mapped, "stream_mapped", slow)
    monkeypatch.setattr(weights, "_read_into", bad_read)
    with pytest.raises(weights.SafetensorsError, match="truncated"):
        weights.load_file(path, "cpu", chunk_bytes=4096, share=0.5)
    assert done.is_set()  # no thread still copying into the tensors when the error surfaces
    assert not [t for t in threading.enumerate() if t.name.startswith("weights")]


def test_the_env_chooses_the_share_on_cuda_only(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    monkeypatch.delenv(weights_split.PATH_ENV, raising=False)
    monkeypatch.delenv(weights_split.SHARE_ENV, raising=False)
    gib = 1 << 30
    # auto, the default: the mapped path for a file up to a quarter of MemAvailable
    assert weights_split.mapped_share(cuda, None, 2 * gib, available=8 * gib) == 1.0
    assert weights_split.mapped_share(cuda, None, 2 * gib + 1, available=8 * gib) == 0.0
    monkeypatch.setattr(weights_split, "available_ram", lambda: None)
    assert weights_split.mapped_share(cuda, None, 1) == 0.0  # MemAvailable unknown: the ring
    assert weights_split.mapped_share(cpu, None, 1, available=8 * gib) == 0.0
    monkeypatch.setenv(weights_split.PATH_ENV, "auto")
    assert weights_split.mapped_share(cuda, None, 2 * gib, available=8 * gib) == 1.0
    monkeypatch.setenv(weights_split.PATH_ENV, "split")
    assert weights_split.mapped_share(cuda, None, 1) == weights_split.DEFAULT_SHARE
    assert weights_split.mapped_share(cpu, None, 1) == 0.0
    monkeypatch.setenv(weights_split.SHARE_ENV, "70")
    assert weights_split.mapped_share(cuda, None, 1) == 0.7
    monkeypatch.setenv(weights_split.SHARE_ENV, "250")
    assert weights_split.mapped_share(cuda, None, 1) == 1.0
    monkeypatch.setenv(weights_split.PATH_ENV, "ring")
    assert weights_split.mapped_share(cuda, None, 1) == 0.0
    monkeypatch.setenv(weights_split.SHARE_ENV, "")
    monkeypatch.setenv(weights_split.PATH_ENV, "bogus")
    assert weights_split.mapped_share(cuda, None, 1) == 0.0
    monkeypatch.setenv(weights_split.PATH_ENV, "mapped")
    assert weights_split.mapped_share(cuda, None, 1) == 1.0
    assert weights_split.mapped_share(cuda, False, 1) == 0.0
    assert weights_split.mapped_share(cpu, True, 1) == 1.0
