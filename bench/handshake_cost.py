"""CPU per WebSocket connect, in this process: the gateway's whole connect path against a bare Autobahn one.

The gateway is the service tree twistd runs (chatgateway.service.make_gateway_service:
telemetry, the real JWT verifier, the store and the bus on a redis-server this script
starts, the connection limits, the request-line router, Autobahn, the Opening, the
Session, the registry); the reference is bench/reference_server.py's protocol. Both get
the same opening handshakes (the gateway's with a distinct HS256 token per connect, as
in a reconnect storm) over in-memory transports on the running reactor, --concurrency
per reactor turn. What neither pays here is the kernel's part (accept, reads, writes):
bench/suite.py measures the whole thing over sockets; this measures the Python part and
where it goes.

A connect of the gateway is timed from its first byte until its ``connected`` frame is
written and its store write (``open_connection``) is answered. The profile's
memberships are cached (--memberships cached: every profile connected once before the
timed rounds, with other tokens), or answered by a stand-in core without a round trip
(--memberships stub: the cost of the connect without the membership lookup).

Each iteration times one round of each system, in alternating order; reported are
the medians of CPU microseconds per connect (time.process_time: every thread of this
process), their ratio, and with --profile the cProfile of one more gateway round.

    .venv/bin/python bench/handshake_cost.py --connects 2000 --rounds 5
    .venv/bin/python bench/handshake_cost.py --connects 2000 --rounds 1 --profile
"""

import argparse
import cProfile
import gc
import io
import json
import os
import pstats
import statistics
import sys
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(HERE))

import reference_server  # noqa: E402
from autobahn.twisted.websocket import WebSocketServerFactory  # noqa: E402
from twisted.internet import defer, reactor, task  # noqa: E402
from twisted.internet.address import IPv4Address  # noqa: E402
from twisted.internet.error import ConnectionDone  # noqa: E402
from twisted.internet.testing import StringTransport  # noqa: E402
from twisted.python.failure import Failure  # noqa: E402

from chatgateway import config as gateway_config  # noqa: E402
from chatgateway.auth.devtokens import mint_token  # noqa: E402
from chatgateway.service import make_gateway_service  # noqa: E402
from chatgateway.sessions.gateway import Gateway  # noqa: E402
from support.processes import free_port  # noqa: E402
from support.redis import RedisServer  # noqa: E402

SECRET = "bench-handshake-secret-0123456789abcdef0123"
AUDIENCE = "service_chat_gateway"
ROOM = "lobby"
REQUEST = (
    "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
)


class Socketless(StringTransport):
    """A connected TCP transport that keeps the first bytes written (the 101, the first frame) and counts the rest."""

    def __init__(self, peer):
        super().__init__(peerAddress=peer)
        self.head = b""
        self.written = 0

    def write(self, data):
        self.written += len(data)
        if len(self.head) < 512:
            self.head += data[:512]

    def writeSequence(self, seq):
        for data in seq:
            self.write(data)


def wait(seconds):
    return task.deferLater(reactor, seconds, lambda: None)


class Round:
    """Opens ``requests`` connections through ``factory``, ``concurrency`` per reactor turn; fires with the
    CPU seconds it took (until ``settled()`` is true), keeping the connections for ``close``."""

    def __init__(self, factory, requests, concurrency, settled):
        self.factory = factory
        self.requests = requests
        self.concurrency = concurrency
        self.settled = settled
        self.connections = []

    async def run(self):
        gc.collect()
        started = time.process_time()
        for first in range(0, len(self.requests), self.concurrency):
            for n in range(first, min(len(self.requests), first + self.concurrency)):
                peer = IPv4Address("TCP", "127.0.0.1", 10000 + n % 50000)
                protocol = self.factory.buildProtocol(peer)
                transport = Socketless(peer)
                protocol.makeConnection(transport)
                protocol.dataReceived(self.requests[n])
                self.connections.append((protocol, transport))
            await wait(0)  # the reactor's turn: Redis replies, subscriptions
        while not self.settled():
            await wait(0.001)
        return time.process_time() - started

    async def close(self):
        for protocol, _ in self.connections:
            protocol.connectionLost(Failure(ConnectionDone()))
        self.connections = []
        await wait(0.3)


