"""Resume across gateways with real processes: redis-server, `twistd chatcore` publishing by the
contract, two `twistd chatgateway` on that Redis. A device leaves gateway A, events go on, and it
comes back on gateway B: with its token and position, or with neither (the server-side record).
It gets every event it missed once and in order, then live events with no gap or duplicate at
the seam, while events keep being sent through its catch-up."""

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task

from chatgateway.api import chat_pb2 as pb
from chatgateway.auth.devtokens import mint_token
from chatgateway.client.wsclient import GatewayClient
from chatgateway.store.resumepositions import parse_record, resume_key
from support.chat import unique, wait_until
from support.processes import Twistd, free_port
from support.redis import RedisServer

SECRET = "resume-test-secret-0123456789abcdef0123"
BEFORE, AWAY, DURING = 10, 20, 20  # events before the device leaves, while it is away, while it resumes


def token(profile, device):
    return mint_token(SECRET, profile, device_id=device, audience="service_chat_gateway")


@pytest.fixture
def deployment():
    redis = RedisServer()
    core_port = free_port()
    env = {"JWT_SECRET": SECRET, "CACHE_URI": redis.uri, "OAUTH2_ISSUER": "", "LOG_LEVEL": "info"}
    core = Twistd("chatcore", ["--port", core_port], env=env, port=core_port)
    gateways = []
    for name in ("gw-resume-a", "gw-resume-b"):
        port = free_port()
        gateway_env = {
            **env,
            "CHAT_SERVICE_URI": f"127.0.0.1:{core_port}",
            "HTTP_PORT": str(port),
            "GRPC_PORT": str(free_port()),
            "HTTP_INTERFACE": "127.0.0.1",
            "GATEWAY_ID": name,
            "MAX_EVENTS_PER_SECOND": "10000",
        }
        gateways.append(Twistd("chatgateway", ["--workers", "1"], env=gateway_env, port=port))
    core.start()
    for gateway in gateways:
        gateway.start()
    yield redis, gateways
    for gateway in gateways:
        gateway.stop()
    core.stop()
    redis.cleanup()


def url(gateway):
    return f"ws://127.0.0.1:{gateway.port}/ws"


async def connect(gateway, profile, device, **resume):
    auth = "frame" if resume else "header"
    client = await GatewayClient.connect(url(gateway), token(profile, device), device_id=device, auth=auth, **resume)
    connected = await client.next_event("connected")
    return client, connected.connected


def messages(client, room_id):
    """(event id, epoch, offset) of the room's messages the device was sent, in order."""
    return [(e.id, e.epoch, e.offset) for e in client.pending("message") if e.message.room_id == room_id]


async def send(owner, room_id, texts, sent):
    for text in texts:
        sent.append((await owner.send_message(room_id, text)).id)
        await task.deferLater(reactor, 0.005, lambda: None)


async def scenario(deployment, resume_with):
    """Run the scenario; ``resume_with(first, connected)`` gives the resume arguments of the
    second connection. Returns (first connection's messages, second's, every event sent)."""
    redis, (a, b) = deployment
    owner_id, member_id = unique("owner"), unique("member")
    owner, _ = await connect(a, owner_id, "desk")
    room = (await owner.call("CreateRoom", pb.CreateRoomRequest(name="resume", member_ids=[member_id]))).room
    first, connected = await connect(a, member_id, "phone")
    sent = []
    await send(owner, room.id, [f"before {i}" for i in range(BEFORE)], sent)
    await wait_until(lambda: {m[0] for m in messages(first, room.id)} >= set(sent), 20)
    resume = resume_with(first, connected, room.id)
    await first.close()
    # The record of the close is written on gateway A's next turn.
    last_offset = messages(first, room.id)[-1][2]
    admin = redis.client()

    def recorded():
        record = parse_record(admin.hgetall(resume_key(member_id, "phone")))
        return record.get(room.id, (None, 0))[1] >= last_offset

    await wait_until(recorded, 20)
    await send(owner, room.id, [f"away {i}" for i in range(AWAY)], sent)
    # Events keep coming while the device resumes on B: the seam is crossed by live traffic.
    during = defer.Deferred.fromCoroutine(send(owner, room.id, [f"during {i}" for i in range(DURING)], sent))
    second, reconnected = await connect(b, member_id, "phone", **resume)
    await during
    await wait_until(lambda: {m[0] for m in messages(second, room.id)} >= set(sent[BEFORE:]), 30)
    await task.deferLater(reactor, 0.3, lambda: None)  # nothing more arrives (no duplicate after the end)
    result = messages(first, room.id), messages(second, room.id), sent, reconnected
    await second.close()
    await owner.close()
    return result


def check_exactly_once(first, second, sent, reconnected):
    assert reconnected.resumed and reconnected.gateway_id == "gw-resume-b"
    assert [m[0] for m in first] == sent[:BEFORE]
    # Every event after what the first connection had, once, in order, offsets without a hole.
    assert [m[0] for m in second] == sent[BEFORE:]
    offsets = [m[2] for m in first + second]
    assert offsets == list(range(offsets[0], offsets[0] + len(offsets)))
    assert len({m[1] for m in first + second}) == 1  # one epoch


@pytest_twisted.ensureDeferred
async def test_a_device_resumes_on_another_gateway_with_its_token_and_position(deployment):
    def with_token(first, connected, room_id):
        _, epoch, offset = messages(first, room_id)[-1]
        return {"resume_token": connected.resume_token, "positions": {room_id: (epoch, offset)}}

    check_exactly_once(*await scenario(deployment, with_token))


@pytest_twisted.ensureDeferred
async def test_a_device_resumes_on_another_gateway_with_only_its_token(deployment):
    # The token carries where its session started (nothing here); the record of the close is further.
    check_exactly_once(
        *await scenario(deployment, lambda first, connected, room_id: {"resume_token": connected.resume_token})
    )


@pytest_twisted.ensureDeferred
async def test_a_device_that_comes_back_without_token_or_positions_resumes_from_the_server_side_record(deployment):
    check_exactly_once(*await scenario(deployment, lambda first, connected, room_id: {}))
