"""The reference core keeps each event's position (given by the publish contract) and reads
its history after a position (GetHistory after_epoch/after_offset, FORWARD, paged)."""

import sqlite3

import grpc
import pytest

from chatgateway.api import chat_pb2 as pb
from chatgateway.bus import channels
from chatgateway.devcore.model import ChatModel
from chatgateway.devcore.rules import CoreError
from chatgateway.devcore.storage import ChatStorage


@pytest.fixture
def published():
    return []


@pytest.fixture
def model(published):
    m = ChatModel(publish=lambda channel, payload: published.append((channel, payload)))
    yield m
    m.close()


def positioned_room(model, published, count, epoch="E1"):
    """A room with ``count`` messages, each given the next position as the contract would."""
    model.create_room("alice", pb.CreateRoomRequest(id="r", name="R"))
    offset = 0
    for i in range(count):
        model.send_event("alice", pb.SendEventRequest(event=pb.RoomEvent(room_id="r", payload={"n": i})))
    for channel, payload in published:
        event = pb.ServerEvent.FromString(payload)
        if channel == channels.room("r") and event.HasField("message"):
            offset += 1
            assert model.record_position(event.message.id, epoch, offset)
    return offset


def after(model, epoch, offset, limit=0):
    request = pb.GetHistoryRequest(
        room_id="r", direction=pb.GetHistoryRequest.FORWARD, after_epoch=epoch, after_offset=offset, limit=limit
    )
    return model.get_history("alice", request)


def test_history_after_a_position_gives_the_events_of_that_epoch_after_it_in_order(model, published):
    top = positioned_room(model, published, 8)  # the room_created SYSTEM event is offset 1
    page = after(model, "E1", 3)
    assert [e.offset for e in page.events] == list(range(4, top + 1))
    assert all(e.epoch == "E1" for e in page.events) and not page.next_cursor
    assert after(model, "E1", top).events == []
    assert after(model, "other", 0).events == []


def test_history_after_a_position_is_paged(model, published):
    positioned_room(model, published, 8)
    page = after(model, "E1", 0, limit=4)
    assert [e.offset for e in page.events] == [1, 2, 3, 4] and page.next_cursor
    assert [e.offset for e in after(model, "E1", 4, limit=4).events] == [5, 6, 7, 8]


def test_history_after_a_position_reads_forward_only(model, published):
    positioned_room(model, published, 1)
    request = pb.GetHistoryRequest(room_id="r", after_epoch="E1", after_offset=0)
    with pytest.raises(CoreError) as info:
        model.get_history("alice", request)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_an_unstored_event_has_no_position_to_record(model):
    assert not model.record_position("nope", "E1", 1)


def test_a_database_made_before_positions_gets_their_columns(tmp_path):
    path = str(tmp_path / "core.db")
    db = sqlite3.connect(path)
    db.executescript(
        "CREATE TABLE events (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE,"
        " room_id TEXT NOT NULL, data BLOB NOT NULL);"
    )
    db.execute(
        "INSERT INTO events (id, room_id, data) VALUES ('e1', 'r', ?)", (pb.RoomEvent(id="e1").SerializeToString(),)
    )
    db.commit()
    db.close()
    storage = ChatStorage(path)
    with storage.locked():
        assert storage.set_position("e1", "E1", 1)
        events, more = storage.history_after_position("r", "E1", 0, 10)
    assert [(e.id, e.epoch, e.offset) for _, e in events] == [("e1", "E1", 1)] and not more
    storage.close()
