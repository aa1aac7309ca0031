"""Redis Cluster key slots and the parts of the cluster client that need no server."""

import pytest

from chatgateway.bus import channels, memberships, roomstream
from chatgateway.redisconn.cluster import ClusterConnection, CrossSlotError, _redirect
from chatgateway.redisconn.protocols import ShardedSubscriberProtocol
from chatgateway.redisconn.slots import crc16, key_slot, tag_of


def test_crc16_and_slots_match_the_cluster_specification():
    assert crc16(b"123456789") == 0x31C3  # the reference value of CRC16-XMODEM
    assert key_slot("123456789") == 12739
    assert key_slot("{user1000}.following") == key_slot("{user1000}.followers") == key_slot("user1000")
    assert key_slot("foo{}{bar}") == key_slot(b"foo{}{bar}")  # an empty tag: the whole key
    assert key_slot("foo{{bar}}zap") == key_slot("{bar")
    assert key_slot("foo{bar}{zap}") == key_slot("bar")


def test_room_and_profile_keys_share_the_slot_of_their_channel_on_a_cluster():
    for room in ("r1", "general", "7f85350951ad42e79c85bf616caa53c6", "a{b}c"):
        slot = key_slot(channels.room(room))
        assert key_slot(roomstream.position_key(room, cluster=True)) == slot
        assert key_slot(roomstream.stream_key(room, cluster=True)) == slot
    for profile in ("alice", "p:1"):
        slot = key_slot(channels.profile(profile))
        assert key_slot(memberships.key(profile, cluster=True)) == slot
        assert key_slot(memberships.version_key(profile, cluster=True)) == slot
    assert roomstream.stream_key("r1", cluster=True) == "chat:stream:{chat:room:r1}"
    assert roomstream.stream_key("r1") == "chat:stream:r1"  # one Redis: the names as before


def test_the_cluster_form_of_the_publish_scripts_uses_spublish():
    _, keys, args = roomstream.publish_call("r1", b"x", cluster=True)
    assert args[-1] == "SPUBLISH" and keys == ["chat:position:{chat:room:r1}", "chat:stream:{chat:room:r1}"]
    _, _, args = roomstream.publish_call("r1", b"x")
    assert len(args) == 5  # one Redis: PUBLISH (the script's default)
    _, keys, args = memberships.change_call("alice", "r1", 1, b"x", cluster=True)
    assert args[-1] == "SPUBLISH" and keys[1] == "gateway:memberships:{chat:profile:alice}:version"


def test_a_name_with_a_closing_brace_and_no_tag_cannot_be_tagged():
    with pytest.raises(ValueError, match="cannot share a slot"):
        tag_of("chat:room:a}b")


def test_keys_of_several_slots_are_refused_before_redis_would():
    assert ClusterConnection.slot_of([]) is None
    assert ClusterConnection.slot_of(["{a}1", "{a}2"]) == key_slot("a")
    with pytest.raises(CrossSlotError):
        ClusterConnection.slot_of(["gateway:conn:a:b", "gateway:room:r1"])


def test_redirections_are_read_from_the_error():
    assert _redirect(Exception("MOVED 3999 127.0.0.1:6381")) == ("MOVED", 3999, "127.0.0.1", 6381)
    assert _redirect(Exception("ASK 3999 10.0.0.2:7000")) == ("ASK", 3999, "10.0.0.2", 7000)
    assert _redirect(Exception("CROSSSLOT Keys in request don't hash to the same slot")) is None


class _Queue:
    def __init__(self):
        self.waiting = []
        self.put_items = []

    def put(self, item):
        self.put_items.append(item)


def test_sharded_messages_and_unasked_unsubscriptions_are_told_apart():
    protocol = ShardedSubscriberProtocol()
    protocol.replyQueue = _Queue()
    got, dropped = [], []
    protocol.messageReceived = lambda pattern, channel, message: got.append((channel, message))
    protocol.on_dropped = dropped.append
    protocol.replyReceived([b"smessage", b"chat:room:r1", b"payload"])
    protocol.replyReceived([b"sunsubscribe", b"chat:room:r2", 0])  # the slot left the node
    assert got == [(b"chat:room:r1", b"payload")] and dropped == [b"chat:room:r2"]
    protocol.replyQueue.waiting = ["someone"]
    protocol.replyReceived([b"ssubscribe", b"chat:room:r3", 1])  # a confirmation: to its waiter
    assert protocol.replyQueue.put_items == [[b"ssubscribe", b"chat:room:r3", 1]]
