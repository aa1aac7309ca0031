"""The benchmark suite: fan-out, idle connections and handshakes, against a bare reference.

    .venv/bin/python bench/suite.py                 # everything, 3 repeats (about 30 minutes)
    .venv/bin/python bench/suite.py --quick         # one repeat, smaller ladders (a few minutes)
    .venv/bin/python bench/plots.py                 # PNG plots from bench/out/suite.json

Every system under test runs in processes of its own, pinned to CPU 0 with
taskset (except the two-process systems, which need both CPUs); the load
clients and the publisher run pinned to the other CPU. Systems:

- reference: bench/reference_server.py, a bare Twisted + Autobahn server that
  subscribes to the room's Redis channel and fans each message out prepared;
- gateway: one `twistd chatgateway --workers 1` on Redis, with the reference
  core (used at connect time, for memberships);
- gateway-2w: `--workers 2` (one gateway in two processes sharing the port);
- 2-gateways: two `twistd chatgateway` processes on the same Redis.

Events enter every system the same way: the publisher PUBLISHes serialized
ServerEvents (about 200 bytes, as the core does) on chat:room:{room}, with
its send time as the event id; clients read it to measure delivery latency.
All figures are also given as ratios to the reference measured in the same
run. Results: bench/out/suite.json, summarised into bench/RESULTS.md.
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

import grpc
import redis

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests"))

from chatgateway.api import chat_pb2 as pb  # noqa: E402
from chatgateway.api import chat_pb2_grpc  # noqa: E402
from chatgateway.auth import mint_token  # noqa: E402
from support.processes import TWISTD, free_port  # noqa: E402
from support.redis import RedisServer  # noqa: E402

SECRET = "bench-suite-secret-0123456789abcdef012345"
SERVER_CPU, CLIENT_CPU = "0", "1"
MAX_PER_CLIENT = 9000  # connections per client process (file descriptor limit 20,000)


def pinned(cpus, argv):
    return ["taskset", "-c", cpus, *argv] if cpus else argv


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_port(port, process, timeout=30):
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"port {port}")


class System:
    """One system under test: its processes, and how a device connects to a room."""

    def __init__(self, name, redis_uri, core_port):
        self.name = name
        self.redis_uri = redis_uri
        self.core_port = core_port
        self.processes = []
        self.ports = []

    def start(self):
        env = {**os.environ, "JWT_SECRET": SECRET, "CACHE_URI": self.redis_uri, "LOG_LEVEL": "warning",
               "CHAT_SERVICE_URI": f"127.0.0.1:{self.core_port}", "MAX_EVENTS_PER_SECOND": "1000",
               "HTTP_INTERFACE": "127.0.0.1", "SEND_BUFFER_BYTES": str(64 * 1024 * 1024),
               # every load client connects from 127.0.0.1, and the idle runs hold up to 19,000
               "MAX_UNAUTHENTICATED_PER_ADDRESS": "0", "MAX_CONNECTIONS": "25000"}
        if self.name == "reference":
            port = free_port()
            self._spawn(pinned(SERVER_CPU, [sys.executable, str(HERE / "reference_server.py"), "--port", str(port),
                                            "--redis", self.redis_uri]), env, port)
            return self
        count = 2 if self.name == "2-gateways" else 1
        workers = "2" if self.name == "gateway-2w" else "1"
        cpus = None if self.name in ("gateway-2w", "2-gateways") else SERVER_CPU
        for i in range(count):
            port = free_port()
            argv = [*TWISTD, "--nodaemon", "--pidfile=", "chatgateway", "--workers", workers]
            self._spawn(pinned(cpus, argv), {**env, "HTTP_PORT": str(port), "GRPC_PORT": str(free_port()),
                                             "GATEWAY_ID": f"bench-{self.name}-{i}"}, port)
        if workers == "2":
            time.sleep(3)  # the second worker binds the port after the first
        return self

    def _spawn(self, argv, env, port):
        log = open(HERE / "out" / f"{self.name}-{port}.log", "wb")
        process = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        wait_port(port, process)
        self.processes.append(process)
        self.ports.append(port)

    def pids(self):
        """Every server process (workers included)."""
        pids = []
        for p in self.processes:
            pids.append(p.pid)
            pids.extend(_descendants(p.pid))
        return [pid for pid in pids if _is_python(pid)]

    def url(self, i, room):
        port = self.ports[i % len(self.ports)]
        if self.name == "reference":
            return f"ws://127.0.0.1:{port}/?room={room}"
        return f"ws://127.0.0.1:{port}/ws"

    def stop(self):
        for p in self.processes:
            p.terminate()
        for p in self.processes:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()


def _descendants(pid):
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as f:
                        if int(f.read().rsplit(")", 1)[1].split()[1]) == parent:
                            found.append(int(entry))
                            frontier.append(int(entry))
                except OSError:
                    pass
    return found


def _is_python(pid):
    try:
        return "python" in Path(f"/proc/{pid}/comm").read_text()
    except OSError:
        return False


class Clients:
    """Receiving devices spread over client processes pinned to the client CPU."""

    def __init__(self, system, room, count, prefix):
        self.processes = []
        gateway = system.name != "reference"
        chunks = [(start, min(MAX_PER_CLIENT, count - start)) for start in range(0, count, MAX_PER_CLIENT)]
        for n, (start, size) in enumerate(chunks):
            argv = [sys.executable, str(HERE / "fanout_client.py"), "--url", system.url(n, room), "--count", str(size),
                    "--first", str(start), "--prefix", prefix]
            if gateway:
                argv += ["--secret", SECRET]
            self.processes.append(subprocess.Popen(pinned(CLIENT_CPU, argv), cwd=ROOT, stdin=subprocess.PIPE,
                                                   stdout=subprocess.PIPE, text=True))
        seconds = []
        for p in self.processes:
            line = _read(p, "READY", 900)
            seconds.append(float(line.split()[2]))
        self.ready_seconds = max(seconds)

    def command(self, word):
        for p in self.processes:
            p.stdin.write(word + "\n")
            p.stdin.flush()
        return [_read(p, word, 60) for p in self.processes]

    def stats(self):
        return [json.loads(line.split(" ", 1)[1]) for line in self.command("STATS")]

    def stop(self):
        for p in self.processes:
            try:
                p.stdin.write("QUIT\n")
                p.stdin.flush()
                p.wait(30)
            except Exception:
                p.kill()


def _read(process, prefix, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            raise RuntimeError(f"client ended ({process.poll()})")
        if line.startswith(prefix):
            return line.strip()
    raise TimeoutError(prefix)


def event_bytes(room, sent_at):
    """A ~200-byte ServerEvent like the core publishes, with the send time as its id."""
    event = pb.RoomEvent(id=f"{sent_at:.6f}", room_id=room, sender_id="publisher", type=pb.RoomEvent.TEXT)
    event.payload.update({"text": "x" * 120})
    return pb.ServerEvent(id=f"{sent_at:.6f}", message=event).SerializeToString()


def publish(client, room, rate, seconds):
    """PUBLISH at ``rate`` per second for ``seconds``; the number sent."""
    channel = f"chat:room:{room}"
    interval = 1.0 / rate
    start = time.time()
    sent = 0
    while True:
        now = time.time()
        due = int((now - start) / interval) + 1
        if now - start >= seconds:
            return sent
        while sent < due:
            client.publish(channel, event_bytes(room, time.time()))
            sent += 1
        time.sleep(min(interval, 0.002))


def drain(clients, quiet=0.5, timeout=60):
    """Wait until no more messages arrive (the backlog of a step is gone); the last stats."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        stats = clients.stats()
        count = sum(s["messages"] for s in stats)
        if count == last:
            return stats
        last = count
        time.sleep(quiet)
    return stats


