"""Fan-out load client for bench/suite.py: N receiving devices in one room.

Holds N WebSocket connections (to the gateway with JWTs and the binary
chat.v1.proto subprotocol, or to the bare reference server). It is a
deliberately thin client so it is not the bottleneck: the opening handshake
is written by hand and the receiving side only walks frame headers (server
frames are unmasked), counting binary frames and answering pings. Delivery
latency is sampled on every SAMPLE_EVERY-th frame of a connection from the
publisher's send time, which the publisher writes as the ServerEvent id
(field 1, the first bytes of the frame): reading it costs a slice.

stdin/stdout, one line each:  -> READY <n> <seconds> {json};  <- RESET;  <- STATS -> STATS {json};  <- QUIT

The READY json has the same handshake figures as bench/fanout_client.c (which the
suite uses by default; this one stays as the fallback, `--client python`): per
device, milliseconds from the TCP connect to the HTTP 101 and to `connected`.
"""

import argparse
import json
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

from twisted.internet import defer, endpoints, stdio, task
from twisted.protocols.basic import LineReceiver

from chatgateway.auth.devtokens import mint_token

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from support.rawwebsocket import RawWebSocket, upgrade_request  # noqa: E402

SAMPLE_EVERY = 4
MAX_SAMPLES = 400_000


class Counters:
    def __init__(self):
        self.reset()

    def reset(self):
        self.messages = 0
        self.latencies = []

    def stats(self, closed):
        lat = sorted(self.latencies)

        def pct(p):
            return round(lat[min(len(lat) - 1, int(p * len(lat)))] * 1000, 2) if lat else None

        return {
            "messages": self.messages,
            "samples": len(lat),
            "p50_ms": pct(0.5),
            "p99_ms": pct(0.99),
            "max_ms": round(lat[-1] * 1000, 2) if lat else None,
            "closed": closed,
        }


class Device(RawWebSocket):
    """One WebSocket client connection (support.rawwebsocket), frames counted."""

    def __init__(self, path, host, headers, subprotocol, counters, opened, expect_hello):
        super().__init__(upgrade_request(host, path, subprotocol, headers))
        self.counters = counters
        self.opened = opened
        self.expect_hello = expect_hello
        self.frames = 0
        self.closed = False
        self.started = time.monotonic()
        self.upgraded_at = None
        self.connected_at = None

    def refused(self, status):
        self.opened.errback(RuntimeError(status))

    def upgraded(self):
        self.upgraded_at = time.monotonic()
        if not self.expect_hello:
            self.connected_at = self.upgraded_at
            self.opened.callback(self)

    def binary(self, buffer, start, length):
        if not self.opened.called:
            self.connected_at = time.monotonic()
            self.opened.callback(self)  # the gateway's `connected`
            return
        counters = self.counters
        counters.messages += 1
        self.frames += 1
        if self.frames % SAMPLE_EVERY == 0 and buffer[start] == 0x0A and len(counters.latencies) < MAX_SAMPLES:
            try:
                latency = time.time() - float(buffer[start + 2 : start + 2 + buffer[start + 1]])
            except ValueError:
                latency = None
            if latency is not None and latency < 3600:  # else not a publisher's event
                counters.latencies.append(latency)

    def connectionLost(self, reason):
        self.closed = True
        if not self.opened.called:
            self.opened.errback(reason)


class Control(LineReceiver):
    delimiter = b"\n"

    def __init__(self, counters, devices, done):
        self.counters, self.devices, self.done = counters, devices, done

    def lineReceived(self, line):
        command = line.decode().strip()
        if command == "RESET":
            self.counters.reset()
            self.sendLine(b"RESET")
        elif command == "STATS":
            closed = sum(d.closed for d in self.devices)
            self.sendLine(b"STATS " + json.dumps(self.counters.stats(closed)).encode())
        elif command == "QUIT":
            self.done.callback(None)


def _summary(seconds):
    if not seconds:
        return None
    ms = sorted(s * 1000 for s in seconds)
    return {
        "mean": round(sum(ms) / len(ms), 2),
        "p50": round(ms[len(ms) // 2], 2),
        "p99": round(ms[min(len(ms) - 1, int(0.99 * len(ms)))], 2),
        "max": round(ms[-1], 2),
    }


async def main(reactor, argv):
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--first", type=int, default=0, help="index of the first profile")
    parser.add_argument("--secret", help="gateway: mint JWTs for profiles PREFIX<i>")
    parser.add_argument("--prefix", default="fan")
    parser.add_argument("--profile", help="gateway: every device of this one profile (device ids d<index>)")
    parser.add_argument("--concurrency", type=int, default=24)
    parser.add_argument("--source", help="local address to connect from (e.g. 127.0.0.2)")
    args = parser.parse_args(argv)
    counters = Counters()
    devices = []
    done = defer.Deferred()
    control = Control(counters, devices, done)
    stdio.StandardIO(control)
    parts = urlsplit(args.url)
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    endpoint = endpoints.TCP4ClientEndpoint(
        reactor, parts.hostname, parts.port, timeout=120, bindAddress=(args.source, 0) if args.source else None
    )

    async def connect(index):
        headers = {}
        if args.secret:
            profile, device_id = (args.profile, f"d{index}") if args.profile else (f"{args.prefix}{index}", "b")
            token = mint_token(args.secret, profile, device_id=device_id, audience="service_chat_gateway", ttl=86400)
            headers["Authorization"] = f"Bearer {token}"
        opened = defer.Deferred()
        device = Device(
            path,
            parts.netloc,
            headers,
            "chat.v1.proto" if args.secret else None,
            counters,
            opened,
            expect_hello=bool(args.secret),
        )
        await endpoints.connectProtocol(endpoint, device)
        devices.append(await opened)

    indexes = iter(range(args.first, args.first + args.count))

    async def worker():
        for index in indexes:
            await connect(index)

    started = time.monotonic()
    await defer.gatherResults(
        [defer.Deferred.fromCoroutine(worker()) for _ in range(args.concurrency)], consumeErrors=True
    )
    figures = {
        "connected": len(devices),
        "failed": 0,
        "retries": 0,
        "concurrency": args.concurrency,
        "seconds_to_101": round(max((d.upgraded_at for d in devices), default=started) - started, 3),
        "seconds_to_connected": round(max((d.connected_at for d in devices), default=started) - started, 3),
        "ms_to_101": _summary([d.upgraded_at - d.started for d in devices]),
        "ms_to_connected": _summary([d.connected_at - d.started for d in devices]),
    }
    control.sendLine(f"READY {len(devices)} {figures['seconds_to_connected']:.3f} {json.dumps(figures)}".encode())
    await done
    for device in devices:
        device.transport.abortConnection()


if __name__ == "__main__":
    task.react(lambda reactor: defer.Deferred.fromCoroutine(main(reactor, sys.argv[1:])))
