"""Staged weights' pinned memory of our own (workers.host_pinned), with the CUDA calls
replaced by recorders: the arena's chunking, its unpinning in pieces, the deferral until
"ready", and a TorchScript module moved into one arena with its answers unchanged. The
real registration runs in the GPU tests (tests/test_standby*.py with -m gpu)."""

from __future__ import annotations

import pytest
import torch

from workers import host_pinned, staged, weights
from workers.host_pinned import REGISTER_CHUNK, PinnedArena


class Driver:
    def __init__(self, refuse_after: int | None = None) -> None:
        self.registered: dict[int, int] = {}
        self.calls: list[tuple[str, int]] = []
        self.refuse_after = refuse_after

    def register(self, addr: int, size: int) -> None:
        if self.refuse_after is not None and len(self.registered) >= self.refuse_after:
            raise host_pinned.HostRegisterError("refused")
        assert addr % 4096 == 0 and addr not in self.registered
        self.registered[addr] = size
        self.calls.append(("register", addr))

    def unregister(self, addr: int) -> None:
        del self.registered[addr]
        self.calls.append(("unregister", addr))


def test_an_arena_registers_page_aligned_disjoint_chunks_and_unpins_them_all() -> None:
    d = Driver()
    size = 2 * REGISTER_CHUNK + 12345
    a = PinnedArena(size, d.register, d.unregister)
    assert a.tensor.numel() == size and a.pinned
    spans = sorted(d.registered.items())
    assert len(spans) == 3
    for (lo, n), (nxt, _) in zip(spans, spans[1:], strict=False):
        assert lo + n == nxt  # contiguous, no overlap
    assert sum(n for _, n in spans) >= size
    a.tensor[:] = 7  # writable host memory
    a.unpin(pause_s=0.0)
    assert d.registered == {} and not a.pinned and a.tensor.numel() == 0


def test_a_refused_chunk_undoes_the_ones_before() -> None:
    d = Driver(refuse_after=1)
    with pytest.raises(host_pinned.HostRegisterError):
        PinnedArena(3 * REGISTER_CHUNK, d.register, d.unregister)
    assert d.registered == {}
    assert [c for c, _ in d.calls] == ["register", "unregister"]


def test_a_deferred_release_waits_for_the_flush(monkeypatch: pytest.MonkeyPatch) -> None:
    d = Driver()
    a = PinnedArena(REGISTER_CHUNK + 1, d.register, d.unregister)
    weights.defer_host_frees(True)
    try:
        weights.release_arena(a)
        assert d.registered and weights.defer_host_frees(True)  # pending
    finally:
        weights.defer_host_frees(False)
    assert weights.flush_host_frees() is True
    assert d.registered == {}
    assert weights.flush_host_frees() is False
    b = PinnedArena(100, d.register, d.unregister)
    weights.release_arena(b)  # not deferred: at once
    assert d.registered == {}


def test_a_scripted_module_staged_into_one_arena_answers_the_same(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    d = Driver()
    arenas: list[PinnedArena] = []

    def arena(size: int) -> PinnedArena:
        arenas.append(PinnedArena(size, d.register, d.unregister))
        return arenas[-1]

    monkeypatch.setattr(weights, "pinned_arena", arena)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 3))
    net.register_buffer("steps", torch.arange(4, dtype=torch.int64))
    scripted = torch.jit.script(net)
    x = torch.rand(2, 5)
    want = scripted(x)
    module, _, got_arena = staged._pinned(scripted, True)
    assert got_arena is arenas[0]
    base = got_arena.tensor.data_ptr()
    for t in [*module.parameters(), *module.buffers()]:
        assert base <= t.data_ptr() < base + got_arena.size
        assert t.data_ptr() % staged.ALIGN == 0
    assert torch.equal(module(x), want)
    assert torch.equal(module.steps, torch.arange(4))
    model = staged.StagedModel("m.pt", "torchscript", module, None, got_arena)
    model.release()
    assert d.registered == {}
