"""chatgateway.client.backoff: when chatgateway-client reconnects (docs/protocol.md#reconnect-hints)."""

import random

import pytest

from chatgateway.client import backoff
from chatgateway.client.wsclient import ClosedError

REFUSED_503 = "connection was closed uncleanly (WebSocket connection upgrade failed [503]: too many new connections)"


def test_a_drained_devices_first_reconnect_waits_the_hinted_delay():
    closed = ClosedError(1001, "gateway draining: reconnect in 2.7s")
    assert backoff.reconnect_after(closed, 0, random.Random(1)) == 2.7  # the first jitter is below 1 s


def test_a_refused_upgrade_waits_its_retry_after_and_a_1013_its_hint():
    assert backoff.reconnect_after(ClosedError(1006, REFUSED_503, retry_after=17.0), 0) == 17.0
    closed = ClosedError(1013, "core unavailable: down: reconnect in 6.3s")
    assert backoff.reconnect_after(closed, 0, random.Random(2)) == 6.3


def test_without_a_hint_failures_in_a_row_back_off_with_full_jitter_up_to_the_cap():
    rng = random.Random(3)
    dropped = ClosedError(1006, "connection was closed uncleanly (peer dropped the TCP connection)")
    for failures in range(10):
        delays = [backoff.reconnect_after(dropped, failures, rng) for _ in range(200)]
        ceiling = min(backoff.CAP_SEC, backoff.BASE_SEC * 2**failures)
        assert all(0 <= d <= ceiling for d in delays) and max(delays) > 0.8 * ceiling
    # Never sooner than the gateway asked, however the jitter falls.
    hinted = ClosedError(1001, "gateway draining: reconnect in 4.0s")
    assert min(backoff.reconnect_after(hinted, 3, rng) for _ in range(200)) == 4.0


@pytest.mark.parametrize(
    "closed",
    [
        ClosedError(4001, "replaced by a newer connection of this device"),
        ClosedError(4401, "invalid token: expired"),
        ClosedError(1008, "too many frames before connected"),
        ClosedError(1006, "connection was closed uncleanly (WebSocket connection upgrade failed [401]: unauthorized)"),
        ClosedError(1000, "bye"),
    ],
)
def test_closes_that_would_happen_again_are_not_reconnected(closed):
    assert backoff.reconnect_after(closed, 0) is None
