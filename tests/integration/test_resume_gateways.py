"""Resume across gateways with real processes: redis-server, `twistd chatcore` publishing by the
contract, two `twistd chatgateway` on that Redis. A device leaves gateway A, events go on, and it
comes back on gateway B: with its token and position, or with neither (the server-side record).
It gets every event it missed once and in order, then live events with no gap or duplicate at
the seam, while events keep being sent through its catch-up."""

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task, threads

from chatgateway.api import chat_pb2 as pb
from chatgateway.api import codec
from chatgateway.auth.devtokens import mint_token
from chatgateway.client.wsclient import GatewayClient
from chatgateway.store.resumepositions import parse_record, resume_key
from support.chat import unique, wait_until
from support.grpcclient import StreamDevice
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
        port, grpc_port = free_port(), free_port()
        gateway_env = {
            **env,
            "CHAT_SERVICE_URI": f"127.0.0.1:{core_port}",
            "HTTP_PORT": str(port),
            "GRPC_PORT": str(grpc_port),
            "HTTP_INTERFACE": "127.0.0.1",
            "GATEWAY_ID": name,
            "MAX_EVENTS_PER_SECOND": "10000",
        }
        gateway = Twistd("chatgateway", ["--workers", "1"], env=gateway_env, port=port, also_ports=(grpc_port,))
        gateway.grpc_port = grpc_port
        gateways.append(gateway)
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


async def connect(gateway, profile, device, subprotocol=codec.JSON, **resume):
    auth = "frame" if resume else "header"
    client = await GatewayClient.connect(
        url(gateway), token(profile, device), device_id=device, auth=auth, subprotocol=subprotocol, **resume
    )
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


@pytest.mark.parametrize("subprotocol", [codec.JSON, codec.PROTO])
@pytest_twisted.ensureDeferred
async def test_a_device_resumes_on_another_gateway_with_its_token_and_position(deployment, subprotocol):
    def with_token(first, connected, room_id):
        _, epoch, offset = messages(first, room_id)[-1]
        positions = {room_id: (epoch, offset)}
        return {"resume_token": connected.resume_token, "positions": positions, "subprotocol": subprotocol}

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


@pytest_twisted.ensureDeferred
async def test_a_websocket_device_resumes_on_another_gateways_grpc_stream(deployment):
    _, (a, b) = deployment
    owner_id, member_id = unique("owner"), unique("member")
    owner, _ = await connect(a, owner_id, "desk")
    room = (await owner.call("CreateRoom", pb.CreateRoomRequest(name="resume", member_ids=[member_id]))).room
    first, connected = await connect(a, member_id, "phone")
    sent = []
    await send(owner, room.id, [f"before {i}" for i in range(BEFORE)], sent)
    await wait_until(lambda: {m[0] for m in messages(first, room.id)} >= set(sent), 20)
    _, epoch, offset = messages(first, room.id)[-1]
    await first.close()
    await send(owner, room.id, [f"away {i}" for i in range(AWAY)], sent)

    device = StreamDevice(f"127.0.0.1:{b.grpc_port}")
    try:
        device.send(
            pb.StreamRequest(
                auth_token=token(member_id, "phone"),
                resume_token=connected.resume_token,
                positions=[pb.RoomPosition(room_id=room.id, epoch=epoch, offset=offset)],
            )
        )
        reconnected = (await threads.deferToThread(device.next_event, "connected", None, 20)).connected
        assert reconnected.resumed and reconnected.resume_token.startswith("r1.")
        await send(owner, room.id, [f"live {i}" for i in range(5)], sent)
        got = []
        while len(got) < len(sent) - BEFORE:
            event = await threads.deferToThread(device.next_event, "message", None, 20)
            got.append((event.id, event.epoch, event.offset))
        assert [g[0] for g in got] == sent[BEFORE:]
        assert [g[2] for g in got] == list(range(offset + 1, offset + 1 + len(got)))
    finally:
        device.close()
        await owner.close()


