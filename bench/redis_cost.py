"""What the connection metadata costs Redis: commands and memory per connection.

Starts a redis-server, the reference core and two gateways (each a real
process), connects N devices spread over both gateways from a separate load
process, and reads Redis's own counters (INFO commandstats, INFO memory):

    .venv/bin/python bench/redis_cost.py --connections 2000 --intervals 5

Phases: connect all, hold for --intervals heartbeat intervals, disconnect
all. Reported: commands per connect and per disconnect, writes per
connection per heartbeat interval in steady state, and Redis memory per
connection. The reference, measured in the same run on the same server,
is the bare cost of the spec's data for one connection written by hand:
one SET of the same JSON with a TTL plus one SADD into its room.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import grpc

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests"))

from chatgateway.api import chat_pb2 as pb  # noqa: E402
from chatgateway.api import chat_pb2_grpc  # noqa: E402
from chatgateway.auth.devtokens import mint_token  # noqa: E402
from support.processes import Twistd, free_port  # noqa: E402
from support.redis import RedisServer  # noqa: E402

SECRET = "bench-secret-0123456789abcdef0123456789"
WRITES = {"set", "setex", "sadd", "srem", "del", "expire", "zadd", "zrem", "hset", "hdel", "publish", "evalsha", "eval"}


def commandstats(client):
    stats = client.info("commandstats")
    return {name.removeprefix("cmdstat_"): value["calls"] for name, value in stats.items()}


def delta(after, before):
    return {k: after.get(k, 0) - before.get(k, 0) for k in after if after.get(k, 0) != before.get(k, 0)}


def total(counts, only=None):
    return sum(v for k, v in counts.items() if only is None or k in only)


def make_rooms(core_port, connections, room_size, prefix):
    """Rooms of room_size consecutive profiles, created through the core's gRPC API."""
    channel = grpc.insecure_channel(f"127.0.0.1:{core_port}")
    stub = chat_pb2_grpc.ChatServiceStub(channel)
    owner = mint_token(SECRET, "bench-owner", audience="service_chat_gateway")
    for start in range(0, connections, room_size):
        members = [f"{prefix}{i}" for i in range(start, min(connections, start + room_size))]
        stub.CreateRoom(
            pb.CreateRoomRequest(name=f"bench {start}", member_ids=members),
            metadata=[("authorization", f"Bearer {owner}")],
            timeout=10,
        )
    channel.close()


