"""The WebSocket edge and the session, driven in memory on a task.Clock."""

import json

import grpc
import pytest
from google.protobuf import any_pb2

from chatgateway import config
from chatgateway.api import chat_pb2 as pb
from chatgateway.api import codec
from chatgateway.auth.devtokens import mint_token
from chatgateway.auth.tokens import TokenVerifier
from chatgateway.bus import channels
from support.wsharness import Harness


@pytest.fixture
def h():
    harness = Harness(HEARTBEAT_INTERVAL_SEC=10, CONNECTION_TIMEOUT_SEC=30, MAX_EVENTS_PER_SECOND=5, AUTH_TIMEOUT_SEC=5)
    yield harness
    harness.stop()


def status(result):
    return result.error.status


# ---------------------------------------------------------------- auth paths


def test_header_auth_sends_connected_with_memberships(h):
    h.core.rooms["alice"] = ["r1", "r2"]
    c = h.connect("alice/phone")
    assert c.factory.opened
    (connected,) = c.of("connected")
    assert connected.connected.profile_id == "alice"
    assert connected.connected.device_id == "phone"
    assert list(connected.connected.room_ids) == ["r1", "r2"]
    assert connected.connected.gateway_id == "gw-test"
    assert connected.connected.heartbeat_interval_sec == 10


def test_bad_header_token_is_refused_with_http_401(h):
    c = h.connect("bad-token")
    assert not c.factory.opened
    assert c.closed is not None
    assert "401" in c.client.http_status_line
    assert len(h.gateway.registry) == 0


def test_query_token_authenticates(h):
    c = h.connect("bob", auth="query")
    assert c.of("connected")[0].connected.profile_id == "bob"


def test_bad_query_token_upgrades_then_closes_4401(h):
    c = h.connect("bad", auth="query")
    assert c.factory.opened
    assert c.closed[0] == 4401
    assert "invalid token" in c.closed[1]


def test_first_frame_auth(h):
    c = h.connect(auth="frame")
    assert c.events == []
    c.send(pb.StreamRequest(auth_token="carol", device_id="tablet"))
    connected = c.of("connected")[0].connected
    assert (connected.profile_id, connected.device_id) == ("carol", "tablet")


def test_first_frame_auth_with_bad_token_closes_4401(h):
    c = h.connect(auth="frame")
    c.send(pb.StreamRequest(auth_token="bad"))
    assert c.closed[0] == 4401


def test_first_frame_without_token_closes_4401(h):
    c = h.connect(auth="frame")
    c.send(pb.StreamRequest(command=pb.ClientCommand(request_id="1", typing=pb.TypingCommand(room_id="r"))))
    assert c.closed[0] == 4401


def test_no_auth_within_auth_timeout_closes_4401(h):
    c = h.connect(auth="frame")
    h.advance(4.9)
    assert c.closed is None
    h.advance(0.2)
    assert c.closed[0] == 4401
    assert "authentication timeout" in c.closed[1]


def test_a_device_gone_while_signing_in_leaves_no_session_and_replaces_nothing(h):
    h.core.rooms["alice"] = ["r1"]
    older = h.connect("alice/phone")
    verifying = h.verify_later()
    c = h.connect(auth="frame")
    c.send(pb.StreamRequest(auth_token="alice/phone"))
    c.client.transport.loseConnection()  # gone while its token is verified
    h.flush()
    calls = len(h.core.calls)
    verifying.callback(None)
    assert len(h.core.calls) == calls  # the core is not asked for a device that left

    opening = h.memberships_later()
    c = h.connect("alice/phone")
    c.client.transport.loseConnection()  # gone while its session opens
    h.flush()
    opening.callback([pb.SearchRoomsResponse(data=[pb.Room(id="r1")])])
    h.flush()
    assert older.closed is None  # not replaced by a connection that is gone
    assert list(h.gateway.registry.sessions) == [older.server.session]


