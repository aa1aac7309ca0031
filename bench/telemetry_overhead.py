"""What telemetry costs the delivery hot path: fan-out throughput with and without it.

One gateway in this process (fake core and verifier, in-memory bus and store, a
task.Clock), N real Autobahn WebSocket server protocols (half chat.v1.json, half
chat.v1.proto) on transports that discard what they are given, devices in rooms
of --room-size. Each round publishes --deliveries / room size room events (at
least 50) on the bus and times the fan-out in CPU time of the process (parse,
encode once per subprotocol, one WebSocket frame per device).

Two modes, in the same process, on the same sessions:

- off: every telemetry hook the hot path calls (a method of the gateway's
  GatewayCounts) is replaced by a no-op (the code as it would be without telemetry,
  less a function call);
- on:  telemetry configured as twistd configures it (Prometheus reader; with
  --spans, an in-memory span exporter too), and /metrics scraped once per round.

Each iteration runs three rounds, off, on and off again, in rotating order. Reported:
deliveries per second for each mode (median over rounds), the ratio on/off within each
iteration (median, min, max; 1.00 = no cost), the same ratio between the two off rounds
(A/A: what noise alone gives), the fan-out's CPU time, and the hooks' own cost per
fan-out measured with timeit (and the ratio it alone would give).

    .venv/bin/python bench/telemetry_overhead.py --room-size 1 10 100 1000
"""

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
import timeit
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests"))

from twisted.internet import task  # noqa: E402
from twisted.internet.address import IPv4Address  # noqa: E402
from twisted.internet.testing import StringTransport  # noqa: E402

from chatgateway import config  # noqa: E402
from chatgateway.api import chat_pb2 as pb  # noqa: E402
from chatgateway.api import codec  # noqa: E402
from chatgateway.bus import channels  # noqa: E402
from chatgateway.bus.memory import MemoryBus, MemoryHub  # noqa: E402
from chatgateway.edge.websocket import DeviceFactory  # noqa: E402
from chatgateway.sessions.gateway import Gateway  # noqa: E402
from chatgateway.store.memory import MemoryStore  # noqa: E402
from chatgateway.telemetry.counts import FANOUT_SAMPLE_EVERY, GatewayCounts  # noqa: E402
from chatgateway.telemetry.providers import Telemetry  # noqa: E402
from support.wsharness import FakeCore, FakeVerifier  # noqa: E402

HOOKS = ("received", "sent", "fanned_out", "session_opened", "session_closed", "connection_closing")
HANDSHAKE = (
    "GET /ws HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
    "Sec-WebSocket-Protocol: {protocol}\r\nAuthorization: Bearer {token}\r\n\r\n"
)


class Discard(StringTransport):
    """A connected transport that counts what is written and keeps nothing."""

    written = 0

    def write(self, data):
        Discard.written += len(data)

    def writeSequence(self, seq):
        for data in seq:
            self.write(data)


