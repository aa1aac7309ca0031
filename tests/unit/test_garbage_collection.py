"""The service tree tunes CPython's collector for a server (docs/performance.md#garbage-collection)."""

import gc

from twisted.internet.testing import MemoryReactorClock

from chatgateway import config
from chatgateway.service import GC_YOUNG_THRESHOLD, GarbageCollection, make_gateway_service


def test_startup_objects_are_frozen_and_young_collections_are_rarer_until_the_stop():
    before, frozen = gc.get_threshold(), gc.get_freeze_count()
    tuning = GarbageCollection(young_threshold=12345)
    tuning.startService()
    try:
        assert gc.get_threshold() == (12345, *before[1:])
        assert gc.get_freeze_count() > frozen  # this test's own modules, at least
    finally:
        tuning.stopService()
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0


def test_the_gateway_process_tunes_the_collector_before_anything_else_starts():
    root = make_gateway_service(config.load({"CACHE_URI": "memory://", "JWT_SECRET": "x" * 32}), MemoryReactorClock())
    first = next(iter(root))
    assert isinstance(first, GarbageCollection)
    assert first._young == GC_YOUNG_THRESHOLD > gc.get_threshold()[0]
