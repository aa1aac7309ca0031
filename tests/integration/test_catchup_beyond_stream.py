"""Catch-up beyond the room's stream with real processes: redis-server, `twistd chatcore`
publishing by the contract, a `twistd chatgateway`, a real WebSocket device.

A device whose gateway missed more events than the room's stream keeps (ROOM_STREAM_MAX_LEN
small) gets the missing range from the core's history (GetHistory after its position); events
the core's history does not hold either reach it as a GapEvent naming the room, the epoch and
the first and last offsets missing. The same for a device that was disconnected that long and
resumes with its token."""

import os
import signal

import grpc
import pytest
import pytest_twisted
from twisted.internet import reactor, task
from twisted.internet.threads import deferToThread

from chatgateway.api import chat_pb2 as pb
from chatgateway.api import chat_pb2_grpc, codec
from chatgateway.auth.devtokens import mint_token
from chatgateway.bus import roomstream
from chatgateway.client.wsclient import GatewayClient
from support.chat import unique, wait_until
from support.processes import Twistd, children_of, free_port
from support.redis import RedisServer
from support.scrape import catchup_reads, core_calls

SECRET = "catchup-test-secret-0123456789abcdef0123"
KEPT = 5  # ROOM_STREAM_MAX_LEN
AWAY = 30  # events the gateway misses: far more than the stream keeps


def token(profile, device="d"):
    return mint_token(SECRET, profile, device_id=device, audience="service_chat_gateway")


@pytest.fixture
def deployment():
    redis = RedisServer()
    # One entry per stream node, so MAXLEN ~ trims to KEPT entries (it trims whole nodes only).
    redis.client().config_set("stream-node-max-entries", 1)
    core_port, port = free_port(), free_port()
    env = {
        "JWT_SECRET": SECRET,
        "CACHE_URI": redis.uri,
        "OAUTH2_ISSUER": "",
        "LOG_LEVEL": "info",
        "ROOM_STREAM_MAX_LEN": str(KEPT),
    }
    core = Twistd("chatcore", ["--port", core_port], env=env, port=core_port)
    gateway = Twistd(
        "chatgateway",
        ["--workers", "1"],
        env={
            **env,
            "CHAT_SERVICE_URI": f"127.0.0.1:{core_port}",
            "HTTP_PORT": str(port),
            "GRPC_PORT": str(free_port()),
            "HTTP_INTERFACE": "127.0.0.1",
            "GATEWAY_ID": "gw-catchup",
            "MAX_EVENTS_PER_SECOND": "10000",
        },
        port=port,
    )
    core.start()
    gateway.start()
    yield redis, core, gateway
    gateway.stop()
    core.stop()
    redis.cleanup()


async def connect(gateway, profile, subprotocol=codec.JSON):
    client = await GatewayClient.connect(f"ws://127.0.0.1:{gateway.port}/ws", token(profile), subprotocol=subprotocol)
    await client.next_event("connected")
    return client


def signal_gateway(gateway, sig):
    for pid in [gateway.pid, *children_of(gateway.pid)]:
        os.kill(pid, sig)


def send_to_core(core_port, owner_id, room_id, count):
    """``count`` messages sent to the core directly (it stores and publishes them), blocking."""
    metadata = [("authorization", f"Bearer {token(owner_id)}")]
    with grpc.insecure_channel(f"127.0.0.1:{core_port}") as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        ids = []
        for i in range(count):
            event = pb.RoomEvent(room_id=room_id, type=pb.RoomEvent.TEXT)
            event.payload.update({"text": f"away {i}"})
            ids.append(stub.SendEvent(pb.SendEventRequest(event=event), metadata=metadata, timeout=10).event.id)
        return ids


def lose(redis, room_id, count):
    """``count`` events published by the contract that the core never stored, their pub/sub
    messages sent where no gateway listens: only the room's stream has them (for a while)."""
    client = redis.client(decode_responses=False)
    ids = []
    for i in range(count):
        event = pb.RoomEvent(id=unique("unstored"), room_id=room_id, sender_id="x", type=pb.RoomEvent.TEXT)
        event.payload.update({"text": f"unstored {i}"})
        script, keys, args = roomstream.publish_call(
            room_id, pb.ServerEvent(id=event.id, message=event).SerializeToString(), max_len=KEPT
        )
        args[0] = "chat:nowhere"
        client.eval(script, len(keys), *keys, *args)
        ids.append(event.id)
    return ids


