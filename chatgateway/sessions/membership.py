"""Which memberships a successful forwarded call changed.

The gateway re-scopes its local connections from these at once, instead of
waiting for the core's events to come back over the bus (which a core that
does not publish never sends).
"""

from chatgateway.api import chat_pb2 as pb

Change = pb.SubscriptionEvent.Change


def changes(method, request, response, caller):
    """SubscriptionEvents implied by ``method`` succeeding with ``response``."""
    if method == "CreateRoom":
        room_id = response.room.id
        members = {caller: ["owner"]}
        for profile_id in request.member_ids:
            members.setdefault(profile_id, ["member"])
        return [event(room_id, p, Change.ADDED, roles) for p, roles in members.items()]
    if method == "AddRoomSubscriptions":
        return [
            event(s.room_id or request.room_id, s.profile_id, Change.ADDED, s.roles) for s in response.subscriptions
        ]
    if method == "RemoveRoomSubscriptions":
        return [event(request.room_id, p, Change.REMOVED) for p in response.removed_profile_ids]
    if method == "UpdateSubscriptionRole":
        s = response.subscription
        return [event(s.room_id or request.room_id, s.profile_id, Change.ROLE_CHANGED, s.roles)]
    return []


def event(room_id, profile_id, change, roles=()):
    return pb.SubscriptionEvent(room_id=room_id, profile_id=profile_id, change=change, roles=list(roles))
