"""The reference core's domain rules, storage and publications, without gRPC."""

import base64
import contextlib
import threading

import grpc
import pytest
from google.protobuf import json_format

from chatgateway.api import chat_pb2 as pb
from chatgateway.bus import channels
from chatgateway.devcore.model import ChatModel
from chatgateway.devcore.rules import CoreError

Code = grpc.StatusCode
Change = pb.SubscriptionEvent.Change


class Clock:
    def __init__(self, now=1_700_000_000.0):
        self.now = now

    def __call__(self):
        self.now += 1.0
        return self.now


@contextlib.contextmanager
def refused(code, match=None):
    with pytest.raises(CoreError) as info:
        yield info
    assert info.value.code == code, info.value.message
    if match:
        assert match in info.value.message


@pytest.fixture
def published():
    return []


@pytest.fixture
def model(published):
    m = ChatModel(clock=Clock(), publish=lambda channel, payload: published.append((channel, payload)))
    yield m
    m.close()


def decoded(published):
    return [(channel, pb.ServerEvent.FromString(payload)) for channel, payload in published]


def summary(published):
    """(channel, what) per publication: the SYSTEM action, the change, or the event type."""
    out = []
    for channel, event in decoded(published):
        if event.HasField("subscription_event"):
            out.append((channel, Change.Name(event.subscription_event.change)))
        elif event.message.type == pb.RoomEvent.SYSTEM:
            out.append((channel, event.message.payload["action"]))
        else:
            out.append((channel, pb.RoomEvent.Type.Name(event.message.type)))
    return out


def create(model, caller, name="room", members=(), **fields):
    request = pb.CreateRoomRequest(name=name, member_ids=list(members), **fields)
    return model.create_room(caller, request).room


def roles_of(model, caller, room_id):
    response = model.search_room_subscriptions(caller, pb.SearchRoomSubscriptionsRequest(room_id=room_id))
    return {sub.profile_id: list(sub.roles) for sub in response.data}


def add(model, caller, room_id, profile_id, roles=()):
    member = pb.RoomSubscription(profile_id=profile_id, roles=list(roles))
    request = pb.AddRoomSubscriptionsRequest(room_id=room_id, members=[member])
    return model.add_room_subscriptions(caller, request).subscriptions


def remove(model, caller, room_id, *profile_ids):
    request = pb.RemoveRoomSubscriptionsRequest(room_id=room_id, profile_ids=list(profile_ids))
    return list(model.remove_room_subscriptions(caller, request).removed_profile_ids)


def set_roles(model, caller, room_id, profile_id, roles):
    request = pb.UpdateSubscriptionRoleRequest(room_id=room_id, profile_id=profile_id, roles=roles)
    return model.update_subscription_role(caller, request).subscription


def send(model, caller, room_id, text="hi", **fields):
    event = pb.RoomEvent(room_id=room_id, **fields)
    event.payload.update({"text": text})
    return model.send_event(caller, pb.SendEventRequest(event=event)).event


def history(model, caller, room_id, **fields):
    return model.get_history(caller, pb.GetHistoryRequest(room_id=room_id, **fields))


def search(model, caller, **fields):
    return list(model.search_rooms(caller, pb.SearchRoomsRequest(**fields)))


def texts(events):
    return [e.payload["text"] for e in events if e.type != pb.RoomEvent.SYSTEM]


# ------------------------------------------------------------ a room with three roles


@pytest.fixture
def team(model):
    """Room where alice owns, bob administers and carol is a member; dave is outside."""
    room = create(model, "alice", "team", members=["bob", "carol"])
    set_roles(model, "alice", room.id, "bob", ["admin"])
    return room.id


# ------------------------------------------------------------ CreateRoom


def test_create_room_makes_the_caller_owner_and_the_listed_profiles_members(model):
    room = create(model, "alice", "general", members=["bob", "carol", "bob", "alice"], description="d")

    assert room.id and room.name == "general" and room.description == "d"
    assert room.created_by == "alice"
    assert room.created_at.seconds > 0 and room.updated_at == room.created_at
    assert roles_of(model, "bob", room.id) == {"alice": ["owner"], "bob": ["member"], "carol": ["member"]}


