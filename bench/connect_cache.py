"""Connects with and without the membership cache, side by side in one run.

Starts redis-server and the reference core (`twistd chatcore`) on CPU 1 and two
`twistd chatgateway` on CPU 0 on the same Redis and core: one with
MEMBERSHIP_CACHE_TTL_SEC=0 (every connect asks the core, as before the cache) and one
with the cache. N profiles, members of one room, connect (one device each, up to
--concurrency at a time, from this process on CPU 1) to one gateway, then close; first
once to the cached gateway with a cold cache, then --repeats alternating rounds: the
uncached gateway, the cached one (warm). Per round: connects/s (to `connected`), the
gateway's and the core's CPU per connect (/proc), and the core calls per connect (the
gateway's /metrics: SearchRooms calls, cache hits). Medians of the repeats and the ratio
cached/uncached; the JSON goes to bench/out/connect_cache.json.

    .venv/bin/python bench/connect_cache.py --devices 1000 --repeats 3
"""

import argparse
import json
import os
import statistics
import sys
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT = HERE / "out"
sys.path.insert(0, str(ROOT / "tests"))

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from twisted.internet import defer, reactor, task  # noqa: E402

from chatgateway.api import chat_pb2 as pb  # noqa: E402
from chatgateway.api import codec  # noqa: E402
from chatgateway.auth.devtokens import mint_token  # noqa: E402
from chatgateway.client.wsclient import GatewayClient  # noqa: E402
from support.processes import TWISTD, Twistd, free_port  # noqa: E402
from support.redis import RedisServer  # noqa: E402

SECRET = "bench-connect-cache-secret-0123456789abcdef"
SERVER_CPU, LOAD_CPU = "0", "1"
SEARCH = {"rpc_method": "chat.v1.ChatService/SearchRooms", "rpc_response_status_code": "OK", "rpc_system_name": "grpc"}


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def token(profile, device):
    return mint_token(SECRET, profile, device_id=device, audience="service_chat_gateway", ttl=86400)


class Gateway:
    def __init__(self, name, env, core_port):
        self.name = name
        self.port = free_port()
        env = {
            **env,
            "CHAT_SERVICE_URI": f"127.0.0.1:{core_port}",
            "HTTP_PORT": str(self.port),
            "GRPC_PORT": str(free_port()),
            "HTTP_INTERFACE": "127.0.0.1",
            "GATEWAY_ID": name,
            "MAX_UNAUTHENTICATED_PER_ADDRESS": "0",
        }
        twistd = ("taskset", "-c", SERVER_CPU, *TWISTD)
        self.process = Twistd("chatgateway", ["--workers", "1"], env=env, port=self.port, twistd=twistd)

    def metric(self, name, **labels):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=10) as answer:
            text = answer.read().decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                own = {k: v for k, v in sample.labels.items() if not k.startswith("otel_scope")}
                if sample.name == name and own == labels:
                    return sample.value
        return 0.0

    def counters(self):
        return {
            "searches": self.metric("rpc_client_call_duration_seconds_count", **SEARCH),
            "hits": self.metric(
                "chatgateway_membership_cache_lookups_total", chatgateway_membership_cache_result="hit"
            ),
        }


async def connect_all(gateway, tokens, concurrency):
    """Connect every token's device, at most ``concurrency`` at a time; (seconds, clients, failures)."""
    url = f"ws://127.0.0.1:{gateway.port}/ws"
    limit = defer.DeferredSemaphore(concurrency)
    clients, failures = [], []

    async def one(t):
        try:
            client = await GatewayClient.connect(url, t, subprotocol=codec.PROTO)
            await client.next_event("connected", timeout=60)
            clients.append(client)
        except Exception as e:  # noqa: BLE001 - counted and reported
            failures.append(repr(e))

    started = time.perf_counter()
    await defer.gatherResults([limit.run(lambda t=t: defer.ensureDeferred(one(t))) for t in tokens])
    return time.perf_counter() - started, clients, failures


async def close_all(clients):
    await defer.gatherResults([c.close() for c in clients], consumeErrors=True)


