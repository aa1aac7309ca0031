"""Several real gateways on a real redis-server, with the reference core publishing to it."""

import json

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task

from chatgateway.api import chat_pb2 as pb
from chatgateway.api import codec
from chatgateway.auth.devtokens import mint_token
from chatgateway.client.wsclient import GatewayClient
from support.chat import fence, pending_texts, rescope_across_gateways, unique, wait_until
from support.processes import Twistd, free_port
from support.redis import RedisServer

SECRET = "scaling-test-secret-0123456789abcdef0123"
HEARTBEAT = 0.5
TIMEOUT = 3  # so the metadata TTL (2 x TIMEOUT) is 6 s


def token(profile, device=None):
    return mint_token(SECRET, profile, device_id=device, audience="service_chat_gateway")


class Cluster:
    """redis-server, `twistd chatcore` and N `twistd chatgateway` processes.

    ``core_publishes=False`` gives the core an in-memory bus of its own, like a
    core that does not publish: then only PUBLISH_FORWARDED_EVENTS feeds the bus.
    """

    def __init__(self, gateways=3, core_publishes=True, **settings):
        self.redis = RedisServer()
        self.core_port = free_port()
        env = {"JWT_SECRET": SECRET, "CACHE_URI": self.redis.uri, "OAUTH2_ISSUER": "", "LOG_LEVEL": "info"}
        core_env = env if core_publishes else {**env, "CACHE_URI": "memory://"}
        self.core = Twistd("chatcore", ["--port", self.core_port], env=core_env, port=self.core_port)
        self.gateways = []
        for i in range(gateways):
            port = free_port()
            gateway_env = {
                **env,
                "CHAT_SERVICE_URI": f"127.0.0.1:{self.core_port}",
                "HTTP_PORT": str(port),
                "GRPC_PORT": str(free_port()),
                "HTTP_INTERFACE": "127.0.0.1",
                "GATEWAY_ID": f"gw-{i}",
                "HEARTBEAT_INTERVAL_SEC": str(HEARTBEAT),
                "CONNECTION_TIMEOUT_SEC": str(TIMEOUT),
                "MAX_EVENTS_PER_SECOND": "1000",
                **settings,
            }
            self.gateways.append(Twistd("chatgateway", ["--workers", "1"], env=gateway_env, port=port))

    def start(self):
        self.core.start()
        for gateway in self.gateways:
            gateway.start()
        return self

    def url(self, i):
        return f"ws://127.0.0.1:{self.gateways[i].port}/ws"

    def stop(self):
        codes = [g.stop() for g in self.gateways if g.running]
        self.core.stop()
        self.redis.cleanup()
        return codes

    def logs(self):
        return "\n".join(g.log_tail(30) for g in self.gateways)


@pytest.fixture
def cluster():
    c = Cluster().start()
    yield c
    c.stop()
    for g in c.gateways:
        assert "Traceback (most recent call last)" not in g.log_text(), g.log_tail(60)


async def connect(cluster, i, profile, device=None, subprotocol=codec.JSON):
    client = await GatewayClient.connect(cluster.url(i), token(profile, device), subprotocol=subprotocol)
    client.connected = await client.next_event("connected")
    return client


def message_ids(client, room_id):
    return [m.id for m in pending_texts(client, room_id)]


