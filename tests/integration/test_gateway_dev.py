"""A real `twistd chatgateway --dev` process and real WebSocket clients over sockets."""

import json
import random
import time
import urllib.request

import jwt
import pytest
import pytest_twisted

from chatgateway.api import chat_pb2 as pb
from chatgateway.api import codec
from chatgateway.client.wsclient import CallError, ClosedError, GatewayClient
from support.chat import fence, pending_texts, unique


async def connect(gw, profile, subprotocol=codec.JSON, device=None, **kwargs):
    client = await GatewayClient.connect(gw.url, gw.token(profile, device), subprotocol=subprotocol, **kwargs)
    connected = await client.next_event("connected")
    assert connected.connected.profile_id == profile
    return client


def texts(client, room_id):
    return [m.payload["text"] for m in pending_texts(client, room_id)]


@pytest_twisted.ensureDeferred
async def test_two_profiles_chat_both_ways_over_both_subprotocols_third_sees_nothing(dev_gateway):
    alice_id, bob_id, carol_id = unique("alice"), unique("bob"), unique("carol")
    alice = await connect(dev_gateway, alice_id, codec.JSON)
    bob = await connect(dev_gateway, bob_id, codec.PROTO)
    carol = await connect(dev_gateway, carol_id, codec.JSON)

    room = (await alice.call("CreateRoom", pb.CreateRoomRequest(name="general", member_ids=[bob_id]))).room
    # bob joined by membership, without reconnecting
    added = await bob.next_event("subscription_event")
    assert added.subscription_event.room_id == room.id

    from_alice = await alice.send_message(room.id, "hello bob")
    got = await bob.next_event("message", lambda e: e.message.id == from_alice.id)
    assert got.message.payload["text"] == "hello bob" and got.message.sender_id == alice_id

    from_bob = await bob.send_message(room.id, "hello alice")
    got = await alice.next_event("message", lambda e: e.message.id == from_bob.id)
    assert got.message.payload["text"] == "hello alice" and got.message.sender_id == bob_id

    own = (await carol.call("CreateRoom", pb.CreateRoomRequest(name="carol's"))).room
    await fence(carol, own.id)
    assert texts(carol, room.id) == []
    assert all(e.message.room_id != room.id for e in carol.pending("message"))
    for client in (alice, bob, carol):
        await client.close()


@pytest_twisted.ensureDeferred
async def test_a_token_within_the_leeway_gets_a_session_kept_until_exp_plus_leeway(dev_gateway):
    """JWT_LEEWAY_SEC (30 s by default) is one rule: a token 27 s past its exp passes the
    handshake, gets ``connected`` and stays connected until exp + 30 s, then 4401."""
    from twisted.internet import reactor

    exp = int(time.time()) - 27
    token = dev_gateway.token(unique("late"), "phone", ttl=60, now=exp - 60)
    client = await GatewayClient.connect(dev_gateway.url, token)
    await client.next_event("connected")
    code, reason = await client.closed.addTimeout(10, reactor)
    closed_at = time.time()
    assert (code, reason) == (4401, "token expired")
    print(f"\ntoken 27 s past exp: connected, closed 4401 {closed_at - (exp + 30):+.2f}s from exp + JWT_LEEWAY_SEC")
    assert exp + 30 - 0.1 <= closed_at <= exp + 30 + 1.0


@pytest_twisted.ensureDeferred
async def test_events_arrive_once_and_in_order(dev_gateway):
    alice_id, bob_id = unique("alice"), unique("bob")
    alice = await connect(dev_gateway, alice_id)
    bob = await connect(dev_gateway, bob_id, codec.PROTO)
    room = (await alice.call("CreateRoom", pb.CreateRoomRequest(name="ordered", member_ids=[bob_id]))).room
    await bob.next_event("subscription_event")
    sent = [(await alice.send_message(room.id, f"m{i}")).id for i in range(30)]
    received = []
    for _ in sent:
        event = await bob.next_event("message", lambda e: e.message.type == pb.RoomEvent.TEXT)
        received.append(event.message.id)
    assert received == sent
    await fence(bob, room.id)
    assert texts(bob, room.id) == []  # nothing twice
    await alice.close()
    await bob.close()


