"""ClusterBus: publishes refused while a shard fails over wait and go out in the order asked."""

import txredisapi
from twisted.internet import defer, task

from chatgateway import config as configuration
from chatgateway.bus.cluster import PUBLISH_RETRY_SEC, PUBLISH_WAIT_SEC, ClusterBus
from chatgateway.redisconn.connection import NotConnected


def make_bus(clock):
    config = configuration.load(
        environ={"CACHE_URI": "redis+cluster://127.0.0.1:1", "JWT_SECRET": "unit-secret-0123456789abcdef0123"}
    )
    bus = ClusterBus(config, clock, clock=clock)
    bus._receiver = lambda channel, payload: None  # started (without connecting anything)
    return bus


class Shard:
    """The sends of one test: each call of ``send(name)`` records it and returns its Deferred."""

    def __init__(self):
        self.sent = []
        self.pending = {}

    def send(self, name):
        def attempt():
            self.sent.append(name)
            d = self.pending[name] = defer.Deferred()
            return d

        return attempt


def refuse(shard, name, message="CLUSTERDOWN The cluster is down"):
    shard.pending.pop(name).errback(txredisapi.ResponseError(message))


def test_publishes_refused_by_a_shard_failing_over_go_out_again_in_the_order_asked():
    clock = task.Clock()
    bus, shard, done = make_bus(clock), Shard(), []
    for name in ("a", "b"):
        bus._in_order("chat:room:r", shard.send(name)).addCallback(lambda _, name=name: done.append(name))
    refuse(shard, "a")  # a waits; what is asked now goes behind it
    bus._in_order("chat:room:r", shard.send("c")).addCallback(lambda _: done.append("c"))
    refuse(shard, "b")  # sent before c, refused after c was queued: still before c
    assert shard.sent == ["a", "b"]
    clock.advance(PUBLISH_RETRY_SEC)
    assert shard.sent == ["a", "b", "a"]
    refuse(shard, "a", "TRYAGAIN Multiple keys request during rehashing of slot")
    clock.advance(PUBLISH_RETRY_SEC)
    shard.pending.pop("a").callback([1, "e"])
    shard.pending.pop("b").callback([2, "e"])
    shard.pending.pop("c").callback([3, "e"])
    assert shard.sent == ["a", "b", "a", "a", "b", "c"] and done == ["a", "b", "c"]
    assert bus._waiting == {}
    # Back to normal: sent at once.
    bus._in_order("chat:room:r", shard.send("d"))
    assert shard.sent[-1] == "d"


def test_a_publish_failed_in_flight_is_not_sent_again_and_a_wait_has_an_end():
    clock = task.Clock()
    bus, shard = make_bus(clock), Shard()
    lost = bus._in_order("chat:room:r", shard.send("in flight"))
    failures = []
    lost.addErrback(failures.append)
    shard.pending.pop("in flight").errback(txredisapi.ConnectionError("Lost connection"))
    assert len(failures) == 1 and shard.sent == ["in flight"]  # may have been applied: not resent

    def refused_at_once():
        shard.sent.append("refused")
        return defer.fail(NotConnected("no node serves slot 1 yet"))

    waiting = bus._in_order("chat:room:r", refused_at_once)
    waiting.addErrback(failures.append)
    clock.pump([PUBLISH_RETRY_SEC] * int(PUBLISH_WAIT_SEC / PUBLISH_RETRY_SEC + 2))
    assert len(failures) == 2 and failures[1].check(NotConnected)
    assert shard.sent.count("refused") > 10 and bus._waiting == {}
