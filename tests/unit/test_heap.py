"""The start-up heap is frozen out of full collections, and the collector's time is counted."""

import gc
import weakref

from rollover.trainer.runtime.heap import collector_clock, freeze_startup_heap


class Node:
    def __init__(self) -> None:
        self.other = None


def test_a_frozen_start_up_heap_is_no_longer_walked_and_later_objects_still_are():
    startup = [Node() for _ in range(1000)]
    try:
        frozen = freeze_startup_heap("test")
        assert frozen == gc.get_freeze_count() >= len(startup)
        walked = {id(o) for o in gc.get_objects()}  # what a full collection visits
        assert not any(id(o) in walked for o in startup)
        later = Node()
        assert id(later) in {id(o) for o in gc.get_objects()}
        # a cycle made after the freeze is still collected
        a, b = Node(), Node()
        a.other, b.other = b, a
        cycle = weakref.ref(a)
        del a, b
        gc.collect()
        assert cycle() is None
    finally:
        gc.unfreeze()  # the test process goes on with an ordinary heap
    assert id(startup[0]) in {id(o) for o in gc.get_objects()}


def test_the_collector_clock_counts_collections_between_reads():
    clock = collector_clock()
    assert collector_clock() is clock  # one per process: one gc.callbacks entry
    clock.take()
    gc.collect()
    counted = clock.take()
    assert counted > 0
    assert clock.take() == 0.0  # read once
    assert gc.callbacks.count(clock._on_gc) == 1
