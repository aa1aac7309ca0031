"""Shared pytest setup. Test helpers live in tests/support (imported as ``support``)."""

import pytest


def pytest_configure(config):
    # tests/integration/test_chaos.py: real processes killed, stopped and drained for a minute
    # or two; it runs in `make test` too (deselect with -m "not chaos").
    config.addinivalue_line("markers", "chaos: the chaos test of issue #17 (docs/architecture.md#the-chaos-test)")


@pytest.fixture
def redis_server():
    """A fresh redis-server on a free port; fails (never skips) without redis-server on PATH."""
    from support.redis import MISSING, RedisServer

    try:
        server = RedisServer()
    except RuntimeError as e:
        pytest.fail(str(e) if str(e) == MISSING else f"could not start redis-server: {e}", pytrace=False)
    yield server
    server.cleanup()


@pytest.fixture
def telemetry_counts():
    """``telemetry_counts(fanout_sample_every=..., **Telemetry options)``: a Telemetry and the
    GatewayCounts it observes, built as the service tree builds them: (telemetry, counts).
    Each test has its own; they are shut down after it."""
    from chatgateway.telemetry.counts import FANOUT_SAMPLE_EVERY, GatewayCounts
    from chatgateway.telemetry.providers import Telemetry

    made = []

    def build(fanout_sample_every=FANOUT_SAMPLE_EVERY, **options):
        telemetry = Telemetry("gw-test", environ={}, **options)
        made.append(telemetry)
        counts = GatewayCounts(telemetry.instruments, fanout_sample_every=fanout_sample_every)
        telemetry.observe(counts)
        return telemetry, counts

    yield build
    for telemetry in made:
        telemetry.shutdown()
