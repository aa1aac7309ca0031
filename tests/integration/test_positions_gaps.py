"""Gap-free live delivery with real processes: redis-server, `twistd chatcore` publishing by
the contract, a `twistd chatgateway`; pub/sub killed and messages lost while events flow."""

import pytest
import pytest_twisted
from twisted.internet import reactor, task

from chatgateway.api import chat_pb2 as pb
from chatgateway.api import codec
from chatgateway.auth.devtokens import mint_token
from chatgateway.bus import roomstream
from chatgateway.client.wsclient import GatewayClient
from support.chat import unique, wait_until
from support.processes import Twistd, free_port
from support.redis import RedisServer

SECRET = "positions-test-secret-0123456789abcdef01"
EVENTS = 240


def token(profile, device):
    return mint_token(SECRET, profile, device_id=device, audience="service_chat_gateway")


@pytest.fixture
def deployment():
    redis = RedisServer()
    core_port, port = free_port(), free_port()
    env = {"JWT_SECRET": SECRET, "CACHE_URI": redis.uri, "OAUTH2_ISSUER": "", "LOG_LEVEL": "info"}
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
            "GATEWAY_ID": "gw-positions",
            "MAX_EVENTS_PER_SECOND": "10000",
        },
        port=port,
    )
    core.start()
    gateway.start()
    yield redis, gateway
    gateway.stop()
    core.stop()
    redis.cleanup()


async def connect(gateway, profile, device, subprotocol=codec.JSON):
    client = await GatewayClient.connect(
        f"ws://127.0.0.1:{gateway.port}/ws", token(profile, device), subprotocol=subprotocol
    )
    await client.next_event("connected")
    return client


def lose_one(redis, room_id, text):
    """An event published by the contract whose pub/sub message is lost: positioned and kept
    in the stream, PUBLISHed where no gateway listens."""
    event = pb.RoomEvent(id=unique("lost"), room_id=room_id, sender_id="core", type=pb.RoomEvent.SYSTEM)
    event.payload.update({"text": text})
    script, keys, args = roomstream.publish_call(
        room_id, pb.ServerEvent(id=event.id, message=event).SerializeToString()
    )
    args[0] = "chat:nowhere"
    redis.client(decode_responses=False).eval(script, len(keys), *keys, *args)
    return event.id


def room_events(client, room_id):
    """What the device was sent: messages of the room (id, epoch, offset) and errors."""
    events = client.pending()
    messages = [(e.id, e.epoch, e.offset) for e in events if e.HasField("message") and e.message.room_id == room_id]
    errors = [e.error.status for e in events if e.HasField("error")]
    return messages, errors


@pytest_twisted.ensureDeferred
async def test_every_device_gets_every_event_once_in_order_through_killed_pubsub_and_lost_messages(deployment):
    redis, gateway = deployment
    owner_id, member_id = unique("owner"), unique("member")
    owner = await connect(gateway, owner_id, "d")
    room = (await owner.call("CreateRoom", pb.CreateRoomRequest(name="positions", member_ids=[member_id]))).room
    devices = [
        owner,
        await connect(gateway, member_id, "json"),
        await connect(gateway, member_id, "proto", codec.PROTO),
    ]
    admin = redis.client()
    sent = []
    kills = 0
    for i in range(EVENTS):
        if i % 60 == 20:
            # The gateway resubscribed after the last kill (the events meanwhile still flow).
            await wait_until(lambda: admin.execute_command("CLIENT", "LIST", "TYPE", "pubsub"), 20)
            kills += admin.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
        if i % 60 == 40:
            sent.append(lose_one(redis, room.id, f"lost {i}"))
            continue
        while True:
            try:
                sent.append((await owner.send_message(room.id, f"n{i}")).id)
                break
            except Exception:  # noqa: BLE001 - the core's publisher may be reconnecting: send again
                await task.deferLater(reactor, 0.05, lambda: None)
    assert kills == 4  # the gateway's subscriber, each time

    def complete(device):
        return {m[0] for m in room_events(device, room.id)[0]} >= set(sent)

    for device in devices:
        await wait_until(lambda device=device: complete(device), 30)
    for device in devices:
        messages, errors = room_events(device, room.id)
        assert errors == []  # no DATA_LOSS: the stream filled every gap
        ours = [m for m in messages if m[0] in set(sent)]
        assert [m[0] for m in ours] == sent  # each once, in order
        assert len({m[1] for m in messages}) == 1  # one epoch
        offsets = [m[2] for m in messages]
        assert offsets == list(range(offsets[0], offsets[0] + len(offsets)))  # consecutive: nothing skipped
    for device in devices:
        await device.close()
    assert "reading the streams" in gateway.log_tail(200)


@pytest_twisted.ensureDeferred
async def test_a_stream_lost_with_a_redis_restart_is_caught_up_from_the_core_and_delivery_goes_on(deployment):
    redis, gateway = deployment
    owner_id, member_id = unique("owner"), unique("member")
    owner = await connect(gateway, owner_id, "d")
    room = (await owner.call("CreateRoom", pb.CreateRoomRequest(name="flushed", member_ids=[member_id]))).room
    member = await connect(gateway, member_id, "d", codec.PROTO)
    first = await owner.send_message(room.id, "before")
    before = await member.next_event("message", lambda e: e.message.id == first.id)
    assert before.offset >= 1 and before.epoch

    redis.restart(kill=True)  # the room's stream and position are gone

    async def delivered():
        try:
            sent = await owner.send_message(room.id, "after")
            await member.next_event("message", lambda e: e.message.id == sent.id, timeout=2)
            return True
        except Exception:  # noqa: BLE001 - the core reconnects too
            return False

    await wait_until(delivered, 30, interval=0.2)
    later = await owner.send_message(room.id, "later")
    event = await member.next_event("message", lambda e: e.message.id == later.id)
    assert event.epoch != before.epoch  # a new epoch: the old positions are void
    # The old epoch's rest came from the core's history (it has every event it stored), so
    # the device is told of no loss (docs/architecture.md#catch-up).
    assert member.pending("error") == [] and member.pending("gap") == []
    await owner.close()
    await member.close()
