"""The circuit breaker on a task.Clock, alone and inside the CoreClient."""

import grpc
import pytest
import pytest_twisted
from twisted.internet import task

from chatgateway.api import chat_pb2 as pb
from chatgateway.core import breaker as circuit
from chatgateway.core.breaker import CircuitBreaker
from chatgateway.core.client import CoreClient, CoreError
from support.processes import free_port


def make(failures=3, cooldown=10.0):
    clock = task.Clock()
    return CircuitBreaker(clock, failures=failures, cooldown=cooldown), clock


def test_opens_after_consecutive_failures_only():
    b, _ = make(failures=3)
    b.failed()
    b.failed()
    b.succeeded()  # a success in between resets the count
    b.failed()
    b.failed()
    assert b.state == circuit.CLOSED and b.allow()
    b.failed()
    assert b.state == circuit.OPEN
    assert not b.allow()


def test_fails_fast_while_open_then_one_probe_after_the_cooldown():
    b, clock = make(failures=1, cooldown=10)
    b.failed()
    assert b.retry_after() == 10
    clock.advance(9.9)
    assert not b.allow()
    assert b.retry_after() == pytest.approx(0.1)
    clock.advance(0.1)
    assert b.state == circuit.HALF_OPEN
    assert b.allow()  # the probe
    assert not b.allow()  # everyone else still fails fast while it is out
    assert not b.allow()


def test_successful_probe_closes():
    b, clock = make(failures=1, cooldown=5)
    b.failed()
    clock.advance(5)
    assert b.allow()
    b.succeeded()
    assert b.state == circuit.CLOSED
    assert all(b.allow() for _ in range(10))
    assert b.consecutive_failures == 0


def test_failed_probe_reopens_for_a_full_cooldown():
    b, clock = make(failures=2, cooldown=5)
    b.failed()
    b.failed()
    clock.advance(7)
    assert b.allow()
    b.failed()
    assert b.state == circuit.OPEN
    assert b.retry_after() == 5
    clock.advance(4)
    assert not b.allow()
    clock.advance(1)
    assert b.allow()


def test_a_probe_that_tells_nothing_lets_another_probe_go():
    b, clock = make(failures=1, cooldown=1)
    b.failed()
    clock.advance(1)
    assert b.allow()
    assert not b.allow()
    b.released()
    assert b.allow()


def test_threshold_must_be_positive():
    with pytest.raises(ValueError):
        CircuitBreaker(task.Clock(), failures=0)


# ---------------------------------------------------------------- inside the CoreClient


@pytest.fixture
def unreachable_core():
    """A CoreClient whose core is a port nothing listens on; the breaker on a Clock."""
    from twisted.internet import reactor

    clock = task.Clock()
    breaker = CircuitBreaker(clock, failures=2, cooldown=30)
    client = CoreClient(f"127.0.0.1:{free_port()}", reactor, 2.0, 2, "gw-unit", breaker=breaker)
    client.start()
    yield client, breaker, clock
    pytest_twisted.blockon(client.stop())


@pytest_twisted.ensureDeferred
async def test_core_client_opens_the_circuit_and_fails_fast(unreachable_core):
    client, breaker, clock = unreachable_core
    for _ in range(2):
        with pytest.raises(CoreError) as failed:
            await client.call("GetHistory", pb.GetHistoryRequest(room_id="r"), "token")
        assert failed.value.code == grpc.StatusCode.UNAVAILABLE
    assert breaker.state == circuit.OPEN
    assert await client.readiness() == "circuit open"

    # fails at once, without a thread: the Deferred has already fired
    d = client.call("GetHistory", pb.GetHistoryRequest(room_id="r"), "token")
    assert d.called
    with pytest.raises(CoreError) as fast:
        await d
    assert fast.value.code == grpc.StatusCode.UNAVAILABLE
    assert "circuit open" in fast.value.message
    assert client.in_flight == 0

    clock.advance(30)
    assert await client.readiness() == "circuit half-open"
    # the probe goes to the (still absent) core and fails: open again
    with pytest.raises(CoreError) as probe:
        await client.call("GetHistory", pb.GetHistoryRequest(room_id="r"), "token")
    assert "circuit" not in probe.value.message
    assert breaker.state == circuit.OPEN


@pytest_twisted.ensureDeferred
async def test_refused_calls_do_not_count(unreachable_core):
    client, breaker, _ = unreachable_core
    with pytest.raises(CoreError) as unknown:
        await client.call("NoSuchMethod", pb.GetHistoryRequest(), "token")
    assert unknown.value.code == grpc.StatusCode.UNIMPLEMENTED
    with pytest.raises(CoreError) as expired:
        await client.call("GetHistory", pb.GetHistoryRequest(), "token", timeout=0)
    assert expired.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert breaker.consecutive_failures == 0
