"""The CoreClient against a scripted in-process core: metadata, statuses, deadlines, limits."""

import time

import grpc
import pytest
import pytest_twisted
from twisted.internet import defer, task

from chatgateway.api import chat_pb2 as pb
from chatgateway.core import breaker as circuit
from chatgateway.core import client as core_module
from chatgateway.core.breaker import CircuitBreaker
from chatgateway.core.client import CoreClient, CoreError, trace_metadata
from support.fakecore import FakeCore

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


class StaticToken:
    """A ClientCredentials stand-in."""

    def __init__(self, value="svc-token"):
        self.value = value
        self.started = self.stopped = False

    def start(self):
        self.started = True

    def stop(self):
        self.stopped = True

    def token(self):
        if isinstance(self.value, Exception):
            return defer.fail(self.value)
        return defer.succeed(self.value)


@pytest.fixture
def core():
    fake = FakeCore()
    yield fake
    fake.stop()


def client_for(core, timeout=2.0, threads=4, service_token=None, failures=3):
    from twisted.internet import reactor

    clock = task.Clock()
    breaker = CircuitBreaker(clock, failures=failures, cooldown=30)
    client = CoreClient(core.target, reactor, timeout, threads, "gw-unit", breaker=breaker, service_token=service_token)
    client.start()
    return client


@pytest.fixture
def stop_after():
    clients = []
    yield clients.append
    for client in clients:
        pytest_twisted.blockon(client.stop())


@pytest_twisted.ensureDeferred
async def test_metadata_reaches_the_core(core, stop_after):
    core.answers["GetHistory"] = lambda request, context: pb.GetHistoryResponse(next_cursor="c")
    service_token = StaticToken()
    client = client_for(core, service_token=service_token)
    stop_after(client)
    assert service_token.started
    response = await client.call(
        "GetHistory",
        pb.GetHistoryRequest(room_id="r"),
        "device-jwt",
        "phone-1",
        traceparent=TRACEPARENT,
        tracestate="a=1",
    )
    assert response.next_cursor == "c"
    metadata = core.metadata("GetHistory")
    assert metadata["authorization"] == "Bearer device-jwt"
    assert metadata["x-gateway-id"] == "gw-unit"
    assert metadata["x-device-id"] == "phone-1"
    assert metadata["traceparent"] == TRACEPARENT
    assert metadata["tracestate"] == "a=1"
    assert metadata["x-service-authorization"] == "Bearer svc-token"


@pytest_twisted.ensureDeferred
async def test_without_optional_metadata(core, stop_after):
    core.answers["GetHistory"] = lambda request, context: pb.GetHistoryResponse()
    client = client_for(core)
    stop_after(client)
    await client.call("GetHistory", pb.GetHistoryRequest(room_id="r"), "device-jwt", traceparent="not-a-trace")
    metadata = core.metadata("GetHistory")
    for key in ("x-device-id", "traceparent", "x-service-authorization"):
        assert key not in metadata


def test_trace_metadata_validation():
    assert trace_metadata(TRACEPARENT) == [("traceparent", TRACEPARENT)]
    assert trace_metadata(TRACEPARENT.upper()) == [("traceparent", TRACEPARENT)]
    assert trace_metadata("00-" + "0" * 32 + "-00f067aa0ba902b7-01") == []  # all-zero trace id
    assert trace_metadata("ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01") == []
    assert trace_metadata("00-xyz") == []
    assert trace_metadata(None) == []
    assert trace_metadata(TRACEPARENT, "x" * 600) == [("traceparent", TRACEPARENT)]


