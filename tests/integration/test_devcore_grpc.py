"""The reference core over real gRPC: in-process server, and ``twistd chatcore`` processes."""

import time

import grpc
import jwt
import pytest
import pytest_twisted

from chatgateway import config
from chatgateway.api import chat_pb2 as pb
from chatgateway.api import chat_pb2_grpc
from chatgateway.bus import channels
from chatgateway.bus.memory import MemoryBus
from chatgateway.devcore.model import ChatModel
from chatgateway.devcore.server import ChatCoreServicer, make_grpc_server
from chatgateway.devcore.service import CoreService
from support.processes import CLEAN_STOP, Twistd, free_port

SECRET = "integration-secret-of-at-least-32-bytes"
AUDIENCE = "service_chat_gateway"
Code = grpc.StatusCode


class BadToken(Exception):
    pass


class Claims:
    def __init__(self, profile_id):
        self.profile_id = profile_id


def verify(token):
    """HS256 verification, as chatgateway.auth.tokens does it for JWT_SECRET, without depending on it."""
    try:
        payload = jwt.decode(
            token, SECRET, algorithms=["HS256"], audience=AUDIENCE, options={"require": ["exp", "sub"]}
        )
    except jwt.PyJWTError as e:
        raise BadToken(str(e)) from None
    return Claims(payload["sub"])


def token(profile_id, secret=SECRET, audience=AUDIENCE, ttl=300):
    now = int(time.time())
    claims = {"sub": profile_id, "aud": audience, "iat": now, "exp": now + ttl}
    return jwt.encode(claims, secret, algorithm="HS256")


def auth(profile_id, **kwargs):
    return [("authorization", f"Bearer {token(profile_id, **kwargs)}")]


class Client:
    """A profile's view of the core: each method with the profile's token."""

    def __init__(self, stub, profile_id):
        self.stub = stub
        self.metadata = auth(profile_id)

    def __getattr__(self, method):
        call = getattr(self.stub, method)
        return lambda request: call(request, metadata=self.metadata, timeout=10)


@pytest.fixture
def core():
    published = []
    model = ChatModel(publish=lambda channel, payload: published.append((channel, payload)))
    server, port = make_grpc_server(ChatCoreServicer(model, verify), "127.0.0.1:0", max_workers=4)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = chat_pb2_grpc.ChatServiceStub(channel)
    yield stub, published
    channel.close()
    server.stop(None).wait()
    model.close()


@pytest.fixture
def stub(core):
    return core[0]


def status_of(call):
    """(code, details) of the RpcError that ``call`` raises (read streams inside it)."""
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


# ------------------------------------------------------------ authentication


@pytest.mark.parametrize(
    "metadata",
    [
        [],
        [("authorization", "Basic dXNlcjpwYXNz")],
        [("authorization", "Bearer ")],
        [("authorization", "Bearer not-a-jwt")],
        auth("alice", secret="another-secret-of-at-least-32-bytes"),
        auth("alice", audience="someone_else"),
        auth("alice", ttl=-120),
    ],
    ids=["none", "basic", "empty", "garbage", "wrong-secret", "wrong-audience", "expired"],
)
def test_every_method_needs_a_valid_bearer_token(stub, metadata):
    calls = {
        "SendEvent": pb.SendEventRequest(),
        "GetHistory": pb.GetHistoryRequest(),
        "CreateRoom": pb.CreateRoomRequest(name="x"),
        "SearchRooms": pb.SearchRoomsRequest(),
        "UpdateRoom": pb.UpdateRoomRequest(),
        "DeleteRoom": pb.DeleteRoomRequest(),
        "AddRoomSubscriptions": pb.AddRoomSubscriptionsRequest(),
        "RemoveRoomSubscriptions": pb.RemoveRoomSubscriptionsRequest(),
        "UpdateSubscriptionRole": pb.UpdateSubscriptionRoleRequest(),
        "SearchRoomSubscriptions": pb.SearchRoomSubscriptionsRequest(),
    }
    for method, request in calls.items():
        call = getattr(stub, method)
        read = list if method == "SearchRooms" else (lambda response: response)
        code, _ = status_of(
            lambda read=read, call=call, request=request: read(call(request, metadata=metadata, timeout=10))
        )
        assert code == Code.UNAUTHENTICATED, method


def test_connect_is_left_to_the_gateway(stub):
    code, details = status_of(
        lambda: list(stub.Connect(iter([pb.StreamRequest()]), metadata=auth("alice"), timeout=10))
    )
    assert code == Code.UNIMPLEMENTED and "gateway" in details


