"""The gRPC edge and the Connect protocol of a real `twistd chatgateway --dev` process.

gRPC devices (grpcio) and WebSocket devices share rooms; every forwarded method
goes through each of the three surfaces; 2,000 gRPC streams are held by one
process without a thread each.
"""

import asyncio
import json
import time
import urllib.request

import grpc
import pytest
import pytest_twisted
from google.protobuf import any_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from twisted.internet import threads

from chatgateway.api import chat_pb2 as pb
from chatgateway.api import codec
from chatgateway.auth.devtokens import mint_token
from chatgateway.client.wsclient import CallError, GatewayClient
from support.chat import unique
from support.grpcclient import AioLoop, ConnectError, StreamDevice, connect_call, connect_method, stream_metadata, unary
from support.processes import Twistd, free_port


def text_event(room_id, text):
    event = pb.RoomEvent(room_id=room_id, type=pb.RoomEvent.TEXT)
    event.payload.update({"text": text})
    return event


def packed(message):
    body = any_pb2.Any()
    body.Pack(message)
    return body


def thread_names(pid):
    import collections
    import os

    names = collections.Counter()
    for tid in os.listdir(f"/proc/{pid}/task"):
        # a thread may end between the listing and the read
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as comm:
                names[comm.read().strip()] += 1
        except FileNotFoundError:
            continue
    return dict(names)


def threads_of(pid):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("Threads:"):
                return int(line.split()[1])
    raise AssertionError("no Threads line")


async def ws_device(gw, profile, device=None, subprotocol=codec.JSON):
    client = await GatewayClient.connect(gw.url, gw.token(profile, device), subprotocol=subprotocol)
    await client.next_event("connected")
    return client


# ---------------------------------------------------------------- streams


@pytest_twisted.ensureDeferred
async def test_grpc_and_websocket_devices_chat_both_ways_and_replacement_ends_the_older(dev_gateway):
    alice_id, bob_id = unique("alice"), unique("bob")
    alice = await ws_device(dev_gateway, alice_id)
    bob = StreamDevice(dev_gateway.grpc, dev_gateway.token(bob_id, "phone"))
    try:
        connected = (await bob.anext_event()).connected  # the first event
        assert (connected.profile_id, connected.device_id) == (bob_id, "phone")
        assert connected.gateway_id and connected.heartbeat_interval_sec > 0

        room = (await alice.call("CreateRoom", pb.CreateRoomRequest(name="mixed", member_ids=[bob_id]))).room
        added = await bob.anext_event("subscription_event")
        assert added.subscription_event.room_id == room.id

        sent = await alice.send_message(room.id, "hello over gRPC")
        got = await bob.anext_event("message", lambda e: e.message.id == sent.id)
        assert got.message.payload["text"] == "hello over gRPC" and got.message.sender_id == alice_id

        bob.command(request_id="1", room_event=text_event(room.id, "hello over WebSocket"))
        result = (await bob.aresult("1")).command_result
        assert not result.HasField("error")
        stored = pb.SendEventResponse()
        result.body.Unpack(stored)
        got = await alice.next_event("message", lambda e: e.message.id == stored.event.id)
        assert got.message.payload["text"] == "hello over WebSocket" and got.message.sender_id == bob_id

        # the forwarded methods work from inside the gRPC stream too (the `call` command)
        bob.command(
            request_id="2", call=pb.CallCommand(method="GetHistory", body=packed(pb.GetHistoryRequest(room_id=room.id)))
        )
        reply = (await bob.aresult("2")).command_result
        history = pb.GetHistoryResponse()
        assert reply.body.Unpack(history)
        assert {sent.id, stored.event.id} <= {e.id for e in history.events}

        # typing from the WebSocket device reaches the gRPC one
        await alice.command(typing=pb.TypingCommand(room_id=room.id, typing=True))
        typing = await bob.anext_event("typing_event")
        assert typing.typing_event.profile_id == alice_id

        # the same device connects again: the older stream ends, ABORTED / 4001
        newer = StreamDevice(dev_gateway.grpc, dev_gateway.token(bob_id, "phone"))
        try:
            await newer.anext_event("connected")
            code, details, trailing = await bob.await_end()
            assert code == grpc.StatusCode.ABORTED
            assert details == "replaced by a newer connection of this device"
            assert trailing["chat-close-code"] == "4001"
            again = await alice.send_message(room.id, "to the newer stream")
            await newer.anext_event("message", lambda e: e.message.id == again.id)
        finally:
            newer.close()
    finally:
        bob.close()
        await alice.close()