@pytest_twisted.ensureDeferred
async def test_wrong_audience_gets_http_401(dev_gateway):
    token = dev_gateway.token(unique("mallory"), audience="some-other-service")
    with pytest.raises(ClosedError) as refused:
        await GatewayClient.connect(dev_gateway.url, token)
    assert "401" in refused.value.reason


@pytest_twisted.ensureDeferred
async def test_alg_none_token_is_refused(dev_gateway):
    claims = {"sub": unique("mallory"), "iss": "chatgateway-dev", "aud": "service_chat_gateway", "exp": 4102444800}
    token = jwt.encode(claims, key=None, algorithm="none")
    with pytest.raises(ClosedError) as refused:
        await GatewayClient.connect(dev_gateway.url, token)
    assert "401" in refused.value.reason
    # in the first frame it is refused with 4401
    client = await GatewayClient.connect(dev_gateway.url, token, auth="frame")
    code, reason = await client.closed
    assert code == 4401


@pytest_twisted.ensureDeferred
async def test_device_joins_through_call_and_receives_without_reconnecting(dev_gateway):
    owner_id, joiner_id = unique("owner"), unique("joiner")
    owner = await connect(dev_gateway, owner_id)
    joiner = await connect(dev_gateway, joiner_id, codec.PROTO)
    room = (await owner.call("CreateRoom", pb.CreateRoomRequest(name="later"))).room
    before = await owner.send_message(room.id, "before")

    response = await owner.call(
        "AddRoomSubscriptions",
        pb.AddRoomSubscriptionsRequest(room_id=room.id, members=[pb.RoomSubscription(profile_id=joiner_id)]),
    )
    assert [s.profile_id for s in response.subscriptions] == [joiner_id]
    after = await owner.send_message(room.id, "after")
    got = await joiner.next_event("message", lambda e: e.message.id == after.id)
    assert got.message.payload["text"] == "after"
    assert before.id not in [e.message.id for e in joiner.pending("message")]

    # and leaving stops it
    await joiner.call(
        "RemoveRoomSubscriptions", pb.RemoveRoomSubscriptionsRequest(room_id=room.id, profile_ids=[joiner_id])
    )
    gone = await owner.send_message(room.id, "gone")
    own = (await joiner.call("CreateRoom", pb.CreateRoomRequest(name="mine"))).room
    await fence(joiner, own.id)
    assert gone.id not in [e.message.id for e in joiner.pending("message")]
    await owner.close()
    await joiner.close()


@pytest_twisted.ensureDeferred
async def test_search_rooms_streams_all_results(dev_gateway):
    alice = await connect(dev_gateway, unique("collector"))
    created = []
    for i in range(120):
        created.append((await alice.call("CreateRoom", pb.CreateRoomRequest(name=f"room {i:03}"))).room.id)
    pages = await alice.call("SearchRooms", pb.SearchRoomsRequest(page_size=50))
    assert [len(p.data) for p in pages] == [50, 50, 20]
    assert [r.id for p in pages for r in p.data] == created
    filtered = await alice.call("SearchRooms", pb.SearchRoomsRequest(query="room 11"))
    assert sorted(r.name for p in filtered for r in p.data) == [f"room {i}" for i in range(110, 120)]
    await alice.close()


