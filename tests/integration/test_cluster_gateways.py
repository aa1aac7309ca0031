"""Two real gateways and the reference core on a real Redis Cluster (3 primaries, 3 replicas):
delivery across gateways in rooms on every shard, the per-device limit, the limits per profile
and per room, membership changes, and a primary killed during traffic with every published
event delivered."""

import json

import pytest
import pytest_twisted
import test_resume_gateways as resume_gateways
from twisted.internet import defer, reactor, task, threads

from chatgateway.api import chat_pb2 as pb
from chatgateway.api import codec
from chatgateway.auth.devtokens import mint_token
from chatgateway.bus import channels, roomstream
from chatgateway.client.wsclient import GatewayClient
from chatgateway.redisconn.slots import key_slot
from support.chat import rescope_across_gateways, unique, wait_until
from support.processes import Twistd, free_port
from support.rediscluster import RedisCluster

# The secret of test_resume_gateways, whose resume scenario runs here too.
SECRET = resume_gateways.SECRET
# Above what the other tests' profiles send (an owner creates up to 60 rooms), below a test's own.
PROFILE_BURST = 400
ROOM_BURST = 200


def token(profile, device=None):
    return mint_token(SECRET, profile, device_id=device, audience="service_chat_gateway")


class Deployment:
    def __init__(self):
        self.redis = RedisCluster()
        self.core_port = free_port()
        env = {"JWT_SECRET": SECRET, "CACHE_URI": self.redis.uri, "OAUTH2_ISSUER": "", "LOG_LEVEL": "info"}
        self.core = Twistd("chatcore", ["--port", self.core_port], env=env, port=self.core_port)
        self.gateways = []
        for i in range(2):
            port = free_port()
            gateway_env = {
                **env,
                "CHAT_SERVICE_URI": f"127.0.0.1:{self.core_port}",
                "HTTP_PORT": str(port),
                "GRPC_PORT": str(free_port()),
                "HTTP_INTERFACE": "127.0.0.1",
                "GATEWAY_ID": f"gw-{i}",
                "HEARTBEAT_INTERVAL_SEC": "0.5",
                "CONNECTION_TIMEOUT_SEC": "3",
                "MAX_EVENTS_PER_SECOND": "1000",
                # Slow enough that nothing refills while the module runs: the bursts are exact.
                "PROFILE_EVENTS_PER_SECOND": "0.01",
                "PROFILE_EVENTS_BURST": str(PROFILE_BURST),
                "ROOM_EVENTS_PER_SECOND": "0.01",
                "ROOM_EVENTS_BURST": str(ROOM_BURST),
            }
            self.gateways.append(Twistd("chatgateway", ["--workers", "1"], env=gateway_env, port=port))
        self.core.start()
        for gateway in self.gateways:
            gateway.start()

    def url(self, i):
        return f"ws://127.0.0.1:{self.gateways[i].port}/ws"

    def stop(self):
        for gateway in self.gateways:
            gateway.stop()
        self.core.stop()
        self.redis.cleanup()


@pytest.fixture(scope="module")
def deployment():
    d = Deployment()
    yield d
    d.stop()
    for g in d.gateways:
        assert "Traceback (most recent call last)" not in g.log_text(), g.log_tail(80)


async def connect(deployment, i, profile, device=None, subprotocol=codec.JSON):
    client = await GatewayClient.connect(deployment.url(i), token(profile, device), subprotocol=subprotocol)
    client.connected = await client.next_event("connected")
    return client


def shard_of(deployment, room_id):
    return deployment.redis.node_of_slot(key_slot(channels.room(room_id))).port


async def rooms_on_every_shard(deployment, owner, members, per_shard=1):
    """Rooms created through the core until every primary owns ``per_shard`` of them (all of
    them: a room left without events would be reported DATA_LOSS after a resubscribe, as its
    devices have no position in it to fill from)."""
    by_shard = {}
    for _ in range(60):
        room = (await owner.call("CreateRoom", pb.CreateRoomRequest(name="spread", member_ids=members))).room
        by_shard.setdefault(shard_of(deployment, room.id), []).append(room.id)
        if len(by_shard) == 3 and min(len(v) for v in by_shard.values()) >= per_shard:
            break
    assert len(by_shard) == 3
    ordered = sorted(by_shard.values(), key=len)
    return [room for rooms in ordered for room in rooms]


def room_messages(client, room_id):
    events = client.pending()
    return [(e.id, e.epoch, e.offset) for e in events if e.HasField("message") and e.message.room_id == room_id]