def test_a_connection_the_gateway_closes_while_it_signs_in_gets_no_session(h):
    h.core.rooms["alice"] = ["r1"]
    older = h.connect("alice/phone")
    opening = h.memberships_later()
    c = h.connect("alice/phone")
    c.server.close(1008, "over its budget")  # before the session opened
    opening.callback([pb.SearchRoomsResponse(data=[pb.Room(id="r1")])])
    h.flush()
    assert c.closed[0] == 1008 and older.closed is None
    assert list(h.gateway.registry.sessions) == [older.server.session]


def test_device_id_falls_back_to_header_then_default(h):
    assert h.connect("dave", device="kiosk").of("connected")[0].connected.device_id == "kiosk"
    assert h.connect("erin").of("connected")[0].connected.device_id == "default"


def test_proto_subprotocol_uses_binary_frames(h):
    c = h.connect("alice/p", protocols=(codec.PROTO,))
    assert c.server.subprotocol == codec.PROTO
    assert c.of("connected")[0].connected.profile_id == "alice"


def test_unknown_subprotocol_is_refused(h):
    c = h.connect("alice", protocols=("mqtt",))
    assert not c.factory.opened
    assert "400" in c.client.http_status_line


# ---------------------------------------------------------------- bad frames


def test_malformed_json_gets_error_event_and_connection_stays(h):
    c = h.connect("alice")
    c.send_raw(b"{not json")
    (error,) = c.of("error")
    assert error.error.status == "INVALID_ARGUMENT"
    assert "not JSON" in error.error.message
    assert c.closed is None


def test_wrong_types_answered_with_request_id(h):
    c = h.connect("alice")
    c.send_raw(json.dumps({"command": {"requestId": "q1", "typing": {"roomId": 42, "typing": "yes"}}}).encode())
    (result,) = c.of("command_result")
    assert result.command_result.request_id == "q1"
    assert status(result.command_result) == "INVALID_ARGUMENT"
    assert c.closed is None


def test_unknown_command_field_answered_with_request_id(h):
    c = h.connect("alice")
    c.send_raw(json.dumps({"command": {"requestId": "q2", "teleport": {}}}).encode())
    (result,) = c.of("command_result")
    assert result.command_result.request_id == "q2"
    assert status(result.command_result) == "INVALID_ARGUMENT"


def test_empty_command_is_invalid_argument(h):
    c = h.connect("alice")
    (result,) = c.command(request_id="q3")
    assert status(result.command_result) == "INVALID_ARGUMENT"
    assert "unknown or empty command" in result.command_result.error.message


def test_non_object_json_and_binary_on_json_are_errors(h):
    c = h.connect("alice")
    c.send_raw(b"[1, 2, 3]")
    c.send_raw(b"\x00\x01", is_binary=True)
    assert [e.error.status for e in c.of("error")] == ["INVALID_ARGUMENT", "INVALID_ARGUMENT"]
    assert c.closed is None


def test_garbage_protobuf_gets_error_event(h):
    c = h.connect("alice", protocols=(codec.PROTO,))
    c.send_raw(b"\xff\xff\xff\xff\xff", is_binary=True)
    assert c.of("error")[0].error.status == "INVALID_ARGUMENT"
    assert c.closed is None


def test_oversize_frame_closes_1009(h):
    c = h.connect("alice")
    c.send_raw(b"x" * (h.config.max_message_bytes + 1))
    assert c.closed[0] == 1009


def test_unknown_call_method_and_wrong_body_type(h):
    c = h.connect("alice")
    c.command(request_id="m1", call=pb.CallCommand(method="DropDatabase"))
    body = any_pb2.Any()
    body.Pack(pb.DeleteRoomRequest(room_id="r"))
    c.command(request_id="m2", call=pb.CallCommand(method="GetHistory", body=body))
    results = {e.command_result.request_id: e.command_result for e in c.of("command_result")}
    assert status(results["m1"]) == "INVALID_ARGUMENT" and "DropDatabase" in results["m1"].error.message
    assert status(results["m2"]) == "INVALID_ARGUMENT" and "GetHistoryRequest" in results["m2"].error.message
    assert [m for m, _, _ in h.core.calls] == ["SearchRooms"]  # nothing bad was forwarded