# ------------------------------------------------------------ the ten methods


def test_rooms_members_and_events_over_grpc(core):
    stub, published = core
    alice, bob, carol = Client(stub, "alice"), Client(stub, "bob"), Client(stub, "carol")

    room = alice.CreateRoom(pb.CreateRoomRequest(id="lobby", name="Lobby", member_ids=["bob"])).room
    assert room.id == "lobby" and room.created_by == "alice"

    renamed = alice.UpdateRoom(pb.UpdateRoomRequest(room_id=room.id, name="Hall")).room
    assert renamed.name == "Hall"

    [carol_sub] = alice.AddRoomSubscriptions(
        pb.AddRoomSubscriptionsRequest(room_id=room.id, members=[pb.RoomSubscription(profile_id="carol")])
    ).subscriptions
    assert list(carol_sub.roles) == ["member"]

    promoted = alice.UpdateSubscriptionRole(
        pb.UpdateSubscriptionRoleRequest(room_id=room.id, profile_id="bob", roles=["admin"])
    ).subscription
    assert list(promoted.roles) == ["admin"]

    members = carol.SearchRoomSubscriptions(pb.SearchRoomSubscriptionsRequest(room_id=room.id))
    assert {(s.profile_id, tuple(s.roles)) for s in members.data} == {
        ("alice", ("owner",)),
        ("bob", ("admin",)),
        ("carol", ("member",)),
    }

    sent = bob.SendEvent(pb.SendEventRequest(event=pb.RoomEvent(room_id=room.id, sender_id="forged"))).event
    assert sent.sender_id == "bob" and sent.type == pb.RoomEvent.TEXT and sent.id

    newest = carol.GetHistory(pb.GetHistoryRequest(room_id=room.id, limit=1))
    assert list(newest.events) == [sent] and newest.next_cursor

    [page] = carol.SearchRooms(pb.SearchRoomsRequest(query="hall"))
    assert [r.id for r in page.data] == [room.id]

    removed = bob.RemoveRoomSubscriptions(pb.RemoveRoomSubscriptionsRequest(room_id=room.id, profile_ids=["carol"]))
    assert list(removed.removed_profile_ids) == ["carol"]

    assert alice.DeleteRoom(pb.DeleteRoomRequest(room_id=room.id)).room_id == room.id
    assert list(alice.SearchRooms(pb.SearchRoomsRequest()))[0].data == []

    room_events = [pb.ServerEvent.FromString(p) for ch, p in published if ch == channels.room(room.id)]
    assert sent.id in [e.id for e in room_events]
    carol_changes = [
        pb.ServerEvent.FromString(p).subscription_event.change for ch, p in published if ch == channels.profile("carol")
    ]
    assert carol_changes == [pb.SubscriptionEvent.ADDED, pb.SubscriptionEvent.REMOVED]


def test_refusals_arrive_with_their_status_codes(stub):
    alice, dave = Client(stub, "alice"), Client(stub, "dave")
    room = alice.CreateRoom(pb.CreateRoomRequest(name="private")).room

    intrusion = pb.SendEventRequest(event=pb.RoomEvent(room_id=room.id))
    assert status_of(lambda: dave.SendEvent(intrusion))[0] == Code.PERMISSION_DENIED
    assert status_of(lambda: dave.GetHistory(pb.GetHistoryRequest(room_id="missing")))[0] == Code.NOT_FOUND
    assert status_of(lambda: dave.CreateRoom(pb.CreateRoomRequest(name="")))[0] == Code.INVALID_ARGUMENT
    assert status_of(lambda: dave.CreateRoom(pb.CreateRoomRequest(id=room.id, name="x")))[0] == Code.ALREADY_EXISTS
    leave = pb.RemoveRoomSubscriptionsRequest(room_id=room.id, profile_ids=["alice"])
    code, details = status_of(lambda: alice.RemoveRoomSubscriptions(leave))
    assert code == Code.FAILED_PRECONDITION and "last owner" in details
    code, details = status_of(lambda: alice.GetHistory(pb.GetHistoryRequest(room_id=room.id, cursor="bogus")))
    assert code == Code.INVALID_ARGUMENT and "cursor" in details
    bad_search = pb.SearchRoomsRequest(cursor="bogus")
    assert status_of(lambda: list(alice.SearchRooms(bad_search)))[0] == Code.INVALID_ARGUMENT