@pytest_twisted.ensureDeferred
async def test_stream_auth_in_the_first_message_and_refusals(dev_gateway):
    profile = unique("framer")
    device = StreamDevice(dev_gateway.grpc)  # no metadata
    try:
        device.send(pb.StreamRequest(auth_token=dev_gateway.token(profile), device_id="tablet"))
        connected = (await device.anext_event("connected")).connected
        assert (connected.profile_id, connected.device_id) == (profile, "tablet")
        device.send(
            pb.StreamRequest(command=pb.ClientCommand(request_id="x", subscribe=pb.RoomsCommand(room_ids=["nope"])))
        )
        denied = (await device.aresult("x")).command_result
        assert denied.error.status == "PERMISSION_DENIED"
    finally:
        device.close()

    bad = StreamDevice(dev_gateway.grpc, "not-a-jwt")
    code, details, trailing = await bad.await_end()
    assert code == grpc.StatusCode.UNAUTHENTICATED and trailing["chat-close-code"] == "4401"
    bad.close()

    wrong_audience = StreamDevice(dev_gateway.grpc)
    wrong_audience.send(pb.StreamRequest(auth_token=dev_gateway.token(profile, audience="another-service")))
    code, details, _ = await wrong_audience.await_end()
    assert code == grpc.StatusCode.UNAUTHENTICATED and "audience" in details
    wrong_audience.close()


def test_health_and_reflection(dev_gateway):
    with grpc.insecure_channel(dev_gateway.grpc) as channel:
        checker = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + 10
        while True:  # SERVING once the first readiness round has run
            status = checker.Check(health_pb2.HealthCheckRequest(service="chat.v1.ChatService"), timeout=5).status
            if status == health_pb2.HealthCheckResponse.SERVING or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert status == health_pb2.HealthCheckResponse.SERVING
        assert checker.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status == status

        reflector = reflection_pb2_grpc.ServerReflectionStub(channel)
        answers = list(
            reflector.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
        )
        services = {s.name for s in answers[0].list_services_response.service}
        assert {"chat.v1.ChatService", "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= services
        files = list(
            reflector.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(file_containing_symbol="chat.v1.ChatService")]), timeout=5
            )
        )
        assert files[0].file_descriptor_response.file_descriptor_proto  # what grpcurl describes from


def test_stopping_the_gateway_ends_streams_with_unavailable(tmp_path):
    secret = "stopping-test-secret-0123456789abcdef0123"
    port, grpc_port = free_port(), free_port()
    process = Twistd(
        "chatgateway",
        ["--dev", "--http-port", port, "--grpc-port", grpc_port],
        env={"JWT_SECRET": secret},
        port=port,
        log_dir=tmp_path,
        also_ports=[grpc_port],
    )
    process.start()
    target = f"127.0.0.1:{grpc_port}"
    tokens = [
        mint_token(secret, unique("leaving"), issuer="chatgateway-dev", audience="service_chat_gateway")
        for _ in range(3)
    ]
    devices = [StreamDevice(target, t) for t in tokens]
    try:
        for device in devices:
            device.next_event("connected")
        started = time.monotonic()
        assert process.stop() in (0, -15)
        stopped = time.monotonic() - started
        for device in devices:
            code, details, trailing = device.wait_end(5)
            assert code == grpc.StatusCode.UNAVAILABLE and trailing["chat-close-code"] == "1001"
            assert details.startswith("gateway")  # with a reconnect hint when the gateway drains
    finally:
        for device in devices:
            device.close()
    assert stopped < 5
    assert "Traceback (most recent call last)" not in process.log_text(), process.log_tail(60)


# ---------------------------------------------------------------- the ten methods, three surfaces


class CallFailed(Exception):
    def __init__(self, status, message):
        super().__init__(f"{status}: {message}")
        self.status = status


class WebSocketSurface:
    def __init__(self, gw):
        self.gw = gw
        self.clients = {}

    async def caller(self, profile):
        client = await ws_device(self.gw, profile)
        self.clients[profile] = client

        async def call(method, request):
            try:
                return await client.call(method, request)
            except CallError as e:
                raise CallFailed(e.detail.status, e.detail.message) from None

        return call

    async def close(self):
        for client in self.clients.values():
            await client.close()


