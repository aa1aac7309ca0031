"""The limits per profile and per room across gateways, with real processes
(docs/operations.md#limits-per-profile-and-per-room): redis-server, the reference core and
two `twistd chatgateway`, devices over real WebSockets.

The rates are slow (one event per 20 s) so that nothing refills while a test runs: the
counts below are the bursts exactly, however slow the machine.
"""

import pytest
import pytest_twisted

from chatgateway.api import chat_pb2 as pb
from support.chat import unique
from support.twogateways import TwoGateways

PROFILE_BURST = 4
ROOM_BURST = 6
RATE = 0.05


@pytest.fixture
def cluster():
    c = TwoGateways(
        PROFILE_EVENTS_PER_SECOND=RATE,
        PROFILE_EVENTS_BURST=PROFILE_BURST,
        ROOM_EVENTS_PER_SECOND=RATE,
        ROOM_EVENTS_BURST=ROOM_BURST,
    ).start()
    yield c
    c.stop()
    assert c.tracebacks() == []


async def typing(client, room_id):
    (result,) = await client.command(typing=pb.TypingCommand(room_id=room_id, typing=True))
    return result


async def rooms(cluster, *member_lists):
    """Rooms made by an owner of their own (whose commands count against nobody else's limit)."""
    owner = await cluster.connect(0, unique("owner"), "desk")
    made = []
    for members in member_lists:
        request = pb.CreateRoomRequest(name="limits", member_ids=list(members))
        made.append((await owner.call("CreateRoom", request)).room)
    return made


@pytest_twisted.ensureDeferred
async def test_the_profile_limit_holds_for_one_profile_with_devices_on_both_gateways(cluster):
    alice_id = unique("alice")
    (room,) = await rooms(cluster, [alice_id])
    phone = await cluster.connect(0, alice_id, "phone")
    laptop = await cluster.connect(1, alice_id, "laptop")
    results = [await typing(device, room.id) for device in [phone, laptop] * PROFILE_BURST]
    statuses = [r.error.status or "OK" for r in results]
    assert statuses == ["OK"] * PROFILE_BURST + ["RESOURCE_EXHAUSTED"] * PROFILE_BURST
    refused = results[PROFILE_BURST].error
    assert refused.meta["limit"] == "profile"
    assert 0 < int(refused.meta["retry_after_ms"]) <= 1000 / RATE
    refused_on = [
        cluster.metric(i, "chatgateway_server_commands_limited_total", chatgateway_limit_kind="profile") for i in (0, 1)
    ]
    assert refused_on == [PROFILE_BURST / 2, PROFILE_BURST / 2]  # each gateway refused its devices' share


@pytest_twisted.ensureDeferred
async def test_the_room_limit_holds_with_senders_on_both_gateways(cluster):
    senders = [unique("bob"), unique("carol"), unique("dave")]
    (room,) = await rooms(cluster, senders)
    devices = [await cluster.connect(i % 2, profile, "phone") for i, profile in enumerate(senders)]
    results = [await typing(device, room.id) for device in devices * 3]  # three each: within their own limits
    statuses = [r.error.status or "OK" for r in results]
    assert statuses == ["OK"] * ROOM_BURST + ["RESOURCE_EXHAUSTED"] * (3 * len(senders) - ROOM_BURST)
    assert {r.error.meta["limit"] for r in results[ROOM_BURST:]} == {"room"}
    # The room's limit is its own: another room takes events from the same senders.
    (other,) = await rooms(cluster, senders)
    assert (await typing(devices[0], other.id)).error.status == ""


@pytest_twisted.ensureDeferred
async def test_with_redis_unreachable_the_limits_fail_open_and_the_gateway_warns(cluster):
    alice_id = unique("alice")
    (room,) = await rooms(cluster, [alice_id])
    phone = await cluster.connect(0, alice_id, "phone")
    cluster.redis.stop()
    results = [await typing(phone, room.id) for _ in range(2 * PROFILE_BURST)]
    assert [r.error.status or "OK" for r in results] == ["OK"] * (2 * PROFILE_BURST)
    assert "shared rate limits not checked" in cluster.gateways[0].log_text()
    unchecked = cluster.metric(0, "chatgateway_limits_unchecked_total", chatgateway_limit_kind="profile")
    assert unchecked == 2 * PROFILE_BURST
