"""Rooms, memberships and events of the reference core: what each call may do and changes.

Storage is chatgateway.devcore.storage (SQLite), publication
chatgateway.devcore.publishing, the rules shared by calls chatgateway.devcore.rules.

Decisions (the API leaves them open):

- One store: SQLite, ``:memory:`` by default or a file (CORE_DB) that survives
  a restart. Every operation holds one lock; gRPC calls arrive on many threads.
- The caller must be non-empty (UNAUTHENTICATED). An unknown room is NOT_FOUND;
  a room the caller is not a member of is PERMISSION_DENIED.
- CreateRoom: a client ``id`` is an idempotency key. The same caller repeating
  it gets the existing room back unchanged; another caller gets ALREADY_EXISTS.
  Client ids are 1-128 characters of ``[A-Za-z0-9._~@:+-]`` (they name bus
  channels). The caller becomes the only owner; ``member_ids`` join as member.
- Roles: "owner", "admin", "member" (normalized, deduplicated). Owners and
  admins add, remove, re-role members and update the room; only an owner
  grants or revokes "owner" or removes an owner; only an owner deletes the
  room. Anyone may leave. No change may leave a room without
  an owner (FAILED_PRECONDITION): the last owner deletes the room instead.
  Adding a profile that is already a member returns its subscription
  unchanged; removing a non-member is skipped. Each request is validated in
  full before anything changes.
- SendEvent: the server assigns id, sent_at and sender_id; TYPE_UNSPECIFIED
  becomes TEXT; clients may not send SYSTEM events. ``replaces_event_id`` (an
  edit; with ``redacted`` a redaction) must name the caller's own event of the
  room and marks the new event ``edited``; ``relates_to_event_id`` must name
  an event of the room. History is append-only: originals are kept.
- Paging: page sizes and limits default to 50, are capped at 500, negative is
  INVALID_ARGUMENT. Cursors are opaque (urlsafe base64 of JSON naming the kind,
  the room and a position); a cursor that does not decode, or belongs to
  another kind or room, is INVALID_ARGUMENT. A next_cursor is set exactly when
  more items follow. SearchRooms streams at least one page and, when ``limit``
  cuts it short, leaves a cursor to continue. History cursors are positions:
  either direction may continue from one.
- Publishing (docs/architecture.md#redis-keys-and-channels), after the
  transaction commits and still under the lock, so publish order is stored
  order: each stored event as a ServerEvent on the room channel; each membership change as a SubscriptionEvent on the
  profile channel, ADDED before the room's SYSTEM event about it, REMOVED after.
  Joins, leaves, removals, role changes and room updates are SYSTEM events in
  the room, payload ``{"action": ..., ...}``. DeleteRoom publishes an
  unstored "room_deleted" SYSTEM event, then REMOVED for every member.
  A failing publish is logged; the stored change stands.
"""

import contextlib
import time
import uuid

import grpc
from google.protobuf import struct_pb2, timestamp_pb2

from chatgateway.api import chat_pb2 as pb
from chatgateway.devcore.publishing import Outbox
from chatgateway.devcore.rules import (
    MEMBER,
    OWNER,
    ROOM_ID,
    CoreError,
    decode_cursor,
    encode_cursor,
    normalize_roles,
    page_limit,
    rank,
    require_caller,
)
from chatgateway.devcore.storage import ChatStorage

_Code = grpc.StatusCode
_Change = pb.SubscriptionEvent.Change