def measure(redis_client, clients, room, rate, seconds, members):
    drain(clients)
    clients.command("RESET")
    sent = publish(redis_client, room, rate, seconds)
    in_window = sum(s["messages"] for s in clients.stats())
    stats = drain(clients)  # the tail, so late deliveries count in the latencies
    delivered = sum(s["messages"] for s in stats)
    p99 = max((s["p99_ms"] for s in stats if s["p99_ms"] is not None), default=None)
    return {
        "publish_rate": rate,
        "sent": sent,
        "delivered": delivered,
        "deliveries_per_second": round(in_window / seconds, 1),
        "expected_per_second": round(sent * members / seconds, 1),
        "p50_ms": max((s["p50_ms"] for s in stats if s["p50_ms"] is not None), default=None),
        "p99_ms": p99,
        "max_ms": max((s["max_ms"] for s in stats if s["max_ms"] is not None), default=None),
        "closed": sum(s["closed"] for s in stats),
    }


def make_room(core_port, room, prefix, members):
    channel = grpc.insecure_channel(f"127.0.0.1:{core_port}")
    stub = chat_pb2_grpc.ChatServiceStub(channel)
    owner = mint_token(SECRET, "bench-owner", audience="service_chat_gateway")
    stub.CreateRoom(pb.CreateRoomRequest(id=room, name=room, member_ids=[f"{prefix}{i}" for i in range(members)]),
                    metadata=[("authorization", f"Bearer {owner}")], timeout=60)
    channel.close()


