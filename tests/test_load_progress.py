"""The worker's loading meter and the loaders' byte counts (no pool: in-process)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import safetensors.torch
import torch

from workers import page_cache, weights
from workers.load_progress import MIN_STEP, LoadMeter


def test_meter_reports_first_steps_and_last_once_each() -> None:
    sent: list[tuple[int, int]] = []
    meter = LoadMeter(5 * MIN_STEP + 7, lambda d, t: sent.append((d, t)))
    meter.start()
    for _ in range(11):
        meter.add(MIN_STEP // 2)
    meter.add(MIN_STEP)
    meter.finish()
    meter.finish()
    done = [d for d, _ in sent]
    assert {t for _, t in sent} == {5 * MIN_STEP + 7}
    assert done[0] == 0 and done[-1] == 5 * MIN_STEP + 7
    assert done == sorted(set(done)) and len(done) == 7, done  # 0, 1..5 MiB, the total
    assert all(b - a >= MIN_STEP for a, b in zip(done[:-2], done[1:-1], strict=True))


def test_read_through_and_streamed_load_count_every_byte(tmp_path: Path) -> None:
    blob = tmp_path / "blob"
    blob.write_bytes(os.urandom((3 << 20) + 5))
    seen: list[int] = []
    weights.read_through(str(blob), seen.append)
    assert sum(seen) == blob.stat().st_size and len(seen) == 4
    state = {"a": torch.randn(300, 300), "b": torch.randn(7)}
    path = str(tmp_path / "w.safetensors")
    safetensors.torch.save_file(state, path)
    chunks: list[int] = []
    out = weights.load_file(path, "cpu", chunk_bytes=64 << 10, progress=chunks.append)
    assert sum(chunks) == weights.read_header(path).data_size and len(chunks) > 5
    assert torch.equal(out["a"], state["a"]) and torch.equal(out["b"], state["b"])


def test_staging_counts_every_byte_in_file_order(tmp_path: Path) -> None:
    from modelkit import make_big_mlp

    from workers.staged import stage_model

    state = {"w": torch.randn(3000, 1000)}  # 12 MB: two staging chunks of 8 MiB
    path = str(tmp_path / "s.safetensors")
    safetensors.torch.save_file(state, path)
    chunks: list[int] = []
    staged = weights.stage_file(path, pin=False, threads=3, progress=chunks.append)
    assert sum(chunks) == staged.header.data_size and len(chunks) == 2
    assert torch.equal(staged.to_device("cpu")["w"], state["w"])
    script = make_big_mlp(str(tmp_path / "m.pt"), hidden=256, layers=4, seed=1)
    read: list[int] = []
    stage_model(script, None, pin=False, progress=read.append)
    assert sum(read) == os.path.getsize(script) and len(read) > 1


def test_read_through_skips_a_file_already_in_the_page_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blob = tmp_path / "blob"
    blob.write_bytes(os.urandom((3 << 20) + 5))
    blob.read_bytes()  # in the page cache now
    fd = os.open(blob, os.O_RDONLY)
    try:
        assert weights.resident(fd, blob.stat().st_size)
    finally:
        os.close(fd)
    reads: list[int] = []
    real = os.preadv
    monkeypatch.setattr(os, "preadv", lambda *a: reads.append(1) or real(*a))
    seen: list[int] = []
    weights.read_through(str(blob), seen.append)
    assert sum(seen) == blob.stat().st_size and len(seen) == 4 and not reads
    monkeypatch.setattr(page_cache, "resident", lambda fd, size: False)  # as if on disk only
    weights.read_through(str(blob), seen.append)
    assert sum(seen) == 2 * blob.stat().st_size and len(reads) == 4