class ChatModel:
    """The domain logic of the core. Methods take the caller's profile id first."""

    def __init__(self, db_path=":memory:", clock=time.time, publish=None):
        self._clock = clock
        self._publish = publish
        self._storage = ChatStorage(db_path)

    def close(self):
        self._storage.close()

    # ------------------------------------------------------------ rooms

    def create_room(self, caller, request):
        if not request.name.strip():
            raise CoreError(_Code.INVALID_ARGUMENT, "name is required")
        if request.id and not ROOM_ID.fullmatch(request.id):
            raise CoreError(_Code.INVALID_ARGUMENT, "id must be 1-128 characters of A-Z a-z 0-9 . _ ~ @ : + -")
        if any(not member for member in request.member_ids):
            raise CoreError(_Code.INVALID_ARGUMENT, "member_ids must not be empty strings")
        with self._transaction(caller) as outbox:
            if request.id:
                existing = self._storage.find_room(request.id)
                if existing is not None:
                    if existing.created_by != caller:
                        raise CoreError(_Code.ALREADY_EXISTS, f"room {request.id} exists")
                    return pb.CreateRoomResponse(room=existing)
            now = self._now()
            room = pb.Room(
                id=request.id or uuid.uuid4().hex,
                name=request.name,
                description=request.description,
                is_private=request.is_private,
                created_by=caller,
                created_at=now,
                updated_at=now,
            )
            if request.HasField("metadata"):
                room.metadata.CopyFrom(request.metadata)
            self._storage.insert_room(room)
            self._subscribe(outbox, room.id, caller, [OWNER], now)
            self._system(outbox, room.id, caller, "room_created", name=room.name)
            for member in dict.fromkeys(request.member_ids):
                if member != caller:
                    self._subscribe(outbox, room.id, member, [MEMBER], now)
                    self._system(outbox, room.id, caller, "member_added", profile_id=member, roles=[MEMBER])
            return pb.CreateRoomResponse(room=room)

    def search_rooms(self, caller, request):
        """An iterator of SearchRoomsResponse pages; each page is read under the lock."""
        page_size = page_limit(request.page_size, "page_size")
        if request.limit < 0:
            raise CoreError(_Code.INVALID_ARGUMENT, "limit must not be negative")
        require_caller(caller)
        after = decode_cursor(request.cursor, "rooms", caller, int) if request.cursor else 0
        return self._room_pages(caller, request.query, page_size, request.limit, after)

    def _room_pages(self, caller, query, page_size, limit, after):
        remaining = limit or None
        while True:
            size = page_size if remaining is None else min(page_size, remaining)
            with self._reading(caller):
                rooms, more = self._storage.rooms_page(caller, query, after, size)
            page = pb.SearchRoomsResponse(data=[room for _, room in rooms])
            if more:
                after = rooms[-1][0]
                page.next_cursor = encode_cursor(k="rooms", s=caller, p=after)
            if remaining is not None:
                remaining -= len(page.data)
            yield page
            if not more or remaining == 0:
                return

    def update_room(self, caller, request):
        if request.HasField("name") and not request.name.strip():
            raise CoreError(_Code.INVALID_ARGUMENT, "name must not be empty")
        with self._transaction(caller) as outbox:
            room, mine = self._membership_of(caller, request.room_id)
            if rank(mine.roles) < 2:
                raise CoreError(_Code.PERMISSION_DENIED, "only an owner or admin updates the room")
            changed = []
            for field in ("name", "description", "is_private", "metadata"):
                if request.HasField(field) and getattr(room, field) != getattr(request, field):
                    changed.append(field)
                    if field == "metadata":
                        room.metadata.CopyFrom(request.metadata)
                    else:
                        setattr(room, field, getattr(request, field))
            if changed:
                room.updated_at.CopyFrom(self._now())
                self._storage.save_room(room)
                self._system(outbox, room.id, caller, "room_updated", fields=changed)
            return pb.UpdateRoomResponse(room=room)

    def delete_room(self, caller, request):
        with self._transaction(caller) as outbox:
            room, mine = self._membership_of(caller, request.room_id)
            if OWNER not in mine.roles:
                raise CoreError(_Code.PERMISSION_DENIED, "only an owner deletes the room")
            members = [sub.profile_id for sub in self._storage.subscriptions(room.id)]
            self._storage.delete_room(room.id)
            self._system(outbox, room.id, caller, "room_deleted", store=False)
            for member in members:
                self._notify(outbox, room.id, member, _Change.REMOVED, [])
            return pb.DeleteRoomResponse(room_id=room.id)

    # ------------------------------------------------------------ memberships

    def add_room_subscriptions(self, caller, request):
        wanted = {}
        for member in request.members:
            if not member.profile_id:
                raise CoreError(_Code.INVALID_ARGUMENT, "every member needs a profile_id")
            wanted.setdefault(member.profile_id, normalize_roles(member.roles) or [MEMBER])
        if not wanted:
            raise CoreError(_Code.INVALID_ARGUMENT, "members is required")
        with self._transaction(caller) as outbox:
            room, mine = self._membership_of(caller, request.room_id)
            if rank(mine.roles) < 2:
                raise CoreError(_Code.PERMISSION_DENIED, "only an owner or admin adds members")
            if OWNER not in mine.roles and any(OWNER in roles for roles in wanted.values()):
                raise CoreError(_Code.PERMISSION_DENIED, "only an owner grants owner")
            now = self._now()
            result = []
            for profile_id, roles in wanted.items():
                sub = self._storage.find_subscription(room.id, profile_id)
                if sub is None:
                    sub = self._subscribe(outbox, room.id, profile_id, roles, now)
                    self._system(outbox, room.id, caller, "member_added", profile_id=profile_id, roles=roles)
                result.append(sub)
            return pb.AddRoomSubscriptionsResponse(subscriptions=result)

    def remove_room_subscriptions(self, caller, request):
        with self._transaction(caller) as outbox:
            room, mine = self._membership_of(caller, request.room_id)
            leaving = []
            for profile_id in dict.fromkeys(request.profile_ids):
                sub = self._storage.find_subscription(room.id, profile_id)
                if sub is None:
                    continue
                if profile_id != caller:
                    if rank(mine.roles) < 2:
                        raise CoreError(_Code.PERMISSION_DENIED, "only an owner or admin removes others")
                    if OWNER in sub.roles and OWNER not in mine.roles:
                        raise CoreError(_Code.PERMISSION_DENIED, "only an owner removes an owner")
                leaving.append(sub)
            removed_owners = sum(OWNER in sub.roles for sub in leaving)
            if removed_owners and removed_owners >= self._storage.owner_count(room.id):
                raise CoreError(
                    _Code.FAILED_PRECONDITION, "the last owner cannot leave: make another owner or delete the room"
                )
            for sub in leaving:
                self._storage.delete_subscription(room.id, sub.profile_id)
                action = "member_left" if sub.profile_id == caller else "member_removed"
                self._system(outbox, room.id, caller, action, profile_id=sub.profile_id)
                self._notify(outbox, room.id, sub.profile_id, _Change.REMOVED, [])
            return pb.RemoveRoomSubscriptionsResponse(removed_profile_ids=[sub.profile_id for sub in leaving])

    def update_subscription_role(self, caller, request):
        if not request.roles:
            raise CoreError(_Code.INVALID_ARGUMENT, "roles is required")
        roles = normalize_roles(request.roles)
        with self._transaction(caller) as outbox:
            room, mine = self._membership_of(caller, request.room_id)
            if rank(mine.roles) < 2:
                raise CoreError(_Code.PERMISSION_DENIED, "only an owner or admin changes roles")
            sub = self._storage.find_subscription(room.id, request.profile_id)
            if sub is None:
                raise CoreError(_Code.NOT_FOUND, f"{request.profile_id} is not a member of room {room.id}")
            touches_owner = OWNER in roles or OWNER in sub.roles
            if touches_owner and OWNER not in mine.roles:
                raise CoreError(_Code.PERMISSION_DENIED, "only an owner grants or revokes owner")
            if list(sub.roles) == roles:
                return pb.UpdateSubscriptionRoleResponse(subscription=sub)
            if OWNER in sub.roles and OWNER not in roles and self._storage.owner_count(room.id) == 1:
                raise CoreError(_Code.FAILED_PRECONDITION, "the last owner cannot be demoted")
            sub.roles[:] = roles
            self._storage.save_subscription(sub)
            self._system(outbox, room.id, caller, "role_changed", profile_id=sub.profile_id, roles=roles)
            self._notify(outbox, room.id, sub.profile_id, _Change.ROLE_CHANGED, roles)
            return pb.UpdateSubscriptionRoleResponse(subscription=sub)

    def search_room_subscriptions(self, caller, request):
        page_size = page_limit(request.page_size, "page_size")
        with self._reading(caller):
            room, _ = self._membership_of(caller, request.room_id)
            after = decode_cursor(request.cursor, "subscriptions", room.id, str) if request.cursor else ""
            subs, more = self._storage.subscriptions_page(room.id, request.query, after, page_size)
        response = pb.SearchRoomSubscriptionsResponse(data=[sub for _, sub in subs])
        if more:
            response.next_cursor = encode_cursor(k="subscriptions", s=room.id, p=subs[-1][0])
        return response

    # ------------------------------------------------------------ events

    def send_event(self, caller, request):
        if not request.HasField("event"):
            raise CoreError(_Code.INVALID_ARGUMENT, "event is required")
        event = pb.RoomEvent()
        event.CopyFrom(request.event)
        if event.type not in pb.RoomEvent.Type.values():
            raise CoreError(_Code.INVALID_ARGUMENT, f"unknown event type {event.type}")
        if event.type == pb.RoomEvent.SYSTEM:
            raise CoreError(_Code.INVALID_ARGUMENT, "SYSTEM events are the server's")
        if event.redacted and not event.replaces_event_id:
            raise CoreError(_Code.INVALID_ARGUMENT, "redacted needs replaces_event_id")
        with self._transaction(caller) as outbox:
            room, _ = self._membership_of(caller, event.room_id)
            if event.replaces_event_id:
                original = self._find_event(room.id, event.replaces_event_id)
                if original.sender_id != caller:
                    raise CoreError(_Code.PERMISSION_DENIED, "only the sender edits or redacts an event")
            if event.relates_to_event_id:
                self._find_event(room.id, event.relates_to_event_id)
            event.edited = bool(event.replaces_event_id)
            event.type = event.type or pb.RoomEvent.TEXT
            self._store_event(outbox, event, caller)
            return pb.SendEventResponse(event=event)

    def get_history(self, caller, request):
        limit = page_limit(request.limit, "limit")
        forward = request.direction == pb.GetHistoryRequest.FORWARD
        if request.after_epoch and not forward:
            raise CoreError(_Code.INVALID_ARGUMENT, "after_epoch/after_offset read FORWARD only")
        with self._reading(caller):
            room, _ = self._membership_of(caller, request.room_id)
            if request.after_epoch:
                # By position (the publish contract's): the events of that epoch after the offset.
                events, more = self._storage.history_after_position(
                    room.id, request.after_epoch, request.after_offset, limit
                )
            else:
                if request.cursor:
                    position = decode_cursor(request.cursor, "history", room.id, int)
                else:
                    position = 0 if forward else 2**63 - 1
                events, more = self._storage.history_page(room.id, position, forward, limit)
        response = pb.GetHistoryResponse(events=[event for _, event in events])
        if more:
            response.next_cursor = encode_cursor(k="history", s=room.id, p=events[-1][0])
        return response

    def record_position(self, event_id, epoch, offset):
        """The publish contract gave the stored event ``event_id`` this position in its room
        (GetHistory after_epoch/after_offset reads by it)."""
        with self._storage.locked(), self._storage.atomically():
            return self._storage.set_position(event_id, epoch, offset)

    # ------------------------------------------------------------ helpers

    @contextlib.contextmanager
    def _reading(self, caller):
        require_caller(caller)
        with self._storage.locked():
            yield

    @contextlib.contextmanager
    def _transaction(self, caller):
        """Commit or roll back; publish the outbox only after a commit, still under the lock."""
        with self._reading(caller):
            outbox = Outbox(self._publish)
            with self._storage.atomically():
                yield outbox
            outbox.send()

    def _now(self):
        stamp = timestamp_pb2.Timestamp()
        stamp.FromNanoseconds(round(self._clock() * 1e9))
        return stamp

    def _membership_of(self, caller, room_id):
        """(room, caller's subscription); NOT_FOUND or PERMISSION_DENIED."""
        if not room_id:
            raise CoreError(_Code.INVALID_ARGUMENT, "room_id is required")
        room = self._storage.find_room(room_id)
        if room is None:
            raise CoreError(_Code.NOT_FOUND, f"room {room_id} not found")
        sub = self._storage.find_subscription(room_id, caller)
        if sub is None:
            raise CoreError(_Code.PERMISSION_DENIED, f"not a member of room {room_id}")
        return room, sub

    def _find_event(self, room_id, event_id):
        event = self._storage.find_event(room_id, event_id)
        if event is None:
            raise CoreError(_Code.NOT_FOUND, f"event {event_id} not found in room {room_id}")
        return event

    def _subscribe(self, outbox, room_id, profile_id, roles, now):
        sub = pb.RoomSubscription(room_id=room_id, profile_id=profile_id, roles=roles, joined_at=now)
        self._storage.save_subscription(sub)
        self._notify(outbox, room_id, profile_id, _Change.ADDED, roles)
        return sub

    def _notify(self, outbox, room_id, profile_id, change, roles):
        outbox.subscription_changed(room_id, profile_id, change, roles, self._now())

    def _system(self, outbox, room_id, actor, action, store=True, **fields):
        payload = struct_pb2.Struct()
        payload.update({"action": action, **fields})
        event = pb.RoomEvent(room_id=room_id, type=pb.RoomEvent.SYSTEM, payload=payload)
        self._store_event(outbox, event, actor, store)

    def _store_event(self, outbox, event, sender_id, store=True):
        """Complete the server's fields of ``event``, store it and queue its publication."""
        event.id = uuid.uuid4().hex
        event.sender_id = sender_id
        event.sent_at.CopyFrom(self._now())
        if store:
            self._storage.insert_event(event)
        outbox.room_event(event)