def test_create_room_keeps_metadata_and_privacy(model):
    request = pb.CreateRoomRequest(name="x", is_private=True)
    request.metadata.update({"topic": "ops"})
    room = model.create_room("alice", request).room

    [page] = search(model, "alice")
    assert page.data[0] == room
    assert room.is_private and room.metadata["topic"] == "ops"


def test_create_room_needs_a_name_and_a_caller(model):
    with refused(Code.INVALID_ARGUMENT, "name"):
        create(model, "alice", "  ")
    with refused(Code.UNAUTHENTICATED):
        create(model, "", "x")
    with refused(Code.INVALID_ARGUMENT):
        create(model, "alice", "x", members=[""])


@pytest.mark.parametrize("bad_id", ["has space", "x" * 129, "slash/es", "new\nline"])
def test_create_room_refuses_client_ids_that_cannot_name_a_channel(model, bad_id):
    with refused(Code.INVALID_ARGUMENT, "id"):
        create(model, "alice", "x", id=bad_id)


def test_server_generates_distinct_room_ids(model):
    assert create(model, "alice", "a").id != create(model, "alice", "b").id


def test_create_room_with_a_client_id_is_idempotent_for_the_same_caller(model, published):
    first = create(model, "alice", "general", id="room-1", members=["bob"])
    count = len(published)

    again = create(model, "alice", "renamed", id="room-1", members=["carol"])

    assert again == first
    assert len(published) == count
    assert roles_of(model, "alice", "room-1") == {"alice": ["owner"], "bob": ["member"]}
    assert [r.id for r in search(model, "alice")[0].data] == ["room-1"]


def test_create_room_with_another_callers_id_is_already_exists(model):
    create(model, "alice", "general", id="room-1")
    with refused(Code.ALREADY_EXISTS):
        create(model, "bob", "mine", id="room-1")


def test_create_room_publishes_added_before_the_system_event_about_it(model, published):
    room = create(model, "alice", "general", members=["bob"])

    assert summary(published) == [
        (channels.profile("alice"), "ADDED"),
        (channels.room(room.id), "room_created"),
        (channels.profile("bob"), "ADDED"),
        (channels.room(room.id), "member_added"),
    ]
    events = decoded(published)
    assert events[0][1].subscription_event == pb.SubscriptionEvent(
        room_id=room.id, profile_id="alice", change=Change.ADDED, roles=["owner"]
    )
    assert events[3][1].message.payload["profile_id"] == "bob"
    assert list(events[3][1].message.payload["roles"]) == ["member"]


# ------------------------------------------------------------ SearchRooms


def test_search_rooms_lists_only_the_callers_rooms_by_substring_of_name_or_description(model):
    create(model, "alice", "Ops Team")
    create(model, "alice", "random", description="about OPS and more")
    create(model, "alice", "Ärger")
    create(model, "bob", "bobs ops")

    def names(query):
        return [r.name for page in search(model, "alice", query=query) for r in page.data]

    assert names("ops") == ["Ops Team", "random"]
    assert names("ärg") == ["Ärger"]
    assert names("") == ["Ops Team", "random", "Ärger"]
    assert names("nothing") == []
    assert [r.name for r in search(model, "bob")[0].data] == ["bobs ops"]


def test_search_rooms_streams_pages_in_creation_order_with_cursors(model):
    ids = [create(model, "alice", f"room {i}").id for i in range(7)]

    pages = search(model, "alice", page_size=3)

    assert [[r.id for r in page.data] for page in pages] == [ids[0:3], ids[3:6], ids[6:7]]
    assert pages[0].next_cursor and pages[1].next_cursor and pages[2].next_cursor == ""
    resumed = search(model, "alice", page_size=10, cursor=pages[0].next_cursor)
    assert [r.id for r in resumed[0].data] == ids[3:]


def test_search_rooms_limit_stops_early_and_leaves_a_cursor_to_continue(model):
    ids = [create(model, "alice", f"room {i}").id for i in range(5)]

    pages = search(model, "alice", page_size=2, limit=3)

    assert [[r.id for r in page.data] for page in pages] == [ids[0:2], ids[2:3]]
    rest = search(model, "alice", cursor=pages[-1].next_cursor)
    assert [r.id for r in rest[0].data] == ids[3:] and rest[0].next_cursor == ""