@pytest_twisted.ensureDeferred
async def test_a_device_that_left_a_quiet_room_resumes_on_another_gateway_from_where_it_started(deployment):
    # The member's device gets no event while connected (the room's only events came before),
    # so it holds no position: the gateway read where it started, and its record keeps it.
    redis, (a, b) = deployment
    owner_id, member_id = unique("owner"), unique("member")
    owner, _ = await connect(a, owner_id, "desk")
    room = (await owner.call("CreateRoom", pb.CreateRoomRequest(name="quiet", member_ids=[member_id]))).room
    first, _ = await connect(a, member_id, "phone")
    await first.close()
    admin = redis.client()
    await wait_until(lambda: room.id in parse_record(admin.hgetall(resume_key(member_id, "phone"))), 20)
    assert messages(first, room.id) == []
    sent = []
    await send(owner, room.id, [f"away {i}" for i in range(AWAY)], sent)
    second, reconnected = await connect(b, member_id, "phone")
    await wait_until(lambda: {m[0] for m in messages(second, room.id)} >= set(sent), 30)
    await task.deferLater(reactor, 0.3, lambda: None)
    assert reconnected.resumed
    assert [m[0] for m in messages(second, room.id)] == sent
    await second.close()
    await owner.close()


@pytest_twisted.ensureDeferred
async def test_a_room_joined_while_away_is_caught_up_from_the_join(deployment):
    _, (a, b) = deployment
    owner_id, member_id = unique("owner"), unique("member")
    owner, _ = await connect(a, owner_id, "desk")
    known = (await owner.call("CreateRoom", pb.CreateRoomRequest(name="known", member_ids=[member_id]))).room
    first, _ = await connect(a, member_id, "phone")
    await first.close()
    await task.deferLater(reactor, 0.3, lambda: None)  # the record of the close is written
    sent = []
    await send(owner, known.id, ["before the new room"], sent)
    joined = (await owner.call("CreateRoom", pb.CreateRoomRequest(name="joined", member_ids=[]))).room
    await send(owner, joined.id, ["before the join"], [])
    request = pb.AddRoomSubscriptionsRequest(room_id=joined.id, members=[pb.RoomSubscription(profile_id=member_id)])
    await owner.call("AddRoomSubscriptions", request)
    after_join = []
    await send(owner, joined.id, [f"after the join {i}" for i in range(3)], after_join)

    second, reconnected = await connect(b, member_id, "phone")
    assert reconnected.resumed and joined.id in reconnected.room_ids
    await wait_until(lambda: {m[0] for m in messages(second, joined.id)} >= set(after_join), 30)
    await task.deferLater(reactor, 0.3, lambda: None)
    events = [e.message for e in second.pending("message") if e.message.room_id == joined.id]
    # From the join's SYSTEM event on, nothing before it.
    assert [(e.type, e.payload["action"]) for e in events[:1]] == [(pb.RoomEvent.SYSTEM, "member_added")]
    assert [e.id for e in events[1:]] == after_join
    assert [m[0] for m in messages(second, known.id)] == sent
    await second.close()
    await owner.close()


@pytest_twisted.ensureDeferred
async def test_a_grpc_stream_resumes_with_the_token_in_its_metadata(deployment):
    _, (a, b) = deployment
    owner_id, member_id = unique("owner"), unique("member")
    owner, _ = await connect(a, owner_id, "desk")
    room = (await owner.call("CreateRoom", pb.CreateRoomRequest(name="resume", member_ids=[member_id]))).room
    first, connected = await connect(a, member_id, "phone")
    sent = []
    await send(owner, room.id, [f"before {i}" for i in range(3)], sent)
    await wait_until(lambda: {m[0] for m in messages(first, room.id)} >= set(sent), 20)
    await first.close()
    await task.deferLater(reactor, 0.3, lambda: None)  # the record of the close is written
    await send(owner, room.id, [f"away {i}" for i in range(5)], sent)
    metadata = [
        ("authorization", f"Bearer {token(member_id, 'phone')}"),
        ("x-resume-token", connected.resume_token),
    ]
    device = StreamDevice(f"127.0.0.1:{b.grpc_port}", metadata=metadata)
    try:
        reconnected = (await threads.deferToThread(device.next_event, "connected", None, 20)).connected
        assert reconnected.resumed
        got = [(await threads.deferToThread(device.next_event, "message", None, 20)).id for _ in range(5)]
        assert got == sent[3:]
    finally:
        device.close()
        await owner.close()