class Reference:
    name = "reference"

    def __init__(self):
        self.factory = WebSocketServerFactory()
        self.factory.protocol = reference_server.Device
        self.factory.rooms = {}
        self.factory.setProtocolOptions(autoPingInterval=0)

    def requests(self, count, tokens):
        return [REQUEST.format(path=f"/?room={ROOM}", extra="").encode() for _ in range(count)]

    def settled(self, connections):
        return True

    def check(self, connections):
        bad = [t.head[:40] for _, t in connections if not t.head.startswith(b"HTTP/1.1 101")]
        if bad:
            raise RuntimeError(f"reference: {len(bad)} connects not upgraded, e.g. {bad[0]!r}")


class GatewaySystem:
    name = "gateway"

    def __init__(self, redis_uri, memberships):
        env = {
            "JWT_SECRET": SECRET,
            "CACHE_URI": redis_uri,
            "LOG_LEVEL": "warning",
            "GATEWAY_ID": f"bench-handshake-{uuid.uuid4().hex[:6]}",
            "HTTP_PORT": str(free_port()),
            "HTTP_INTERFACE": "127.0.0.1",
            "GRPC_PORT": str(free_port()),
            "GRPC_INTERFACE": "127.0.0.1",
            "MAX_UNAUTHENTICATED_PER_ADDRESS": "0",  # every connect comes from 127.0.0.1, as in bench/suite.py
            "MAX_CONNECTIONS": "100000",
            "CHAT_SERVICE_URI": f"127.0.0.1:{free_port()}",  # nothing there: no connect may need the core
        }
        self.config = gateway_config.load(env)
        self.tree = make_gateway_service(self.config, reactor)
        self.gateway = self.tree.gateway
        self.factory = None
        self.memberships = memberships
        self.writes = [0, 0]  # open_connection calls made, answered
        self.core_calls = 0
        if memberships == "stub":
            rooms = [ROOM]

            async def stub(gateway, token, device_id):
                return rooms

            Gateway.memberships = stub
        store = self.gateway.store
        original = store.open_connection

        def counted(*args, **kwargs):
            self.writes[0] += 1
            d = original(*args, **kwargs)
            d.addBoth(self._written)
            return d

        store.open_connection = counted  # an instance attribute: only this harness counts
        core = self.gateway.core
        call = core.call

        def counted_call(*args, **kwargs):
            self.core_calls += 1
            return call(*args, **kwargs)

        core.call = counted_call

    def _written(self, result):
        self.writes[1] += 1
        return result

    async def start(self):
        self.tree.startService()
        for _ in range(200):
            if self.gateway.store.ready and self.gateway.bus.ready:
                break
            await wait(0.05)
        else:
            raise RuntimeError("the store or the bus did not become ready")
        self.factory = self.tree.http.factory

    def stop(self):
        return defer.maybeDeferred(self.tree.stopService)

    def requests(self, count, profiles):
        return [
            REQUEST.format(
                path="/ws",
                extra=f"Sec-WebSocket-Protocol: chat.v1.proto\r\nAuthorization: Bearer {token}\r\n",
            ).encode()
            for token in profiles
        ]

    def settled(self, connections):
        return self.writes[0] == self.writes[1] and len(self.gateway.registry) >= len(connections)

    def check(self, connections):
        bad = [t.head[:60] for _, t in connections if not t.head.startswith(b"HTTP/1.1 101") or t.written < 200]
        if bad:
            raise RuntimeError(f"gateway: {len(bad)} connects not upgraded or not connected, e.g. {bad[0]!r}")


def tokens(profiles, round_number):
    """A distinct token per connect: the same profiles, a new ``jti`` every round (none is verified before)."""
    return [
        mint_token(
            SECRET,
            profile,
            device_id="d",
            audience=AUDIENCE,
            ttl=86400,
            extra={"jti": f"{round_number}-{n}"},
        )
        for n, profile in enumerate(profiles)
    ]


