"""Storm control (docs/security.md#storm-control): the process's ConnectRate on a task.Clock,
its 503 + Retry-After at the WebSocket edge (before any token is verified), its 1013 on a
gRPC stream, and the reconnect hints of close reasons (chatgateway.sessions.reconnect)."""

import random

import pytest
from twisted.internet import task

from chatgateway.edge.http import build_http_factory
from chatgateway.edge.limits import Refused
from chatgateway.edge.websocket import DeviceProtocol
from chatgateway.sessions import reconnect
from chatgateway.sessions.ratelimit import ConnectRate
from chatgateway.sessions.session import CloseCode
from support.wsharness import Harness, accept

UPGRADE_HEADERS = (
    b"Host: gw\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
)


def attempts(limiter, clock, per_second, seconds):
    """Ask ``limiter`` ``per_second`` times a second, evenly, for ``seconds``: how many it let in."""
    admitted = 0
    step = 1.0 / per_second
    for _ in range(int(per_second * seconds)):
        admitted += limiter.admit()
        clock.advance(step)
    return admitted


# ------------------------------------------------------------ the ConnectRate


@pytest.mark.parametrize("rate, burst", [(20, 20), (50, 10), (7.5, 30)])
def test_at_three_times_the_rate_the_limiter_lets_in_the_burst_and_then_the_rate(rate, burst):
    # A burst test alone passes a bucket that refills at 1/s; ten seconds at 3x the rate do not.
    clock = task.Clock()
    clock.advance(1000)
    limiter = ConnectRate(rate, burst, clock)
    admitted = attempts(limiter, clock, 3 * rate, 10)
    assert abs(admitted - (burst + 10 * rate)) <= 1
    assert limiter.refused == int(3 * rate * 10) - admitted


def test_below_the_rate_every_connection_is_let_in_and_a_rate_of_zero_lets_in_all():
    clock = task.Clock()
    limiter = ConnectRate(20, 20, clock)
    assert attempts(limiter, clock, 19, 10) == 190
    unlimited = ConnectRate(0, 0, clock)
    assert all(unlimited.admit() for _ in range(10_000)) and unlimited.refused == 0
    assert unlimited.spread() == ConnectRate.MIN_SPREAD_SEC


def test_the_burst_refills_at_the_rate_after_a_pause():
    clock = task.Clock()
    limiter = ConnectRate(10, 30, clock)
    assert sum(limiter.admit() for _ in range(100)) == 30
    clock.advance(1.0)
    assert sum(limiter.admit() for _ in range(100)) == 10  # one second's worth, not the burst
    clock.advance(10.0)
    assert sum(limiter.admit() for _ in range(100)) == 30  # never more than the burst


def test_retry_after_is_random_per_client_within_one_to_the_spread():
    clock = task.Clock()
    limiter = ConnectRate(100, 100, clock, rng=random.Random(7))
    for _ in range(150):
        limiter.admit()  # 50 refused: less than a second's worth
    assert limiter.spread() == ConnectRate.MIN_SPREAD_SEC
    values = [limiter.retry_after() for _ in range(200)]
    assert set(values) == set(range(1, ConnectRate.MIN_SPREAD_SEC + 1))


def test_the_spread_grows_with_what_was_refused_in_the_last_second_up_to_its_cap():
    clock = task.Clock()
    limiter = ConnectRate(10, 10, clock, rng=random.Random(3))
    for _ in range(10 + 300):
        limiter.admit()
    assert limiter.spread() == 30  # 300 refused at 10/s: thirty seconds to let them in
    assert max(limiter.retry_after() for _ in range(500)) == 30
    clock.advance(1.0)
    assert limiter.spread() == 30  # the last whole second still counts
    clock.advance(1.0)
    assert limiter.spread() == ConnectRate.MIN_SPREAD_SEC  # the storm is over
    for _ in range(5000):
        limiter.admit()
    assert limiter.spread() == ConnectRate.MAX_SPREAD_SEC


# ------------------------------------------------------------ the WebSocket edge


@pytest.fixture
def h():
    harness = Harness(MAX_CONNECTS_PER_SECOND=2, CONNECT_BURST=3, HANDSHAKE_TIMEOUT_SEC=2)
    harness.core.rooms = {"alice": ["r1"]}
    verify = harness.gateway.verifier.verify
    harness.verified = []

    def recording(token):
        harness.verified.append(token)
        return verify(token)

    harness.gateway.verifier.verify = recording
    yield harness
    harness.stop()


def upgrade(h, path=b"/ws", token="alice", host="10.0.0.1", port=40000):
    guard, transport = accept(build_http_factory(h.gateway, {}, clock=h.clock), host=host, port=port)
    guard.dataReceived(b"GET " + path + b" HTTP/1.1\r\n" + UPGRADE_HEADERS)
    guard.dataReceived(f"Authorization: Bearer {token}\r\n\r\n".encode())
    return guard, transport.value()


def retry_after(response):
    head = response.split(b"\r\n\r\n", 1)[0].decode()
    (value,) = [line.split(": ", 1)[1] for line in head.split("\r\n") if line.lower().startswith("retry-after:")]
    return int(value)