class ConnectSurface:
    def __init__(self, gw):
        self.gw = gw

    async def caller(self, profile):
        token = self.gw.token(profile)

        async def call(method, request):
            try:
                response = await threads.deferToThread(connect_call, self.gw.http, method, request, token)
            except ConnectError as e:
                raise CallFailed(e.code.upper(), e.message) from None
            return [response] if method == "SearchRooms" else response  # the unary fallback: one merged page

        return call

    async def close(self):
        pass


class GrpcSurface:
    def __init__(self, gw):
        self.channel = grpc.insecure_channel(gw.grpc)
        self.gw = gw

    async def caller(self, profile):
        token = self.gw.token(profile)

        async def call(method, request):
            try:
                return await threads.deferToThread(unary, self.channel, method, request, token)
            except grpc.RpcError as e:
                raise CallFailed(e.code().name, e.details()) from None

        return call

    async def close(self):
        self.channel.close()


SURFACES = {"websocket": WebSocketSurface, "connect": ConnectSurface, "grpc": GrpcSurface}


@pytest.mark.parametrize("surface", list(SURFACES))
@pytest_twisted.ensureDeferred
async def test_the_ten_methods_through_each_surface(dev_gateway, surface):
    api = SURFACES[surface](dev_gateway)
    alice_id, bob_id, carol_id = unique("alice"), unique("bob"), unique("carol")
    try:
        alice, bob = await api.caller(alice_id), await api.caller(bob_id)

        room = (await alice("CreateRoom", pb.CreateRoomRequest(name=f"ten {surface}", member_ids=[bob_id]))).room
        assert room.id and room.created_by == alice_id

        updated = (await alice("UpdateRoom", pb.UpdateRoomRequest(room_id=room.id, name=f"renamed {surface}"))).room
        assert updated.name == f"renamed {surface}"

        added = await alice(
            "AddRoomSubscriptions",
            pb.AddRoomSubscriptionsRequest(room_id=room.id, members=[pb.RoomSubscription(profile_id=carol_id)]),
        )
        assert [s.profile_id for s in added.subscriptions] == [carol_id]

        role = await alice(
            "UpdateSubscriptionRole",
            pb.UpdateSubscriptionRoleRequest(room_id=room.id, profile_id=carol_id, roles=["admin"]),
        )
        assert list(role.subscription.roles) == ["admin"]

        members = await alice("SearchRoomSubscriptions", pb.SearchRoomSubscriptionsRequest(room_id=room.id))
        assert {s.profile_id for s in members.data} == {alice_id, bob_id, carol_id}

        sent = (await bob("SendEvent", pb.SendEventRequest(event=text_event(room.id, f"via {surface}")))).event
        assert sent.id and sent.sender_id == bob_id

        history = await alice("GetHistory", pb.GetHistoryRequest(room_id=room.id, limit=50))
        assert sent.id in [e.id for e in history.events]

        pages = await bob("SearchRooms", pb.SearchRoomsRequest(query=f"renamed {surface}"))
        assert [r.id for page in pages for r in page.data] == [room.id]

        removed = await alice(
            "RemoveRoomSubscriptions", pb.RemoveRoomSubscriptionsRequest(room_id=room.id, profile_ids=[carol_id])
        )
        assert list(removed.removed_profile_ids) == [carol_id]

        # the core's errors arrive with the core's code
        with pytest.raises(CallFailed) as denied:
            await bob("DeleteRoom", pb.DeleteRoomRequest(room_id=room.id))
        assert denied.value.status == "PERMISSION_DENIED"
        with pytest.raises(CallFailed) as missing:
            await alice("GetHistory", pb.GetHistoryRequest(room_id="no-such-room"))
        assert missing.value.status == "NOT_FOUND"

        deleted = await alice("DeleteRoom", pb.DeleteRoomRequest(room_id=room.id))
        assert deleted.room_id == room.id
    finally:
        await api.close()