@pytest_twisted.ensureDeferred
async def test_core_errors_arrive_with_their_codes(dev_gateway):
    alice = await connect(dev_gateway, unique("alice"))
    with pytest.raises(CallError) as missing:
        await alice.call("GetHistory", pb.GetHistoryRequest(room_id="no-such-room"))
    assert missing.value.detail.status == "NOT_FOUND"
    owner = await connect(dev_gateway, unique("owner"))
    room = (await owner.call("CreateRoom", pb.CreateRoomRequest(name="private"))).room
    with pytest.raises(CallError) as denied:
        await alice.call("DeleteRoom", pb.DeleteRoomRequest(room_id=room.id))
    assert denied.value.detail.status in ("PERMISSION_DENIED", "NOT_FOUND")
    with pytest.raises(CallError) as not_member:
        await alice.send_message(room.id, "let me in")
    assert not_member.value.detail.status in ("PERMISSION_DENIED", "NOT_FOUND")
    await alice.close()
    await owner.close()


def random_frame(rng):
    """A frame a broken or hostile device might send (never a valid auth_token)."""
    kind = rng.randrange(8)
    if kind == 0:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300))), True
    if kind == 1:
        return "".join(chr(rng.randrange(32, 0x2FF)) for _ in range(rng.randrange(1, 200))).encode(), False
    if kind == 2:
        return (b"[" * rng.randrange(1, 5000)), False
    if kind == 3:
        value = rng.choice([None, 1, -1.5, "x", [], {}, True, "A" * 1000, {"a": [1, {"b": None}]}])
        field = rng.choice(["requestId", "typing", "roomEvent", "call", "subscribe", "readMarker", "bogus"])
        return json.dumps({"command": {"requestId": str(rng.random()), field: value}}).encode(), False
    if kind == 4:
        method = rng.choice(["CreateRoom", "Nope", "", "SendEvent", "GetHistory"])
        body = rng.choice(
            [{"@type": "type.googleapis.com/chat.v1.CreateRoomRequest", "name": 5}, {"@type": "bad"}, {}, 7]
        )
        return json.dumps({"command": {"requestId": "c", "call": {"method": method, "body": body}}}).encode(), False
    if kind == 5:
        return json.dumps({"ack": {"eventId": rng.random()}, "resumeToken": ["x"]}).encode(), False
    if kind == 6:
        return json.dumps(rng.choice([[], 1, "s", None, {"command": []}, {"deviceId": {"x": 1}}])).encode(), False
    return b"\xff\xfe invalid utf8 \xc0\xaf", False


@pytest_twisted.ensureDeferred
async def test_a_thousand_random_frames_leave_the_process_serving_others(dev_gateway):
    rng = random.Random(20261127)
    fuzzer = await connect(dev_gateway, unique("fuzzer"))
    for _ in range(1000):
        payload, is_binary = random_frame(rng)
        try:
            fuzzer.send_raw(payload, is_binary)
        except ClosedError:
            break  # a defined close (e.g. invalid UTF-8 → 1007) ends the run for this connection

    # others are served: a fresh pair chats
    alice_id, bob_id = unique("alice"), unique("bob")
    alice = await connect(dev_gateway, alice_id)
    bob = await connect(dev_gateway, bob_id, codec.PROTO)
    room = (await alice.call("CreateRoom", pb.CreateRoomRequest(name="after fuzz", member_ids=[bob_id]))).room
    await bob.next_event("subscription_event")
    sent = await alice.send_message(room.id, "still here")
    await bob.next_event("message", lambda e: e.message.id == sent.id)
    with urllib.request.urlopen(dev_gateway.http + "/healthz", timeout=5) as response:
        assert response.status == 200
    assert dev_gateway.process.running
    # every frame the fuzzer got back is a defined answer, never a crash
    assert fuzzer.pending("error") or fuzzer.pending("command_result") or fuzzer.close_code is not None
    await alice.close()
    await bob.close()
    await fuzzer.close()