@pytest_twisted.ensureDeferred
async def test_three_gateways_deliver_every_event_once_in_order_and_nothing_to_non_members(cluster):
    owner_id = unique("owner")
    members = [unique(f"m{i}") for i in range(6)]
    owner = await connect(cluster, 0, owner_id)
    room = (await owner.call("CreateRoom", pb.CreateRoomRequest(name="spread", member_ids=members))).room
    devices = [
        await connect(cluster, i % 3, m, subprotocol=(codec.JSON, codec.PROTO)[i % 2]) for i, m in enumerate(members)
    ]
    outsider = await connect(cluster, 1, unique("outsider"))
    for device in devices:
        assert room.id in device.connected.connected.room_ids
    assert {d.connected.connected.gateway_id for d in devices} == {"gw-0", "gw-1", "gw-2"}

    sent = [(await owner.send_message(room.id, f"m{i}")).id for i in range(25)]
    for device in devices:
        received = []
        for _ in sent:
            event = await device.next_event("message", lambda e: e.message.type == pb.RoomEvent.TEXT)
            received.append(event.message.id)
        assert received == sent
    # exactly once: after a fence of the device's own, nothing more of those arrived
    for device in devices[:3]:
        await fence(device, room.id)
        assert [i for i in message_ids(device, room.id) if i in sent] == []
    own = (await outsider.call("CreateRoom", pb.CreateRoomRequest(name="alone"))).room
    await fence(outsider, own.id)
    assert all(e.message.room_id != room.id for e in outsider.pending("message"))
    for client in [owner, outsider, *devices]:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_redis_keys_match_the_spec_schema_and_go_with_a_clean_disconnect(cluster):
    r = cluster.redis.client()
    profile = unique("alice")
    owner = await connect(cluster, 0, profile, "laptop")
    room = (await owner.call("CreateRoom", pb.CreateRoomRequest(name="keys"))).room
    phone = await connect(cluster, 1, profile, "phone")
    key = f"gateway:conn:{profile}:phone"
    await wait_until(lambda: r.exists(key))
    meta = json.loads(r.get(key))
    assert set(meta) == {
        "profile_id",
        "device_id",
        "room_ids",
        "last_active",
        "last_heartbeat",
        "connected",
        "gateway_id",
    }
    assert (meta["profile_id"], meta["device_id"], meta["room_ids"], meta["gateway_id"]) == (
        profile,
        "phone",
        [room.id],
        "gw-1",
    )
    assert all(isinstance(meta[f], int) for f in ("last_active", "last_heartbeat", "connected"))
    assert 0 < r.ttl(key) <= 2 * TIMEOUT
    room_key = f"gateway:room:{room.id}"
    await wait_until(lambda: r.smembers(room_key) == {f"{profile}:laptop", f"{profile}:phone"})
    assert 0 < r.ttl(room_key) <= 2 * TIMEOUT
    await wait_until(lambda: json.loads(r.get("gateway:instance:gw-1"))["connections"] == 1)
    instance = json.loads(r.get("gateway:instance:gw-1"))
    assert instance["gateway_id"] == "gw-1" and instance["addresses"][0].startswith("http://127.0.0.1:")
    assert r.ttl("gateway:instance:gw-1") > 0
    # refreshed while connected: still there after more than one TTL
    await task.deferLater(reactor, 2 * TIMEOUT + 1, lambda: None)
    assert r.exists(key) and f"{profile}:phone" in r.smembers(room_key)
    await phone.close()
    await wait_until(lambda: not r.exists(key))
    await wait_until(lambda: r.smembers(room_key) == {f"{profile}:laptop"})
    await owner.close()
    await wait_until(lambda: not r.exists(room_key))


@pytest_twisted.ensureDeferred
async def test_same_device_racing_onto_two_gateways_ends_with_one_connection(cluster):
    r = cluster.redis.client()
    for _attempt in range(5):
        profile = unique("racer")
        connects = [
            defer.Deferred.fromCoroutine(GatewayClient.connect(cluster.url(i), token(profile, "phone"))) for i in (0, 1)
        ]
        clients = await defer.gatherResults(connects)
        await wait_until(lambda clients=clients: sum(c.close_code is None for c in clients) == 1)
        (closed,) = [c for c in clients if c.close_code is not None]
        assert closed.close_code == 4001
        (alive,) = [c for c in clients if c.close_code is None]
        connected = await alive.next_event("connected")
        await wait_until(lambda profile=profile: r.zcard(f"gateway:device:{profile}:phone") == 1)
        (entry,) = r.zrange(f"gateway:device:{profile}:phone", 0, -1)
        assert json.loads(entry) == [connected.connected.gateway_id, connected.connected.session_id]
        await alive.close()


@pytest_twisted.ensureDeferred
async def test_redis_restart_resumes_delivery_without_reconnecting_and_restores_metadata(cluster):
    owner_id, member_id = unique("owner"), unique("member")
    owner = await connect(cluster, 0, owner_id, "d")
    room = (await owner.call("CreateRoom", pb.CreateRoomRequest(name="restart", member_ids=[member_id]))).room
    member = await connect(cluster, 1, member_id, "d", codec.PROTO)
    first = await owner.send_message(room.id, "before")
    await member.next_event("message", lambda e: e.message.id == first.id)

    cluster.redis.restart(kill=True)  # everything in Redis is gone
    r = cluster.redis.client()
    await wait_until(lambda: r.exists(f"gateway:conn:{owner_id}:d") and r.exists(f"gateway:conn:{member_id}:d"), 20)
    await wait_until(lambda: r.smembers(f"gateway:room:{room.id}") == {f"{owner_id}:d", f"{member_id}:d"}, 20)
    # The room's stream went with Redis (a new epoch): the gateway takes the old epoch's rest
    # from the core's history (nothing after "before"), then the new epoch from its offset 1,
    # so the device is told of no loss (docs/architecture.md#catch-up).

    # the core reconnects too; keep sending until one arrives (bounded), then all arrive in order
    async def delivered():
        try:
            sent = await owner.send_message(room.id, "after")
        except Exception:
            return False
        try:
            await member.next_event("message", lambda e: e.message.id == sent.id, timeout=2)
            return True
        except defer.TimeoutError:
            return False

    await wait_until(delivered, 30, interval=0.2)
    assert owner.close_code is None and member.close_code is None
    sent = [(await owner.send_message(room.id, f"x{i}")).id for i in range(10)]
    got = [(await member.next_event("message", lambda e: e.message.id in sent)).message.id for _ in sent]
    assert got == sent
    told = [e for e in member._events if e.WhichOneof("payload") in ("error", "gap")]
    assert told == [], told  # nothing was lost, so nothing was reported lost
    await owner.close()
    await member.close()


