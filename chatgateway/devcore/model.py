"""Rooms, memberships and events of the reference core, stored in SQLite.

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
- Publishing (DESIGN §7), after the transaction commits and still under the
  lock, so publish order is stored order: each stored event as a ServerEvent
  on the room channel; each membership change as a SubscriptionEvent on the
  profile channel, ADDED before the room's SYSTEM event about it, REMOVED after.
  Joins, leaves, removals, role changes and room updates are SYSTEM events in
  the room, payload ``{"action": ..., ...}``. DeleteRoom publishes an
  unstored "room_deleted" SYSTEM event, then REMOVED for every member.
  A failing publish is logged; the stored change stands.
"""

import base64
import binascii
import contextlib
import json
import re
import sqlite3
import threading
import time
import uuid

import grpc
from google.protobuf import struct_pb2, timestamp_pb2
from twisted.logger import Logger

from chatgateway.bus import channels
from chatgateway.api import chat_pb2 as pb

OWNER, ADMIN, MEMBER = "owner", "admin", "member"
ROLES = (OWNER, ADMIN, MEMBER)
DEFAULT_PAGE = 50
MAX_PAGE = 500

_ROOM_ID = re.compile(r"[A-Za-z0-9._~@:+-]{1,128}")
_Code = grpc.StatusCode
_Change = pb.SubscriptionEvent.Change

_SCHEMA = """
CREATE TABLE IF NOT EXISTS rooms (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL,
    description TEXT NOT NULL,
    data BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS subscriptions (
    room_id TEXT NOT NULL,
    profile_id TEXT NOT NULL,
    is_owner INTEGER NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (room_id, profile_id)
);
CREATE INDEX IF NOT EXISTS subscriptions_by_profile ON subscriptions (profile_id, room_id);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    room_id TEXT NOT NULL,
    data BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_room ON events (room_id, seq);
"""


class CoreError(Exception):
    """A refused call, with the gRPC status it is answered with."""

    def __init__(self, code, message):
        super().__init__(message)
        self.code = code
        self.message = message


def _contains(haystack, needle):
    """Case-insensitive substring, Unicode-aware (SQLite's lower() is ASCII only)."""
    return needle.casefold() in (haystack or "").casefold()


def _require_caller(caller):
    if not caller:
        raise CoreError(_Code.UNAUTHENTICATED, "no caller")


def _normalize_roles(roles):
    unknown = sorted(set(roles) - set(ROLES))
    if unknown:
        raise CoreError(_Code.INVALID_ARGUMENT, f"unknown roles {unknown}: use owner, admin, member")
    return [role for role in ROLES if role in roles]


def _rank(roles):
    """3 owner, 2 admin, 1 member: what the roles allow."""
    if OWNER in roles:
        return 3
    if ADMIN in roles:
        return 2
    return 1


def _page_size(value, name):
    if value < 0:
        raise CoreError(_Code.INVALID_ARGUMENT, f"{name} must not be negative")
    return min(value or DEFAULT_PAGE, MAX_PAGE)


def _encode_cursor(**fields):
    return base64.urlsafe_b64encode(json.dumps(fields, sort_keys=True).encode()).decode()


def _decode_cursor(cursor, kind, scope, position_type):
    """The position a cursor of ``kind`` within ``scope`` names; INVALID_ARGUMENT otherwise."""
    try:
        fields = json.loads(base64.urlsafe_b64decode(cursor.encode("ascii")))
        valid = (
            isinstance(fields, dict)
            and fields.get("k") == kind
            and fields.get("s") == scope
            and type(fields.get("p")) is position_type
        )
    except (ValueError, UnicodeError, binascii.Error):
        valid = False
    if not valid:
        raise CoreError(_Code.INVALID_ARGUMENT, "bad cursor")
    return fields["p"]


