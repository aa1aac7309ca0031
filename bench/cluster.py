"""Room events per second through the bus: one Redis, a cluster of 1 shard, a cluster of 3 shards.

    .venv/bin/python bench/cluster.py --gateways 3 --publishers 2 --rooms 300 --seconds 8 --repeats 3

Each "gateway" is a process with the gateway's own bus (chatgateway.bus.make_bus on
EVENTS_URI: RedisBus on one Redis, ClusterBus on a cluster) subscribed to every room's
channel, counting the messages it receives. Each publisher is a process publishing room
events by the contract (the PUBLISH_ROOM script: position, stream, PUBLISH or SPUBLISH)
round-robin over the rooms, with WINDOW publishes outstanding, for --seconds. Every
event reaches every gateway, so deliveries = events × gateways.

Reported per setup (medians of --repeats runs): events published per second, messages
delivered per second (all gateways), and messages lost (published × gateways −
delivered, after the gateways' counts stopped moving). Setups, all in one invocation:

- ``redis``: one redis-server, plain pub/sub: the reference (what one Redis gives today);
- ``cluster-1``: a Redis Cluster of one primary holding every slot (SPUBLISH/SSUBSCRIBE);
- ``cluster-3``: three primaries, the rooms spread over them by slot.

No replicas (on a machine of a few cores they would only take CPU from the primaries).
Ratios are against ``redis`` of the same invocation.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests"))

WINDOW = 200  # publishes outstanding per publisher
SECRET = "bench-secret-0123456789abcdef0123456789"


def _config(uri):
    from chatgateway import config as configuration

    return configuration.load(environ={"CACHE_URI": uri, "JWT_SECRET": SECRET, "GATEWAY_ID": f"bench-{os.getpid()}"})


def _payload(i):
    from chatgateway.api import chat_pb2 as pb

    event = pb.RoomEvent(id=f"e{i}", room_id="r", sender_id="bench", type=pb.RoomEvent.TEXT)
    event.payload.update({"text": "x" * 100})
    return pb.ServerEvent(id=f"e{i}", message=event).SerializeToString()


def _ready(bus, reactor):
    from twisted.internet import task

    async def wait():
        while not bus.ready:
            await task.deferLater(reactor, 0.05, lambda: None)

    return wait()


def subscriber(uri, rooms):
    """A gateway's bus subscribed to every room; prints READY, then its count on each stdin line."""
    from twisted.internet import defer, reactor, stdio
    from twisted.protocols.basic import LineReceiver

    from chatgateway.bus import channels, make_bus

    bus = make_bus(_config(uri), reactor)
    count = [0]

    def received(channel, payload):
        count[0] += 1

    class Control(LineReceiver):
        delimiter = b"\n"

        def lineReceived(self, line):
            if line.strip() == b"QUIT":
                reactor.stop()
                return
            self.sendLine(json.dumps({"received": count[0]}).encode())

    async def main():
        bus.start(received)
        await _ready(bus, reactor)
        await defer.gatherResults([bus.subscribe(channels.room(f"room-{i}")) for i in range(rooms)])
        stdio.StandardIO(Control())
        print("READY", flush=True)

    reactor.callWhenRunning(
        lambda: defer.ensureDeferred(main()).addErrback(lambda f: (f.printTraceback(), reactor.stop()))
    )
    reactor.run()


def publisher(uri, rooms, seconds, offset):
    """Publishes by the contract for ``seconds`` with WINDOW outstanding; prints its counts."""
    from twisted.internet import defer, reactor

    from chatgateway.bus import make_bus

    bus = make_bus(_config(uri), reactor)
    payloads = [_payload(i) for i in range(64)]
    stats = {"published": 0, "failed": 0}

    async def main():
        bus.start(lambda channel, payload: None)
        await _ready(bus, reactor)
        print("READY", flush=True)
        sys.stdin.readline()  # GO
        start = time.monotonic()
        deadline = start + seconds
        done = defer.Deferred()
        state = {"next": offset, "outstanding": 0}

        def one():
            i = state["next"]
            state["next"] += 1
            state["outstanding"] += 1
            d = bus.publish_room_event(f"room-{i % rooms}", payloads[i % len(payloads)])
            d.addCallbacks(lambda _: ok(), lambda f: failed())

        def ok():
            stats["published"] += 1
            after()

        def failed():
            stats["failed"] += 1
            after()

        def after():
            state["outstanding"] -= 1
            if time.monotonic() < deadline:
                one()
            elif state["outstanding"] == 0 and not done.called:
                done.callback(None)

        for _ in range(WINDOW):
            one()
        await done
        stats["seconds"] = time.monotonic() - start
        print(json.dumps(stats), flush=True)
        await bus.stop()
        reactor.stop()

    reactor.callWhenRunning(
        lambda: defer.ensureDeferred(main()).addErrback(lambda f: (f.printTraceback(), reactor.stop()))
    )
    reactor.run()