async def one_round(gateway, tokens, core_pid, concurrency):
    before, gw0, core0 = gateway.counters(), cpu_seconds(gateway.process.pid), cpu_seconds(core_pid)
    seconds, clients, failures = await connect_all(gateway, tokens, concurrency)
    gw1, core1 = cpu_seconds(gateway.process.pid), cpu_seconds(core_pid)
    after = gateway.counters()
    await close_all(clients)
    await task.deferLater(reactor, 1.0, lambda: None)  # let the closes settle before the next round
    n = len(tokens)
    return {
        "gateway": gateway.name,
        "connected": len(clients),
        "failed": len(failures),
        "failures": failures[:3],
        "connects_per_second": round(len(clients) / seconds, 1),
        "gateway_cpu_ms_per_connect": round((gw1 - gw0) / n * 1000, 3),
        "core_cpu_ms_per_connect": round((core1 - core0) / n * 1000, 3),
        "core_calls_per_connect": round((after["searches"] - before["searches"]) / n, 4),
        "cache_hits": int(after["hits"] - before["hits"]),
    }


def median_of(rounds, key):
    return statistics.median(r[key] for r in rounds)


async def run(options):
    os.sched_setaffinity(0, {int(LOAD_CPU)})
    redis_server = RedisServer()
    env = {"JWT_SECRET": SECRET, "CACHE_URI": redis_server.uri, "OAUTH2_ISSUER": "", "LOG_LEVEL": "warning"}
    core_port = free_port()
    core = Twistd(
        "chatcore", ["--port", core_port], env=env, port=core_port, twistd=("taskset", "-c", LOAD_CPU, *TWISTD)
    )
    uncached = Gateway("uncached", {**env, "MEMBERSHIP_CACHE_TTL_SEC": "0"}, core_port)
    cached = Gateway("cached", {**env, "MEMBERSHIP_CACHE_TTL_SEC": "600"}, core_port)
    processes = [core, uncached.process, cached.process]
    try:
        for process in processes:
            process.start()
        profiles = [f"bench-{i}" for i in range(options.devices)]
        owner = await GatewayClient.connect(f"ws://127.0.0.1:{cached.port}/ws", token("bench-owner", "o"))
        await owner.next_event("connected")
        await owner.call("CreateRoom", pb.CreateRoomRequest(name="bench", member_ids=profiles))
        await owner.close()
        await task.deferLater(reactor, 2.0, lambda: None)  # the core publishes the members' changes
        rounds = [await one_round(cached, [token(p, "cold") for p in profiles], core.pid, options.concurrency)]
        rounds[0]["gateway"] = "cached (cold)"
        print(json.dumps(rounds[0]), flush=True)
        for repeat in range(options.repeats):
            for gateway in (uncached, cached):
                tokens = [token(p, f"{gateway.name}-{repeat}") for p in profiles]
                result = await one_round(gateway, tokens, core.pid, options.concurrency)
                rounds.append(result)
                print(json.dumps(result), flush=True)
    finally:
        for process in processes:
            process.stop()
        redis_server.cleanup()
    summary = {}
    for name in ("uncached", "cached"):
        mine = [r for r in rounds if r["gateway"] == name]
        summary[name] = {
            key: median_of(mine, key)
            for key in (
                "connects_per_second",
                "gateway_cpu_ms_per_connect",
                "core_cpu_ms_per_connect",
                "core_calls_per_connect",
                "failed",
            )
        }
    summary["ratio cached/uncached"] = {
        "connects_per_second": round(
            summary["cached"]["connects_per_second"] / summary["uncached"]["connects_per_second"], 3
        ),
        "gateway_cpu_per_connect": round(
            summary["cached"]["gateway_cpu_ms_per_connect"] / summary["uncached"]["gateway_cpu_ms_per_connect"], 3
        ),
    }
    result = {"options": vars(options), "rounds": rounds, "medians": summary}
    OUT.mkdir(exist_ok=True)
    (OUT / "connect_cache.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(summary, indent=2))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=32)
    options = parser.parse_args()
    failure = []

    def done(result):
        if isinstance(result, Exception) or hasattr(result, "getTraceback"):
            failure.append(result)
            print(result.getTraceback(), file=sys.stderr)
        reactor.stop()

    reactor.callWhenRunning(lambda: defer.ensureDeferred(run(options)).addBoth(done))
    reactor.run()
    sys.exit(1 if failure else 0)


if __name__ == "__main__":
    main()