def test_search_rooms_exact_page_boundary_ends_with_an_empty_cursor(model):
    for i in range(4):
        create(model, "alice", f"room {i}")
    pages = search(model, "alice", page_size=2)
    assert [len(p.data) for p in pages] == [2, 2]
    assert pages[-1].next_cursor == ""


def test_search_rooms_without_rooms_streams_one_empty_page(model):
    assert search(model, "nobody") == [pb.SearchRoomsResponse()]


def test_search_rooms_page_size_defaults_to_50_and_is_capped_at_500(model):
    for i in range(501):
        create(model, "alice", f"room {i}")
    assert [len(p.data) for p in search(model, "alice")][:2] == [50, 50]
    assert [len(p.data) for p in search(model, "alice", page_size=10_000)] == [500, 1]


def test_search_rooms_refuses_bad_arguments(model):
    create(model, "alice", "a")
    create(model, "alice", "b")
    cursor = search(model, "alice", page_size=1)[0].next_cursor
    with refused(Code.INVALID_ARGUMENT, "cursor"):
        search(model, "alice", cursor="not a cursor")
    with refused(Code.INVALID_ARGUMENT, "cursor"):
        search(model, "bob", cursor=cursor)  # another caller's cursor
    with refused(Code.INVALID_ARGUMENT):
        search(model, "alice", page_size=-1)
    with refused(Code.INVALID_ARGUMENT):
        search(model, "alice", limit=-1)
    with refused(Code.UNAUTHENTICATED):
        search(model, "")


# ------------------------------------------------------------ UpdateRoom


def test_update_room_changes_only_the_given_fields(model, team, published):
    del published[:]
    request = pb.UpdateRoomRequest(room_id=team, description="new")
    request.metadata.update({"k": 1})

    room = model.update_room("bob", request).room

    assert room.name == "team" and room.description == "new" and room.metadata["k"] == 1
    assert room.updated_at.ToNanoseconds() > room.created_at.ToNanoseconds()
    assert search(model, "carol")[0].data[0] == room
    [(channel, event)] = decoded(published)
    assert channel == channels.room(team)
    assert event.message.payload["action"] == "room_updated"
    assert list(event.message.payload["fields"]) == ["description", "metadata"]
    assert event.message.sender_id == "bob"


def test_update_room_without_changes_publishes_nothing(model, team, published):
    del published[:]
    model.update_room("alice", pb.UpdateRoomRequest(room_id=team, name="team"))
    assert published == []


def test_update_room_is_for_owners_and_admins(model, team):
    with refused(Code.PERMISSION_DENIED):
        model.update_room("carol", pb.UpdateRoomRequest(room_id=team, name="x"))
    with refused(Code.PERMISSION_DENIED):
        model.update_room("dave", pb.UpdateRoomRequest(room_id=team, name="x"))
    with refused(Code.NOT_FOUND):
        model.update_room("alice", pb.UpdateRoomRequest(room_id="missing", name="x"))
    with refused(Code.INVALID_ARGUMENT):
        model.update_room("alice", pb.UpdateRoomRequest(room_id=team, name=""))
    with refused(Code.INVALID_ARGUMENT):
        model.update_room("alice", pb.UpdateRoomRequest(name="x"))


# ------------------------------------------------------------ DeleteRoom


def test_delete_room_is_for_owners_only(model, team):
    for caller in ("bob", "carol", "dave"):
        with refused(Code.PERMISSION_DENIED):
            model.delete_room(caller, pb.DeleteRoomRequest(room_id=team))
    with refused(Code.NOT_FOUND):
        model.delete_room("alice", pb.DeleteRoomRequest(room_id="missing"))


def test_delete_room_removes_everything_and_tells_every_member(model, published):
    room = create(model, "alice", "doomed", id="doomed", members=["bob"])
    send(model, "bob", room.id)
    del published[:]

    assert model.delete_room("alice", pb.DeleteRoomRequest(room_id=room.id)).room_id == room.id

    assert summary(published) == [
        (channels.room(room.id), "room_deleted"),
        (channels.profile("alice"), "REMOVED"),
        (channels.profile("bob"), "REMOVED"),
    ]
    assert search(model, "bob") == [pb.SearchRoomsResponse()]
    with refused(Code.NOT_FOUND):
        history(model, "alice", room.id)
    again = create(model, "carol", "reborn", id="doomed")
    assert [e.payload["action"] for e in history(model, "carol", again.id).events] == ["room_created"]