@pytest_twisted.ensureDeferred
async def test_query_and_first_frame_auth_paths(dev_gateway):
    profile = unique("browser")
    query_token = dev_gateway.token(profile, "b1")
    by_query = await GatewayClient.connect(dev_gateway.url, query_token, auth="query")
    assert (await by_query.next_event("connected")).connected.device_id == "b1"
    by_frame = await GatewayClient.connect(dev_gateway.url, dev_gateway.token(profile), auth="frame", device_id="b2")
    assert (await by_frame.next_event("connected")).connected.device_id == "b2"
    await by_query.close()
    await by_frame.close()
    # Plain HTTP requests are access-logged; a token in their query string must not be.
    with urllib.request.urlopen(f"{dev_gateway.http}/healthz?access_token={query_token}", timeout=5):
        pass
    log = dev_gateway.process.log_text()
    assert "access_token=REDACTED" in log
    assert query_token not in log and query_token.split(".")[2] not in log


def test_health_endpoints(dev_gateway):
    with urllib.request.urlopen(dev_gateway.http + "/healthz", timeout=5) as response:
        assert json.load(response) == {"status": "alive"}
    with urllib.request.urlopen(dev_gateway.http + "/readyz", timeout=5) as response:
        body = json.load(response)
    assert response.status == 200
    assert body["status"] == "ready"
    assert set(body["dependencies"]) == {"listening", "store:memory", "bus:memory", "core", "capacity"}


def test_invalid_configuration_exits_before_listening(tmp_path):
    from support.processes import Twistd, free_port

    process = Twistd(
        "chatgateway",
        ["--http-port", free_port()],
        env={"JWT_SECRET": "", "OAUTH2_ISSUER": "", "HEARTBEAT_INTERVAL_SEC": "400", "CACHE_URI": "mongodb://x"},
        port=free_port(),
        log_dir=tmp_path,
    )
    with pytest.raises(RuntimeError, match="exited with 1 before listening"):
        process.start(timeout=30)
    log = process.log_text()
    assert "HEARTBEAT_INTERVAL_SEC=400 must be less than CONNECTION_TIMEOUT_SEC=300" in log
    assert "CACHE_URI='mongodb://x': unknown scheme" in log
    assert "no way to verify tokens" in log
    assert "listening on" not in log


def run_twistd(tmp_path, *arguments, **settings):
    """A twistd run to its end, in an environment of only ``settings`` among the gateway's."""
    import os
    import subprocess

    from chatgateway.config import SETTINGS
    from support.processes import TWISTD

    env = {k: v for k, v in os.environ.items() if k not in {s.name for s in SETTINGS}}
    return subprocess.run(
        [*TWISTD, "--nodaemon", "--pidfile=", *map(str, arguments)],
        cwd=tmp_path,
        env={**env, **settings},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    "plugin, arguments, settings, problems",
    [
        (
            "chatgateway",
            ["--http-port", "x", "--grpc-port", "y"],
            {},
            ["HTTP_PORT='x': must be a whole number", "GRPC_PORT='y': must be a whole number"],
        ),
        ("chatcore", ["--port", "x"], {}, ["CORE_PORT='x': must be a whole number"]),
        # Each worker would have a store of its own: MAX_CONNECTIONS_PER_DEVICE would not hold.
        (
            "chatgateway",
            ["--workers", "2", "--http-port", "8090"],
            {"CACHE_URI": "memory://", "EVENTS_URI": "redis://127.0.0.1:1/0"},
            [
                "--workers 2 needs the store and the bus on Redis: CACHE_URI is memory://, "
                "which cannot span processes (use --workers 1)"
            ],
        ),
    ],
)
def test_invalid_configuration_prints_only_its_problems_one_line_each(tmp_path, plugin, arguments, settings, problems):
    result = run_twistd(tmp_path, plugin, *arguments, JWT_SECRET="s" * 32, **settings)
    assert result.returncode == 1
    # twistd prints its whole --help in front of a usage error; a configuration error is not one.
    assert (result.stdout + result.stderr).splitlines() == [f"{plugin}: invalid configuration: {p}" for p in problems]
