"""RedisBus against a real redis-server: binary payloads, resubscription after every kind of loss."""

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, threads
from zope.interface.verify import verifyObject

from chatgateway import config as configuration
from chatgateway.bus import IEventBus
from chatgateway.bus.memory import MemoryBus
from chatgateway.bus.redis import RedisBus
from chatgateway.redisconn.connection import ConnectionError
from support.processes import free_port
from support.redis import RedisServer, eventually

PAYLOADS = [
    b"\x00\xff\xfe\x80 not UTF-8 \xc3\x28",
    b"42",  # would come back as an int if numbers were converted
    b"",  # an empty protobuf message
    b"line\r\nbreaks\r\n",
    bytes(range(256)) * 1024,  # 256 KiB
]


def make_config(uri):
    return configuration.load(environ={"CACHE_URI": uri, "JWT_SECRET": "test-secret-0123456789abcdef0123456789"})


class Received:
    def __init__(self):
        self.messages = []

    def __call__(self, channel, payload):
        self.messages.append((channel, payload))

    def on(self, channel):
        return [payload for c, payload in self.messages if c == channel]


@pytest_twisted.async_yield_fixture
async def buses(redis_server):
    """make(uri=None, wait=True) -> (bus, Received); every bus stopped at teardown."""
    made = []

    async def make(uri=None, wait=True, **kwargs):
        bus = RedisBus(make_config(uri or redis_server.uri), reactor, **kwargs)
        received = Received()
        made.append(bus)
        bus.start(received)
        if wait:
            await eventually(lambda: bus.ready and bus.publisher.ready, what="bus ready")
        return bus, received

    yield make
    for bus in made:
        await bus.stop()


def subscribers(client, channel):
    return dict(client.pubsub_numsub(channel))[channel]


@pytest_twisted.ensureDeferred
async def test_both_buses_provide_the_interface(buses):
    bus, _ = await buses()
    verifyObject(IEventBus, bus)
    verifyObject(IEventBus, MemoryBus())


@pytest_twisted.ensureDeferred
async def test_binary_payloads_arrive_unchanged_and_in_order(buses):
    bus, received = await buses()
    publisher, _ = await buses()
    await bus.subscribe("chat:room:r1")
    for payload in PAYLOADS:
        await publisher.publish("chat:room:r1", payload)
    await eventually(lambda: len(received.messages) == len(PAYLOADS))
    assert received.messages == [("chat:room:r1", p) for p in PAYLOADS]
    assert all(type(p) is bytes for _, p in received.messages)


@pytest_twisted.ensureDeferred
async def test_subscribe_is_idempotent_and_unsubscribe_stops_delivery(redis_server, buses):
    bus, received = await buses()
    r = redis_server.client()
    await bus.subscribe("chat:room:r1")
    await bus.subscribe("chat:room:r1")
    await bus.subscribe("chat:room:fence")
    assert subscribers(r, "chat:room:r1") == 1
    await bus.unsubscribe("chat:room:r1")
    await bus.unsubscribe("chat:room:r1")
    assert subscribers(r, "chat:room:r1") == 0
    await bus.publish("chat:room:r1", b"muted")
    await bus.publish("chat:room:fence", b"fence")
    await eventually(lambda: received.on("chat:room:fence"))
    assert received.on("chat:room:r1") == []
    assert bus.channels == {"chat:room:fence"}


@pytest_twisted.ensureDeferred
async def test_channels_asked_in_one_turn_leave_as_one_command_and_replies_stay_matched(redis_server, buses):
    bus, received = await buses()
    r = redis_server.client()

    def calls(command):
        return r.info("commandstats").get(f"cmdstat_{command}", {}).get("calls", 0)

    channels = [f"chat:profile:p{i}" for i in range(50)]
    subscribes = calls("subscribe")
    await defer.gatherResults([bus.subscribe(c) for c in channels])  # one reactor turn
    assert calls("subscribe") == subscribes + 1
    assert {c: subscribers(r, c) for c in channels} == {c: 1 for c in channels}
    # the 49 extra confirmations did not answer the next command
    assert await bus.subscriber.protocol.ping() in ("PONG", b"PONG", ["pong", ""], [b"pong", b""])
    unsubscribes = calls("unsubscribe")
    leaving, staying = channels[:25], channels[25:]
    await defer.gatherResults([bus.unsubscribe(c) for c in leaving] + [bus.subscribe("chat:room:late")])
    assert calls("unsubscribe") == unsubscribes + 1
    assert [subscribers(r, c) for c in leaving] == [0] * 25
    for channel in (*staying, "chat:room:late"):
        r.publish(channel, channel.encode())
    await eventually(lambda: len(received.messages) == 26)
    assert received.messages == [(c, c.encode()) for c in (*staying, "chat:room:late")]