# ---------------------------------------------------------------- limits and timers


def test_rate_limit_refills(h):
    h.core.rooms["alice"] = ["r1"]
    c = h.connect("alice")
    for i in range(6):
        c.command(request_id=f"t{i}", typing=pb.TypingCommand(room_id="r1", typing=True))
    results = [e.command_result for e in c.of("command_result")]
    assert [status(r) for r in results] == [""] * 5 + ["RESOURCE_EXHAUSTED"]
    h.advance(0.21)  # one token back at 5 per second
    c.command(request_id="t6", typing=pb.TypingCommand(room_id="r1", typing=True))
    c.command(request_id="t7", typing=pb.TypingCommand(room_id="r1", typing=True))
    results = [e.command_result for e in c.of("command_result")]
    assert [status(r) for r in results[6:]] == ["", "RESOURCE_EXHAUSTED"]
    assert c.closed is None


def test_heartbeat_pings_keep_a_live_device_connected(h):
    c = h.connect("alice")
    for _ in range(10):
        h.advance(10)  # each tick pings; the client's pong counts as activity
    assert c.closed is None


def test_heartbeat_timeout_closes_4408(h):
    c = h.connect("alice")
    # The device goes silent: its pongs never arrive because nothing is pumped.
    for _ in range(3):
        h.clock.advance(10)
    assert c.closed is None
    h.clock.advance(10)
    c.pump.flush()
    assert c.closed[0] == 4408
    assert len(h.gateway.registry) == 0


def test_newer_connection_of_same_device_replaces_older_4001(h):
    first = h.connect("alice/phone")
    second = h.connect("alice/phone")
    h.flush()
    assert first.closed[0] == 4001
    assert second.closed is None
    other_device = h.connect("alice/laptop")
    h.flush()
    assert second.closed is None and other_device.closed is None
    assert len(h.gateway.registry) == 2


def test_token_expiry_closes_4401(h):
    now = h.clock.seconds()
    c = h.connect(f"alice@{now + 60}")
    h.run_for(59)
    assert c.closed is None
    h.run_for(2)
    assert c.closed[0] == 4401
    assert "expired" in c.closed[1]


def test_fresh_token_before_expiry_keeps_connection(h):
    now = h.clock.seconds()
    c = h.connect(f"alice@{now + 60}")
    c.send(pb.StreamRequest(auth_token=f"alice@{now + 600}"))
    h.run_for(120)
    assert c.closed is None
    h.run_for(500, step=5)
    assert c.closed[0] == 4401


def test_fresh_token_of_another_profile_closes_4401(h):
    c = h.connect("alice")
    c.send(pb.StreamRequest(auth_token="mallory"))
    assert c.closed[0] == 4401


# ---------------------------------------------------------------- JWT_LEEWAY_SEC: one rule at the handshake and after


@pytest.fixture
def jwt_tokens(h):
    """The harness with the real TokenVerifier (HS256, JWT_LEEWAY_SEC=30) on its clock;
    makes tokens whose ``exp`` is ``exp`` seconds from now."""
    settings = config.load({"JWT_SECRET": "leeway-test-secret-0123456789abcdef", "JWT_LEEWAY_SEC": "30"})
    h.gateway.verifier = TokenVerifier(settings, clock=h.clock)

    def make(exp):
        issued = h.clock.seconds() - 3600
        return mint_token(
            settings.jwt_secret, "alice", device_id="phone", audience="service_chat_gateway", ttl=3600 + exp, now=issued
        )

    return make


def test_a_token_accepted_within_the_leeway_keeps_its_session_until_exp_plus_leeway(h, jwt_tokens):
    c = h.connect(jwt_tokens(-10))  # 10 s past exp: within JWT_LEEWAY_SEC
    assert c.kinds() == ["connected"]
    h.run_for(19)
    assert c.closed is None  # open until exp + 30, 20 s from now
    h.run_for(1)
    assert c.closed == (4401, "token expired")


