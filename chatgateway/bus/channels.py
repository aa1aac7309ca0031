"""Names of the bus channels (docs/architecture.md#redis-keys-and-channels).

Room and profile channels carry serialized ServerEvents; a control channel carries JSON.
"""


def room(room_id):
    """Events of one room: messages, typing, receipts."""
    return f"chat:room:{room_id}"


def profile(profile_id):
    """Events for one user: membership changes."""
    return f"chat:profile:{profile_id}"


def control(gateway_id):
    """Control messages for one gateway instance (JSON: evictions)."""
    return f"gateway:ctl:{gateway_id}"
