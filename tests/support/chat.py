"""Small helpers the integration tests share: unique ids, polling, fences on a device's stream."""

import uuid

from twisted.internet import defer, reactor, task

from chatgateway.api import chat_pb2 as pb


def unique(name):
    """A profile or room name no other test uses."""
    return f"{name}-{uuid.uuid4().hex[:8]}"


async def wait_until(predicate, timeout=10, interval=0.05):
    """Poll ``predicate`` (which may return a Deferred) until true; fail after ``timeout``."""
    deadline = reactor.seconds() + timeout
    while True:
        if await defer.maybeDeferred(predicate):
            return
        if reactor.seconds() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await task.deferLater(reactor, interval, lambda: None)


async def fence(client, room_id):
    """Everything delivered to ``client`` before now has arrived: send to its own room and see it."""
    sent = await client.send_message(room_id, "fence")
    await client.next_event("message", lambda e: e.message.id == sent.id)


def pending_texts(client, room_id):
    """TEXT events of a room received by ``client`` and not taken yet."""
    return [
        e.message
        for e in client.pending("message")
        if e.message.room_id == room_id and e.message.type == pb.RoomEvent.TEXT
    ]


async def rescope_across_gateways(owner, joiner, joiner_id):
    """``owner`` adds ``joiner`` (connected to another gateway) to a new room, then removes it:
    the joiner gets the room's event while a member, and none once removed."""
    room = (await owner.call("CreateRoom", pb.CreateRoomRequest(name="rescope"))).room
    await owner.call(
        "AddRoomSubscriptions",
        pb.AddRoomSubscriptionsRequest(room_id=room.id, members=[pb.RoomSubscription(profile_id=joiner_id)]),
    )
    await joiner.next_event("subscription_event")
    sent = await owner.send_message(room.id, "hello from gw-0")
    await joiner.next_event("message", lambda e: e.message.id == sent.id)
    await owner.call(
        "RemoveRoomSubscriptions", pb.RemoveRoomSubscriptionsRequest(room_id=room.id, profile_ids=[joiner_id])
    )
    await joiner.next_event("subscription_event", lambda e: e.subscription_event.change == pb.SubscriptionEvent.REMOVED)
    gone = await owner.send_message(room.id, "not for you")
    own = (await joiner.call("CreateRoom", pb.CreateRoomRequest(name="own"))).room
    await fence(joiner, own.id)
    assert gone.id not in [e.message.id for e in joiner.pending("message")]