# ------------------------------------------------------------ AddRoomSubscriptions


def test_owner_adds_members_with_the_default_role(model, team, published):
    del published[:]
    [sub] = add(model, "alice", team, "dave")

    assert sub.room_id == team and sub.profile_id == "dave" and list(sub.roles) == ["member"]
    assert sub.joined_at.seconds > 0
    assert summary(published) == [(channels.profile("dave"), "ADDED"), (channels.room(team), "member_added")]
    assert search(model, "dave")[0].data[0].id == team


def test_admin_adds_members_and_admins_but_not_owners(model, team):
    add(model, "bob", team, "dave", ["admin"])
    assert roles_of(model, "bob", team)["dave"] == ["admin"]
    with refused(Code.PERMISSION_DENIED, "owner"):
        add(model, "bob", team, "erin", ["owner"])
    add(model, "alice", team, "erin", ["owner", "member", "owner"])
    assert roles_of(model, "bob", team)["erin"] == ["owner", "member"]


def test_members_and_outsiders_cannot_add(model, team):
    with refused(Code.PERMISSION_DENIED):
        add(model, "carol", team, "dave")
    with refused(Code.PERMISSION_DENIED):
        add(model, "dave", team, "dave")
    with refused(Code.NOT_FOUND):
        add(model, "alice", "missing", "dave")


def test_adding_an_existing_member_returns_it_unchanged(model, team, published):
    del published[:]
    [sub] = add(model, "alice", team, "carol", ["admin"])
    assert list(sub.roles) == ["member"]
    assert published == []


def test_add_refuses_bad_members(model, team):
    with refused(Code.INVALID_ARGUMENT, "unknown roles"):
        add(model, "alice", team, "dave", ["king"])
    with refused(Code.INVALID_ARGUMENT):
        add(model, "alice", team, "")
    with refused(Code.INVALID_ARGUMENT):
        model.add_room_subscriptions("alice", pb.AddRoomSubscriptionsRequest(room_id=team))


# ------------------------------------------------------------ RemoveRoomSubscriptions


def test_anyone_can_leave_and_the_system_event_comes_before_removed(model, team, published):
    del published[:]
    assert remove(model, "carol", team, "carol") == ["carol"]

    assert summary(published) == [(channels.room(team), "member_left"), (channels.profile("carol"), "REMOVED")]
    with refused(Code.PERMISSION_DENIED):
        history(model, "carol", team)


def test_owner_and_admin_remove_others(model, team, published):
    add(model, "alice", team, "dave")
    del published[:]
    assert remove(model, "bob", team, "carol", "nobody") == ["carol"]
    assert remove(model, "alice", team, "bob", "dave") == ["bob", "dave"]
    assert roles_of(model, "alice", team) == {"alice": ["owner"]}
    assert summary(published) == [
        (channels.room(team), "member_removed"),
        (channels.profile("carol"), "REMOVED"),
        (channels.room(team), "member_removed"),
        (channels.profile("bob"), "REMOVED"),
        (channels.room(team), "member_removed"),
        (channels.profile("dave"), "REMOVED"),
    ]


def test_members_cannot_remove_others_and_admins_cannot_remove_owners(model, team):
    with refused(Code.PERMISSION_DENIED):
        remove(model, "carol", team, "bob")
    with refused(Code.PERMISSION_DENIED, "owner"):
        remove(model, "bob", team, "alice")
    with refused(Code.PERMISSION_DENIED):
        remove(model, "dave", team, "dave")


def test_a_refused_removal_removes_nobody(model, team):
    with refused(Code.PERMISSION_DENIED):
        remove(model, "bob", team, "carol", "alice")
    assert set(roles_of(model, "alice", team)) == {"alice", "bob", "carol"}


def test_the_last_owner_cannot_leave(model, team):
    with refused(Code.FAILED_PRECONDITION, "last owner"):
        remove(model, "alice", team, "alice")
    set_roles(model, "alice", team, "bob", ["owner"])
    with refused(Code.FAILED_PRECONDITION):
        remove(model, "alice", team, "alice", "bob")
    assert remove(model, "alice", team, "alice") == ["alice"]
    assert roles_of(model, "bob", team) == {"bob": ["owner"], "carol": ["member"]}