@pytest_twisted.ensureDeferred
async def test_status_message_and_rich_details_come_back_unchanged(core, stop_after):
    details = b"\x08\x09\x12\x04nope"  # a google.rpc.Status, as bytes

    def refuse(request, context):
        context.abort_with_status(_Status(grpc.StatusCode.FAILED_PRECONDITION, "the last owner cannot leave", details))

    core.answers["RemoveRoomSubscriptions"] = refuse
    client = client_for(core)
    stop_after(client)
    with pytest.raises(CoreError) as failed:
        await client.call("RemoveRoomSubscriptions", pb.RemoveRoomSubscriptionsRequest(room_id="r"), "t")
    assert failed.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert failed.value.message == "the last owner cannot leave"
    assert failed.value.status_details == details
    assert client.breaker.consecutive_failures == 0  # the core answered


class _Status(grpc.Status):
    def __init__(self, code, details, binary):
        self.code = code
        self.details = details
        self.trailing_metadata = (("grpc-status-details-bin", binary),)


@pytest_twisted.ensureDeferred
async def test_server_streaming_gives_every_page(core, stop_after):
    core.answers["SearchRooms"] = lambda request, context: [
        pb.SearchRoomsResponse(data=[pb.Room(id=str(i))]) for i in range(3)
    ]
    client = client_for(core)
    stop_after(client)
    pages = await client.call("SearchRooms", pb.SearchRoomsRequest(), "t")
    assert [p.data[0].id for p in pages] == ["0", "1", "2"]


@pytest_twisted.ensureDeferred
async def test_server_streaming_failures_keep_status_details_and_deadlines(core, stop_after):
    details = b"\x08\x07\x12\x03no!"

    def refuse(request, context):
        context.abort_with_status(_Status(grpc.StatusCode.PERMISSION_DENIED, "not yours", details))

    core.answers["SearchRooms"] = refuse
    client = client_for(core, timeout=5.0)
    stop_after(client)
    with pytest.raises(CoreError) as failed:
        await client.call("SearchRooms", pb.SearchRoomsRequest(), "t")
    assert (failed.value.code, failed.value.message) == (grpc.StatusCode.PERMISSION_DENIED, "not yours")
    assert failed.value.status_details == details
    core.slow = 1.0
    core.answers["SearchRooms"] = lambda request, context: [pb.SearchRoomsResponse()]
    started = time.monotonic()
    with pytest.raises(CoreError) as late:
        await client.call("SearchRooms", pb.SearchRoomsRequest(), "t", timeout=0.2)
    assert late.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 0.9


@pytest_twisted.ensureDeferred
async def test_a_slow_core_gives_deadline_exceeded_at_the_deadline(core, stop_after):
    core.slow = 1.5
    core.answers["GetHistory"] = lambda request, context: pb.GetHistoryResponse()
    client = client_for(core, timeout=0.4, failures=2)
    stop_after(client)
    for _ in range(2):
        started = time.monotonic()
        with pytest.raises(CoreError) as late:
            await client.call("GetHistory", pb.GetHistoryRequest(room_id="r"), "t")
        elapsed = time.monotonic() - started
        assert late.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert 0.35 <= elapsed < 0.4 + 0.5
    assert client.breaker.state == circuit.OPEN


@pytest_twisted.ensureDeferred
async def test_a_callers_shorter_deadline_is_used_and_does_not_count(core, stop_after):
    core.slow = 1.0
    core.answers["GetHistory"] = lambda request, context: pb.GetHistoryResponse()
    client = client_for(core, timeout=5.0, failures=1)
    stop_after(client)
    started = time.monotonic()
    with pytest.raises(CoreError) as late:
        await client.call("GetHistory", pb.GetHistoryRequest(room_id="r"), "t", timeout=0.2)
    assert late.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 0.9
    assert client.breaker.state == circuit.CLOSED


