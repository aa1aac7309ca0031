"""The reference core's SQLite storage: rooms, subscriptions and events.

``:memory:`` by default, or a file (CORE_DB, in WAL mode) that survives a restart.
Rows keep the serialized protobuf (``data``) beside the columns the queries need.
gRPC calls arrive on many threads: every operation holds the one lock (``locked``).
"""

import contextlib
import sqlite3
import threading

import grpc

from chatgateway.api import chat_pb2 as pb
from chatgateway.devcore.rules import OWNER, CoreError

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
# Each event's position in its room, given by the publish contract after it was stored
# (chatgateway.bus.roomstream): added to a database made before positions existed.
_POSITIONS = """
ALTER TABLE events ADD COLUMN position_epoch TEXT;
ALTER TABLE events ADD COLUMN position_offset INTEGER;
"""
_POSITIONS_INDEX = "CREATE INDEX IF NOT EXISTS events_by_position ON events (room_id, position_epoch, position_offset)"


def _contains(haystack, needle):
    """Case-insensitive substring, Unicode-aware (SQLite's lower() is ASCII only)."""
    return needle.casefold() in (haystack or "").casefold()


def _message(row, message_class):
    """The message stored in ``row`` (a row of one ``data`` column), or None for no row."""
    return None if row is None else message_class.FromString(row[0])


def _page(rows, size, message_class):
    """([(position, message)], more) of rows (position, data) read with LIMIT size + 1."""
    return [(position, message_class.FromString(data)) for position, data in rows[:size]], len(rows) > size