def test_connect_curl_style_calls(dev_gateway):
    """What docs/protocol.md#connect-with-curl shows: plain JSON over HTTP, errors as Connect JSON with their HTTP status."""
    token = dev_gateway.token(unique("curl"))
    request = urllib.request.Request(
        f"{dev_gateway.http}/chat.v1.ChatService/CreateRoom",
        data=json.dumps({"name": "from curl"}).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
    )
    with urllib.request.urlopen(request, timeout=10) as answer:
        assert answer.headers["Content-Type"] == "application/json"
        assert json.load(answer)["room"]["name"] == "from curl"
    with pytest.raises(ConnectError) as unauthenticated:
        connect_call(dev_gateway.http, "GetHistory", pb.GetHistoryRequest(room_id="x"), token=None)
    assert (unauthenticated.value.status, unauthenticated.value.code) == (401, "unauthenticated")


def test_grpc_unary_refusals(dev_gateway):
    with grpc.insecure_channel(dev_gateway.grpc) as channel:
        with pytest.raises(grpc.RpcError) as missing:
            unary(channel, "GetHistory", pb.GetHistoryRequest(room_id="x"))
        assert missing.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as big:
            unary(channel, "CreateRoom", pb.CreateRoomRequest(name="x" * 70_000), token=dev_gateway.token("big"))
        assert big.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # over MAX_MESSAGE_BYTES


# ---------------------------------------------------------------- thousands of streams


STREAMS = 2000
CHANNELS = 10
WARM_UP = 100  # opened like the rest (50 at once), so the bounded pools have grown before the baseline
OPENING_AT_ONCE = 50  # below the core pool limit (16 threads x 5): a connect asks the core for rooms


def test_two_thousand_streams_without_a_thread_each(dev_gateway):
    pid = dev_gateway.process.pid
    crowd, host = unique("crowd"), unique("host")
    room = connect_call(
        dev_gateway.http, "CreateRoom", pb.CreateRoomRequest(name="crowd", member_ids=[crowd]), dev_gateway.token(host)
    ).room
    token = dev_gateway.token(crowd)
    # a few streams first, so every pool the process keeps has started
    loop = AioLoop()
    try:
        channels = loop.run(_open_channels(dev_gateway.grpc))
        streams = loop.run(_open_streams(channels, token, range(WARM_UP)))
        baseline = threads_of(pid)
        streams += loop.run(_open_streams(channels, token, range(WARM_UP, STREAMS)), timeout=300)
        assert len(streams) == STREAMS
        held = threads_of(pid)
        print("\nthreads:", thread_names(pid))

        sent = connect_call(
            dev_gateway.http,
            "SendEvent",
            pb.SendEventRequest(event=text_event(room.id, "to all")),
            dev_gateway.token(host),
        ).event
        delivered = loop.run(_await_message(streams, sent.id), timeout=120)
        after = threads_of(pid)
        print(
            f"\n{STREAMS} gRPC streams: threads {baseline} with {WARM_UP} streams, {held} with {STREAMS}, {after} after a delivery to all"
        )
        assert delivered == STREAMS
        # Bounded pools (core client 16, in-process core 16, reactor 10) may still grow a
        # little; a thread per stream would be ~1,900 more.
        assert held <= baseline + 10 and after <= baseline + 10, (baseline, held, after)
        assert held < 100
        loop.run(_close(streams, channels), timeout=120)
    finally:
        loop.close()
    # the process still serves
    with urllib.request.urlopen(dev_gateway.http + "/healthz", timeout=5) as answer:
        assert answer.status == 200


async def _open_channels(target):
    return [grpc.aio.insecure_channel(target) for _ in range(CHANNELS)]


class _AioStream:
    def __init__(self, channel, token, device_id):
        self.call = connect_method(channel)(metadata=stream_metadata(token, device_id))

    async def connected(self):
        event = await self.call.read()
        assert event.WhichOneof("payload") == "connected", event
        return self


async def _open_streams(channels, token, numbers):
    numbers = list(numbers)
    opened = []
    for start in range(0, len(numbers), OPENING_AT_ONCE):
        batch = [
            _AioStream(channels[n % len(channels)], token, f"d{n}").connected()
            for n in numbers[start : start + OPENING_AT_ONCE]
        ]
        opened += await asyncio.gather(*batch)
    return opened


async def _await_message(streams, event_id):
    async def one(stream):
        while True:
            event = await stream.call.read()
            if event.WhichOneof("payload") == "message" and event.message.id == event_id:
                return 1

    return sum(await asyncio.gather(*(one(s) for s in streams)))


async def _close(streams, channels):
    for stream in streams:
        stream.call.cancel()
    for channel in channels:
        await channel.close()