@pytest_twisted.ensureDeferred
async def test_client_kill_pubsub_resubscribes_and_delivers_again(cluster):
    owner_id, member_id = unique("owner"), unique("member")
    owner = await connect(cluster, 0, owner_id)
    room = (await owner.call("CreateRoom", pb.CreateRoomRequest(name="killed", member_ids=[member_id]))).room
    member = await connect(cluster, 2, member_id)
    first = await owner.send_message(room.id, "before")  # the room has a position on gw-2
    await member.next_event("message", lambda e: e.message.id == first.id)
    cluster.redis.client().execute_command("CLIENT", "KILL", "TYPE", "pubsub")
    missed = await owner.send_message(room.id, "while resubscribing")
    # Filled from the room's stream after the resubscribe: delivered, and no DATA_LOSS.
    await member.next_event("message", lambda e: e.message.id == missed.id, timeout=10)

    async def delivered():
        sent = await owner.send_message(room.id, "again")
        try:
            await member.next_event("message", lambda e: e.message.id == sent.id, timeout=1)
            return True
        except defer.TimeoutError:
            return False

    await wait_until(delivered, 10, interval=0.1)
    assert member.pending("error") == []
    await owner.close()
    await member.close()


@pytest_twisted.ensureDeferred
async def test_sigkilled_gateway_is_cleaned_up_and_its_devices_reconnect_elsewhere(cluster):
    r = cluster.redis.client()
    owner_id, member_id = unique("owner"), unique("member")
    owner = await connect(cluster, 0, owner_id)
    room = (await owner.call("CreateRoom", pb.CreateRoomRequest(name="sigkill", member_ids=[member_id]))).room
    member = await connect(cluster, 2, member_id, "phone")
    key = f"gateway:conn:{member_id}:phone"
    await wait_until(lambda: r.exists(key))

    cluster.gateways[2].kill()
    code, _ = await member.closed
    assert code is not None
    # gone by TTL (2 x CONNECTION_TIMEOUT_SEC) or by another gateway reaping gw-2
    await wait_until(lambda: not r.exists(key), 2 * TIMEOUT + 5)
    # the room entry goes when gw-2's instance entry has expired and another gateway reaps it
    await wait_until(lambda: f"{member_id}:phone" not in r.smembers(f"gateway:room:{room.id}"), 30)
    await wait_until(lambda: not r.sismember("gateway:instances", "gw-2"), 30)
    assert not r.exists("gateway:instance:gw-2:conns")

    again = await connect(cluster, 1, member_id, "phone")
    sent = await owner.send_message(room.id, "welcome back")
    await again.next_event("message", lambda e: e.message.id == sent.id)
    await wait_until(lambda: json.loads(r.get(key) or "{}").get("gateway_id") == "gw-1")
    await owner.close()
    await again.close()


@pytest_twisted.ensureDeferred
async def test_membership_change_on_one_gateway_rescopes_the_profile_on_another(cluster):
    owner_id, joiner_id = unique("owner"), unique("joiner")
    owner = await connect(cluster, 0, owner_id)
    joiner = await connect(cluster, 2, joiner_id)
    await rescope_across_gateways(owner, joiner, joiner_id)
    await owner.close()
    await joiner.close()


@pytest_twisted.ensureDeferred
async def test_publish_forwarded_events_for_a_core_that_does_not_publish():
    c = Cluster(gateways=2, core_publishes=False, PUBLISH_FORWARDED_EVENTS="true").start()
    try:
        owner_id, member_id = unique("owner"), unique("member")
        owner = await connect(c, 0, owner_id)
        member = await connect(c, 1, member_id)
        room = (await owner.call("CreateRoom", pb.CreateRoomRequest(name="forwarded", member_ids=[member_id]))).room
        # the membership reaches gateway 1 only through the gateway's own publication
        added = await member.next_event("subscription_event")
        assert added.subscription_event.room_id == room.id
        sent = [(await owner.send_message(room.id, f"f{i}")).id for i in range(5)]
        got = [
            (await member.next_event("message", lambda e: e.message.type == pb.RoomEvent.TEXT)).message.id for _ in sent
        ]
        assert got == sent
        await owner.close()
        await member.close()
    finally:
        c.stop()