class ChatStorage:
    """Rows of rooms, subscriptions and events. Callers hold ``locked()`` around every use."""

    def __init__(self, db_path=":memory:"):
        self._lock = threading.Lock()
        self._db = sqlite3.connect(db_path, check_same_thread=False)
        self._db.create_function("contains", 2, _contains, deterministic=True)
        if db_path != ":memory:":
            self._db.execute("PRAGMA journal_mode=WAL")
        with self._db:
            self._db.executescript(_SCHEMA)
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(events)")}
            if "position_epoch" not in columns:
                self._db.executescript(_POSITIONS)
            self._db.execute(_POSITIONS_INDEX)
        self._closed = False

    def close(self):
        with self._lock:
            if not self._closed:
                self._closed = True
                self._db.close()

    @contextlib.contextmanager
    def locked(self):
        """The one lock of every operation; UNAVAILABLE once closed."""
        with self._lock:
            if self._closed:
                raise CoreError(grpc.StatusCode.UNAVAILABLE, "the core is shutting down")
            yield

    def atomically(self):
        """A transaction (a context manager): committed if the block ends, rolled back if it raises."""
        return self._db

    # ------------------------------------------------------------ rooms

    def find_room(self, room_id):
        return _message(self._db.execute("SELECT data FROM rooms WHERE id = ?", (room_id,)).fetchone(), pb.Room)

    def insert_room(self, room):
        self._db.execute(
            "INSERT INTO rooms (id, name, description, data) VALUES (?, ?, ?, ?)",
            (room.id, room.name, room.description, room.SerializeToString()),
        )

    def save_room(self, room):
        self._db.execute(
            "UPDATE rooms SET name = ?, description = ?, data = ? WHERE id = ?",
            (room.name, room.description, room.SerializeToString(), room.id),
        )

    def delete_room(self, room_id):
        """The room, its subscriptions and its events."""
        for table in ("events", "subscriptions"):
            self._db.execute(f"DELETE FROM {table} WHERE room_id = ?", (room_id,))
        self._db.execute("DELETE FROM rooms WHERE id = ?", (room_id,))

    def rooms_page(self, profile_id, query, after, size):
        """([(seq, Room)], more): up to ``size`` of the profile's rooms past ``after`` whose
        name or description contains ``query``, and whether more follow."""
        rows = self._db.execute(
            "SELECT r.seq, r.data FROM rooms r"
            " JOIN subscriptions s ON s.room_id = r.id AND s.profile_id = ?"
            " WHERE r.seq > ? AND (? = '' OR contains(r.name, ?) OR contains(r.description, ?))"
            " ORDER BY r.seq LIMIT ?",
            (profile_id, after, query, query, query, size + 1),
        ).fetchall()
        return _page(rows, size, pb.Room)

    # ------------------------------------------------------------ subscriptions

    def find_subscription(self, room_id, profile_id):
        row = self._db.execute(
            "SELECT data FROM subscriptions WHERE room_id = ? AND profile_id = ?", (room_id, profile_id)
        ).fetchone()
        return _message(row, pb.RoomSubscription)

    def subscriptions(self, room_id):
        rows = self._db.execute("SELECT data FROM subscriptions WHERE room_id = ? ORDER BY profile_id", (room_id,))
        return [pb.RoomSubscription.FromString(data) for (data,) in rows]

    def owner_count(self, room_id):
        return self._db.execute(
            "SELECT count(*) FROM subscriptions WHERE room_id = ? AND is_owner", (room_id,)
        ).fetchone()[0]

    def save_subscription(self, sub):
        self._db.execute(
            "INSERT OR REPLACE INTO subscriptions (room_id, profile_id, is_owner, data) VALUES (?, ?, ?, ?)",
            (sub.room_id, sub.profile_id, OWNER in sub.roles, sub.SerializeToString()),
        )

    def delete_subscription(self, room_id, profile_id):
        self._db.execute("DELETE FROM subscriptions WHERE room_id = ? AND profile_id = ?", (room_id, profile_id))

    def subscriptions_page(self, room_id, query, after, size):
        """([(profile_id, RoomSubscription)], more): up to ``size`` members past ``after``
        (by profile id) whose id contains ``query``, and whether more follow."""
        rows = self._db.execute(
            "SELECT profile_id, data FROM subscriptions"
            " WHERE room_id = ? AND profile_id > ? AND (? = '' OR contains(profile_id, ?))"
            " ORDER BY profile_id LIMIT ?",
            (room_id, after, query, query, size + 1),
        ).fetchall()
        return _page(rows, size, pb.RoomSubscription)

    # ------------------------------------------------------------ events

    def find_event(self, room_id, event_id):
        row = self._db.execute("SELECT data FROM events WHERE id = ? AND room_id = ?", (event_id, room_id)).fetchone()
        return _message(row, pb.RoomEvent)

    def insert_event(self, event):
        self._db.execute(
            "INSERT INTO events (id, room_id, data) VALUES (?, ?, ?)",
            (event.id, event.room_id, event.SerializeToString()),
        )

    def set_position(self, event_id, epoch, offset):
        """Record the position the publish contract gave a stored event (in its columns and its
        data); False when no such event is stored (an unstored event, or one deleted since)."""
        row = self._db.execute("SELECT data FROM events WHERE id = ?", (event_id,)).fetchone()
        if row is None:
            return False
        event = pb.RoomEvent.FromString(row[0])
        event.epoch, event.offset = epoch, offset
        self._db.execute(
            "UPDATE events SET position_epoch = ?, position_offset = ?, data = ? WHERE id = ?",
            (epoch, offset, event.SerializeToString(), event_id),
        )
        return True

    def history_after_position(self, room_id, epoch, offset, size):
        """([(seq, RoomEvent)], more): up to ``size`` events of the room of ``epoch`` with a
        position after ``offset``, in position order, and whether more follow."""
        rows = self._db.execute(
            "SELECT seq, data FROM events WHERE room_id = ? AND position_epoch = ? AND position_offset > ?"
            " ORDER BY position_offset LIMIT ?",
            (room_id, epoch, offset, size + 1),
        ).fetchall()
        return _page(rows, size, pb.RoomEvent)

    def history_page(self, room_id, position, forward, size):
        """([(seq, RoomEvent)], more): up to ``size`` events of the room past ``position``,
        oldest first when ``forward``, else newest first, and whether more follow."""
        comparison, order = (">", "ASC") if forward else ("<", "DESC")
        rows = self._db.execute(
            f"SELECT seq, data FROM events WHERE room_id = ? AND seq {comparison} ? ORDER BY seq {order} LIMIT ?",
            (room_id, position, size + 1),
        ).fetchall()
        return _page(rows, size, pb.RoomEvent)
