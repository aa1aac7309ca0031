"""The membership cache with real processes: redis-server, `twistd chatcore` publishing to it by
the contract, and two `twistd chatgateway` (docs/architecture.md#membership-cache).

Core calls are counted on each gateway's /metrics (rpc.client.call.duration's count of
SearchRooms, and the cache's lookups): the core is called by nobody else here.
"""

import urllib.request

import pytest
import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families

from chatgateway.api import chat_pb2 as pb
from chatgateway.api import codec
from chatgateway.auth.devtokens import mint_token
from chatgateway.client.wsclient import CallError, ClosedError, GatewayClient
from support.chat import fence, unique, wait_until
from support.processes import Twistd, free_port
from support.redis import RedisServer

SECRET = "memcache-test-secret-0123456789abcdef0123"
SEARCH = {"rpc_method": "chat.v1.ChatService/SearchRooms", "rpc_response_status_code": "OK", "rpc_system_name": "grpc"}


def token(profile, device=None):
    return mint_token(SECRET, profile, device_id=device, audience="service_chat_gateway")


class Cluster:
    def __init__(self):
        self.redis = RedisServer()
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
                "MEMBERSHIP_CACHE_TTL_SEC": "600",
                "CORE_TIMEOUT_SEC": "2",
                "MAX_EVENTS_PER_SECOND": "1000",
            }
            self.gateways.append(Twistd("chatgateway", ["--workers", "1"], env=gateway_env, port=port))

    def start(self):
        self.core.start()
        for gateway in self.gateways:
            gateway.start()
        return self

    def stop(self):
        for gateway in self.gateways:
            gateway.stop()
        self.core.stop()
        self.redis.cleanup()

    async def connect(self, i, profile, device=None):
        url = f"ws://127.0.0.1:{self.gateways[i].port}/ws"
        client = await GatewayClient.connect(url, token(profile, device), subprotocol=codec.JSON)
        client.connected = await client.next_event("connected")
        return client

    def metric(self, i, name, **labels):
        """The value of one sample of gateway ``i``'s /metrics (0 when absent)."""
        url = f"http://127.0.0.1:{self.gateways[i].port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as answer:
            text = answer.read().decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                own = {k: v for k, v in sample.labels.items() if not k.startswith("otel_scope")}
                if sample.name == name and own == labels:
                    return sample.value
        return 0.0

    def searches(self, i):
        return self.metric(i, "rpc_client_call_duration_seconds_count", **SEARCH)

    def lookups(self, i, result):
        return self.metric(i, "chatgateway_membership_cache_lookups_total", chatgateway_membership_cache_result=result)


@pytest.fixture
def cluster():
    c = Cluster().start()
    yield c
    c.stop()
    for process in (*c.gateways, c.core):
        assert "Traceback (most recent call last)" not in process.log_text(), process.log_tail(60)


def rooms(client):
    return set(client.connected.connected.room_ids)


@pytest_twisted.ensureDeferred
async def test_a_warm_cache_connect_makes_no_core_call_on_any_gateway(cluster):
    alice = unique("alice")
    first = await cluster.connect(0, alice, "phone")
    room = (await first.call("CreateRoom", pb.CreateRoomRequest(name="cached"))).room
    assert cluster.searches(0) == 1 and cluster.lookups(0, "miss") == 1
    await first.close()

    again = await cluster.connect(1, alice, "laptop")  # the other gateway: the cache is shared
    assert rooms(again) == {room.id}  # the room created after the first connect: the core's ADDED patched the cache
    assert cluster.searches(1) == 0 and cluster.lookups(1, "hit") == 1
    sent = await again.send_message(room.id, "still delivered")
    await again.next_event("message", lambda e: e.message.id == sent.id)
    await again.close()


@pytest_twisted.ensureDeferred
async def test_a_removal_through_one_gateway_is_honoured_on_every_gateway_and_by_the_cache(cluster):
    owner_id, member_id = unique("owner"), unique("member")
    owner = await cluster.connect(0, owner_id)
    member = await cluster.connect(1, member_id, "phone")
    room = (await owner.call("CreateRoom", pb.CreateRoomRequest(name="leaving", member_ids=[member_id]))).room
    await member.next_event("subscription_event", lambda e: e.subscription_event.room_id == room.id)
    sent = await owner.send_message(room.id, "before")
    await member.next_event("message", lambda e: e.message.id == sent.id)

    request = pb.RemoveRoomSubscriptionsRequest(room_id=room.id, profile_ids=[member_id])
    await owner.call("RemoveRoomSubscriptions", request)  # through gateway 0
    await member.next_event("subscription_event", lambda e: e.subscription_event.change == pb.SubscriptionEvent.REMOVED)
    after = await owner.send_message(room.id, "after the removal")
    own = (await member.call("CreateRoom", pb.CreateRoomRequest(name="own"))).room
    await fence(member, own.id)
    assert after.id not in [e.message.id for e in member.pending("message")]  # gateway 1 re-scoped at once

    searches = cluster.searches(1)
    fresh = await cluster.connect(1, member_id, "laptop")  # a fresh connect: from the cache
    assert rooms(fresh) == {own.id}
    assert cluster.searches(1) == searches
    r = cluster.redis.client()
    assert r.smembers(f"gateway:memberships:{member_id}") == {"", own.id}
    for client in (owner, member, fresh):
        await client.close()


@pytest_twisted.ensureDeferred
async def test_with_the_core_stopped_a_cached_profile_connects_and_receives_its_rooms(cluster):
    alice = unique("alice")
    first = await cluster.connect(0, alice, "phone")
    room = (await first.call("CreateRoom", pb.CreateRoomRequest(name="outage"))).room
    await first.close()
    cluster.core.stop()

    device = await cluster.connect(1, alice, "laptop")
    assert rooms(device) == {room.id}
    # Nobody publishes room events through a stopped core: publish one as a core would.
    event = pb.RoomEvent(id=unique("event"), room_id=room.id, sender_id="bob", type=pb.RoomEvent.TEXT)
    payload = pb.ServerEvent(id=event.id, message=event).SerializeToString()
    cluster.redis.client(decode_responses=False).publish(f"chat:room:{room.id}", payload)
    got = await device.next_event("message")
    assert got.message.id == event.id
    with pytest.raises(CallError) as refused:
        await device.send_message(room.id, "the core is down")
    assert refused.value.detail.status == "UNAVAILABLE"

    with pytest.raises(ClosedError) as closed:
        await cluster.connect(1, unique("stranger"))  # not cached: its rooms can only come from the core
    assert closed.value.code == 1013
    await device.close()


@pytest_twisted.ensureDeferred
async def test_redis_keys_of_the_cache(cluster):
    alice = unique("alice")
    client = await cluster.connect(0, alice)
    r = cluster.redis.client()
    await wait_until(lambda: r.exists(f"gateway:memberships:{alice}"))
    assert 0 < r.ttl(f"gateway:memberships:{alice}") <= 600
    assert r.get(f"gateway:memberships:{alice}:version") == "0"
    await client.close()
