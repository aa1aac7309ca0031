"""Presence across gateways with real processes (docs/protocol.md#presence): redis-server,
the reference core and two `twistd chatgateway`, devices over real WebSockets."""

import time

import pytest
import pytest_twisted

from chatgateway.api import chat_pb2 as pb
from chatgateway.store.presence import offline_bound_sec
from support.chat import unique
from support.twogateways import HEARTBEAT_SEC, TwoGateways, token

GRACE_SEC = 3
# A dead gateway's devices are offline once its registration expires, plus one sweep (docs/protocol.md#presence).
BOUND_SEC = offline_bound_sec(HEARTBEAT_SEC)
ONLINE, OFFLINE = pb.PresenceEvent.ONLINE, pb.PresenceEvent.OFFLINE


@pytest.fixture
def cluster():
    c = TwoGateways(PRESENCE_GRACE_SEC=GRACE_SEC).start()
    yield c
    c.stop()
    assert c.tracebacks() == []


def of(profile, status):
    return lambda e: e.presence_event.profile_id == profile and e.presence_event.status == status


async def shared_room(owner, *members):
    return (await owner.call("CreateRoom", pb.CreateRoomRequest(name="presence", member_ids=list(members)))).room


async def presence_of(client, room_id):
    (result,) = await client.command(presence=pb.GetPresenceRequest(room_id=room_id))
    assert not result.HasField("error"), result.error
    response = pb.GetPresenceResponse()
    assert result.body.Unpack(response)
    return response


@pytest_twisted.ensureDeferred
async def test_a_profile_on_another_gateway_goes_online_and_offline_for_its_fellow_members(cluster):
    alice_id, bob_id, carol_id = unique("alice"), unique("bob"), unique("carol")
    alice = await cluster.connect(0, alice_id, "phone")
    room = await shared_room(alice, bob_id)
    carol = await cluster.connect(0, carol_id, "phone")  # shares no room with bob

    bob = await cluster.connect(1, bob_id, "phone")
    online = await alice.next_event("presence_event", of(bob_id, ONLINE))
    assert online.presence_event.room_id == room.id
    assert (await presence_of(alice, room.id)).profile_ids == sorted([alice_id, bob_id])
    status, body = cluster.http(1, "GetPresence", {"roomId": room.id}, token(alice_id))
    assert status == 200 and sorted(body["profileIds"]) == sorted([alice_id, bob_id]), body
    status, body = cluster.http(1, "GetPresence", {"roomId": room.id}, token(carol_id))
    assert (status, body["code"]) == (403, "permission_denied")
    (refused,) = await carol.command(presence=pb.GetPresenceRequest(room_id=room.id))
    assert refused.error.status == "PERMISSION_DENIED"

    await bob.close()
    offline = await alice.next_event("presence_event", of(bob_id, OFFLINE), timeout=GRACE_SEC + 3 * HEARTBEAT_SEC)
    assert offline.presence_event.room_id == room.id
    assert (await presence_of(alice, room.id)).profile_ids == [alice_id]
    assert carol.pending("presence_event") == []
    assert not any(e.presence_event.profile_id == bob_id for e in bob.pending("presence_event"))


@pytest_twisted.ensureDeferred
async def test_a_reconnect_to_the_other_gateway_within_the_grace_sends_no_offline_online_pair(cluster):
    alice_id, bob_id, dave_id = unique("alice"), unique("bob"), unique("dave")
    alice = await cluster.connect(0, alice_id, "phone")
    room = await shared_room(alice, bob_id, dave_id)
    bob = await cluster.connect(1, bob_id, "phone")
    dave = await cluster.connect(1, dave_id, "phone")
    await alice.next_event("presence_event", of(bob_id, ONLINE))
    await alice.next_event("presence_event", of(dave_id, ONLINE))

    await bob.close()
    await cluster.connect(0, bob_id, "phone")  # back at once, on the other gateway
    await dave.close()  # the fence: dave's grace ends after bob's would have
    await alice.next_event("presence_event", of(dave_id, OFFLINE), timeout=GRACE_SEC + 3 * HEARTBEAT_SEC + 5)
    assert [e.presence_event.profile_id for e in alice.pending("presence_event")] == []  # nothing of bob's
    assert (await presence_of(alice, room.id)).profile_ids == sorted([alice_id, bob_id])


@pytest_twisted.ensureDeferred
async def test_the_devices_of_a_sigkilled_gateway_go_offline_within_the_bound(cluster):
    alice_id, bob_id = unique("alice"), unique("bob")
    alice = await cluster.connect(0, alice_id, "phone")
    room = await shared_room(alice, bob_id)
    await cluster.connect(1, bob_id, "phone")
    await cluster.connect(1, bob_id, "laptop")
    await alice.next_event("presence_event", of(bob_id, ONLINE))

    cluster.gateways[1].kill()  # SIGKILL: no close, no release, nothing renewed
    killed = time.monotonic()
    offline = await alice.next_event("presence_event", of(bob_id, OFFLINE), timeout=BOUND_SEC + 5)
    took = time.monotonic() - killed
    assert offline.presence_event.room_id == room.id
    print(f"offline {took:.1f}s after SIGKILL (bound {BOUND_SEC:.0f}s + delivery)")
    assert (await presence_of(alice, room.id)).profile_ids == [alice_id]
    assert cluster.metric(0, "chatgateway_presence_online_profiles") == 1  # alice
