import gc
from collections.abc import Iterator

import pytest

from agent.runtime import GC_THRESHOLDS, freeze_heap


@pytest.fixture
def restored_gc() -> Iterator[None]:
    thresholds = gc.get_threshold()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)


@pytest.mark.usefixtures("restored_gc")
def test_freeze_heap_exempts_start_up_objects_and_raises_the_young_threshold() -> None:
    gc.unfreeze()
    survivor = [object()]  # allocated before the freeze: the collector must skip it now
    freeze_heap()
    assert gc.get_freeze_count() > 0
    assert not any(o is survivor for o in gc.get_objects())
    assert gc.get_threshold() == GC_THRESHOLDS
    assert GC_THRESHOLDS[0] > 700  # the default young threshold, which this is about