@pytest_twisted.ensureDeferred
async def test_two_workers_share_the_port_and_deliver_each_event_once():
    c = Cluster(gateways=0)
    port = free_port()
    env = {
        "JWT_SECRET": SECRET,
        "CACHE_URI": c.redis.uri,
        "CHAT_SERVICE_URI": f"127.0.0.1:{c.core_port}",
        "HTTP_PORT": str(port),
        "HTTP_INTERFACE": "127.0.0.1",
        "GRPC_PORT": str(free_port()),
        "GATEWAY_ID": "gw-main",
        "MAX_EVENTS_PER_SECOND": "1000",
    }
    c.gateways.append(Twistd("chatgateway", ["--workers", "2"], env=env, port=port))
    c.start()
    try:
        owner_id = unique("owner")
        owner = await connect(c, 0, owner_id)
        room = (await owner.call("CreateRoom", pb.CreateRoomRequest(name="workers"))).room
        members, seen = [], set()
        deadline = reactor.seconds() + 30
        # The worker starts after the parent listens, and the kernel spreads connections
        # over both: keep connecting until both hold members (bounded).
        while reactor.seconds() < deadline:
            member_id = unique("m")
            await owner.call(
                "AddRoomSubscriptions",
                pb.AddRoomSubscriptionsRequest(room_id=room.id, members=[pb.RoomSubscription(profile_id=member_id)]),
            )
            member = await connect(c, 0, member_id)
            members.append(member)
            seen.add(member.connected.connected.gateway_id)
            if seen == {"gw-main", "gw-main-w1"} and len(members) >= 4:
                break
        assert seen == {"gw-main", "gw-main-w1"}
        sent = [(await owner.send_message(room.id, f"w{i}")).id for i in range(5)]
        for member in members:
            got = [
                (await member.next_event("message", lambda e: e.message.type == pb.RoomEvent.TEXT)).message.id
                for _ in sent
            ]
            assert got == sent
            await fence(member, room.id)
            assert [i for i in message_ids(member, room.id) if i in sent] == []
        for client in [owner, *members]:
            await client.close()
    finally:
        c.stop()


def test_unreachable_redis_at_start_then_ready_when_it_appears(tmp_path):
    import urllib.error
    import urllib.request

    redis_port = free_port()
    http_port = free_port()
    gateway = Twistd(
        "chatgateway",
        ["--workers", "1"],
        env={
            "JWT_SECRET": SECRET,
            "CACHE_URI": f"redis://127.0.0.1:{redis_port}/0",
            "HTTP_PORT": str(http_port),
            "GRPC_PORT": str(free_port()),
            "HTTP_INTERFACE": "127.0.0.1",
            "CHAT_SERVICE_URI": f"127.0.0.1:{free_port()}",
            "CORE_TIMEOUT_SEC": "0.5",
        },
        port=http_port,
        log_dir=tmp_path,
    )
    gateway.start()
    try:
        with pytest.raises(urllib.error.HTTPError) as not_ready:
            urllib.request.urlopen(f"http://127.0.0.1:{http_port}/readyz", timeout=10)
        body = json.load(not_ready.value)
        assert not_ready.value.code == 503
        assert body["dependencies"]["store:redis"] == "down"
        assert body["dependencies"]["bus:redis"] == "down"
        server = RedisServer(port=redis_port)
        try:
            import time

            deadline = time.monotonic() + 20
            while True:
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{http_port}/readyz", timeout=10)
                    raise AssertionError("ready although the core is down")
                except urllib.error.HTTPError as e:
                    deps = json.load(e)["dependencies"]
                if deps["store:redis"] == deps["bus:redis"] == "up":
                    break
                assert time.monotonic() < deadline, deps
                time.sleep(0.2)  # readiness polling only
        finally:
            server.cleanup()
        assert gateway.running
    finally:
        gateway.stop()


def test_workers_end_with_their_parent_even_after_sigkill(redis_server, tmp_path):
    import os
    import time

    from support.processes import children_of

    port = free_port()
    parent = Twistd(
        "chatgateway",
        ["--workers", "2"],
        env={
            "JWT_SECRET": SECRET,
            "CACHE_URI": redis_server.uri,
            "HTTP_PORT": str(port),
            "GRPC_PORT": str(free_port()),
            "HTTP_INTERFACE": "127.0.0.1",
            "CHAT_SERVICE_URI": f"127.0.0.1:{free_port()}",
        },
        port=port,
        log_dir=tmp_path,
    )
    parent.start()
    deadline = time.monotonic() + 20
    while not children_of(parent.pid):
        assert time.monotonic() < deadline, parent.log_tail()
        time.sleep(0.1)  # polling for the worker to appear
    (worker,) = children_of(parent.pid)
    parent.kill()
    deadline = time.monotonic() + 20
    while os.path.exists(f"/proc/{worker}") and open(f"/proc/{worker}/stat").read().split()[2] != "Z":
        assert time.monotonic() < deadline, "the worker outlived its parent"
        time.sleep(0.1)
