"""Shared pytest setup. Test helpers live in tests/support (imported as ``support``)."""

import pytest


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
