"""On a Redis Cluster (CACHE_URI redis+cluster://) presence is not kept and each shared limit
is its own script: what the gateway does then (docs/operations.md#limits-per-profile-and-per-room)."""

import grpc
from twisted.internet import defer, task
from zope.interface.verify import verifyObject

from chatgateway.api import chat_pb2 as pb
from chatgateway.store.gcra import ClusterGcra, IRateChecks, RedisGcra, make_gcra
from chatgateway.store.presence import IPresenceLeases, NoPresence, RedisPresence, make_presence
from support.wsharness import Harness

CLUSTER = "redis+cluster://10.0.0.1:7000,10.0.0.2:7000"


class RecordingRedis:
    """eval() answers from ``replies`` (one per call) and records the keys of each call."""

    def __init__(self, replies):
        self.replies = list(replies)
        self.keys = []

    def eval(self, script, keys=(), args=()):
        self.keys.append(list(keys))
        return defer.succeed(self.replies.pop(0))


class StoreWithRedis:
    def __init__(self, redis):
        self.redis = redis


def test_a_cluster_uri_keeps_no_presence_and_checks_each_limit_alone():
    store, clock = StoreWithRedis(RecordingRedis([])), task.Clock()
    assert isinstance(make_presence(store, clock, CLUSTER), NoPresence)
    assert isinstance(make_presence(store, clock, "redis://127.0.0.1:6379/0"), RedisPresence)
    assert isinstance(make_gcra(store, clock, "rediss+cluster://10.0.0.1:7000"), ClusterGcra)
    assert isinstance(make_gcra(store, clock, "redis://127.0.0.1:6379/0"), RedisGcra)
    assert verifyObject(IPresenceLeases, NoPresence())
    assert verifyObject(IRateChecks, ClusterGcra(store.redis))


def test_cluster_gcra_sends_one_key_per_script_and_stops_at_the_first_refusal():
    redis = RecordingRedis([[0, 0], [1, 1500]])  # the profile lets it in, the room refuses
    gcra = ClusterGcra(redis)
    assert gcra.check([("profile", "alice", 1.0, 5), ("room", "r1", 1.0, 5)]).result == ("room", 1.5)
    assert redis.keys == [["gateway:limit:profile:alice"], ["gateway:limit:room:r1"]]
    refused_first = RecordingRedis([[1, 800]])
    assert ClusterGcra(refused_first).check([("profile", "a", 1.0, 1), ("room", "r", 1.0, 1)]).result == (
        "profile",
        0.8,
    )
    assert refused_first.keys == [["gateway:limit:profile:a"]]


def test_without_presence_signals_are_relayed_and_the_presence_command_is_unavailable():
    h = Harness(HEARTBEAT_INTERVAL_SEC=10, CONNECTION_TIMEOUT_SEC=3000)
    h.core.rooms.update({"alice": ["r1"], "bob": ["r1"]})
    h.gateway.presence.leases = NoPresence()
    alice = h.connect("alice/laptop")
    h.connect("bob/phone")  # in the membership cache now
    signal = pb.CallSignal(call_id="c", kind=pb.CallSignal.OFFER, room_id="r1", to_profile_id="bob")
    alice.command(request_id="s", call_signal=signal)
    alice.command(request_id="p", presence=pb.GetPresenceRequest(room_id="r1"))
    results = {e.command_result.request_id: e.command_result for e in alice.of("command_result")}
    assert not results["s"].HasField("error")
    assert results["p"].error.code == grpc.StatusCode.UNAVAILABLE.value[0]
    h.stop()