def test_a_token_past_exp_plus_leeway_is_refused_at_the_handshake(h, jwt_tokens):
    c = h.connect(jwt_tokens(-30))
    assert not c.factory.opened and c.kinds() == []


def test_a_refreshed_token_within_the_leeway_keeps_the_session_until_its_exp_plus_leeway(h, jwt_tokens):
    c = h.connect(jwt_tokens(5))
    c.send(pb.StreamRequest(auth_token=jwt_tokens(-10)))
    h.run_for(19)
    assert c.closed is None
    h.run_for(1)
    assert c.closed == (4401, "token expired")


def test_a_refreshed_token_past_exp_plus_leeway_closes_4401_at_once(h, jwt_tokens):
    c = h.connect(jwt_tokens(600))
    c.send(pb.StreamRequest(auth_token=jwt_tokens(-31)))
    assert c.closed == (4401, "invalid token: token expired")


# ---------------------------------------------------------------- delivery and membership


def room_message(room_id, text, event_id="e1"):
    event = pb.RoomEvent(id=event_id, room_id=room_id, sender_id="x", type=pb.RoomEvent.TEXT)
    event.payload.update({"text": text})
    return pb.ServerEvent(id=event_id, message=event)


def test_room_events_reach_members_only_in_both_encodings(h):
    h.core.rooms.update({"alice": ["r1"], "bob": ["r1"], "eve": ["r2"]})
    alice = h.connect("alice")
    bob = h.connect("bob", protocols=(codec.PROTO,))
    eve = h.connect("eve")
    h.publish(channels.room("r1"), room_message("r1", "hi"))
    h.publish(channels.room("r1"), room_message("r1", "again", "e2"))
    for c in (alice, bob):
        assert [e.message.id for e in c.of("message")] == ["e1", "e2"]
    assert eve.of("message") == []


def test_typing_reaches_other_members_not_the_sender(h):
    h.core.rooms.update({"alice": ["r1"], "bob": ["r1"]})
    alice, bob = h.connect("alice"), h.connect("bob")
    alice.command(request_id="t", typing=pb.TypingCommand(room_id="r1", typing=True))
    assert [e.typing_event.profile_id for e in bob.of("typing_event")] == ["alice"]
    assert alice.of("typing_event") == []


def test_typing_in_a_room_one_is_not_member_of_is_denied(h):
    h.core.rooms.update({"alice": ["r1"], "bob": ["r2"]})
    alice, bob = h.connect("alice"), h.connect("bob")
    (result,) = alice.command(request_id="t", typing=pb.TypingCommand(room_id="r2", typing=True))
    assert status(result.command_result) == "PERMISSION_DENIED"
    assert bob.of("typing_event") == []


def test_read_marker_reaches_room(h):
    h.core.rooms.update({"alice": ["r1"], "bob": ["r1"]})
    alice, bob = h.connect("alice"), h.connect("bob")
    alice.command(request_id="m", read_marker=pb.ReadMarkerCommand(room_id="r1", event_id="e9"))
    (receipt,) = bob.of("receipt_event")
    assert (receipt.receipt_event.profile_id, receipt.receipt_event.event_id) == ("alice", "e9")


def test_room_event_forwarded_and_reply_carries_core_id(h):
    h.core.rooms["alice"] = ["r1"]
    c = h.connect("alice")
    event = pb.RoomEvent(room_id="r1", type=pb.RoomEvent.TEXT)
    (result,) = c.command(request_id="s1", room_event=event)
    response = pb.SendEventResponse()
    result.command_result.body.Unpack(response)
    assert response.event.id == "e1"
    assert h.core.calls[-1][0] == "SendEvent" and h.core.calls[-1][2] == "alice"