def _spawn(role, *args):
    command = [sys.executable, str(Path(__file__).resolve()), "--role", role, *map(str, args)]
    process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    line = process.stdout.readline()
    if line.strip() != "READY":
        process.kill()
        raise RuntimeError(f"{role} did not start: {line!r}")
    return process


def _ask(process):
    process.stdin.write("COUNT\n")
    process.stdin.flush()
    return json.loads(process.stdout.readline())["received"]


def run_once(uri, args):
    gateways = [_spawn("subscriber", uri, args.rooms) for _ in range(args.gateways)]
    publishers = [_spawn("publisher", uri, args.rooms, args.seconds, i * 1_000_000) for i in range(args.publishers)]
    try:
        for p in publishers:
            p.stdin.write("GO\n")
            p.stdin.flush()
        results = [json.loads(p.stdout.readline()) for p in publishers]
        published = sum(r["published"] for r in results)
        seconds = max(r["seconds"] for r in results)
        # Wait until the gateways' counts stop moving (what is in flight arrives).
        last, counts = None, None
        for _ in range(100):
            counts = [_ask(g) for g in gateways]
            if counts == last:
                break
            last = counts
            time.sleep(0.3)
        delivered = sum(counts)
        return {
            "published_per_sec": published / seconds,
            "delivered_per_sec": delivered / seconds,
            "published": published,
            "failed": sum(r["failed"] for r in results),
            "lost": published * args.gateways - delivered,
        }
    finally:
        for p in gateways + publishers:
            if p.poll() is None:
                try:
                    p.stdin.write("QUIT\n")
                    p.stdin.flush()
                except OSError:
                    pass
        for p in gateways + publishers:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


def setups(names):
    from support.redis import RedisServer
    from support.rediscluster import RedisCluster

    for name in names:
        if name == "redis":
            server = RedisServer()
            yield name, server.uri, server.cleanup
        else:
            cluster = RedisCluster(primaries=int(name.split("-")[1]), replicas=0)
            yield name, cluster.uri, cluster.cleanup


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--role", choices=["subscriber", "publisher"])
    parser.add_argument("--gateways", type=int, default=3)
    parser.add_argument("--publishers", type=int, default=2)
    parser.add_argument("--rooms", type=int, default=300)
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--setups", nargs="+", default=["redis", "cluster-1", "cluster-3"])
    parser.add_argument("rest", nargs="*")
    args = parser.parse_args()
    if args.role == "subscriber":
        return subscriber(args.rest[0], int(args.rest[1]))
    if args.role == "publisher":
        return publisher(args.rest[0], int(args.rest[1]), float(args.rest[2]), int(args.rest[3]))

    results = {}
    for name, uri, cleanup in setups(args.setups):
        try:
            runs = [run_once(uri, args) for _ in range(args.repeats)]
        finally:
            cleanup()
        results[name] = {
            key: statistics.median(run[key] for run in runs)
            for key in ("published_per_sec", "delivered_per_sec", "lost", "failed")
        }
        results[name]["runs"] = runs
        print(f"{name}: {json.dumps(results[name]['runs'])}", flush=True)
    reference = results.get("redis", {}).get("delivered_per_sec")
    print(
        f"\n{args.gateways} gateways, {args.publishers} publishers, {args.rooms} rooms, {args.seconds:g} s, "
        f"medians of {args.repeats}; {platform.python_version()}, {os.cpu_count()} CPUs"
    )
    print("| setup | events published/s | messages delivered/s | ratio vs redis | lost | failed publishes |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, r in results.items():
        ratio = f"{r['delivered_per_sec'] / reference:.2f}" if reference else "-"
        print(
            f"| {name} | {r['published_per_sec']:,.0f} | {r['delivered_per_sec']:,.0f} | {ratio} | "
            f"{r['lost']:,.0f} | {r['failed']:,.0f} |"
        )
    out = ROOT / "bench" / "out"
    out.mkdir(exist_ok=True)
    (out / "cluster.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=2))


if __name__ == "__main__":
    main()