def top(profile, sort, limit):
    out = io.StringIO()
    stats = pstats.Stats(profile, stream=out)
    stats.sort_stats(sort).print_stats(limit)
    return out.getvalue()


async def measure(options):
    redis_server = RedisServer()
    gateway = GatewaySystem(redis_server.uri, options.memberships)
    reference = Reference()
    results = {"reference": [], "gateway": []}
    try:
        await gateway.start()
        profiles = [f"p{n}" for n in range(options.connects)]
        if options.memberships == "cached":
            # every profile connected once (other tokens), the core's answer stood in for:
            # the profiles' memberships are cached; the timed rounds must not need the core
            async def stand_in(token, device_id):
                return [ROOM]

            gateway.gateway.memberships = stand_in
            warm = Round(
                gateway.factory, gateway.requests(options.connects, tokens(profiles, "warm")), 48, lambda: True
            )
            await warm.run()
            await warm.close()
            del gateway.gateway.memberships
        core_calls_before = gateway.core_calls
        for r in range(options.rounds):
            order = (reference, gateway) if r % 2 == 0 else (gateway, reference)
            for system in order:
                requests = system.requests(options.connects, tokens(profiles, r))
                round_ = Round(system.factory, requests, options.concurrency, lambda: None)
                round_.settled = lambda s=system, rd=round_: s.settled(rd.connections)
                seconds = await round_.run()
                system.check(round_.connections)
                await round_.close()
                results[system.name].append(seconds / options.connects * 1e6)
        profile_text = None
        if options.profile:
            system = gateway if options.profile == "gateway" else reference
            requests = system.requests(options.connects, tokens(profiles, "profile"))
            round_ = Round(system.factory, requests, options.concurrency, lambda: None)
            round_.settled = lambda: system.settled(round_.connections)
            profile = cProfile.Profile()
            profile.enable()
            await round_.run()
            profile.disable()
            await round_.close()
            profile_text = top(profile, "tottime", 45) + top(profile, "cumulative", 90)
        core_calls = gateway.core_calls - core_calls_before
    finally:
        await gateway.stop()
        redis_server.cleanup()
    ref, gw = statistics.median(results["reference"]), statistics.median(results["gateway"])
    return {
        "connects": options.connects,
        "rounds": options.rounds,
        "concurrency": options.concurrency,
        "memberships": options.memberships,
        "core_calls_in_timed_rounds": core_calls,
        "reference_us_per_connect": [round(v, 1) for v in results["reference"]],
        "gateway_us_per_connect": [round(v, 1) for v in results["gateway"]],
        "reference_median_us": round(ref, 1),
        "gateway_median_us": round(gw, 1),
        "ratio_reference_over_gateway": round(ref / gw, 3),
    }, profile_text


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connects", type=int, default=2000, help="connects per round")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of each system (alternating)")
    parser.add_argument("--concurrency", type=int, default=48, help="connects begun per reactor turn")
    parser.add_argument(
        "--memberships",
        choices=("cached", "stub"),
        default="cached",
        help="cached: the store's membership cache, warmed first; stub: answered without a round trip",
    )
    parser.add_argument(
        "--profile", choices=("gateway", "reference"), help="cProfile one more round of this system (printed)"
    )
    parser.add_argument("--out", default=str(HERE / "out" / "handshake_cost.json"))
    options = parser.parse_args(argv)
    outcome = {}

    async def run():
        try:
            outcome["result"] = await measure(options)
        finally:
            reactor.stop()

    reactor.callWhenRunning(
        lambda: defer.Deferred.fromCoroutine(run()).addErrback(lambda f: outcome.setdefault("error", f))
    )
    reactor.run()
    if "error" in outcome:
        outcome["error"].printTraceback()
        return 1
    result, profile_text = outcome["result"]
    if profile_text:
        print(profile_text)
    print(json.dumps(result, indent=2))
    Path(options.out).parent.mkdir(parents=True, exist_ok=True)
    Path(options.out).write_text(json.dumps({**result, "pid": os.getpid()}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