@pytest_twisted.ensureDeferred
async def test_unsubscribe_then_subscribe_in_one_turn_keeps_the_order(redis_server, buses):
    bus, received = await buses()
    r = redis_server.client()
    await bus.subscribe("chat:room:r1")
    await defer.gatherResults([bus.unsubscribe("chat:room:r1"), bus.subscribe("chat:room:r1")])
    assert subscribers(r, "chat:room:r1") == 1
    await defer.gatherResults([bus.subscribe("chat:room:r2"), bus.unsubscribe("chat:room:r2")])
    assert subscribers(r, "chat:room:r2") == 0


@pytest_twisted.ensureDeferred
async def test_redis_restart_resubscribes_and_fires_on_reconnect(redis_server, buses):
    bus, received = await buses()
    back = []
    bus.on_reconnect(lambda: back.append(True))
    for channel in ("chat:room:r1", "chat:profile:alice"):
        await bus.subscribe(channel)
    await threads.deferToThread(redis_server.restart)  # killed, started on the same port
    await eventually(lambda: back, timeout=20, what="on_reconnect after the restart")
    assert bus.ready and back == [True]
    r = redis_server.client()
    assert subscribers(r, "chat:room:r1") == subscribers(r, "chat:profile:alice") == 1
    r.publish("chat:room:r1", b"after restart")
    await eventually(lambda: received.on("chat:room:r1"))
    assert received.on("chat:room:r1") == [b"after restart"]
    await eventually(lambda: bus.publisher.ready, timeout=20)
    await bus.publish("chat:profile:alice", b"\xffpublished by us")
    await eventually(lambda: received.on("chat:profile:alice"))


@pytest_twisted.ensureDeferred
async def test_killed_pubsub_connection_is_resubscribed_within_seconds(redis_server, buses):
    bus, received = await buses()
    back = []
    bus.on_reconnect(lambda: back.append(True))
    await bus.subscribe("chat:room:r1")
    r = redis_server.client()
    assert r.execute_command("CLIENT", "KILL", "TYPE", "pubsub") == 1
    await eventually(lambda: back, timeout=10, what="resubscribed after CLIENT KILL")
    assert subscribers(r, "chat:room:r1") == 1
    await bus.publish("chat:room:r1", b"again")  # the publishing connection was not touched
    await eventually(lambda: received.on("chat:room:r1") == [b"again"])


@pytest_twisted.ensureDeferred
async def test_publish_fails_fast_while_disconnected(redis_server, buses):
    bus, _ = await buses()
    await threads.deferToThread(redis_server.stop)
    await eventually(lambda: not bus.publisher.ready and not bus.ready, what="bus noticed Redis is gone")
    d = bus.publish("chat:room:r1", b"x")
    assert d.called  # failed at once, nothing queued
    with pytest.raises(ConnectionError):
        await d
    await bus.subscribe("chat:room:r1")  # remembered for later, not an error
    await threads.deferToThread(redis_server.start)
    await eventually(lambda: bus.ready and bus.publisher.ready, timeout=20)
    assert subscribers(redis_server.client(), "chat:room:r1") == 1


@pytest_twisted.ensureDeferred
async def test_redis_unreachable_at_start_then_started(buses):
    server = RedisServer(port=free_port(), start=False)
    try:
        bus, received = await buses(uri=server.uri, wait=False)
        back = []
        bus.on_reconnect(lambda: back.append(True))
        assert not bus.ready
        d = bus.subscribe("chat:room:r1")
        assert d.called
        await d
        await threads.deferToThread(server.start)
        await eventually(lambda: bus.ready, timeout=20, what="bus ready once Redis started")
        assert back == [True]  # subscribed late: devices may have missed events
        server.client().publish("chat:room:r1", b"\x00late")
        await eventually(lambda: received.on("chat:room:r1") == [b"\x00late"])
    finally:
        server.cleanup()
