"""Load generator: devices that reconnect, for reconnect storms (tests/integration/test_storm.py, bench/storm.py).

Runs in its own process. Each device i (profile PREFIX<i mod --profiles>, device
``storm<i div --profiles>``, its own JWT)
connects to the first of ``--urls`` with the chat.v1.proto subprotocol (the handshake
written by hand: support.rawwebsocket), waits for `connected` and holds the connection.
Whenever a connection ends or an attempt fails, the device tries again, as
docs/protocol.md#reconnect-hints tells a client to:

- after full-jitter exponential backoff, uniform(0, min(cap, base * 2 ** n)) seconds for
  its n-th failure since its last `connected`, but never sooner than the gateway asked:
- a handshake refused with 503 or 429 and a ``Retry-After``: at least that many seconds,
  to the same URL (that server is up and said when; the gateway jitters it per client);
- a close frame whose reason says ``reconnect in X s`` (1001 draining, 1013): at least X s,
  to the next URL;
- anything else (the gateway died: a reset, a refused TCP connect, no `connected` within
  ``--attempt-timeout``): the backoff alone, to the next URL.

So when the first gateway dies, every device moves to the next URL after a jittered delay.
Storm figures count from MARK (wall clock, so the driver can compare with when it killed).

stdin/stdout, one line each:

    -> READY <n> {json}      every device received its first `connected`
    <- MARK                  -> MARK <unix time>: the storm counters start again now
    <- STATS                 -> STATS {json}   (see Fleet.stats)
    <- QUIT

    python tests/support/stormdevices.py --urls ws://127.0.0.1:8081/ws,ws://127.0.0.1:8082/ws \\
        --secret S --count 300 --prefix storm
"""

import argparse
import json
import random
import re
import sys
import time
from urllib.parse import urlsplit

from twisted.internet import defer, endpoints, stdio, task
from twisted.protocols.basic import LineReceiver

from chatgateway.api import chat_pb2 as pb
from chatgateway.auth.devtokens import mint_token
from support.rawwebsocket import RawWebSocket, upgrade_request

RETRY_AFTER = re.compile(rb"^retry-after:[ \t]*([0-9]+(?:\.[0-9]+)?)[ \t]*\r?$", re.IGNORECASE | re.MULTILINE)
RECONNECT_IN = re.compile(r"reconnect in (\d+(?:\.\d+)?) ?s")  # docs/protocol.md#reconnect-hints
DIGITS = re.compile(r"\d+")
STATUS = re.compile(r"^HTTP/1\.[01] (\d{3})")


def retry_after(head):
    """The seconds of a refused handshake's ``Retry-After`` header (bytes of the response head), or None."""
    match = RETRY_AFTER.search(head)
    return float(match.group(1)) if match else None


def told_delay(reason):
    """The X of a close reason's ``reconnect in X s``, or None."""
    match = RECONNECT_IN.search(reason or "")
    return float(match.group(1)) if match else None


def full_jitter(attempt, base, cap, rng=None):
    """Full-jitter exponential backoff: uniform over [0, min(cap, base * 2 ** attempt)]."""
    return (rng or random).uniform(0, min(cap, base * 2 ** min(attempt, 30)))


def next_try(status, head, close_reason, attempt, base, cap, rng=None):
    """(delay in s, same URL?, what the gateway asked: "retry_after", "told" or "backoff" for
    nothing) after the ``attempt``-th failure (0: the first) since the device's last `connected`.

    ``status`` is a refused handshake's HTTP status (else None), ``head`` its response head,
    ``close_reason`` the reason of the server's close frame ("" without one)."""
    jitter = full_jitter(attempt, base, cap, rng)
    if status in (429, 503):
        seconds = retry_after(head)
        if seconds is not None:
            return max(seconds, jitter), True, "retry_after"
    seconds = told_delay(close_reason)
    if seconds is not None:
        return max(seconds, jitter), False, "told"
    return jitter, False, "backoff"