def test_core_error_passed_back_with_its_code(h):
    c = h.connect("alice")
    body = any_pb2.Any()
    body.Pack(pb.GetHistoryRequest(room_id="nope"))
    (result,) = c.command(request_id="h1", call=pb.CallCommand(method="GetHistory", body=body))
    assert result.command_result.error.code == grpc.StatusCode.NOT_FOUND.value[0]
    assert result.command_result.error.status == "NOT_FOUND"


def test_joining_through_call_starts_delivery_without_reconnect(h):
    h.core.rooms.update({"alice": ["r1"]})
    alice, bob = h.connect("alice"), h.connect("bob")
    h.publish(channels.room("r1"), room_message("r1", "before", "e0"))
    assert bob.of("message") == []
    body = any_pb2.Any()
    body.Pack(pb.AddRoomSubscriptionsRequest(room_id="r1", members=[pb.RoomSubscription(profile_id="bob")]))
    (result,) = alice.command(request_id="a1", call=pb.CallCommand(method="AddRoomSubscriptions", body=body))
    assert status(result.command_result) == ""
    h.publish(channels.room("r1"), room_message("r1", "after", "e1"))
    assert [e.message.id for e in bob.of("message")] == ["e1"]


def test_removal_on_profile_channel_stops_delivery(h):
    h.core.rooms.update({"bob": ["r1"]})
    bob = h.connect("bob")
    removed = pb.SubscriptionEvent(room_id="r1", profile_id="bob", change=pb.SubscriptionEvent.REMOVED)
    h.publish(channels.profile("bob"), pb.ServerEvent(id="s", subscription_event=removed))
    assert bob.of("subscription_event")[0].subscription_event.change == pb.SubscriptionEvent.REMOVED
    h.publish(channels.room("r1"), room_message("r1", "gone"))
    assert bob.of("message") == []


def test_unsubscribe_and_subscribe_within_memberships(h):
    h.core.rooms.update({"bob": ["r1"]})
    bob = h.connect("bob")
    bob.command(request_id="u", unsubscribe=pb.RoomsCommand(room_ids=["r1"]))
    h.publish(channels.room("r1"), room_message("r1", "muted", "e1"))
    assert bob.of("message") == []
    bob.command(request_id="s", subscribe=pb.RoomsCommand(room_ids=["r1"]))
    (denied,) = [
        r
        for r in bob.command(request_id="x", subscribe=pb.RoomsCommand(room_ids=["r9"]))
        if r.command_result.request_id == "x"
    ]
    assert status(denied.command_result) == "PERMISSION_DENIED"
    h.publish(channels.room("r1"), room_message("r1", "back", "e2"))
    assert [e.message.id for e in bob.of("message")] == ["e2"]


def test_metadata_in_store_follows_the_connection(h):
    h.core.rooms.update({"alice": ["r1"]})
    c = h.connect("alice/phone")
    meta = json.loads(h.store.values["gateway:conn:alice:phone"])
    assert meta["room_ids"] == ["r1"] and meta["gateway_id"] == "gw-test"
    assert h.store.sets["gateway:room:r1"] == {"alice:phone"}
    c.client.sendClose(1000)
    h.flush()
    assert "gateway:conn:alice:phone" not in h.store.values
    assert "gateway:room:r1" not in h.store.sets


# ---------------------------------------------------------------- origins


def test_origin_policy_refuses_other_sites_with_403():
    h = Harness(ALLOWED_ORIGINS="https://app.example.com, https://*.example.org")
    try:
        refused = h.connect("alice", headers={"Origin": "https://evil.example.net"})
        assert not refused.factory.opened and "403" in refused.client.http_status_line
        for origin in ("https://app.example.com", "https://app.example.com:443", "https://chat.example.org"):
            assert h.connect("alice", headers={"Origin": origin}).factory.opened, origin
        assert (
            h.connect("alice", headers={"Origin": "http://app.example.com"}).client.http_status_line.split()[1] == "403"
        )
        assert h.connect("alice", headers={"Origin": "null"}).client.http_status_line.split()[1] == "403"
        assert h.connect("native-device").factory.opened  # no Origin header
    finally:
        h.stop()