# ------------------------------------------------------------ UpdateSubscriptionRole


def test_role_change_is_stored_and_published(model, team, published):
    del published[:]
    sub = set_roles(model, "alice", team, "carol", ["member", "admin"])

    assert list(sub.roles) == ["admin", "member"]
    assert roles_of(model, "carol", team)["carol"] == ["admin", "member"]
    assert summary(published) == [(channels.room(team), "role_changed"), (channels.profile("carol"), "ROLE_CHANGED")]
    change = decoded(published)[1][1].subscription_event
    assert change.room_id == team and list(change.roles) == ["admin", "member"]


def test_admins_manage_non_owner_roles_only(model, team):
    set_roles(model, "bob", team, "carol", ["admin"])
    set_roles(model, "bob", team, "carol", ["member"])
    with refused(Code.PERMISSION_DENIED, "owner"):
        set_roles(model, "bob", team, "carol", ["owner"])
    with refused(Code.PERMISSION_DENIED, "owner"):
        set_roles(model, "bob", team, "alice", ["member"])
    with refused(Code.PERMISSION_DENIED):
        set_roles(model, "carol", team, "carol", ["admin"])
    with refused(Code.PERMISSION_DENIED):
        set_roles(model, "dave", team, "carol", ["admin"])


def test_the_last_owner_cannot_be_demoted(model, team):
    with refused(Code.FAILED_PRECONDITION, "last owner"):
        set_roles(model, "alice", team, "alice", ["admin"])
    set_roles(model, "alice", team, "bob", ["owner"])
    set_roles(model, "bob", team, "alice", ["member"])
    assert roles_of(model, "bob", team) == {"alice": ["member"], "bob": ["owner"], "carol": ["member"]}


def test_role_change_refuses_bad_arguments(model, team, published):
    with refused(Code.NOT_FOUND):
        set_roles(model, "alice", team, "dave", ["admin"])
    with refused(Code.INVALID_ARGUMENT):
        set_roles(model, "alice", team, "carol", [])
    with refused(Code.INVALID_ARGUMENT):
        set_roles(model, "alice", team, "carol", ["root"])
    del published[:]
    set_roles(model, "alice", team, "carol", ["member"])
    assert published == []  # unchanged roles publish nothing


# ------------------------------------------------------------ SearchRoomSubscriptions


def test_search_room_subscriptions_pages_by_profile_id(model):
    members = [f"user{i:02d}" for i in range(12)]
    room = create(model, "alice", "big", members=members)

    def request(**fields):
        return model.search_room_subscriptions("user03", pb.SearchRoomSubscriptionsRequest(room_id=room.id, **fields))

    first = request(page_size=5)
    second = request(page_size=5, cursor=first.next_cursor)
    third = request(page_size=5, cursor=second.next_cursor)
    seen = [s.profile_id for page in (first, second, third) for s in page.data]
    assert seen == sorted(["alice", *members])
    assert third.next_cursor == ""
    assert [s.profile_id for s in request(query="USER1").data] == ["user10", "user11"]


def test_search_room_subscriptions_is_for_members(model, team):
    other = create(model, "alice", "other", members=["x", "y"])
    cursor = model.search_room_subscriptions(
        "alice", pb.SearchRoomSubscriptionsRequest(room_id=other.id, page_size=1)
    ).next_cursor
    with refused(Code.PERMISSION_DENIED):
        model.search_room_subscriptions("dave", pb.SearchRoomSubscriptionsRequest(room_id=team))
    with refused(Code.NOT_FOUND):
        model.search_room_subscriptions("dave", pb.SearchRoomSubscriptionsRequest(room_id="missing"))
    with refused(Code.INVALID_ARGUMENT, "cursor"):
        model.search_room_subscriptions("alice", pb.SearchRoomSubscriptionsRequest(room_id=team, cursor=cursor))


# ------------------------------------------------------------ SendEvent