def summary(values):
    if not values:
        return None
    ms = sorted(v * 1000 for v in values)
    return {
        "p50": round(ms[len(ms) // 2], 1),
        "p99": round(ms[min(len(ms) - 1, int(0.99 * len(ms)))], 1),
        "max": round(ms[-1], 1),
    }


class Connection(RawWebSocket):
    """One attempt of a device: the handshake, `connected`, then counting what arrives."""

    def __init__(self, device, request):
        super().__init__(request)
        self.device = device
        self.opened = False
        self.status = None  # HTTP status of a refused handshake

    def upgraded(self):
        if not self.device.fleet.hello:  # a server that sends nothing first: the 101 is the open
            self.opened = True
            self.device.opened()

    def refused(self, status):
        match = STATUS.match(status)
        self.status = int(match.group(1)) if match else 0

    def binary(self, buffer, start, length):
        if self.opened:
            self.device.fleet.counts["messages"] += 1
            return
        event = pb.ServerEvent.FromString(buffer[start : start + length])
        if event.WhichOneof("payload") == "connected":
            self.opened = True
            self.device.opened()

    def closed_by_server(self, code):
        counts = self.device.fleet.counts
        counts["close_codes"][str(code)] = counts["close_codes"].get(str(code), 0) + 1
        reason = f"{code} " + DIGITS.sub("N", self.close_reason)[:80]  # "reconnect in N.Ns": one entry
        counts["close_reasons"][reason] = counts["close_reasons"].get(reason, 0) + 1

    def connectionLost(self, reason):
        self.device.ended(self)


class Device:
    """A device across its connections: which URL it tries next, its failures since `connected`."""

    def __init__(self, fleet, index, token):
        self.fleet = fleet
        self.index = index
        self.token = token
        self.url = 0  # index into fleet.urls
        self.attempt = 0
        self.connection = None
        self.pending = None  # the TCP connect in progress
        self.timer = None
        self.lost_at = None  # when its last live connection ended
        self.first = defer.Deferred()  # its first `connected`

    def connect(self):
        fleet = self.fleet
        if fleet.quitting:
            return
        fleet.counts["attempts"] += 1
        host, path, endpoint = fleet.targets[self.url]
        request = upgrade_request(host, path, "chat.v1.proto", {"Authorization": f"Bearer {self.token}"})
        connection = self.connection = Connection(self, request)
        self.timer = fleet.reactor.callLater(fleet.attempt_timeout, self._timed_out, connection)
        self.pending = endpoints.connectProtocol(endpoint, connection)
        self.pending.addCallbacks(self._tcp_connected, self._tcp_failed, errbackArgs=(connection,))

    def _tcp_connected(self, _):
        self.pending = None

    def _tcp_failed(self, failure, connection):
        self.pending = None
        self.fleet.counts["connect_errors"] += 1
        self.ended(connection)

    def _timed_out(self, connection):
        self.timer = None
        self.fleet.counts["timeouts"] += 1
        if self.pending is not None:
            self.pending.cancel()  # -> _tcp_failed
        elif connection.transport is not None:
            connection.transport.abortConnection()  # -> ended

    def opened(self):
        fleet = self.fleet
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None
        self.attempt = 0
        fleet.connected += 1
        now = time.time()
        if now >= fleet.marked_at:
            fleet.reconnected.add(self.index)
            fleet.last_connected = max(fleet.last_connected or 0.0, now)
            if self.lost_at is not None:
                fleet.reconnect_seconds.append(now - self.lost_at)
        if not self.first.called:
            self.first.callback(self)

    def ended(self, connection):
        """An attempt or a live connection ended (each connection reports once)."""
        if connection is not self.connection:
            return
        self.connection = None
        fleet = self.fleet
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None
        if connection.opened:
            fleet.connected -= 1
            fleet.counts["lost"] += 1
            self.lost_at = time.time()
        if connection.status is not None:
            refused = fleet.counts["refused"]
            refused[str(connection.status)] = refused.get(str(connection.status), 0) + 1
        if fleet.quitting:
            return
        delay, same, why = next_try(
            connection.status, connection.response_head, connection.close_reason, self.attempt, fleet.base, fleet.cap
        )
        fleet.counts[why] += 1
        if why == "retry_after":
            fleet.counts["retry_after_max"] = max(fleet.counts["retry_after_max"], delay)
        self.attempt += 1
        if not same:
            self.url = (self.url + 1) % len(fleet.targets)
        fleet.reactor.callLater(delay, self.connect)


class Fleet:
    """Every device of this process, and the storm's counters since MARK."""

    def __init__(self, reactor, args):
        self.reactor = reactor
        self.base, self.cap, self.attempt_timeout = args.base, args.cap, args.attempt_timeout
        self.hello = args.hello == "connected"
        self.targets = []
        for url in args.urls:
            parts = urlsplit(url)
            endpoint = endpoints.TCP4ClientEndpoint(
                reactor,
                parts.hostname,
                parts.port,
                timeout=args.attempt_timeout,
                bindAddress=(args.source, 0) if args.source else None,
            )
            self.targets.append((parts.netloc, parts.path + (f"?{parts.query}" if parts.query else ""), endpoint))
        profiles = args.profiles or args.first + args.count
        self.devices = [
            Device(
                self,
                i,
                mint_token(
                    args.secret,
                    f"{args.prefix}{i % profiles}",
                    device_id=f"storm{i // profiles}",
                    audience="service_chat_gateway",
                    ttl=86400,
                ),
            )
            for i in range(args.first, args.first + args.count)
        ]
        self.quitting = False
        self.connected = 0
        self.mark(float("inf"))  # nothing counts as a reconnection before the first MARK

    def mark(self, at):
        self.marked_at = at
        self.reconnected = set()
        self.last_connected = None
        self.reconnect_seconds = []
        self.counts = {
            "attempts": 0,
            "lost": 0,
            "messages": 0,
            "connect_errors": 0,
            "timeouts": 0,
            "refused": {},
            "close_codes": {},
            "close_reasons": {},
            "retry_after": 0,
            "retry_after_max": 0.0,
            "told": 0,
            "backoff": 0,
        }

    def stats(self):
        """The counters since MARK: ``reconnected`` devices got `connected` since, the latest at
        ``last_connected`` (unix time); ``reconnect_ms`` from a device's loss to its next `connected`."""
        return {
            "devices": len(self.devices),
            "connected": self.connected,
            "reconnected": len(self.reconnected),
            "last_connected": self.last_connected,
            "reconnect_ms": summary(self.reconnect_seconds),
            **self.counts,
        }

    def quit(self):
        self.quitting = True
        for device in self.devices:
            if device.connection is not None and device.connection.transport is not None:
                device.connection.transport.abortConnection()


class Control(LineReceiver):
    delimiter = b"\n"

    def __init__(self, fleet, done):
        self.fleet, self.done = fleet, done

    def lineReceived(self, line):
        command = line.decode().strip()
        if command == "MARK":
            now = time.time()
            self.fleet.mark(now)
            self.sendLine(f"MARK {now:.6f}".encode())
        elif command == "STATS":
            self.sendLine(b"STATS " + json.dumps(self.fleet.stats()).encode())
        elif command == "QUIT":
            self.fleet.quit()
            if not self.done.called:
                self.done.callback(None)

    def connectionLost(self, reason):  # the driver went away
        self.fleet.quit()
        if not self.done.called:
            self.done.callback(None)


async def main(reactor, argv):
    parser = argparse.ArgumentParser()
    parser.add_argument("--urls", required=True, type=lambda s: s.split(","), help="the first is connected first")
    parser.add_argument("--secret", required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--first", type=int, default=0, help="index of the first device")
    parser.add_argument("--profiles", type=int, default=0, help="devices share this many profiles (0: one each)")
    parser.add_argument("--prefix", default="storm")
    parser.add_argument("--concurrency", type=int, default=32, help="first connects in flight")
    parser.add_argument("--source", help="local address to connect from (e.g. 127.0.0.2)")
    parser.add_argument("--base", type=float, default=1.0, help="backoff base (s)")
    parser.add_argument("--cap", type=float, default=60.0, help="backoff cap (s)")
    parser.add_argument("--attempt-timeout", type=float, default=30.0, help="s from TCP connect to `connected`")
    parser.add_argument(
        "--hello",
        choices=("connected", "none"),
        default="connected",
        help="none: the 101 opens (bench/reference_server.py)",
    )
    args = parser.parse_args(argv)
    fleet = Fleet(reactor, args)
    done = defer.Deferred()
    control = Control(fleet, done)
    stdio.StandardIO(control)
    started = time.monotonic()
    devices = iter(fleet.devices)

    async def worker():
        for device in devices:
            device.connect()
            await device.first

    await defer.gatherResults(
        [defer.Deferred.fromCoroutine(worker()) for _ in range(args.concurrency)], consumeErrors=True
    )
    figures = {"seconds": round(time.monotonic() - started, 3), **fleet.counts}
    control.sendLine(f"READY {fleet.connected} {json.dumps(figures)}".encode())
    await done


if __name__ == "__main__":
    task.react(lambda reactor: defer.Deferred.fromCoroutine(main(reactor, sys.argv[1:])))