def fanout(system, redis_client, core_port, members, ladder, seconds):
    room = f"fan-{members}"
    prefix = f"f{members}-"
    if system.name != "reference":
        make_room(core_port, room, prefix, members)
    clients = Clients(system, room, members, prefix)
    try:
        pids = system.pids()
        cpu0 = sum(cpu_seconds(p) for p in pids)
        client_cpu0 = sum(cpu_seconds(p.pid) for p in clients.processes)
        steps = []
        for rate in ladder:
            step = measure(redis_client, clients, room, rate, seconds, members)
            steps.append(step)
            if step["deliveries_per_second"] < 0.8 * step["expected_per_second"]:
                break  # past saturation
        saturation = max(s["deliveries_per_second"] for s in steps)
        half_rate = max(1, round(saturation / 2 / members, 2))
        half = measure(redis_client, clients, room, half_rate, seconds, members)
        within = [s["publish_rate"] for s in steps if s["p99_ms"] is not None and s["p99_ms"] <= 50
                  and s["deliveries_per_second"] >= 0.95 * s["expected_per_second"]]
        server_cpu = sum(cpu_seconds(p) for p in pids) - cpu0
        client_cpu = sum(cpu_seconds(p.pid) for p in clients.processes) - client_cpu0
        return {"members": members, "steps": steps, "saturation_deliveries_per_second": saturation,
                "half_saturation": half, "max_rate_p99_under_50ms": max(within, default=0),
                "server_cpu_seconds": round(server_cpu, 2), "client_cpu_seconds": round(client_cpu, 2)}
    finally:
        clients.stop()


def idle(system, core_port, count):
    room = f"idle-{count}"
    prefix = f"i{count}-"
    if system.name != "reference":
        make_room(core_port, room, prefix, count)
    pids = system.pids()
    before = sum(rss_kib(p) for p in pids)
    clients = Clients(system, room, count, prefix)
    try:
        time.sleep(1)
        after = sum(rss_kib(p) for p in system.pids())
        return {"connections": count, "rss_kib_before": before, "rss_kib_after": after,
                "kib_per_connection": round((after - before) / count, 2),
                "handshakes_per_second": round(count / clients.ready_seconds, 1)}
    finally:
        clients.stop()