def test_send_event_assigns_the_server_fields_and_publishes_on_the_room(model, team, published):
    del published[:]
    client = pb.RoomEvent(room_id=team, id="mine", sender_id="mallory", edited=True)
    client.payload.update({"text": "hello"})
    client.sent_at.FromSeconds(5)

    event = model.send_event("carol", pb.SendEventRequest(event=client)).event

    assert event.id and event.id != "mine"
    assert event.sender_id == "carol" and event.room_id == team
    assert event.type == pb.RoomEvent.TEXT and not event.edited
    assert event.sent_at.seconds > 5 and event.payload["text"] == "hello"
    [(channel, published_event)] = decoded(published)
    assert channel == channels.room(team)
    assert published_event.id == event.id
    assert published_event.timestamp == event.sent_at
    assert published_event.message == event
    assert history(model, "carol", team).events[0] == event


def test_send_event_keeps_the_client_type(model, team):
    assert send(model, "carol", team, type=pb.RoomEvent.REACTION).type == pb.RoomEvent.REACTION


def test_send_event_is_for_members_of_existing_rooms(model, team):
    with refused(Code.PERMISSION_DENIED):
        send(model, "dave", team)
    with refused(Code.NOT_FOUND):
        send(model, "alice", "missing")
    with refused(Code.INVALID_ARGUMENT):
        model.send_event("alice", pb.SendEventRequest())
    with refused(Code.INVALID_ARGUMENT, "SYSTEM"):
        send(model, "alice", team, type=pb.RoomEvent.SYSTEM)
    with refused(Code.INVALID_ARGUMENT):
        send(model, "alice", team, type=99)
    with refused(Code.UNAUTHENTICATED):
        send(model, "", team)


def test_edits_and_relations_must_name_events_of_the_room(model, team):
    original = send(model, "carol", team, "orignal")

    edit = send(model, "carol", team, "original", replaces_event_id=original.id)
    reply = send(model, "bob", team, "a reply", relates_to_event_id=original.id)
    redaction = send(model, "carol", team, "", replaces_event_id=original.id, redacted=True)

    assert edit.edited and edit.replaces_event_id == original.id
    assert reply.relates_to_event_id == original.id and not reply.edited
    assert redaction.redacted and redaction.edited
    with refused(Code.PERMISSION_DENIED):
        send(model, "alice", team, "not mine", replaces_event_id=original.id)
    with refused(Code.NOT_FOUND):
        send(model, "carol", team, replaces_event_id="missing")
    with refused(Code.NOT_FOUND):
        send(model, "carol", team, relates_to_event_id="missing")
    with refused(Code.INVALID_ARGUMENT):
        send(model, "carol", team, redacted=True)
    other = create(model, "carol", "other")
    with refused(Code.NOT_FOUND):
        send(model, "carol", other.id, relates_to_event_id=original.id)


# ------------------------------------------------------------ GetHistory


@pytest.fixture
def chat(model):
    """A room with only its room_created event and ten messages m0..m9."""
    room = create(model, "alice", "chat")
    for i in range(10):
        send(model, "alice", room.id, f"m{i}")
    return room.id


def test_history_backward_pages_newest_first(model, chat):
    first = history(model, "alice", chat, limit=4)
    second = history(model, "alice", chat, limit=4, cursor=first.next_cursor)
    third = history(model, "alice", chat, limit=4, cursor=second.next_cursor)

    assert texts(first.events) == ["m9", "m8", "m7", "m6"]
    assert texts(second.events) == ["m5", "m4", "m3", "m2"]
    assert texts(third.events) == ["m1", "m0"]
    assert third.events[-1].payload["action"] == "room_created"
    assert first.next_cursor and second.next_cursor and third.next_cursor == ""


def test_history_forward_pages_oldest_first(model, chat):
    forward = pb.GetHistoryRequest.FORWARD
    first = history(model, "alice", chat, limit=6, direction=forward)
    second = history(model, "alice", chat, limit=6, direction=forward, cursor=first.next_cursor)

    assert first.events[0].payload["action"] == "room_created"
    assert texts(first.events) == ["m0", "m1", "m2", "m3", "m4"]
    assert texts(second.events) == ["m5", "m6", "m7", "m8", "m9"]
    assert second.next_cursor == ""