@pytest_twisted.ensureDeferred
async def test_calls_beyond_the_pool_wait_their_turn_and_beyond_the_bound_are_refused_at_once(
    core, stop_after, monkeypatch
):
    monkeypatch.setattr(core_module, "WAITING_PER_THREAD", 2)
    core.slow = 0.1
    core.answers["GetHistory"] = lambda request, context: pb.GetHistoryResponse()
    client = client_for(core, timeout=5.0, threads=1)  # one thread, four queued in the pool: five in flight
    stop_after(client)
    accepted = [client.call("GetHistory", pb.GetHistoryRequest(room_id=str(i)), "t") for i in range(7)]
    assert (client.in_flight, client.waiting) == (5, 2)
    refused = client.call("GetHistory", pb.GetHistoryRequest(room_id="r"), "t")
    assert refused.called
    with pytest.raises(CoreError) as full:
        await refused
    assert full.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    await defer.gatherResults(accepted)
    assert [request.room_id for _, request, _ in core.calls] == [str(i) for i in range(7)]  # oldest first
    assert (client.in_flight, client.waiting) == (0, 0)
    assert client.breaker.consecutive_failures == 0


@pytest_twisted.ensureDeferred
async def test_a_call_waiting_past_its_deadline_fails_without_reaching_the_core(core, stop_after):
    core.slow = 1.0
    core.answers["GetHistory"] = lambda request, context: pb.GetHistoryResponse()
    client = client_for(core, timeout=5.0, threads=1, failures=1)
    stop_after(client)
    in_flight = [client.call("GetHistory", pb.GetHistoryRequest(room_id="busy"), "t") for _ in range(5)]
    started = time.monotonic()
    with pytest.raises(CoreError) as late:
        await client.call("GetHistory", pb.GetHistoryRequest(room_id="late"), "t", timeout=0.3)
    assert late.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert 0.25 <= time.monotonic() - started < 0.9
    assert client.waiting == 0
    assert client.breaker.state == circuit.CLOSED  # nothing learned about the core
    await defer.DeferredList(in_flight, consumeErrors=True)
    assert "late" not in [request.room_id for _, request, _ in core.calls]


@pytest_twisted.ensureDeferred
async def test_an_open_circuit_refuses_at_once_even_when_calls_would_wait(core, stop_after):
    core.slow = 0.3
    core.answers["GetHistory"] = lambda request, context: pb.GetHistoryResponse()
    client = client_for(core, threads=1, failures=1)
    stop_after(client)
    in_flight = [client.call("GetHistory", pb.GetHistoryRequest(room_id="r"), "t") for _ in range(5)]
    client.breaker.failed()  # opened meanwhile (as another call's UNAVAILABLE would)
    refused = client.call("GetHistory", pb.GetHistoryRequest(room_id="r"), "t")
    assert refused.called and client.waiting == 0
    with pytest.raises(CoreError) as failed:
        await refused
    assert failed.value.code == grpc.StatusCode.UNAVAILABLE
    await defer.DeferredList(in_flight, consumeErrors=True)


@pytest_twisted.ensureDeferred
async def test_stop_fails_the_calls_still_waiting(core):
    core.slow = 0.3
    core.answers["GetHistory"] = lambda request, context: pb.GetHistoryResponse()
    client = client_for(core, threads=1)
    in_flight = [client.call("GetHistory", pb.GetHistoryRequest(room_id="r"), "t") for _ in range(5)]
    waiting = client.call("GetHistory", pb.GetHistoryRequest(room_id="r"), "t")
    stopped = client.stop()
    with pytest.raises(CoreError) as failed:
        await waiting
    assert failed.value.code == grpc.StatusCode.UNAVAILABLE
    await defer.DeferredList(in_flight, consumeErrors=True)
    await stopped


@pytest_twisted.ensureDeferred
async def test_no_service_token_is_unavailable_without_calling_the_core(core, stop_after):
    core.answers["GetHistory"] = lambda request, context: pb.GetHistoryResponse()
    client = client_for(core, service_token=StaticToken(RuntimeError("endpoint down")))
    stop_after(client)
    with pytest.raises(CoreError) as failed:
        await client.call("GetHistory", pb.GetHistoryRequest(room_id="r"), "t")
    assert failed.value.code == grpc.StatusCode.UNAVAILABLE
    assert "service token" in failed.value.message
    assert core.calls == []
    assert client.breaker.consecutive_failures == 0
