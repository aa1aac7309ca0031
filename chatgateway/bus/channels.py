"""Names of the bus channels (DESIGN §7). Payloads are serialized ServerEvents."""


def room(room_id):
    """Events of one room: messages, typing, receipts."""
    return f"chat:room:{room_id}"


def profile(profile_id):
    """Events for one user: membership changes."""
    return f"chat:profile:{profile_id}"


def control(gateway_id):
    """Control messages for one gateway instance."""
    return f"gateway:ctl:{gateway_id}"