class Setup:
    def __init__(self, devices, room_size, counts):
        env = {"JWT_SECRET": "bench", "GATEWAY_ID": "gw-bench", "MAX_EVENTS_PER_SECOND": "1000000"}
        self.config = config.load(env)
        self.clock = task.Clock()
        self.clock.advance(1_000_000)
        self.core = FakeCore()
        self.hub = MemoryHub()
        self.gateway = Gateway(
            self.config,
            self.clock,
            FakeVerifier(self.clock),
            self.core,
            MemoryBus(self.hub),
            MemoryStore(),
            clock=self.clock,
            counts=counts,
        )
        self.gateway.startService()
        self.factory = DeviceFactory(self.gateway)
        self.factory.setProtocolOptions(openHandshakeTimeout=0, closeHandshakeTimeout=0)
        self.rooms = [f"room-{i}" for i in range(max(1, devices // room_size))]
        self.protocols = []
        for i in range(len(self.rooms) * room_size):
            profile = f"p{i}"
            self.core.rooms[profile] = [self.rooms[i // room_size]]
            protocol = self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000 + i))
            protocol.makeConnection(Discard())
            subprotocol = codec.JSON if i % 2 == 0 else codec.PROTO
            protocol.dataReceived(HANDSHAKE.format(protocol=subprotocol, token=f"{profile}/d").encode())
            self.protocols.append(protocol)
        open_sessions = len(self.gateway.registry)
        if open_sessions != len(self.protocols):
            raise RuntimeError(f"only {open_sessions} of {len(self.protocols)} sessions opened")
        self.payloads = [
            pb.ServerEvent(
                id=f"e{n}",
                message=pb.RoomEvent(id=f"e{n}", room_id=room, sender_id="p0", type=pb.RoomEvent.TEXT),
            )
            for n, room in enumerate(self.rooms * 2)
        ]
        for event in self.payloads:
            event.message.payload.update({"text": "hello, this is a chat message of ordinary length"})
            codec.stamp(event, self.clock.seconds())
        self.payloads = [(channels.room(e.message.room_id), e.SerializeToString()) for e in self.payloads]

    def round(self, events):
        """Publish ``events`` events; seconds taken and deliveries made."""
        count = len(self.payloads)
        before = Discard.written
        gc.collect()
        started = time.process_time()  # CPU time of this process: other load on the machine counts less
        for n in range(events):
            channel, payload = self.payloads[n % count]
            self.hub.deliver(channel, payload)
            if self.gateway.fanout._pumping is not None:  # chunked fan-outs continue on later turns
                self.clock.advance(0)
        while self.gateway.fanout._pumping is not None:
            self.clock.advance(0)
        elapsed = time.process_time() - started
        if Discard.written == before:
            raise RuntimeError("nothing was written")
        return elapsed


class Modes:
    """Switches the gateway between telemetry off (hooks are no-ops) and on (configured)."""

    def __init__(self, spans):
        self.exporter = None
        kwargs = {}
        if spans:
            from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

            self.exporter = kwargs["span_exporter"] = InMemorySpanExporter()
        self.telemetry = Telemetry("gw-bench", environ={}, **kwargs)
        self.counts = GatewayCounts(self.telemetry.instruments)
        self.telemetry.observe(self.counts)

    def off(self):
        for name in HOOKS:
            setattr(self.counts, name, _noop)  # shadows the method for every caller

    def on(self):
        for name in HOOKS:
            self.counts.__dict__.pop(name, None)

    def scrape(self):
        from prometheus_client import generate_latest

        return len(generate_latest(self.telemetry.registry))


def _noop(*args, **kwargs):
    return None


def hook_cost(counts, room_size):
    """Microseconds the hot path's telemetry hooks take per fan-out (telemetry configured)."""
    event = pb.ServerEvent(message=pb.RoomEvent(room_id="r"))
    started = counts.clock()
    number = 100_000
    runs = timeit.repeat(lambda: counts.fanned_out(event, room_size, started), number=number, repeat=5)
    empty = timeit.repeat(lambda: _noop(event, room_size, started), number=number, repeat=5)
    return max(0.0, (min(runs) - min(empty)) / number * 1e6)


def measure(room_size, devices, events, rounds, spans):
    modes = Modes(spans)
    setup = Setup(devices, room_size, modes.counts)
    deliveries = events * room_size
    setup.round(events)  # warm-up: JSON frames cached per event, code paths hot
    times = {"off": [], "on": []}
    ratios, calibration = [], []
    slots = ("off", "on", "off2")
    for r in range(rounds):
        # rotate the order, so drift favours none; "off2" is a second off round: off/off2
        # is an A/A comparison, the noise floor of the on/off ratio
        order = slots[r % 3 :] + slots[: r % 3]
        triple = {}
        for slot in order:
            getattr(modes, slot.rstrip("2"))()
            triple[slot] = setup.round(events)
            if slot == "on":
                modes.scrape()
        times["off"].append(triple["off"])
        times["on"].append(triple["on"])
        ratios.append(triple["off"] / triple["on"])  # throughput on / throughput off
        calibration.append(triple["off"] / triple["off2"])
    modes.on()
    hook_us = hook_cost(modes.counts, room_size)
    modes.telemetry.shutdown()
    event_us_off = statistics.median(times["off"]) / events * 1e6
    return {
        "room_size": room_size,
        "devices": len(setup.protocols),
        "events_per_round": events,
        "rounds": rounds,
        "deliveries_per_sec_off": deliveries / statistics.median(times["off"]),
        "deliveries_per_sec_on": deliveries / statistics.median(times["on"]),
        "ratio_median": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "aa_ratio_median": statistics.median(calibration),
        "fanout_us_off": event_us_off,
        "hook_us_per_fanout": hook_us,
        "ratio_from_hook_cost": event_us_off / (event_us_off + hook_us),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--room-size", type=int, nargs="+", default=[1, 10, 100, 1000])
    parser.add_argument("--devices", type=int, default=2000, help="devices connected (rounded to whole rooms)")
    parser.add_argument(
        "--deliveries", type=int, default=5000, help="deliveries per round (events = this / room size, at least 50)"
    )
    parser.add_argument("--rounds", type=int, default=31, help="iterations (of three rounds each)")
    parser.add_argument("--spans", action="store_true", help="also record spans (in memory); none are on this path")
    parser.add_argument("--out", default=str(HERE / "out" / "telemetry_overhead.json"))
    args = parser.parse_args(argv)

    results = []
    print(
        f"{'room':>6} {'devices':>8} {'off deliveries/s':>17} {'on deliveries/s':>16} "
        f"{'ratio on/off median [min, max]':>31} {'A/A off/off':>12} {'fan-out us':>11} {'hooks us':>9} {'ratio from hook cost':>21}"
    )
    for size in args.room_size:
        events = max(50, args.deliveries // size)
        result = measure(size, max(args.devices, size), events, args.rounds, args.spans)
        results.append(result)
        print(
            f"{size:>6} {result['devices']:>8} {result['deliveries_per_sec_off']:>17,.0f} "
            f"{result['deliveries_per_sec_on']:>16,.0f} "
            f"{result['ratio_median']:>15.3f} [{result['ratio_min']:.3f}, {result['ratio_max']:.3f}] "
            f"{result['aa_ratio_median']:>12.3f} "
            f"{result['fanout_us_off']:>11.1f} {result['hook_us_per_fanout']:>9.2f} {result['ratio_from_hook_cost']:>21.4f}"
        )
    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "fanout_sample_every": FANOUT_SAMPLE_EVERY,
        "results": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
