"""Presence and call signaling in one `twistd chatgateway --dev` (the embedded store, bus and
reference core: docs/protocol.md#presence), over both subprotocols."""

import pytest_twisted

from chatgateway.api import chat_pb2 as pb
from chatgateway.api import codec
from chatgateway.client.wsclient import GatewayClient
from support.chat import unique

ONLINE = pb.PresenceEvent.ONLINE


async def connect(gw, profile, device, subprotocol=codec.JSON):
    client = await GatewayClient.connect(gw.url, gw.token(profile, device), subprotocol=subprotocol)
    await client.next_event("connected")
    return client


@pytest_twisted.ensureDeferred
async def test_presence_and_a_call_in_the_embedded_gateway(dev_gateway):
    alice_id, bob_id = unique("alice"), unique("bob")
    alice = await connect(dev_gateway, alice_id, "laptop")
    room = (await alice.call("CreateRoom", pb.CreateRoomRequest(name="embedded", member_ids=[bob_id]))).room
    bob = await connect(dev_gateway, bob_id, "phone", codec.PROTO)
    online = await alice.next_event("presence_event", lambda e: e.presence_event.profile_id == bob_id)
    assert (online.presence_event.status, online.presence_event.room_id) == (ONLINE, room.id)
    (result,) = await bob.command(presence=pb.GetPresenceRequest(room_id=room.id))
    response = pb.GetPresenceResponse()
    assert result.body.Unpack(response) and sorted(response.profile_ids) == sorted([alice_id, bob_id])

    offer = pb.CallSignal(call_id="c1", kind=pb.CallSignal.OFFER, room_id=room.id, to_profile_id=bob_id)
    offer.payload.update({"sdp": "v=0"})
    (sent,) = await alice.command(call_signal=offer)
    assert not sent.HasField("error"), sent.error
    ring = await bob.next_event("call_signal_event")
    assert (ring.call_signal_event.from_profile_id, ring.call_signal_event.payload["sdp"]) == (alice_id, "v=0")
    await alice.close()
    await bob.close()
