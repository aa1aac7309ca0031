"""The store on a real Redis Cluster (3 primaries, 3 replicas): the single-Redis store's tests
(test_redis_store), run again against ClusterStore, plus what differs on a cluster."""

import pytest
import pytest_twisted
from test_redis_store import (  # noqa: F401 (collected here, run with this module's fixtures)
    TTL,
    dump,
    make_config,
    meta,
    test_claim_keeps_the_newest_and_release_removes,
    test_connected_writes_the_spec_keys_with_their_ttls,
    test_disconnected_leaves_a_device_another_gateway_holds_now,
    test_disconnected_removes_the_connection,
    test_instance_alive_registers_and_stop_unregisters,
    test_racing_claims_from_two_gateways_leave_exactly_the_limit,
    test_reap_cleans_up_after_a_gateway_whose_registration_expired,
    test_reap_removes_room_entries_whose_metadata_expired_first,
    test_refresh_rewrites_metadata_and_renews_room_ttls_every_few_refreshes,
    test_rooms_changed_adds_and_removes_room_entries,
    test_stop_with_connections_left_leaves_them_to_the_reaper,
)
from twisted.internet import reactor

from chatgateway.redisconn.slots import key_slot
from chatgateway.store import make_store
from chatgateway.store.cluster import ClusterStore
from support.redis import eventually
from support.rediscluster import RedisCluster


@pytest.fixture(scope="module")
def cluster():
    c = RedisCluster()
    yield c
    c.cleanup()


class ClusterAsServer:
    """What test_redis_store's tests use of a RedisServer (uri, client()), for the cluster."""

    def __init__(self, cluster):
        self.cluster = cluster
        self.uri = cluster.uri
        self._client = cluster.client()

    def client(self):
        return self._client


@pytest.fixture
def redis_server(cluster):
    server = ClusterAsServer(cluster)
    server.client().flushall()
    yield server
    server.client().close()


@pytest_twisted.async_yield_fixture
async def stores(redis_server):
    made = []

    async def make(gateway_id="gw-a", uri=None, wait=True, **kwargs):
        config = make_config(uri or redis_server.uri, gateway_id)
        store = ClusterStore(config, reactor, **kwargs)
        made.append(store)
        await store.start()
        if wait:
            await eventually(lambda: store.ready, what="cluster store ready")
        return store

    yield make
    for store in made:
        await store.stop()


def test_make_store_gives_the_cluster_store(redis_server):
    assert isinstance(make_store(make_config(redis_server.uri), reactor), ClusterStore)


@pytest_twisted.ensureDeferred
async def test_open_connection_writes_what_connected_and_claim_write(redis_server, stores):
    separate, combined = await stores(), await stores()
    r = redis_server.client()
    rooms = [f"room-{i}" for i in range(12)]  # spread over every primary
    assert len({redis_server.cluster.node_of_slot(key_slot(f"gateway:room:{room}")).port for room in rooms}) == 3
    await separate.connected(meta(rooms=rooms))
    await separate.claim_device("alice", "phone", "gw-a", "s1", 1)
    expected = dump(r)
    r.flushall()
    assert await combined.open_connection(meta(rooms=rooms), "s1", 1) == []
    assert dump(r) == expected
    for key in ("gateway:conn:alice:phone", "gateway:room:room-3", "gateway:device:alice:phone"):
        assert TTL - 5 < r.ttl(key) <= TTL
    assert await combined.open_connection(meta(rooms=[], at=2000), "s2", 1) == [("gw-a", "s1")]


@pytest_twisted.ensureDeferred
async def test_a_primary_killed_the_store_is_ready_again_and_asks_for_a_rewrite(redis_server, stores):
    # Last in the module: the cluster keeps one primary fewer.
    store = await stores()
    rewrites = []
    store.on_reconnect(lambda: rewrites.append(True))
    await store.connected(meta(rooms=["r1"]))
    slot = key_slot("gateway:conn:alice:phone")
    with redis_server.cluster.node_of_slot(slot).client() as c:
        c.execute_command("WAIT", 1, 1000)
    redis_server.cluster.kill_primary_of(slot)
    await eventually(lambda: not store.ready, what="the store sees the primary gone")
    await eventually(lambda: store.ready, timeout=30, what="ready again on the promoted replica")
    await eventually(lambda: rewrites, what="on_reconnect: rewrite the metadata")
    await store.connected(meta(rooms=["r1"], at=3000))
    assert '"last_active":3000' in redis_server.client().get("gateway:conn:alice:phone")