class ChatModel:
    """The domain logic of the core. Methods take the caller's profile id first."""

    log = Logger()

    def __init__(self, db_path=":memory:", clock=time.time, publish=None):
        self._clock = clock
        self._publish = publish
        self._lock = threading.Lock()
        self._db = sqlite3.connect(db_path, check_same_thread=False)
        self._db.create_function("contains", 2, _contains, deterministic=True)
        if db_path != ":memory:":
            self._db.execute("PRAGMA journal_mode=WAL")
        with self._db:
            self._db.executescript(_SCHEMA)
        self._closed = False

    def close(self):
        with self._lock:
            if not self._closed:
                self._closed = True
                self._db.close()

    # ------------------------------------------------------------ rooms

    def create_room(self, caller, request):
        if not request.name.strip():
            raise CoreError(_Code.INVALID_ARGUMENT, "name is required")
        if request.id and not _ROOM_ID.fullmatch(request.id):
            raise CoreError(_Code.INVALID_ARGUMENT, "id must be 1-128 characters of A-Z a-z 0-9 . _ ~ @ : + -")
        if any(not member for member in request.member_ids):
            raise CoreError(_Code.INVALID_ARGUMENT, "member_ids must not be empty strings")
        with self._transaction(caller) as outbox:
            if request.id:
                existing = self._find_room(request.id)
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
            self._db.execute(
                "INSERT INTO rooms (id, name, description, data) VALUES (?, ?, ?, ?)",
                (room.id, room.name, room.description, room.SerializeToString()),
            )
            self._subscribe(outbox, room.id, caller, [OWNER], now)
            self._system(outbox, room.id, caller, "room_created", name=room.name)
            for member in dict.fromkeys(request.member_ids):
                if member != caller:
                    self._subscribe(outbox, room.id, member, [MEMBER], now)
                    self._system(outbox, room.id, caller, "member_added", profile_id=member, roles=[MEMBER])
            return pb.CreateRoomResponse(room=room)

    def search_rooms(self, caller, request):
        """An iterator of SearchRoomsResponse pages; each page is read under the lock."""
        page_size = _page_size(request.page_size, "page_size")
        if request.limit < 0:
            raise CoreError(_Code.INVALID_ARGUMENT, "limit must not be negative")
        _require_caller(caller)
        after = _decode_cursor(request.cursor, "rooms", caller, int) if request.cursor else 0
        return self._room_pages(caller, request.query, page_size, request.limit, after)

    def _room_pages(self, caller, query, page_size, limit, after):
        remaining = limit or None
        while True:
            size = page_size if remaining is None else min(page_size, remaining)
            with self._reading(caller):
                rows = self._db.execute(
                    "SELECT r.seq, r.data FROM rooms r"
                    " JOIN subscriptions s ON s.room_id = r.id AND s.profile_id = ?"
                    " WHERE r.seq > ? AND (? = '' OR contains(r.name, ?) OR contains(r.description, ?))"
                    " ORDER BY r.seq LIMIT ?",
                    (caller, after, query, query, query, size + 1),
                ).fetchall()
            page = pb.SearchRoomsResponse(data=[pb.Room.FromString(data) for _, data in rows[:size]])
            more = len(rows) > size
            if more:
                after = rows[size - 1][0]
                page.next_cursor = _encode_cursor(k="rooms", s=caller, p=after)
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
            if _rank(mine.roles) < 2:
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
                self._db.execute(
                    "UPDATE rooms SET name = ?, description = ?, data = ? WHERE id = ?",
                    (room.name, room.description, room.SerializeToString(), room.id),
                )
                self._system(outbox, room.id, caller, "room_updated", fields=changed)
            return pb.UpdateRoomResponse(room=room)

    def delete_room(self, caller, request):
        with self._transaction(caller) as outbox:
            room, mine = self._membership_of(caller, request.room_id)
            if OWNER not in mine.roles:
                raise CoreError(_Code.PERMISSION_DENIED, "only an owner deletes the room")
            members = [sub.profile_id for sub in self._subscriptions(room.id)]
            for table in ("events", "subscriptions"):
                self._db.execute(f"DELETE FROM {table} WHERE room_id = ?", (room.id,))
            self._db.execute("DELETE FROM rooms WHERE id = ?", (room.id,))
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
            wanted.setdefault(member.profile_id, _normalize_roles(member.roles) or [MEMBER])
        if not wanted:
            raise CoreError(_Code.INVALID_ARGUMENT, "members is required")
        with self._transaction(caller) as outbox:
            room, mine = self._membership_of(caller, request.room_id)
            if _rank(mine.roles) < 2:
                raise CoreError(_Code.PERMISSION_DENIED, "only an owner or admin adds members")
            if OWNER not in mine.roles and any(OWNER in roles for roles in wanted.values()):
                raise CoreError(_Code.PERMISSION_DENIED, "only an owner grants owner")
            now = self._now()
            result = []
            for profile_id, roles in wanted.items():
                sub = self._find_subscription(room.id, profile_id)
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
                sub = self._find_subscription(room.id, profile_id)
                if sub is None:
                    continue
                if profile_id != caller:
                    if _rank(mine.roles) < 2:
                        raise CoreError(_Code.PERMISSION_DENIED, "only an owner or admin removes others")
                    if OWNER in sub.roles and OWNER not in mine.roles:
                        raise CoreError(_Code.PERMISSION_DENIED, "only an owner removes an owner")
                leaving.append(sub)
            removed_owners = sum(OWNER in sub.roles for sub in leaving)
            if removed_owners and removed_owners >= self._owner_count(room.id):
                raise CoreError(
                    _Code.FAILED_PRECONDITION, "the last owner cannot leave: make another owner or delete the room"
                )
            for sub in leaving:
                self._db.execute(
                    "DELETE FROM subscriptions WHERE room_id = ? AND profile_id = ?", (room.id, sub.profile_id)
                )
                action = "member_left" if sub.profile_id == caller else "member_removed"
                self._system(outbox, room.id, caller, action, profile_id=sub.profile_id)
                self._notify(outbox, room.id, sub.profile_id, _Change.REMOVED, [])
            return pb.RemoveRoomSubscriptionsResponse(removed_profile_ids=[sub.profile_id for sub in leaving])

    def update_subscription_role(self, caller, request):
        if not request.roles:
            raise CoreError(_Code.INVALID_ARGUMENT, "roles is required")
        roles = _normalize_roles(request.roles)
        with self._transaction(caller) as outbox:
            room, mine = self._membership_of(caller, request.room_id)
            if _rank(mine.roles) < 2:
                raise CoreError(_Code.PERMISSION_DENIED, "only an owner or admin changes roles")
            sub = self._find_subscription(room.id, request.profile_id)
            if sub is None:
                raise CoreError(_Code.NOT_FOUND, f"{request.profile_id} is not a member of room {room.id}")
            touches_owner = OWNER in roles or OWNER in sub.roles
            if touches_owner and OWNER not in mine.roles:
                raise CoreError(_Code.PERMISSION_DENIED, "only an owner grants or revokes owner")
            if list(sub.roles) == roles:
                return pb.UpdateSubscriptionRoleResponse(subscription=sub)
            if OWNER in sub.roles and OWNER not in roles and self._owner_count(room.id) == 1:
                raise CoreError(_Code.FAILED_PRECONDITION, "the last owner cannot be demoted")
            sub.roles[:] = roles
            self._save_subscription(sub)
            self._system(outbox, room.id, caller, "role_changed", profile_id=sub.profile_id, roles=roles)
            self._notify(outbox, room.id, sub.profile_id, _Change.ROLE_CHANGED, roles)
            return pb.UpdateSubscriptionRoleResponse(subscription=sub)

    def search_room_subscriptions(self, caller, request):
        page_size = _page_size(request.page_size, "page_size")
        with self._reading(caller):
            room, _ = self._membership_of(caller, request.room_id)
            after = _decode_cursor(request.cursor, "subscriptions", room.id, str) if request.cursor else ""
            rows = self._db.execute(
                "SELECT profile_id, data FROM subscriptions"
                " WHERE room_id = ? AND profile_id > ? AND (? = '' OR contains(profile_id, ?))"
                " ORDER BY profile_id LIMIT ?",
                (room.id, after, request.query, request.query, page_size + 1),
            ).fetchall()
        response = pb.SearchRoomSubscriptionsResponse(
            data=[pb.RoomSubscription.FromString(data) for _, data in rows[:page_size]]
        )
        if len(rows) > page_size:
            response.next_cursor = _encode_cursor(k="subscriptions", s=room.id, p=rows[page_size - 1][0])
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
        limit = _page_size(request.limit, "limit")
        forward = request.direction == pb.GetHistoryRequest.FORWARD
        with self._reading(caller):
            room, _ = self._membership_of(caller, request.room_id)
            if request.cursor:
                position = _decode_cursor(request.cursor, "history", room.id, int)
            else:
                position = 0 if forward else 2**63 - 1
            comparison, order = (">", "ASC") if forward else ("<", "DESC")
            rows = self._db.execute(
                f"SELECT seq, data FROM events WHERE room_id = ? AND seq {comparison} ?"
                f" ORDER BY seq {order} LIMIT ?",
                (room.id, position, limit + 1),
            ).fetchall()
        response = pb.GetHistoryResponse(events=[pb.RoomEvent.FromString(data) for _, data in rows[:limit]])
        if len(rows) > limit:
            response.next_cursor = _encode_cursor(k="history", s=room.id, p=rows[limit - 1][0])
        return response

    # ------------------------------------------------------------ helpers

    @contextlib.contextmanager
    def _reading(self, caller):
        _require_caller(caller)
        with self._lock:
            if self._closed:
                raise CoreError(_Code.UNAVAILABLE, "the core is shutting down")
            yield

    @contextlib.contextmanager
    def _transaction(self, caller):
        """Commit or roll back; publish the outbox only after a commit, still under the lock."""
        with self._reading(caller):
            outbox = []
            with self._db:
                yield outbox
            for channel, payload in outbox:
                self._send(channel, payload)

    def _send(self, channel, payload):
        if self._publish is None:
            return
        try:
            self._publish(channel, payload)
        except Exception:
            self.log.failure("publishing on {channel} failed", channel=channel)

    def _now(self):
        stamp = timestamp_pb2.Timestamp()
        stamp.FromNanoseconds(round(self._clock() * 1e9))
        return stamp

    def _find_room(self, room_id):
        row = self._db.execute("SELECT data FROM rooms WHERE id = ?", (room_id,)).fetchone()
        return None if row is None else pb.Room.FromString(row[0])

    def _find_subscription(self, room_id, profile_id):
        row = self._db.execute(
            "SELECT data FROM subscriptions WHERE room_id = ? AND profile_id = ?", (room_id, profile_id)
        ).fetchone()
        return None if row is None else pb.RoomSubscription.FromString(row[0])

    def _subscriptions(self, room_id):
        rows = self._db.execute("SELECT data FROM subscriptions WHERE room_id = ? ORDER BY profile_id", (room_id,))
        return [pb.RoomSubscription.FromString(data) for (data,) in rows]

    def _owner_count(self, room_id):
        return self._db.execute(
            "SELECT count(*) FROM subscriptions WHERE room_id = ? AND is_owner", (room_id,)
        ).fetchone()[0]

    def _membership_of(self, caller, room_id):
        """(room, caller's subscription); NOT_FOUND or PERMISSION_DENIED."""
        if not room_id:
            raise CoreError(_Code.INVALID_ARGUMENT, "room_id is required")
        room = self._find_room(room_id)
        if room is None:
            raise CoreError(_Code.NOT_FOUND, f"room {room_id} not found")
        sub = self._find_subscription(room_id, caller)
        if sub is None:
            raise CoreError(_Code.PERMISSION_DENIED, f"not a member of room {room_id}")
        return room, sub

    def _find_event(self, room_id, event_id):
        row = self._db.execute(
            "SELECT data FROM events WHERE id = ? AND room_id = ?", (event_id, room_id)
        ).fetchone()
        if row is None:
            raise CoreError(_Code.NOT_FOUND, f"event {event_id} not found in room {room_id}")
        return pb.RoomEvent.FromString(row[0])

    def _save_subscription(self, sub):
        self._db.execute(
            "INSERT OR REPLACE INTO subscriptions (room_id, profile_id, is_owner, data) VALUES (?, ?, ?, ?)",
            (sub.room_id, sub.profile_id, OWNER in sub.roles, sub.SerializeToString()),
        )

    def _subscribe(self, outbox, room_id, profile_id, roles, now):
        sub = pb.RoomSubscription(room_id=room_id, profile_id=profile_id, roles=roles, joined_at=now)
        self._save_subscription(sub)
        self._notify(outbox, room_id, profile_id, _Change.ADDED, roles)
        return sub

    def _notify(self, outbox, room_id, profile_id, change, roles):
        change_event = pb.SubscriptionEvent(room_id=room_id, profile_id=profile_id, change=change, roles=roles)
        envelope = pb.ServerEvent(id=uuid.uuid4().hex, timestamp=self._now(), subscription_event=change_event)
        outbox.append((channels.profile(profile_id), envelope.SerializeToString()))

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
            self._db.execute(
                "INSERT INTO events (id, room_id, data) VALUES (?, ?, ?)",
                (event.id, event.room_id, event.SerializeToString()),
            )
        envelope = pb.ServerEvent(id=event.id, timestamp=event.sent_at, message=event)
        outbox.append((channels.room(event.room_id), envelope.SerializeToString()))