def test_search_rooms_streams_120_rooms_in_pages_of_50(stub):
    alice = Client(stub, "alice")
    ids = [alice.CreateRoom(pb.CreateRoomRequest(name=f"room {i:03d}")).room.id for i in range(120)]
    Client(stub, "bob").CreateRoom(pb.CreateRoomRequest(name="not alice's"))

    pages = list(alice.SearchRooms(pb.SearchRoomsRequest(page_size=50)))

    assert [len(page.data) for page in pages] == [50, 50, 20]
    assert [room.id for page in pages for room in page.data] == ids
    assert [bool(page.next_cursor) for page in pages] == [True, True, False]


# ------------------------------------------------------------ CoreService in this process


@pytest_twisted.ensureDeferred
async def test_core_service_publishes_on_the_bus_in_stored_order():
    from twisted.internet import defer, reactor, threads

    settings = config.load(environ={"JWT_SECRET": SECRET})
    bus = MemoryBus()
    listener = MemoryBus(bus.hub)
    received = []
    four = defer.Deferred().addTimeout(10, reactor)

    def receive(channel, payload):
        received.append((channel, pb.ServerEvent.FromString(payload)))
        if len(received) == 4:
            four.callback(None)

    listener.start(receive)
    for channel in (channels.profile("alice"), channels.profile("bob"), channels.room("r1")):
        await listener.subscribe(channel)
    core = CoreService(settings, bus, reactor, 0)  # chatgateway.auth.tokens's verifier, from settings
    core.startService()
    try:
        assert core.port > 0

        def create():
            with grpc.insecure_channel(f"127.0.0.1:{core.port}") as channel:
                stub = Client(chat_pb2_grpc.ChatServiceStub(channel), "alice")
                return stub.CreateRoom(pb.CreateRoomRequest(id="r1", name="r", member_ids=["bob"])).room

        room = await threads.deferToThread(create)
        await four
    finally:
        await core.stopService()

    assert room.id == "r1"
    assert [(channel, event.WhichOneof("payload")) for channel, event in received] == [
        (channels.profile("alice"), "subscription_event"),
        (channels.room("r1"), "message"),
        (channels.profile("bob"), "subscription_event"),
        (channels.room("r1"), "message"),
    ]
    assert [event.message.payload["action"] for _, event in received[1::2]] == ["room_created", "member_added"]
    assert core.model is None and not core.running


# ------------------------------------------------------------ twistd chatcore


def _twistd_chatcore(port, db_path, log_dir):
    env = {"JWT_SECRET": SECRET, "CORE_DB": str(db_path), "OAUTH2_ISSUER": "", "OAUTH2_JWKS_URI": ""}
    return Twistd("chatcore", ["--port", port], env=env, port=port, log_dir=log_dir)


def test_twistd_chatcore_keeps_its_rooms_across_a_restart(tmp_path):
    port = free_port()
    process = _twistd_chatcore(port, tmp_path / "core.sqlite3", tmp_path)

    with process, grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        alice = Client(chat_pb2_grpc.ChatServiceStub(channel), "alice")
        created = [alice.CreateRoom(pb.CreateRoomRequest(name=f"kept {i}", member_ids=["bob"])).room for i in range(3)]
        sent = alice.SendEvent(pb.SendEventRequest(event=pb.RoomEvent(room_id=created[0].id))).event
    assert process.stop() == CLEAN_STOP
    assert f"listening on 127.0.0.1:{port}" in process.log_text()
    assert "Server Shut Down." in process.log_text()

    with process.start(), grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        bob = Client(chat_pb2_grpc.ChatServiceStub(channel), "bob")
        [page] = bob.SearchRooms(pb.SearchRoomsRequest())
        newest = bob.GetHistory(pb.GetHistoryRequest(room_id=created[0].id, limit=1))

    assert list(page.data) == created
    [kept] = newest.events
    # The position the publish contract gave it is stored after the publish (it may not be yet).
    assert kept.offset in (0, 3)
    kept.ClearField("epoch")
    kept.ClearField("offset")
    assert kept == sent
    assert process.stop() == CLEAN_STOP
    assert process.log_text().count("Server Shut Down.") == 2


def test_twistd_chatcore_refuses_bad_configuration_before_listening(tmp_path):
    port = free_port()
    env = {"JWT_SECRET": "", "OAUTH2_ISSUER": "", "OAUTH2_JWKS_URI": "", "HEARTBEAT_INTERVAL_SEC": "999"}
    process = Twistd("chatcore", ["--port", port], env=env, port=port, log_dir=tmp_path)

    with pytest.raises(RuntimeError, match="exited with"):
        process.start()

    assert process.process.returncode != 0
    log = process.log_text()
    assert "no way to verify tokens" in log
    assert "HEARTBEAT_INTERVAL_SEC=999 must be less than" in log