def read_line(process, prefix, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            raise RuntimeError(f"load client ended: {process.stderr.read()}")
        if line.startswith(prefix):
            return line.strip()
    raise TimeoutError(prefix)


def reference_memory(client, meta_json, count):
    """used_memory for count hand-written conn keys + room entries (the spec's bare data)."""
    before = client.info("memory")["used_memory"]
    pipe = client.pipeline(transaction=False)
    for i in range(count):
        pipe.set(f"ref:conn:dev{i}:bench", meta_json.replace("dev0", f"dev{i}"), ex=600)
        pipe.sadd(f"ref:room:{i // 10}", f"dev{i}:bench")
    pipe.execute()
    used = client.info("memory")["used_memory"] - before
    client.delete(*[f"ref:conn:dev{i}:bench" for i in range(count)])
    client.delete(*[f"ref:room:{i}" for i in range(count // 10 + 1)])
    return used / count


def start_gateways(env, core_port, heartbeat, count=2):
    gateways = []
    for i in range(count):
        port = free_port()
        gateway_env = {
            **env,
            "CHAT_SERVICE_URI": f"127.0.0.1:{core_port}",
            "HTTP_PORT": str(port),
            "GRPC_PORT": str(free_port()),
            "HTTP_INTERFACE": "127.0.0.1",
            "GATEWAY_ID": f"bench-gw-{i}",
            "HEARTBEAT_INTERVAL_SEC": str(heartbeat),
            "CONNECTION_TIMEOUT_SEC": str(heartbeat * 10),
        }
        gateways.append(Twistd("chatgateway", ["--workers", "1"], env=gateway_env, port=port).start())
    return gateways


def start_load(gateways, connections, wait=False):
    urls = ",".join(f"ws://127.0.0.1:{g.port}/ws" for g in gateways)
    return subprocess.Popen(
        [
            sys.executable,
            str(HERE / "loadclient.py"),
            "--urls",
            urls,
            "--secret",
            SECRET,
            "--profiles",
            str(connections),
            "--prefix",
            "dev",
            *(["--wait"] if wait else []),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )


def close_load(load):
    load.stdin.write("CLOSE\n")
    load.stdin.flush()
    read_line(load, "CLOSED", 120)


def settle(r, quiet=1.0, timeout=60):
    """Wait until Redis's command counters stop moving for ``quiet`` seconds (writes have landed)."""
    deadline = time.monotonic() + timeout
    last = total(commandstats(r))
    while time.monotonic() < deadline:
        time.sleep(quiet)
        now = total(commandstats(r)) - 1  # the INFO call itself
        if now == last:
            return
        last = now + 1


def connect_and_disconnect(r, env, core_port, n):
    """Phase 1: the cost of connecting and disconnecting, with no refresh in the window."""
    gateways = start_gateways(env, core_port, heartbeat=300)
    load = start_load(gateways, n, wait=True)
    try:
        settle(r)
        memory_before = r.info("memory")["used_memory"]
        s0 = commandstats(r)
        started = time.monotonic()
        load.stdin.write("CONNECT\n")
        load.stdin.flush()
        read_line(load, "READY", 600)
        seconds = time.monotonic() - started
        settle(r)
        s1 = commandstats(r)
        memory = r.info("memory")["used_memory"] - memory_before
        close_load(load)
        settle(r)
        s2 = commandstats(r)
        return delta(s1, s0), delta(s2, s1), memory, seconds
    finally:
        if load.poll() is None:
            load.kill()
        for g in gateways:
            g.stop()


def steady_state(r, env, core_port, n, heartbeat, intervals):
    """Phase 2: commands while n devices stay connected for a number of heartbeat intervals."""
    gateways = start_gateways(env, core_port, heartbeat=heartbeat)
    load = start_load(gateways, n)
    try:
        read_line(load, "READY", 600)
        time.sleep(heartbeat * 2)  # past the connect writes and the first refresh
        s0 = commandstats(r)
        started = time.monotonic()
        time.sleep(heartbeat * intervals)
        seconds = time.monotonic() - started
        s1 = commandstats(r)
        close_load(load)
        return delta(s1, s0), seconds
    finally:
        if load.poll() is None:
            load.kill()
        for g in gateways:
            g.stop()


def run(args):
    redis_server = RedisServer()
    r = redis_server.client()
    core_port = free_port()
    env = {"JWT_SECRET": SECRET, "CACHE_URI": redis_server.uri, "LOG_LEVEL": "warning"}
    core = Twistd("chatcore", ["--port", core_port], env=env, port=core_port).start()
    try:
        n = args.connections
        make_rooms(core_port, n, args.room_size, "dev")
        connect, disconnect, memory, connect_seconds = connect_and_disconnect(r, env, core_port, n)
        steady, steady_seconds = steady_state(r, env, core_port, n, args.heartbeat, args.intervals)
        meta_json = json.dumps(
            {
                "profile_id": "dev0",
                "device_id": "bench",
                "room_ids": ["0" * 32],
                "last_active": 1795765703,
                "last_heartbeat": 1795765703,
                "connected": 1795765703,
                "gateway_id": "bench-gw-0",
            },
            separators=(",", ":"),
        )
        intervals = steady_seconds / args.heartbeat
        results = {
            "connections": n,
            "room_size": args.room_size,
            "gateways": 2,
            "heartbeat_interval_sec": args.heartbeat,
            "steady_intervals": round(intervals, 2),
            "handshakes_per_second": round(n / connect_seconds, 1),
            "commands_per_connect": round(total(connect) / n, 2),
            "commands_per_disconnect": round(total(disconnect) / n, 2),
            "steady_commands_per_connection_per_minute": round(total(steady) / n / (steady_seconds / 60), 2),
            "steady_writes_per_connection_per_heartbeat": round(total(steady, WRITES) / n / intervals, 3),
            "redis_bytes_per_connection": round(memory / n),
            "reference_bytes_per_connection": round(reference_memory(r, meta_json, n)),
            "connect_commands": connect,
            "steady_commands": steady,
            "disconnect_commands": disconnect,
            "machine": {
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "redis": r.info("server")["redis_version"],
            },
        }
        results["memory_ratio_to_reference"] = round(
            results["redis_bytes_per_connection"] / max(1, results["reference_bytes_per_connection"]), 2
        )
        return results
    finally:
        core.stop()
        redis_server.cleanup()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument("--room-size", type=int, default=10)
    parser.add_argument("--heartbeat", type=float, default=2.0, help="HEARTBEAT_INTERVAL_SEC of the gateways")
    parser.add_argument("--intervals", type=int, default=12, help="heartbeat intervals held in steady state")
    parser.add_argument("--out", default=str(HERE / "out" / "redis_cost.json"))
    args = parser.parse_args()
    results = run(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    for key, value in results.items():
        if not isinstance(value, dict):
            print(f"{key:45} {value}")
    print("connect:   ", results["connect_commands"])
    print("steady:    ", results["steady_commands"])
    print("disconnect:", results["disconnect_commands"])


if __name__ == "__main__":
    main()
