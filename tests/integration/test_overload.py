"""Overload against real processes: a room flooded beyond what the gateway can deliver, a blocked reactor.

The flood test runs a real redis-server, a scripted core (tests/support/fakecore.py),
one `twistd chatgateway` and a load process of room members
(tests/support/floodmembers.py), and PUBLISHes serialized ServerEvents on the room's
channel directly, as the core does. Nothing here asserts speed: deadlines only bound
the waits.
"""

import json
import time
import urllib.error
import urllib.request

import pytest_twisted
from twisted.internet import reactor

from chatgateway.api import chat_pb2 as pb
from chatgateway.redisconn.connection import RedisConnection
from chatgateway.redisconn.uri import parse_uri
from support.fakecore import FakeCore
from support.loadgen import LineProcess
from support.processes import one_gateway, until
from support.redis import eventually

SECRET = "overload-test-secret-0123456789abcdef01234"
ROOM = "flooded"
MEMBERS = 300
BURST = 20_000  # x 300 members: minutes of work; the backlog bound is about 2 s of it


def event_bytes(event_id, room=ROOM):
    """A ~200-byte ServerEvent like the core publishes (as bench/suite.py's)."""
    event = pb.RoomEvent(id=event_id, room_id=room, sender_id="publisher", type=pb.RoomEvent.TEXT)
    event.payload.update({"text": "x" * 120})
    return pb.ServerEvent(id=event_id, message=event).SerializeToString()


def get(url):
    try:
        with urllib.request.urlopen(url, timeout=10) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def pubsub_clients(redis_client):
    """Ids of the pub/sub connections Redis has: the gateway's subscriber."""
    return {client["id"] for client in redis_client.client_list(_type="pubsub")}


def test_a_room_flooded_beyond_capacity_sheds_old_events_tells_devices_and_keeps_redis(tmp_path, redis_server):
    core = FakeCore()
    core.answers["SearchRooms"] = lambda request, context: [pb.SearchRoomsResponse(data=[pb.Room(id=ROOM)])]
    gateway = one_gateway(
        tmp_path,
        core,
        SECRET,
        CACHE_URI=redis_server.uri,
        GATEWAY_ID="gw-flooded",
        MAX_UNAUTHENTICATED_PER_ADDRESS=0,
        # Room for whatever the load process is slow to read (it shares the CPUs): the
        # test is about the fan-out's backlog, not slow consumers.
        SEND_BUFFER_BYTES=64 * 1024 * 1024,
    )
    port = gateway.port
    gateway.start()
    members = None
    http = f"http://127.0.0.1:{port}"
    try:
        members = LineProcess(
            "tests/support/floodmembers.py",
            ["--port", port, "--secret", SECRET, "--count", MEMBERS],
            log_path=tmp_path / "members.log",
        )
        assert int(members.expect("READY", 180)) == MEMBERS

        def report():
            members.send("REPORT")
            return json.loads(members.expect("REPORT", 60))

        r = redis_server.client(decode_responses=False)
        subscriber = pubsub_clients(r)
        assert len(subscriber) == 1
        channel = f"chat:room:{ROOM}"
        pipe = r.pipeline(transaction=False)
        for n in range(BURST):
            pipe.publish(channel, event_bytes(str(n)))
            if n % 1000 == 999:
                pipe.execute()
        pipe.execute()
        r.publish(channel, event_bytes("end"))  # the newest event is never shed

        until(
            lambda: report()["marked"].get("end") == MEMBERS, 180, "every member received the last event of the burst"
        )
        r.publish(channel, event_bytes("after"))  # the backlog is gone: a new event goes straight out
        result = until(
            lambda: (rep := report())["marked"].get("after") == MEMBERS and rep,
            60,
            "every member received the event published after the burst",
        )

        print(
            f"\n{MEMBERS} members, {BURST} events: {result['messages']} deliveries of the burst, "
            f"{result['notices']} DATA_LOSS notices"
        )
        assert result["open"] == MEMBERS, result["closes"]
        assert result["told"] == MEMBERS  # every member lost events and was told
        assert result["out_of_order"] == 0
        assert 0 < result["messages"] < MEMBERS * BURST  # delivered some, shed the oldest

        status, body = get(http + "/readyz")
        assert status == 200, body
        assert pubsub_clients(r) == subscriber  # the same subscription all along: never dropped
        _, metrics = get(http + "/metrics")
        dropped = [
            line
            for line in metrics.splitlines()
            if line.startswith("chatgateway_fanout_dropped_total{") and 'chatgateway_message_kind="message"' in line
        ]
        assert dropped and float(dropped[0].split()[-1]) > 0, dropped

        log = gateway.log_text()
        assert "fan-out overloaded" in log
        for sign_of_trouble in (
            "unreachable",
            "health check failed",
            "Not received Redis response",
            "event bus reconnected",
            "Traceback (most recent call last)",
        ):
            assert sign_of_trouble not in log, gateway.log_tail(60)
    finally:
        if members is not None:
            members.stop()
        gateway.stop()
        core.stop()


@pytest_twisted.ensureDeferred
async def test_a_reactor_blocked_longer_than_the_timeout_keeps_a_healthy_redis(redis_server):
    redis = RedisConnection(parse_uri(redis_server.uri), reactor, "blocked", timeout=1.0)
    redis.start()
    try:
        await eventually(lambda: redis.ready, what="connected")
        reconnected = []
        redis.on_ready(reconnected.append)

        # A reactor turn of 2.5 timeouts right after the command: not even sent yet when
        # its timer comes due. (A sleep stands in for CPU-bound work on the reactor thread.)
        pong = redis.execute("PING")
        time.sleep(2.5)
        assert await pong == "PONG"

        # The reply arrives while the reactor is blocked, and waits unread in the socket.
        slow = redis.execute("DEBUG", "SLEEP", "0.3")
        pong = redis.execute("PING")
        reactor.callLater(0.05, time.sleep, 2.5)
        assert await slow == "OK"
        assert await pong == "PONG"

        assert redis.ready and reconnected == []  # the connection was never dropped
    finally:
        await redis.stop()
