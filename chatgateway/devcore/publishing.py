"""What the reference core publishes on the bus after a change (docs/architecture.md#redis-keys-and-channels).

Each stored event goes out as a ServerEvent on its room's channel, each membership
change as a SubscriptionEvent on the profile's channel. A transaction queues them in
an Outbox, in order; they are sent only once it has committed. A failing publish is
logged; the stored change stands.
"""

import uuid

from twisted.logger import Logger

from chatgateway.api import chat_pb2 as pb
from chatgateway.bus import channels


class Outbox:
    """The publications of one transaction, sent by ``send`` through ``publish(channel, payload)``."""

    log = Logger()

    def __init__(self, publish):
        self._publish = publish
        self._queued = []  # (channel, serialized ServerEvent), in order

    def room_event(self, event):
        """``event`` (a RoomEvent with its server fields set) on its room's channel."""
        envelope = pb.ServerEvent(id=event.id, timestamp=event.sent_at, message=event)
        self._queued.append((channels.room(event.room_id), envelope.SerializeToString()))

    def subscription_changed(self, room_id, profile_id, change, roles, timestamp):
        """A SubscriptionEvent for ``profile_id`` on the profile's channel."""
        change_event = pb.SubscriptionEvent(room_id=room_id, profile_id=profile_id, change=change, roles=roles)
        envelope = pb.ServerEvent(id=uuid.uuid4().hex, timestamp=timestamp, subscription_event=change_event)
        self._queued.append((channels.profile(profile_id), envelope.SerializeToString()))

    def send(self):
        if self._publish is None:
            return
        for channel, payload in self._queued:
            try:
                self._publish(channel, payload)
            except Exception:
                self.log.failure("publishing on {channel} failed", channel=channel)
