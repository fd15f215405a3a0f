"""The mapped path of workers.weights (``GPU_POOL_WEIGHTS_PATH=mapped``): on a CPU the
page-locking is skipped, so this checks its chunk logic against safetensors, bit for
bit, chunk sizes that split tensors and pages included, and that a failed registration
falls back to the ring."""

from __future__ import annotations

from typing import Any

import pytest
import safetensors.torch
import torch

from workers import load_targets, weights, weights_mapped


def _file(tmp_path: Any) -> tuple[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    state = {
        "a": torch.randn(333, 17, generator=g),
        "b": torch.randint(0, 255, (5,), dtype=torch.uint8, generator=g),
        "c": torch.randn(64, 1024, generator=g).to(torch.bfloat16),
        "empty": torch.empty(0, 3),
        "s": torch.tensor(1.5),
    }
    path = str(tmp_path / "w.safetensors")
    safetensors.torch.save_file(state, path)
    return path, safetensors.torch.load_file(path)


@pytest.mark.parametrize("chunk", [1, 4095, 4096, 10_000, 1 << 20])
def test_mapped_path_is_bit_identical(tmp_path: Any, chunk: int) -> None:
    path, want = _file(tmp_path)
    seen: list[int] = []
    got = weights.load_file(path, "cpu", chunk_bytes=chunk, mapped=True, progress=seen.append)
    assert list(got) == list(want)  # the header's order
    for k, w in want.items():
        assert got[k].dtype == w.dtype and got[k].shape == w.shape, k
        assert torch.equal(got[k].reshape(-1).view(torch.uint8), w.reshape(-1).view(torch.uint8))
    assert sum(seen) == weights.read_header(path).data_size
    ptrs = [t.untyped_storage().data_ptr() for t in got.values() if t.numel()]
    assert len(set(ptrs)) == len(ptrs)  # each tensor its own storage, not the mapping


def test_a_refused_registration_falls_back_to_the_ring(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, want = _file(tmp_path)

    def refuse(*args: Any, **kw: Any) -> dict[str, torch.Tensor]:
        raise weights_mapped.HostRegisterError("no")

    monkeypatch.setattr(weights_mapped, "stream_mapped", refuse)
    got = weights.load_file(path, "cpu", chunk_bytes=4096, mapped=True)
    assert all(torch.equal(got[k], w) for k, w in want.items() if w.numel())


@pytest.mark.parametrize("begin,end,chunk", [(8, 10_000, 1), (8, 10_000, 4096),
                                             (4096, 3 * 4096, 8192), (100, 101, 1 << 20),
                                             (8 + 200, (5 << 20) + 3, 1 << 20)])  # fmt: skip
def test_chunks_register_disjoint_pages_each_holding_its_range(
    begin: int, end: int, chunk: int
) -> None:
    page = weights_mapped.PAGE
    chunks = weights_mapped._chunks(begin, end, chunk)
    assert chunks[0][0] == begin and chunks[-1][1] == end
    assert all(a < b for a, b in chunks)
    assert all(b == a2 for (_, b), (a2, _) in zip(chunks, chunks[1:], strict=False))
    pages = [((a // page) * page, -(-b // page) * page) for a, b in chunks]
    assert all(e <= s2 for (_, e), (s2, _) in zip(pages, pages[1:], strict=False)), pages
    assert all(b - a <= max(chunk, page) for a, b in chunks[1:-1])


def test_a_refused_copy_falls_back_to_the_ring(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, want = _file(tmp_path)
    real = load_targets.Targets.copy
    calls: list[int] = []

    def copy_then_refuse(*args: Any) -> int:
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("CUDA error: invalid argument")
        return real(*args)

    monkeypatch.setattr(load_targets.Targets, "copy", copy_then_refuse)
    got = weights.load_file(path, "cpu", chunk_bytes=4096, mapped=True)
    assert all(torch.equal(got[k], w) for k, w in want.items() if w.numel())
