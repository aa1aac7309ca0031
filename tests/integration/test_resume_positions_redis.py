"""The devices' server-side positions on a real redis-server: the SAVE script's rule (never back
within an epoch, another epoch replaces), its TTL, batches of many devices, read back."""

import pytest_twisted
from twisted.internet import reactor
from zope.interface.verify import verifyObject

from chatgateway import config as configuration
from chatgateway.store.redis import RedisStore
from chatgateway.store.resumepositions import (
    SAVE_CHUNK,
    IResumePositions,
    RedisResumePositions,
    make_resume_positions,
    resume_key,
)
from support.redis import eventually


@pytest_twisted.ensureDeferred
async def test_records_keep_the_furthest_position_within_an_epoch_and_expire(redis_server):
    config = configuration.load({"CACHE_URI": redis_server.uri, "JWT_SECRET": "s" * 32, "GATEWAY_ID": "gw-a"})
    store = RedisStore(config, reactor)
    await store.start()
    try:
        await eventually(lambda: store.ready, what="store ready")
        records = make_resume_positions(store, 120, reactor)
        assert isinstance(records, RedisResumePositions)
        verifyObject(IResumePositions, records)

        await records.save({("alice", "phone"): {"r1": ("e", 5), "r2": ("e", 5)}})
        # The gateway the device left writes late: r1 does not go back; r2's epoch is new.
        await records.save({("alice", "phone"): {"r1": ("e", 3), "r2": ("new", 1), "r3": ("e", 2)}})
        assert await records.load("alice", "phone") == {"r1": ("e", 5), "r2": ("new", 1), "r3": ("e", 2)}
        assert await records.load("alice", "laptop") == {}
        # A start before a room's first event ("", 0) never replaces a position; it fills a gap.
        await records.save({("alice", "phone"): {"r1": ("", 0), "quiet": ("", 0)}})
        assert (await records.load("alice", "phone"))["r1"] == ("e", 5)
        assert (await records.load("alice", "phone"))["quiet"] == ("", 0)
        await records.save({("alice", "phone"): {"quiet": ("e9", 1)}})
        assert (await records.load("alice", "phone"))["quiet"] == ("e9", 1)

        admin = redis_server.client()
        assert 110 < admin.ttl(resume_key("alice", "phone")) <= 120
        assert admin.hget(resume_key("alice", "phone"), "r1") == "e:5"

        many = {("bob", f"d{i}"): {"r1": ("e", i + 1)} for i in range(SAVE_CHUNK * 2 + 5)}
        await records.save(many)
        assert await records.load("bob", f"d{SAVE_CHUNK * 2 + 4}") == {"r1": ("e", SAVE_CHUNK * 2 + 5)}
        assert len(admin.keys("gateway:resume:bob:*")) == len(many)
    finally:
        await store.stop()