@pytest_twisted.ensureDeferred
async def test_devices_on_two_gateways_get_each_others_room_events_on_every_shard(deployment):
    a_id, b_id = unique("alice"), unique("bob")
    alice = await connect(deployment, 0, a_id)
    bob = await connect(deployment, 1, b_id, subprotocol=codec.PROTO)
    rooms = await rooms_on_every_shard(deployment, alice, [b_id])
    # bob learnt of each new room (a membership change on his profile channel's shard)
    for room in rooms:
        await bob.next_event("subscription_event", lambda e, room=room: e.subscription_event.room_id == room)
    for room in rooms:
        sent = await alice.send_message(room, f"from gw-0 to {room}")
        await bob.next_event("message", lambda e, sent=sent: e.message.id == sent.id)
        back = await bob.send_message(room, "from gw-1")
        await alice.next_event("message", lambda e, back=back: e.message.id == back.id)
    assert {alice.connected.connected.gateway_id, bob.connected.connected.gateway_id} == {"gw-0", "gw-1"}
    r = deployment.redis.client()
    assert json.loads(r.get(f"gateway:conn:{b_id}:{bob.connected.connected.device_id}"))["gateway_id"] == "gw-1"
    await alice.close()
    await bob.close()


@pytest_twisted.ensureDeferred
async def test_the_per_device_limit_holds_across_gateways(deployment):
    r = deployment.redis.client()
    for _attempt in range(3):
        profile = unique("racer")
        connects = [
            defer.Deferred.fromCoroutine(GatewayClient.connect(deployment.url(i), token(profile, "phone")))
            for i in (0, 1)
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


async def typing(client, room_id):
    (result,) = await client.command(typing=pb.TypingCommand(room_id=room_id, typing=True))
    return result.error.status or "OK", result.error.meta.get("limit", "")


@pytest_twisted.ensureDeferred
async def test_the_limits_per_profile_and_per_room_hold_across_gateways(deployment):
    # The two limits' keys are in different slots: one script each (docs/operations.md#redis-cluster).
    owner = await connect(deployment, 0, unique("owner"))
    alice_id = unique("alice")
    rooms = [
        (await owner.call("CreateRoom", pb.CreateRoomRequest(name="limits", member_ids=[alice_id]))).room.id
        for _ in range(6)
    ]
    phone = await connect(deployment, 0, alice_id, "phone")
    laptop = await connect(deployment, 1, alice_id, "laptop")
    # PROFILE_BURST commands over six rooms (within every room's limit), from both gateways
    sent = [await typing((phone, laptop)[i % 2], rooms[i % 6]) for i in range(PROFILE_BURST)]
    assert sent == [("OK", "")] * PROFILE_BURST
    assert await typing(laptop, rooms[0]) == ("RESOURCE_EXHAUSTED", "profile")
    assert await typing(phone, rooms[1]) == ("RESOURCE_EXHAUSTED", "profile")

    senders = [await connect(deployment, i % 2, unique("sender")) for i in range(3)]
    members = [c.connected.connected.profile_id for c in senders]
    room = (await owner.call("CreateRoom", pb.CreateRoomRequest(name="busy", member_ids=members))).room.id
    for sender in senders:  # each learns of the room from its profile's channel
        await sender.next_event("subscription_event", lambda e: e.subscription_event.room_id == room)
    statuses = [await typing(senders[i % 3], room) for i in range(ROOM_BURST + 3)]
    assert statuses == [("OK", "")] * ROOM_BURST + [("RESOURCE_EXHAUSTED", "room")] * 3
    for client in (owner, phone, laptop, *senders):
        await client.close()


@pytest_twisted.ensureDeferred
async def test_a_membership_change_on_one_gateway_rescopes_the_profile_on_the_other(deployment):
    owner_id, joiner_id = unique("owner"), unique("joiner")
    owner = await connect(deployment, 0, owner_id)
    joiner = await connect(deployment, 1, joiner_id)
    await rescope_across_gateways(owner, joiner, joiner_id)
    # the membership cache lives on the profile channel's shard, tagged with it
    r = deployment.redis.client()
    assert r.get(f"gateway:memberships:{{chat:profile:{joiner_id}}}:version") is not None
    await owner.close()
    await joiner.close()


def check_resumed_exactly_once(first, second, sent, reconnected):
    before = resume_gateways.BEFORE
    assert reconnected.resumed and reconnected.gateway_id == "gw-1"
    assert [m[0] for m in first] == sent[:before]
    assert [m[0] for m in second] == sent[before:]  # every event it missed, once, in order
    offsets = [m[2] for m in first + second]
    assert offsets == list(range(offsets[0], offsets[0] + len(offsets)))
    assert len({m[1] for m in first + second}) == 1


@pytest.mark.parametrize("how", ["token and position", "the server-side record"])
@pytest_twisted.ensureDeferred
async def test_a_device_resumes_on_the_other_gateway(deployment, how):
    # test_resume_gateways' scenario: leave gw-0, events go on, come back on gw-1 while events
    # keep coming; the positions record is on the cluster (one script per device there).
    def with_token(first, connected, room_id):
        _, epoch, offset = resume_gateways.messages(first, room_id)[-1]
        return {"resume_token": connected.resume_token, "positions": {room_id: (epoch, offset)}}

    def with_nothing(first, connected, room_id):
        return {}

    resume_with = with_token if how == "token and position" else with_nothing
    check_resumed_exactly_once(*await resume_gateways.scenario((deployment.redis, deployment.gateways), resume_with))


class ContractPublisher:
    """Publishes room events by the contract (cluster form) from a thread with redis-py's
    cluster client, retrying a publish that failed (the shard failing over) until it is in."""

    def __init__(self, cluster):
        self.client = cluster.client()
        self.client_raw = type(self.client)(host="127.0.0.1", port=cluster.running()[0].port, decode_responses=False)
        self.published = {}  # room -> [event ids], in the order the cluster took them
        self.failures = 0

    def publish(self, room_id, text):
        event = pb.RoomEvent(id=unique("ev"), room_id=room_id, sender_id="core", type=pb.RoomEvent.SYSTEM)
        event.payload.update({"text": text})
        payload = pb.ServerEvent(id=event.id, message=event).SerializeToString()
        script, keys, args = roomstream.publish_call(room_id, payload, cluster=True)
        while True:
            try:
                self.client_raw.eval(script, len(keys), *keys, *args)
                break
            except Exception:  # noqa: BLE001 - the shard is failing over: the publish did not happen, again
                self.failures += 1
                import time

                time.sleep(0.05)
        self.published.setdefault(room_id, []).append(event.id)


@pytest_twisted.ensureDeferred
async def test_a_primary_killed_during_traffic_every_published_event_is_delivered(deployment):
    # Last in the module: the cluster keeps one primary fewer (its replica took over).
    owner_id, member_id = unique("owner"), unique("member")
    owner = await connect(deployment, 0, owner_id, "d")
    rooms = await rooms_on_every_shard(deployment, owner, [member_id])
    devices = [
        owner,
        await connect(deployment, 1, member_id, "json"),
        await connect(deployment, 0, member_id, "p", codec.PROTO),
    ]
    for room in rooms:
        sent = await owner.send_message(room, "warm-up")
        for device in devices:
            await device.next_event("message", lambda e, sent=sent: e.message.id == sent.id)
    victim_room = rooms[0]
    slot = key_slot(channels.room(victim_room))
    publisher = ContractPublisher(deployment.redis)

    def traffic():
        for i in range(120):
            if i == 40:
                with deployment.redis.node_of_slot(slot).client() as c:
                    c.execute_command("WAIT", 1, 1000)  # the replica has every event so far
                deployment.redis.kill_primary_of(slot)
            publisher.publish(rooms[i % len(rooms)], f"e{i}")

    # The core sends too, through the failover: its bus holds a publish whose shard has no
    # primary until the promoted replica answers (sessions' order kept per room).
    through_core = {room: [] for room in rooms}
    running = threads.deferToThread(traffic)
    i = 0
    while not running.called:
        room = rooms[i % len(rooms)]
        through_core[room].append((await owner.send_message(room, f"core {i}")).id)
        i += 1
        await task.deferLater(reactor, 0.02, lambda: None)
    await running
    assert publisher.failures > 0  # some publishes met the failover and were sent again
    expected = {room: publisher.published.get(room, []) + through_core[room] for room in rooms}

    def complete(device):
        got = {m[0] for room in rooms for m in room_messages(device, room)}
        return all(set(ids) <= got for ids in expected.values())

    for device in devices:
        try:
            await wait_until(lambda device=device: complete(device), 40)
        except AssertionError:
            missing = {
                r: [i for i in ids if i not in {m[0] for m in room_messages(device, r)}] for r, ids in expected.items()
            }
            logs = "\n".join(p.log_tail(60) for p in [deployment.core, *deployment.gateways])
            raise AssertionError(f"missing {missing} on {device.connected.connected.gateway_id}\n{logs}") from None
    for device in devices:
        for room in rooms:
            messages = room_messages(device, room)
            ours = [m for m in messages if m[0] in set(expected[room])]
            ids = [m[0] for m in ours]
            assert sorted(ids) == sorted(expected[room])  # each once
            published, core = set(publisher.published.get(room, [])), set(through_core[room])
            assert [i for i in ids if i in published] == publisher.published.get(room, [])  # in order
            assert [i for i in ids if i in core] == through_core[room]
            offsets = [m[2] for m in ours]  # nothing else was published in the room meanwhile
            assert offsets == list(range(offsets[0], offsets[0] + len(offsets)))  # nothing skipped
            assert len({m[1] for m in messages}) == 1  # one epoch: the stream survived the failover
        errors = [(e.error.status, e.error.message) for e in device.pending("error")]
        assert errors == [], (errors, rooms, [shard_of(deployment, r) for r in rooms])  # no DATA_LOSS

    sent = await owner.send_message(victim_room, "after the failover")
    for device in devices[1:]:
        await device.next_event("message", lambda e: e.message.id == sent.id)
    logs = "\n".join(g.log_text() for g in deployment.gateways)
    assert "reading the streams" in logs or "filled" in logs
    for device in devices:
        await device.close()
    await task.deferLater(reactor, 0, lambda: None)