def median_of(runs, key):
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--systems", default="reference,gateway,gateway-2w,2-gateways")
    parser.add_argument("--rooms", default="100,1000,5000")
    parser.add_argument("--idle", default="1000,10000,19000")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--out", default=str(HERE / "out" / "suite.json"))
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.rooms, args.idle, args.seconds = 1, "100,1000", "1000", 2.0
    ladders = {100: [50, 100, 200, 400, 800, 1600, 3200], 1000: [5, 10, 20, 40, 80, 160, 320],
               5000: [1, 2, 4, 8, 16, 32, 64]}

    (HERE / "out").mkdir(parents=True, exist_ok=True)
    redis_server = RedisServer()
    redis_client = redis.Redis(port=redis_server.port)
    core_port = free_port()
    env = {**os.environ, "JWT_SECRET": SECRET, "CACHE_URI": redis_server.uri, "LOG_LEVEL": "warning"}
    core = subprocess.Popen(pinned(CLIENT_CPU, [*TWISTD, "--nodaemon", "--pidfile=", "chatcore",
                                                "--port", str(core_port)]),
                            env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(core_port, core)
    results = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                           "redis": redis_client.info("server")["redis_version"]},
               "command": " ".join(sys.argv), "systems": {}}
    try:
        for name in args.systems.split(","):
            runs = {"fanout": {}, "idle": {}}
            for repeat in range(args.repeats):
                system = System(name, redis_server.uri, core_port).start()
                try:
                    for members in map(int, args.rooms.split(",")):
                        result = fanout(system, redis_client, core_port, members, ladders[members], args.seconds)
                        runs["fanout"].setdefault(str(members), []).append(result)
                        print(name, repeat, members, "saturation", result["saturation_deliveries_per_second"],
                              "p99@half", result["half_saturation"]["p99_ms"], flush=True)
                finally:
                    system.stop()
            system = System(name, redis_server.uri, core_port).start()
            try:
                for count in map(int, args.idle.split(",")):
                    result = idle(system, core_port, count)
                    runs["idle"][str(count)] = result
                    print(name, "idle", count, result["kib_per_connection"], "KiB/conn",
                          result["handshakes_per_second"], "handshakes/s", flush=True)
            finally:
                system.stop()
            results["systems"][name] = runs
            save(results, args.out)  # a partial file survives an interrupted run
    finally:
        core.terminate()
        core.wait(20)
        redis_server.cleanup()
    save(results, args.out)
    print(json.dumps(results["summary"], indent=2))


def save(results, out):
    summarise(results)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(results, indent=2) + "\n")


def summarise(results):
    """Medians over repeats, and ratios to the reference."""
    summary = {}
    for name, runs in results["systems"].items():
        entry = {"fanout": {}, "idle": runs["idle"]}
        for members, reps in runs["fanout"].items():
            entry["fanout"][members] = {
                "saturation_deliveries_per_second": median_of(reps, "saturation_deliveries_per_second"),
                "max_rate_p99_under_50ms": median_of(reps, "max_rate_p99_under_50ms"),
                "p50_ms_at_half": statistics.median([r["half_saturation"]["p50_ms"] or 0 for r in reps]),
                "p99_ms_at_half": statistics.median([r["half_saturation"]["p99_ms"] or 0 for r in reps]),
                "max_ms_at_half": statistics.median([r["half_saturation"]["max_ms"] or 0 for r in reps]),
                "client_cpu_share": round(sum(r["client_cpu_seconds"] for r in reps)
                                          / max(0.01, sum(r["client_cpu_seconds"] + r["server_cpu_seconds"] for r in reps)), 2),
                "repeats": len(reps),
            }
        summary[name] = entry
    reference = summary.get("reference")
    if reference:
        for name, entry in summary.items():
            for members, figures in entry["fanout"].items():
                ref = reference["fanout"].get(members)
                if ref and ref["saturation_deliveries_per_second"]:
                    figures["saturation_ratio"] = round(figures["saturation_deliveries_per_second"]
                                                        / ref["saturation_deliveries_per_second"], 2)
                if ref and ref["max_rate_p99_under_50ms"]:
                    figures["p99_50ms_rate_ratio"] = round(figures["max_rate_p99_under_50ms"]
                                                           / ref["max_rate_p99_under_50ms"], 2)
            for count, figures in entry["idle"].items():
                ref = reference["idle"].get(count)
                if ref:
                    figures["kib_over_reference"] = round(figures["kib_per_connection"] - ref["kib_per_connection"], 2)
                    figures["handshake_ratio"] = round(figures["handshakes_per_second"]
                                                       / max(0.1, ref["handshakes_per_second"]), 2)
    results["summary"] = summary


if __name__ == "__main__":
    main()
