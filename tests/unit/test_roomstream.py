"""The publish contract of room events (chatgateway.bus.roomstream): the scripts, run against
a real redis-server started for the test, and the in-process streams of the memory bus."""

import time

from chatgateway.api import chat_pb2 as pb
from chatgateway.bus import channels, roomstream
from chatgateway.bus.memory import MemoryBus, MemoryHub


def run(client, call):
    script, keys, args = call
    return client.eval(script, len(keys), *keys, *args)


def message(text, room="r1"):
    return pb.ServerEvent(id=f"e-{text}", message=pb.RoomEvent(id=f"e-{text}", room_id=room))


def test_the_script_appends_a_position_that_decodes_as_the_server_event_fields(redis_server):
    client = redis_server.client(decode_responses=False)
    pubsub = client.pubsub()
    pubsub.subscribe(channels.room("r1"))
    assert pubsub.get_message(timeout=5)["type"] == "subscribe"
    sent = [message(str(i)) for i in range(200)]  # offsets past 127: two-byte varints
    for event in sent:
        offset, epoch, _ = run(client, roomstream.publish_call("r1", event.SerializeToString()))
    assert offset == 200
    received = []
    while len(received) < 200:
        got = pubsub.get_message(timeout=5)
        assert got is not None, f"only {len(received)} of 200 published"
        if got["type"] == "message":
            event = pb.ServerEvent()
            event.ParseFromString(got["data"])
            received.append(event)
    assert [e.offset for e in received] == list(range(1, 201))
    assert {e.epoch for e in received} == {epoch.decode()}
    for event, original in zip(received, sent, strict=True):
        event.ClearField("epoch")
        event.ClearField("offset")
        assert event == original  # the rest of the event is untouched
    pubsub.close()


def test_a_payload_that_already_has_a_position_gets_the_scripts(redis_server):
    client = redis_server.client(decode_responses=False)
    stale = pb.ServerEvent(id="x", epoch="old", offset=99).SerializeToString()
    run(client, roomstream.publish_call("r2", stale))
    read = roomstream.parse_read(run(client, roomstream.read_call("r2", 0)))
    event = pb.ServerEvent()
    event.ParseFromString(read.events[0][1])
    assert (event.epoch, event.offset) == (read.epoch, 1)


def test_the_stream_is_read_after_an_offset_and_bounded_by_size(redis_server):
    client = redis_server.client(decode_responses=False)
    for i in range(3000):
        run(client, roomstream.publish_call("r3", message(str(i)).SerializeToString(), max_len=1000))
    read = roomstream.parse_read(run(client, roomstream.read_call("r3", 2990)))
    assert read.top == 3000
    assert [offset for offset, _ in read.events] == list(range(2991, 3001))
    length = client.xlen(roomstream.stream_key("r3"))
    assert 1000 <= length < 1200  # MAXLEN ~: trimmed in whole nodes
    oldest = roomstream.parse_read(run(client, roomstream.read_call("r3", 0, count=1)))
    assert oldest.events[0][0] > 1000  # a reader sees the stream no longer reaches its offset


def test_old_events_leave_the_stream_by_age(redis_server):
    client = redis_server.client(decode_responses=False)
    run(client, roomstream.publish_call("r4", message("a").SerializeToString(), max_age_sec=0.2))
    time.sleep(0.3)  # the script takes Redis's TIME: the test has to let real time pass
    run(client, roomstream.publish_call("r4", message("b").SerializeToString(), max_age_sec=0.2))
    read = roomstream.parse_read(run(client, roomstream.read_call("r4", 0)))
    assert [offset for offset, _ in read.events] == [2]
    assert 0 < client.pttl(roomstream.stream_key("r4")) <= 200


def test_a_lost_position_starts_a_new_epoch_and_a_new_stream(redis_server):
    client = redis_server.client(decode_responses=False)
    for i in range(3):
        _, first, _ = run(client, roomstream.publish_call("r5", message(str(i)).SerializeToString()))
    client.delete(roomstream.position_key("r5"))  # as after a flush, the position first
    offset, second, _ = run(client, roomstream.publish_call("r5", message("x").SerializeToString()))
    assert (offset, second != first) == (1, True)
    read = roomstream.parse_read(run(client, roomstream.read_call("r5", 0)))
    assert (read.epoch, [o for o, _ in read.events]) == (second.decode(), [1])


def test_a_room_without_a_stream_reads_empty(redis_server):
    client = redis_server.client(decode_responses=False)
    assert roomstream.parse_read(run(client, roomstream.read_call("never", 0))) == roomstream.StreamRead("", 0, [])


def test_the_memory_bus_gives_positions_and_keeps_a_bounded_stream():
    hub = MemoryHub()
    hub.streams.limit(5, 3600)
    bus, got = MemoryBus(hub), []
    bus.start(lambda channel, payload: got.append(payload))
    bus.subscribe(channels.room("r"))
    for i in range(8):
        bus.publish_room_event("r", message(str(i)).SerializeToString())
    events = [pb.ServerEvent.FromString(p) for p in got]
    assert [e.offset for e in events] == list(range(1, 9))
    assert len({e.epoch for e in events}) == 1
    read = bus.read_room_stream("r", 2, 100).result
    assert [o for o, _ in read.events] == [4, 5, 6, 7, 8]
    assert read.top == 8
    assert read.events[-1][1] == got[-1]  # the stream keeps what was published


def test_typing_gets_no_position_receipts_and_messages_do():
    hub = MemoryHub()
    bus, got = MemoryBus(hub), []
    bus.start(lambda channel, payload: got.append(pb.ServerEvent.FromString(payload)))
    bus.subscribe(channels.room("r"))
    typing = pb.ServerEvent(id="t", typing_event=pb.TypingEvent(room_id="r", profile_id="p", typing=True))
    receipt = pb.ServerEvent(id="c", receipt_event=pb.ReceiptEvent(room_id="r", profile_id="p", event_id="e"))
    for event in (message("m", "r"), typing, receipt):
        roomstream.publish_event(bus, channels.room("r"), event)
    assert [(e.id, e.offset) for e in got] == [("e-m", 1), ("t", 0), ("c", 2)]


def test_publishing_gives_the_position_given_by_the_contract(redis_server):
    # The reference core stores it with the event (GetHistory after a position reads by it).
    client = redis_server.client(decode_responses=False)
    replies = [run(client, roomstream.publish_call("given", message(str(i)).SerializeToString())) for i in range(2)]
    positions = [roomstream.parse_published(reply) for reply in replies]
    assert [offset for _, offset in positions] == [1, 2] and positions[0][0] == positions[1][0]
    bus = MemoryBus(MemoryHub())
    first = bus.publish_room_event("r", message("a").SerializeToString()).result
    second = bus.publish_room_event("r", message("b").SerializeToString()).result
    assert first[1] == 1 and second == (first[0], 2)
