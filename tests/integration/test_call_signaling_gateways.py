"""Call signaling across gateways with real processes (docs/protocol.md#call-signaling):
redis-server, the reference core and two `twistd chatgateway`, devices over real WebSockets."""

import pytest
import pytest_twisted

from chatgateway.api import chat_pb2 as pb
from support.chat import unique, wait_until
from support.twogateways import TwoGateways

Kind = pb.CallSignal.Kind


@pytest.fixture
def cluster():
    c = TwoGateways().start()
    yield c
    c.stop()
    assert c.tracebacks() == []


async def send(client, kind, to, room_id, device="", call_id="call-1", **payload):
    signal = pb.CallSignal(call_id=call_id, kind=kind, room_id=room_id, to_profile_id=to, to_device_id=device)
    signal.payload.update(payload)
    (result,) = await client.command(call_signal=signal)
    return result


def signal_of(kind, call_id="call-1"):
    return lambda e: e.call_signal_event.kind == kind and e.call_signal_event.call_id == call_id


@pytest_twisted.ensureDeferred
async def test_an_offer_on_one_gateway_rings_both_devices_on_the_other_and_an_answer_tells_the_second(cluster):
    alice_id, bob_id = unique("alice"), unique("bob")
    alice = await cluster.connect(0, alice_id, "laptop")
    room = (await alice.call("CreateRoom", pb.CreateRoomRequest(name="call", member_ids=[bob_id]))).room
    phone = await cluster.connect(1, bob_id, "phone")
    tablet = await cluster.connect(1, bob_id, "tablet")

    offered = await send(alice, Kind.OFFER, bob_id, room.id, sdp="v=0 offer")
    assert not offered.HasField("error"), offered.error
    for device in (phone, tablet):
        ring = (await device.next_event("call_signal_event", signal_of(Kind.OFFER))).call_signal_event
        assert (ring.from_profile_id, ring.from_device_id, ring.room_id) == (alice_id, "laptop", room.id)
        assert ring.payload["sdp"] == "v=0 offer"

    answered = await send(phone, Kind.ANSWER, alice_id, room.id, device="laptop", sdp="v=0 answer")
    assert not answered.HasField("error"), answered.error
    answer = (await alice.next_event("call_signal_event", signal_of(Kind.ANSWER))).call_signal_event
    assert (answer.from_profile_id, answer.from_device_id, answer.payload["sdp"]) == (bob_id, "phone", "v=0 answer")
    taken = (await tablet.next_event("call_signal_event", signal_of(Kind.TAKEN))).call_signal_event
    assert (taken.from_device_id, taken.HasField("payload")) == ("phone", False)

    ice = await send(
        alice, Kind.ICE, bob_id, room.id, device="phone", candidate="candidate:1 1 udp 1 10.0.0.1 9 typ host"
    )
    assert not ice.HasField("error")
    await phone.next_event("call_signal_event", signal_of(Kind.ICE))
    assert await send(phone, Kind.END, alice_id, room.id, reason="hangup") is not None
    await alice.next_event("call_signal_event", signal_of(Kind.END))
    # The answering phone is not told its own answer was taken; the tablet heard no ICE meant for the phone.
    assert [e.call_signal_event.kind for e in phone.pending("call_signal_event")] == []
    assert [e.call_signal_event.kind for e in tablet.pending("call_signal_event")] == []
    assert cluster.metric(0, "chatgateway_calls_signals_relayed_total", chatgateway_call_signal_kind="offer") == 1
    assert cluster.metric(1, "chatgateway_calls_signals_relayed_total", chatgateway_call_signal_kind="taken") == 1


@pytest_twisted.ensureDeferred
async def test_a_stranger_is_refused_and_an_offline_member_is_unavailable(cluster):
    alice_id, bob_id, mallory_id, olga_id = unique("alice"), unique("bob"), unique("mallory"), unique("olga")
    alice = await cluster.connect(0, alice_id, "laptop")
    room = (await alice.call("CreateRoom", pb.CreateRoomRequest(name="call", member_ids=[bob_id, olga_id]))).room
    bob = await cluster.connect(1, bob_id, "phone")
    mallory = await cluster.connect(0, mallory_id, "phone")
    own = (await mallory.call("CreateRoom", pb.CreateRoomRequest(name="mallory's"))).room

    for room_id in (room.id, own.id):  # a room of bob's she is not in; her own, bob is not in
        refused = await send(mallory, Kind.OFFER, bob_id, room_id)
        assert refused.error.status == "PERMISSION_DENIED", refused.error
    offline = await send(alice, Kind.OFFER, olga_id, room.id)  # a member, never connected
    assert offline.error.status == "UNAVAILABLE", offline.error
    wrong_device = await send(alice, Kind.OFFER, bob_id, room.id, device="watch")
    assert wrong_device.error.status == "UNAVAILABLE"
    await bob.close()

    async def unavailable():  # once gateway 1 has released bob's lease (it closes a moment after bob)
        gone = await send(alice, Kind.OFFER, bob_id, room.id, call_id="call-2")
        return gone.error.status == "UNAVAILABLE"

    await wait_until(unavailable)
    assert bob.pending("call_signal_event") == []