def received(client, room_id, since):
    """(kind, id or (first, last), epoch, offset or reason) of the room's messages, gaps and
    errors the device received after the first ``since`` events it holds."""
    out = []
    for e in client.pending()[since:]:
        if e.HasField("message") and e.message.room_id == room_id:
            out.append(("message", e.id, e.epoch, e.offset))
        elif e.HasField("gap") and e.gap.room_id == room_id:
            out.append(("gap", (e.gap.first_offset, e.gap.last_offset), e.gap.epoch, e.gap.reason))
        elif e.HasField("error"):
            out.append(("error", e.error.status, "", 0))
    return out


async def stream_length(redis, room_id):
    return await deferToThread(redis.client().xlen, roomstream.stream_key(room_id))


@pytest_twisted.ensureDeferred
async def test_a_device_away_longer_than_the_stream_keeps_gets_the_missing_range_from_the_core(deployment):
    redis, core, gateway = deployment
    owner_id, member_id = unique("owner"), unique("member")
    owner = await connect(gateway, owner_id)
    room = (await owner.call("CreateRoom", pb.CreateRoomRequest(name="away", member_ids=[member_id]))).room
    member = await connect(gateway, member_id, codec.PROTO)
    first = await owner.send_message(room.id, "before")
    await member.next_event("message", lambda e: e.message.id == first.id)
    since = len(member.pending())  # what came before is not this test's

    # The gateway is stopped and its subscription killed: whatever is published now it never
    # receives over pub/sub, and the stream keeps only the last KEPT events.
    signal_gateway(gateway, signal.SIGSTOP)
    try:
        admin = redis.client()
        assert admin.execute_command("CLIENT", "KILL", "TYPE", "pubsub") >= 1
        away = await deferToThread(send_to_core, core.port, owner_id, room.id, AWAY)
        assert await stream_length(redis, room.id) <= KEPT + 1
    finally:
        signal_gateway(gateway, signal.SIGCONT)
    last = await owner.send_message(room.id, "back")  # through the gateway once it is back

    def complete():
        return last.id in [r[1] for r in received(member, room.id, since) if r[0] == "message"]

    await wait_until(complete, 30)
    await task.deferLater(reactor, 0.3, lambda: None)  # anything late (a duplicate) would show now
    got = received(member, room.id, since)
    messages = [r for r in got if r[0] == "message"]
    assert [r for r in got if r[0] != "message"] == []  # no gap, no DATA_LOSS
    assert [m[1] for m in messages] == away + [last.id]  # every one, once, in order
    offsets = [m[3] for m in messages]
    assert offsets == list(range(offsets[0], offsets[0] + len(offsets)))
    assert len({m[2] for m in messages}) == 1
    reads = catchup_reads(gateway.port)
    assert reads["core"] >= 1 and reads["gaps"] == 0  # the range came from the core's history
    assert core_calls(gateway.port).get("GetHistory", 0) == reads["core"]
    assert "Traceback" not in gateway.log_tail(300)
    await owner.close()
    await member.close()


@pytest_twisted.ensureDeferred
async def test_what_neither_the_stream_nor_the_cores_history_holds_is_a_gap_event_with_its_positions(deployment):
    redis, core, gateway = deployment
    owner_id, member_id = unique("owner"), unique("member")
    owner = await connect(gateway, owner_id)
    room = (await owner.call("CreateRoom", pb.CreateRoomRequest(name="gap", member_ids=[member_id]))).room
    member = await connect(gateway, member_id)
    first = await owner.send_message(room.id, "before")
    before = await member.next_event("message", lambda e: e.message.id == first.id)
    since = len(member.pending())

    # AWAY events the core never stored, and whose pub/sub messages were lost: the stream keeps
    # the last KEPT of them; the rest nobody holds.
    lost = await deferToThread(lose, redis, room.id, AWAY)
    last = await owner.send_message(room.id, "after")  # its offset shows the gateway the hole

    def complete():
        return last.id in [r[1] for r in received(member, room.id, since) if r[0] == "message"]

    await wait_until(complete, 30)
    await task.deferLater(reactor, 0.3, lambda: None)
    got = received(member, room.id, since)
    gaps = [r for r in got if r[0] == "gap"]
    messages = [r for r in got if r[0] == "message"]
    assert [r for r in got if r[0] == "error"] == []
    assert len(gaps) == 1 and got[0][0] == "gap"  # the gap first, then what the stream kept
    (first_missing, last_missing), epoch, reason = gaps[0][1], gaps[0][2], gaps[0][3]
    assert epoch == before.epoch and reason
    assert first_missing == before.offset + 1
    kept = [m for m in messages if m[1] in set(lost)]
    assert kept and last_missing == kept[0][3] - 1  # up to the stream's oldest entry
    assert [m[1] for m in kept] == lost[-len(kept) :]
    assert [m[1] for m in messages] == [m[1] for m in kept] + [last.id]
    offsets = [m[3] for m in messages]
    assert offsets == list(range(last_missing + 1, last_missing + 1 + len(offsets)))
    assert catchup_reads(gateway.port)["gaps"] == 2  # the member's device and the owner's
    await owner.close()
    await member.close()


