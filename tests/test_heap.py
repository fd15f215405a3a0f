"""workers.heap: garbage is collected before the heap is frozen, survivors are frozen."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from workers.heap import freeze_heap


class _Node:
    def __init__(self) -> None:
        self.other: _Node | None = None


@pytest.fixture
def unfrozen() -> Iterator[None]:
    gc.unfreeze()
    try:
        yield
    finally:
        gc.unfreeze()  # the rest of the test session collects as usual


@pytest.mark.slow
def test_garbage_is_collected_and_survivors_frozen(unfrozen: None) -> None:
    a, b = _Node(), _Node()
    a.other, b.other = b, a  # a cycle: only the cyclic collector frees it
    dead = weakref.ref(a)
    del a, b
    kept = _Node()
    assert gc.get_freeze_count() == 0
    frozen = freeze_heap()
    assert dead() is None, "a cycle that was garbage survived into the frozen heap"
    assert frozen == gc.get_freeze_count() > 0
    assert not any(o is kept for o in gc.get_objects()), "a survivor is still collected"


def test_objects_made_after_the_freeze_are_still_collected(unfrozen: None) -> None:
    freeze_heap()
    a, b = _Node(), _Node()
    a.other, b.other = b, a
    dead = weakref.ref(a)
    del a, b
    gc.collect()
    assert dead() is None