def test_any_origin_when_none_configured(h):
    assert h.connect("alice", headers={"Origin": "https://anywhere.example"}).factory.opened


# ---------------------------------------------------------------- across gateways


def test_device_moving_to_another_gateway_is_evicted_there_through_the_control_channel(h):
    other = h.peer("gw-other")
    try:
        first = h.connect("alice/phone")
        assert h.store.devices["gateway:device:alice:phone"]
        second = other.connect("alice/phone")
        h.flush()
        assert first.closed[0] == 4001
        assert second.closed is None
        assert len(h.gateway.registry) == 0 and len(other.gateway.registry) == 1
        # the device list names only the surviving session
        (entry,) = h.store.devices["gateway:device:alice:phone"]
        assert "gw-other" in entry
    finally:
        other.stop()


def test_malformed_control_message_is_ignored(h):
    c = h.connect("alice")
    h.hub.deliver(channels.control("gw-test"), b"{not json")
    h.hub.deliver(channels.control("gw-test"), b'{"evict": {"session_id": 5}}')
    h.flush()
    assert c.closed is None


def test_bus_reconnect_fills_rooms_from_their_streams_and_tells_only_rooms_without_a_position(h):
    h.core.rooms["alice"] = ["r1", "r2"]
    c = h.connect("alice")
    h.hub.deliver(channels.room("r1"), h.hub.streams.append("r1", room_message("r1", "seen", "e1").SerializeToString()))
    h.flush()
    # Published while pub/sub was down: in the stream, never received.
    h.hub.streams.append("r1", room_message("r1", "missed", "e2").SerializeToString())
    h.gateway._bus_reconnected()
    h.flush()
    assert [(e.id, e.offset) for e in c.of("message")] == [("e1", 1), ("e2", 2)]
    # r2 had no event since it was subscribed: what it missed cannot be told.
    (notice,) = c.of("error")
    assert notice.error.status == "DATA_LOSS"
    assert "r2 may have been missed" in notice.error.message


def test_store_reconnect_rewrites_live_connections(h):
    h.core.rooms["alice"] = ["r1"]
    h.connect("alice/phone")
    h.store.values.clear()
    h.store.sets.clear()
    h.gateway._store_reconnected()
    assert json.loads(h.store.values["gateway:conn:alice:phone"])["room_ids"] == ["r1"]
    assert h.store.sets["gateway:room:r1"] == {"alice:phone"}
    assert "gateway:instance:gw-test" in h.store.values


def test_the_heartbeat_sweeps_a_slice_per_reactor_turn_and_refreshes_once(h, monkeypatch):
    from chatgateway.sessions import gateway as gateway_module

    monkeypatch.setattr(gateway_module, "HEARTBEAT_SLICE", 2)
    clients = [h.connect(f"user{i}") for i in range(5)]
    sessions = list(h.gateway.registry.sessions)
    refreshes, turns = [], []
    real_refresh, real_sweep = h.gateway.store.refresh, h.gateway._sweep
    monkeypatch.setattr(h.gateway.store, "refresh", lambda metas: refreshes.append(metas) or real_refresh(metas))

    def sweep(sessions_, start, now, *rest):
        turns.append((start, sum(s.last_heartbeat == now for s in sessions), len(refreshes)))
        if start == 2:
            sessions[4].closed_by_transport()  # gone before its slice: skipped
        return real_sweep(sessions_, start, now, *rest)

    monkeypatch.setattr(h.gateway, "_sweep", sweep)
    h.clock.advance(10)
    # three turns (the later ones by callLater(0)); two sessions pinged per turn; one refresh at the end
    assert turns == [(0, 0, 0), (2, 2, 0), (4, 4, 0)]
    assert len(refreshes) == 1
    assert sorted(m.profile_id for m in refreshes[0]) == sorted(s.profile_id for s in sessions[:4])
    assert all(c.closed is None for c in clients[:4])
