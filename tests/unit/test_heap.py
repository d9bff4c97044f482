"""The collector is set for a long run: the start-up heap frozen out of full collections, young
collections rarer; and its time is counted."""

import gc
import weakref

from rollover.trainer.runtime.heap import THRESHOLDS, collector_clock, tune_collector


class Node:
    def __init__(self) -> None:
        self.other = None


def test_the_start_up_heap_is_no_longer_walked_and_what_comes_later_is_still_collected():
    startup = [Node() for _ in range(1000)]
    before = gc.get_threshold()
    try:
        frozen = tune_collector("test")
        # Frozen objects are still freed by reference counting (other threads of the test
        # session run on), so the count can only have fallen since the freeze.
        assert frozen >= gc.get_freeze_count() >= len(startup)
        assert gc.get_threshold() == THRESHOLDS and THRESHOLDS[0] > before[0]
        walked = {id(o) for o in gc.get_objects()}  # what a full collection visits
        assert not any(id(o) in walked for o in startup)
        later = Node()
        assert id(later) in {id(o) for o in gc.get_objects()}
        a, b = Node(), Node()  # a cycle made after the freeze is still collected
        a.other, b.other = b, a
        cycle = weakref.ref(a)
        del a, b
        gc.collect()
        assert cycle() is None
    finally:
        gc.unfreeze()  # the test process goes on with an ordinary heap
        gc.set_threshold(*before)
    assert id(startup[0]) in {id(o) for o in gc.get_objects()}


def test_gc_tuning_0_leaves_the_collector_as_it_is(monkeypatch):
    monkeypatch.setenv("ROLLOVER_GC_TUNING", "0")
    before = gc.get_threshold()
    assert tune_collector("test") == 0
    assert gc.get_freeze_count() == 0 and gc.get_threshold() == before


def test_the_collector_clock_counts_collections_between_reads():
    clock = collector_clock()
    assert collector_clock() is clock  # one per process: one gc.callbacks entry
    clock.take()
    gc.collect()
    assert clock.take() > 0
    assert clock.take() == 0.0  # read once
    assert gc.callbacks.count(clock._on_gc) == 1