def test_history_cursor_is_a_position_usable_in_both_directions(model, chat):
    newest = history(model, "alice", chat, limit=3)
    newer_than = history(model, "alice", chat, cursor=newest.next_cursor, direction=pb.GetHistoryRequest.FORWARD)
    assert texts(newer_than.events) == ["m8", "m9"]


def test_history_limit_defaults_to_50_and_is_capped_at_500(model, chat):
    for i in range(10, 600):
        send(model, "alice", chat, f"m{i}")
    assert len(history(model, "alice", chat).events) == 50
    assert len(history(model, "alice", chat, limit=1000).events) == 500
    with refused(Code.INVALID_ARGUMENT):
        history(model, "alice", chat, limit=-1)


def test_history_exact_limit_ends_with_an_empty_cursor(model, chat):
    everything = history(model, "alice", chat, limit=11)
    assert len(everything.events) == 11 and everything.next_cursor == ""


@pytest.mark.parametrize(
    "cursor",
    [
        "%%%",
        "bm90IGpzb24=",  # base64 of "not json"
        base64.urlsafe_b64encode(b'{"k": "history", "s": "other", "p": 3}').decode(),
        base64.urlsafe_b64encode(b'{"k": "rooms", "s": "alice", "p": 3}').decode(),
        base64.urlsafe_b64encode(b'{"k": "history", "p": "3"}').decode(),
    ],
)
def test_history_refuses_a_bad_cursor(model, chat, cursor):
    with refused(Code.INVALID_ARGUMENT, "cursor"):
        history(model, "alice", chat, cursor=cursor)


def test_history_is_for_members(model, chat):
    with refused(Code.PERMISSION_DENIED):
        history(model, "mallory", chat)
    with refused(Code.NOT_FOUND):
        history(model, "alice", "missing")


# ------------------------------------------------------------ publishing, storage, concurrency


def test_publish_failure_does_not_undo_the_stored_change():
    def broken(channel, payload):
        raise ConnectionError("bus down")

    model = ChatModel(publish=broken)
    room = create(model, "alice", "x")
    send(model, "alice", room.id, "kept")
    assert texts(history(model, "alice", room.id).events) == ["kept"]


def test_a_refused_call_publishes_nothing(model, team, published):
    del published[:]
    with refused(Code.PERMISSION_DENIED):
        remove(model, "bob", team, "carol", "alice")
    assert published == []


def test_concurrent_sends_publish_in_stored_order(model, published):
    room = create(model, "alice", "busy", members=[f"p{i}" for i in range(8)])
    del published[:]

    def sender(profile):
        for i in range(25):
            send(model, profile, room.id, f"{profile}-{i}")

    threads = [threading.Thread(target=sender, args=(f"p{i}",)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    stored = history(model, "alice", room.id, limit=500, direction=pb.GetHistoryRequest.FORWARD).events
    messages = [e for e in stored if e.type == pb.RoomEvent.TEXT]
    assert [e.message.id for _, e in decoded(published)] == [e.id for e in messages]
    assert len(messages) == 200


def test_a_closed_model_is_unavailable():
    model = ChatModel()
    model.close()
    with refused(Code.UNAVAILABLE):
        create(model, "alice", "x")


def test_a_database_file_survives_a_restart(tmp_path):
    path = str(tmp_path / "core.sqlite3")
    first = ChatModel(path)
    room = create(first, "alice", "kept", members=["bob"], id="kept")
    before = [send(first, "bob", room.id, f"m{i}") for i in range(3)]
    first.close()

    second = ChatModel(path)
    after = send(second, "alice", room.id, "after restart")

    assert search(second, "bob")[0].data[0] == room
    assert roles_of(second, "bob", room.id) == {"alice": ["owner"], "bob": ["member"]}
    assert history(second, "bob", room.id, limit=4).events[:4] == [after, *reversed(before)]
    with refused(Code.ALREADY_EXISTS):
        create(second, "carol", "x", id="kept")
    second.close()


def test_json_clients_see_system_payloads_as_plain_objects(model, team):
    system = history(model, "alice", team, limit=1).events[0]
    as_json = json_format.MessageToDict(system)
    assert as_json["type"] == "SYSTEM"
    assert as_json["payload"] == {"action": "role_changed", "profile_id": "bob", "roles": ["admin"]}