async def away_and_back(gateway, member_id, connected):
    """The member's device signs in again with the resume token of its last ``connected``
    (in the first frame): a new client."""
    return await GatewayClient.connect(
        f"ws://127.0.0.1:{gateway.port}/ws",
        token(member_id),
        subprotocol=codec.PROTO,
        auth="frame",
        resume_token=connected.resume_token,
    )


@pytest_twisted.ensureDeferred
async def test_a_device_disconnected_longer_than_the_stream_keeps_resumes_from_the_cores_history(deployment):
    redis, core, gateway = deployment
    owner_id, member_id = unique("owner"), unique("member")
    owner = await connect(gateway, owner_id)
    room = (await owner.call("CreateRoom", pb.CreateRoomRequest(name="offline", member_ids=[member_id]))).room
    member = await GatewayClient.connect(f"ws://127.0.0.1:{gateway.port}/ws", token(member_id), subprotocol=codec.PROTO)
    connected = (await member.next_event("connected")).connected
    first = await owner.send_message(room.id, "before")
    await member.next_event("message", lambda e: e.message.id == first.id)
    await member.close()  # the device goes away

    away = await deferToThread(send_to_core, core.port, owner_id, room.id, AWAY)
    assert await stream_length(redis, room.id) <= KEPT + 1  # the stream lost most of them
    reads_before = catchup_reads(gateway.port)["core"]
    back = await away_and_back(gateway, member_id, connected)
    assert (await back.next_event("connected")).connected.resumed
    last = await owner.send_message(room.id, "back")

    def complete():
        return last.id in [r[1] for r in received(back, room.id, 0) if r[0] == "message"]

    await wait_until(complete, 30)
    await task.deferLater(reactor, 0.3, lambda: None)
    got = received(back, room.id, 0)
    assert [r for r in got if r[0] != "message"] == []  # no gap, no DATA_LOSS
    assert [r[1] for r in got] == away + [last.id]  # every one, once, in order
    assert catchup_reads(gateway.port)["core"] > reads_before  # the range came from the core
    await owner.close()
    await back.close()


@pytest_twisted.ensureDeferred
async def test_a_device_disconnected_past_what_the_core_holds_is_told_the_gap_with_its_positions(deployment):
    redis, core, gateway = deployment
    owner_id, member_id = unique("owner"), unique("member")
    owner = await connect(gateway, owner_id)
    room = (await owner.call("CreateRoom", pb.CreateRoomRequest(name="offline-gap", member_ids=[member_id]))).room
    member = await GatewayClient.connect(f"ws://127.0.0.1:{gateway.port}/ws", token(member_id), subprotocol=codec.PROTO)
    connected = (await member.next_event("connected")).connected
    first = await owner.send_message(room.id, "before")
    before = await member.next_event("message", lambda e: e.message.id == first.id)
    await member.close()

    lost = await deferToThread(lose, redis, room.id, AWAY)  # the core never stored them
    back = await away_and_back(gateway, member_id, connected)
    assert (await back.next_event("connected")).connected.resumed
    last = await owner.send_message(room.id, "after")

    def complete():
        return last.id in [r[1] for r in received(back, room.id, 0) if r[0] == "message"]

    await wait_until(complete, 30)
    got = received(back, room.id, 0)
    gaps = [r for r in got if r[0] == "gap"]
    assert len(gaps) == 1 and got[0][0] == "gap"  # first the gap, then what the stream kept
    (first_missing, last_missing), epoch = gaps[0][1], gaps[0][2]
    assert epoch == before.epoch and first_missing == before.offset + 1
    kept = [r for r in got if r[0] == "message" and r[1] in set(lost)]
    assert kept and last_missing == kept[0][3] - 1
    assert [r[1] for r in kept] == lost[-len(kept) :]
    assert [r for r in got if r[0] == "error"] == []
    await owner.close()
    await back.close()
