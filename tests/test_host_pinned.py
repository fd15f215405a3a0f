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

    def arena(size: int, cuts: list[int] | None = None) -> PinnedArena:
        arenas.append(PinnedArena(size, d.register, d.unregister, cuts))
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


def within_one_region(d: Driver, addr: int, n: int) -> bool:
    """What the driver checks for a copy from registered memory: it starts in a region
    and does not run past that region's end."""
    return any(lo <= addr and addr + n <= lo + size for lo, size in d.registered.items())


def test_laid_out_tensors_never_cross_a_region_cut() -> None:
    # A cut falling inside a tensor made .to("cuda") fail with "invalid argument" on a
    # lent H200: the layout starts a new region before a tensor that would cross one.
    sizes = [40 << 20, 40 << 20, 3 * REGISTER_CHUNK + 5, 8, 0, 63 << 20, 2 << 20, 1 << 20]
    places, total, cuts = host_pinned.layout(sizes, staged.ALIGN)
    d = Driver()
    a = PinnedArena(total, d.register, d.unregister, cuts)
    base = a.tensor.data_ptr()
    assert len(d.registered) == len(cuts) + 1 >= 3
    for at, n in zip(places, sizes, strict=True):
        assert at % staged.ALIGN == 0 and at + n <= total
        assert within_one_region(d, base + at, max(n, 1)), (at, n)
    ends = sorted(zip(places, sizes, strict=True))
    assert all(p + n <= q for (p, n), (q, _) in zip(ends, ends[1:], strict=False))  # no overlap
    a.unpin(pause_s=0.0)


def test_a_copy_across_cuts_is_split_into_pieces_inside_one_region_each() -> None:
    d = Driver()
    a = PinnedArena(3 * REGISTER_CHUNK, d.register, d.unregister)
    base = a.tensor.data_ptr()
    lo, hi = REGISTER_CHUNK - 100, 2 * REGISTER_CHUNK + 100  # crosses two cuts
    pieces = a.pieces(lo, hi)
    assert len(pieces) == 3 and pieces[0][0] == lo and pieces[-1][1] == hi
    assert all(p[1] == q[0] for p, q in zip(pieces, pieces[1:], strict=False))
    assert all(within_one_region(d, base + x, y - x) for x, y in pieces)
    assert a.pieces(10, 20) == [(10, 20)]
    a.unpin(pause_s=0.0)


def test_staged_safetensors_copy_each_piece_inside_one_region(
    tmp_path: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    """StagedWeights.to_device, with tensors that straddle the arena's cuts: every copy
    it makes reads inside one registered region, and the bytes arrive whole."""
    import os

    from safetensors.torch import save_file

    d = Driver()
    monkeypatch.setattr(host_pinned, "REGISTER_CHUNK", 1 << 20)  # cuts every MiB
    monkeypatch.setattr(
        weights, "pinned_arena", lambda size, cuts=None: PinnedArena(size, d.register, d.unregister)
    )
    torch.manual_seed(0)
    want = {f"w{i}": torch.rand(1000 + 37 * i, 301) for i in range(4)}  # ~1.2 MiB each
    path = os.path.join(str(tmp_path), "w.safetensors")
    save_file(want, path)
    stage = weights.stage_file(path, pin=True)
    assert stage.arena is not None and len(d.registered) >= 4
    base = stage.data.data_ptr()
    copies: list[tuple[int, int]] = []
    real_copy = torch.Tensor.copy_

    def copy_(self: torch.Tensor, src: torch.Tensor, non_blocking: bool = False) -> torch.Tensor:
        if src.data_ptr() >= base:
            copies.append((src.data_ptr(), src.numel() * src.element_size()))
        return real_copy(self, src, non_blocking)

    monkeypatch.setattr(torch.Tensor, "copy_", copy_)
    got = stage.to_device("cpu")
    monkeypatch.setattr(torch.Tensor, "copy_", real_copy)
    assert len(copies) > len(want)  # some tensors were split
    assert all(within_one_region(d, addr, n) for addr, n in copies)
    for name, t in want.items():
        assert torch.equal(got[name], t)
    stage.release()
    assert d.registered == {}


def test_an_empty_item_after_a_large_one_makes_no_cut_at_the_end() -> None:
    """_pinned gives a non-contiguous tensor 0 bytes; after a tensor over a region a cut
    for it would fall at the arena's end, which PinnedArena refuses (ValueError, not a
    registration refusal the caller falls back from)."""
    sizes = [REGISTER_CHUNK + (1 << 20), 0]
    places, total, cuts = host_pinned.layout(sizes, staged.ALIGN)
    assert cuts == [] and places == [0, REGISTER_CHUNK + (1 << 20)]
    d = Driver()
    PinnedArena(total, d.register, d.unregister, cuts).unpin(pause_s=0.0)