def test_upgrades_over_the_rate_get_503_with_a_jittered_retry_after_and_no_token_verification(h):
    answers = [upgrade(h, token=f"alice/d{i}", port=40000 + i) for i in range(40)]
    upgraded = [a for a in answers if a[1].startswith(b"HTTP/1.1 101 ")]
    refused = [a for a in answers if a[1].startswith(b"HTTP/1.1 503 too many new connections\r\n")]
    assert len(upgraded) == 3 and len(refused) == 37  # the burst, then nothing: no time passed
    assert h.verified == ["alice/d0", "alice/d1", "alice/d2"]  # a refused upgrade is not verified
    assert all(isinstance(guard.wrappedProtocol, Refused) for guard, _ in refused)  # no Autobahn at all
    delays = [retry_after(response) for _, response in refused]
    # Uniform in [1, spread]: the spread grows with the refusals, to 37 / 2 per second = 19 s.
    assert all(1 <= d <= 19 for d in delays) and len(set(delays)) > 5 and max(delays) > ConnectRate.MIN_SPREAD_SEC
    assert h.gateway.connects.spread() == 19
    assert h.gateway.counts.connects_refused_counts() == {"websocket": 37, "grpc": 0}
    h.clock.advance(1.0)
    _, later = upgrade(h, token="alice/later", port=41000)
    assert later.startswith(b"HTTP/1.1 101 ")  # the bucket refilled


def test_an_upgrade_through_the_site_counts_once_and_is_refused_the_same_way(h):
    answers = [upgrade(h, path=b"/ws/", token=f"alice/s{i}", port=42000 + i) for i in range(5)]
    statuses = [response.split(b"\r\n", 1)[0] for _, response in answers]
    assert statuses.count(b"HTTP/1.1 101 Switching Protocols") == 3
    assert statuses.count(b"HTTP/1.1 503 too many new connections") == 2
    assert len(h.verified) == 3
    assert all(1 <= retry_after(r) <= ConnectRate.MIN_SPREAD_SEC for _, r in answers[3:])
    assert h.gateway.counts.connects_refused_counts()["websocket"] == 2


def test_an_upgrade_let_in_by_the_router_is_not_counted_again(h):
    guard, response = upgrade(h)
    assert response.startswith(b"HTTP/1.1 101 ")
    assert isinstance(guard.wrappedProtocol, DeviceProtocol) and guard.wrappedProtocol.rate_checked
    assert h.gateway.connects.admit() and h.gateway.connects.admit()  # two of the burst of three left
    assert not h.gateway.connects.admit()


def test_a_draining_gateways_503_carries_a_jittered_retry_after_too():
    h = Harness(MAX_CONNECTS_PER_SECOND=0)
    try:
        h.gateway.draining = True
        delays = set()
        for i in range(30):
            _, response = upgrade(h, port=43000 + i)
            assert response.startswith(b"HTTP/1.1 503 gateway draining")
            delays.add(retry_after(response))
        assert delays <= set(range(1, ConnectRate.MIN_SPREAD_SEC + 1)) and len(delays) > 1
    finally:
        h.gateway.draining = False
        h.stop()


# ------------------------------------------------------------ the gRPC edge


def test_a_grpc_stream_over_the_rate_ends_1013_with_a_reconnect_hint_before_its_token_is_verified(h):
    from test_grpc_device import FakeEdge, Stream

    edge = FakeEdge(h)
    streams = [Stream(edge, f"alice/g{i}") for i in range(5)]
    assert [s.kinds() for s in streams[:3]] == [["connected"]] * 3
    for stream in streams[3:]:
        code, reason = stream.end
        assert code == CloseCode.TRY_AGAIN_LATER and reason.startswith("too many new connections: reconnect in ")
        assert 1 <= reconnect.reconnect_delay(reason) <= ConnectRate.MIN_SPREAD_SEC
    assert len(h.verified) == 3
    assert h.gateway.counts.connects_refused_counts()["grpc"] == 2


# ------------------------------------------------------------ reconnect hints


def test_a_hint_is_read_back_and_survives_a_long_cause():
    reason = reconnect.hinted("gateway draining", 2.74)
    assert reason == "gateway draining: reconnect in 2.7s" and reconnect.reconnect_delay(reason) == 2.7
    long = reconnect.hinted("core unavailable: " + "é" * 200, 9.96)
    assert len(long.encode("utf-8")) <= reconnect.MAX_REASON_BYTES
    assert long.endswith(": reconnect in 10.0s") and reconnect.reconnect_delay(long) == 10.0
    assert reconnect.reconnect_delay("reconnect in 3 s") == 3.0
    assert reconnect.reconnect_delay("heartbeat timeout") is None and reconnect.reconnect_delay(None) is None


def test_delays_are_spread_over_their_documented_ranges():
    rng = random.Random(1)
    drains = [reconnect.drain_delay(rng) for _ in range(500)]
    assert 0 <= min(drains) < 0.5 and reconnect.DRAIN_SPREAD_SEC - 0.5 < max(drains) <= reconnect.DRAIN_SPREAD_SEC
    tries = [reconnect.try_again_delay(rng) for _ in range(500)]
    assert reconnect.TRY_AGAIN_MIN_SEC <= min(tries) and max(tries) <= reconnect.TRY_AGAIN_SPREAD_SEC
    assert len({round(t, 1) for t in tries}) > 50


def test_the_burst_defaults_to_one_seconds_worth_and_zero_turns_the_limit_off():
    from chatgateway import config

    base = {"JWT_SECRET": "s"}
    assert config.load(base).max_connects_per_second == 1000 and config.load(base).connect_burst == 1000
    assert config.load({**base, "MAX_CONNECTS_PER_SECOND": "7.5"}).connect_burst == 8
    assert config.load({**base, "MAX_CONNECTS_PER_SECOND": "50", "CONNECT_BURST": "5"}).connect_burst == 5
    off = config.load({**base, "MAX_CONNECTS_PER_SECOND": "0"})
    assert ConnectRate(off.max_connects_per_second, off.connect_burst, task.Clock()).admit()
    with pytest.raises(config.ConfigError):
        config.load({**base, "MAX_CONNECTS_PER_SECOND": "-1"})
