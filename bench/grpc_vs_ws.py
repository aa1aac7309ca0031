"""The gRPC edge against the WebSocket edge, on one gateway: CPU per delivery and events lost.

    .venv/bin/python bench/grpc_vs_ws.py                      # 500 devices, 20 and 40 events/s, 3 repeats
    .venv/bin/python bench/grpc_vs_ws.py --edges ws,grpc --rates 20 --repeats 3 --seconds 5
    .venv/bin/python bench/grpc_vs_ws.py --tree /path/to/a/worktree/of/main   # the gateway of another checkout

One `twistd chatgateway` (pinned to CPU 0) on a redis-server started on a free port,
with the reference core (`twistd chatcore`) for the connects' SearchRooms; one room
whose one member is one profile; DEVICES devices of that profile (device ids d0, d1,
...) connect over one edge at a time, from Python client processes on CPU 1 (with
Redis, the core and this publisher): bench/fanout_client.py for WebSocket
(chat.v1.proto), bench/grpc_client.py for gRPC Connect streams (a channel, so an
HTTP/2 connection, per device). The rounds take turns (ws, grpc, ws-ref, grpc-ref, then
the other way round, ...): the two edges of the gateway, then the bare references of both
(bench/reference_server.py, bench/grpc_reference_server.py), each alone on CPU 0, so the
CPU of a round is one edge's: the server's utime + stime from /proc/PID/stat
(every thread, grpc's included) from the first publish until the clients' counts stop
moving, divided by the deliveries counted. Events are PUBLISHed on the room's channel
as the core publishes them (~200-byte ServerEvents, the send time as the id). Lost =
published x devices - delivered once the counts stopped moving (a stream or
connection closed early loses what came after). Medians over --repeats; the ratio
gRPC/WS of the medians. JSON: bench/out/grpc_vs_ws.json.

The gateway runs with its defaults (SEND_BUFFER_BYTES 1 MiB, so a device that falls
that far behind is closed 4429 and loses the rest) except the settings named in ENV.
"""

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import redis

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "tests"))

from suite import (  # noqa: E402
    LOAD_CPU,
    OUT,
    SECRET,
    SERVER_CPU,
    TWISTD,
    ClientProcesses,
    _cleanup,
    _Lines,
    _sigterm,
    _tail,
    cpu_seconds,
    event_bytes,
    kill_tree,
    make_room,
    pinned,
    ready,
    spawn,
    wait_port,
)

from support.processes import free_port  # noqa: E402
from support.redis import RedisServer  # noqa: E402

ROOM = "grpc-vs-ws"
PREFIX = "gw-"
PROFILE = PREFIX + "0"  # the room's one member (make_room names members PREFIX<i>)
ENV = {
    "JWT_SECRET": SECRET,
    "LOG_LEVEL": "warning",
    "HTTP_INTERFACE": "127.0.0.1",
    "MAX_UNAUTHENTICATED_PER_ADDRESS": "0",  # every device connects from 127.0.0.1
    "PYTHONUNBUFFERED": "1",
}


class Gateway:
    """The gateway under test: `twistd chatgateway` of ``tree`` (a checkout: its code, its plugin)."""

    def __init__(self, redis_uri, core_port, tree=ROOT):
        self.http_port, self.grpc_port = free_port(), free_port()
        self.log = OUT / f"grpc_vs_ws-gateway-{self.http_port}.log"
        env = {
            **os.environ,
            **ENV,
            "PYTHONPATH": str(tree),
            "CACHE_URI": redis_uri,
            "CHAT_SERVICE_URI": f"127.0.0.1:{core_port}",
            "HTTP_PORT": str(self.http_port),
            "GRPC_PORT": str(self.grpc_port),
            "GATEWAY_ID": "bench-grpc-vs-ws",
        }
        argv = pinned(SERVER_CPU, [*TWISTD, "--nodaemon", "--pidfile=", "chatgateway"])
        with open(self.log, "wb") as f:
            self.process = spawn(argv, env=env, cwd=tree, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT)
        wait_port(self.http_port, self.process, timeout=60)
        wait_port(self.grpc_port, self.process, timeout=60)
        deadline = time.monotonic() + 60
        while not ready(self.http_port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the gateway did not get ready:\n{_tail(self.log)}")
            time.sleep(0.2)

    def url(self, edge):
        if edge == "ws":
            return f"ws://127.0.0.1:{self.http_port}/ws"
        return f"127.0.0.1:{self.grpc_port}"

    def cpu(self):
        return cpu_seconds(self.process.pid)

    def stop(self):
        kill_tree(self.process)


class Reference:
    """A bare server of one edge, started for its round: bench/reference_server.py (ws-ref) or
    bench/grpc_reference_server.py (grpc-ref), pinned where the gateway runs."""

    def __init__(self, edge, redis_uri):
        self.port = free_port()
        script = "reference_server.py" if edge == "ws-ref" else "grpc_reference_server.py"
        argv = [sys.executable, str(HERE / script), "--port", str(self.port), "--redis", redis_uri]
        self.log = OUT / f"grpc_vs_ws-{edge}-{self.port}.log"
        with open(self.log, "wb") as f:
            self.process = spawn(
                pinned(SERVER_CPU, argv), cwd=ROOT, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT
            )
        try:
            wait_port(self.port, self.process, timeout=30)
        except Exception as e:
            raise RuntimeError(f"{edge} did not start: {e}\n{_tail(self.log)}") from None
        time.sleep(0.5)  # its Redis subscription

    def url(self, edge):
        if edge == "ws-ref":
            return f"ws://127.0.0.1:{self.port}/?room={ROOM}"
        return f"127.0.0.1:{self.port}"

    def cpu(self):
        return cpu_seconds(self.process.pid)

    def stop(self):
        kill_tree(self.process)


class Clients(ClientProcesses):
    """DEVICES devices of PROFILE over one edge, spread over client processes on the load CPU."""

    def __init__(self, edge, server, devices, processes, shared_channel=False):
        super().__init__()
        self.edge = edge
        size = -(-devices // processes)
        log = open(OUT / "grpc_vs_ws-clients.log", "ab")
        try:
            for first in range(0, devices, size):
                count = min(size, devices - first)
                common = ["--count", str(count), "--first", str(first), "--profile", PROFILE]
                if edge != "ws-ref":  # the WebSocket reference takes no token (and sends no `connected`)
                    common += ["--secret", SECRET]
                if edge.startswith("ws"):
                    argv = [sys.executable, str(HERE / "fanout_client.py"), "--url", server.url(edge)]
                else:
                    argv = [sys.executable, str(HERE / "grpc_client.py"), "--target", server.url(edge)]
                    if shared_channel:
                        argv.append("--shared-channel")
                process = spawn(
                    pinned(LOAD_CPU, [*argv, *common]),
                    cwd=ROOT,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=log,
                    text=True,
                )
                self.processes.append(process)
                self.lines.append(_Lines(process.stdout))
            self.connected = sum(
                int(lines.read("READY", 300, p).split()[1]) for p, lines in zip(self.processes, self.lines, strict=True)
            )
        except BaseException:
            self.stop()
            raise
        finally:
            log.close()


def publish(client, rate, seconds):
    """PUBLISH at ``rate`` per second for ``seconds``, the messages due at once in one pipeline; how many."""
    channel = f"chat:room:{ROOM}"
    start = time.time()
    sent = 0
    pipe = client.pipeline(transaction=False)
    while True:
        elapsed = time.time() - start
        if elapsed >= seconds:
            return sent
        due = int(elapsed * rate) + 1
        if due > sent:
            for _ in range(due - sent):
                pipe.publish(channel, event_bytes(ROOM, time.time()))
            pipe.execute()
            sent = due
        time.sleep(min(1.0 / rate, 0.002))


def settled(clients, quiet=1.0, timeout=60):
    """Stats once the clients' counts stopped moving for ``quiet`` s (or after ``timeout``)."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        stats = clients.stats()
        count = sum(s["messages"] for s in stats)
        if count == last or time.monotonic() >= deadline:
            return stats
        last = count
        time.sleep(quiet)


def step(server, redis_client, clients, devices, rate, seconds):
    settled(clients, quiet=0.5)
    clients.command("RESET")
    cpu0, client_cpu0, started = server.cpu(), clients.cpu_seconds(), time.monotonic()
    sent = publish(redis_client, rate, seconds)
    stats = settled(clients)
    cpu, client_cpu, elapsed = server.cpu() - cpu0, clients.cpu_seconds() - client_cpu0, time.monotonic() - started
    delivered = sum(s["messages"] for s in stats)
    expected = sent * devices
    result = {
        "edge": clients.edge,
        "publish_rate": rate,
        "deliveries_per_second": rate * devices,
        "sent": sent,
        "expected": expected,
        "delivered": delivered,
        "lost": expected - delivered,
        "closed": sum(s["closed"] for s in stats),
        "server_cpu_s": round(cpu, 3),
        "server_cpu_us_per_delivery": round(cpu / max(1, delivered) * 1e6, 2),
        "server_cpu_share": round(cpu / elapsed, 3),
        "client_cpu_us_per_delivery": round(client_cpu / max(1, delivered) * 1e6, 2),
        "p50_ms": max((s["p50_ms"] for s in stats if s["p50_ms"] is not None), default=None),
        "p99_ms": max((s["p99_ms"] for s in stats if s["p99_ms"] is not None), default=None),
    }
    print(
        f"  {clients.edge:8} {rate:>4}/s x {devices}: {result['server_cpu_us_per_delivery']:7.2f} us/delivery "
        f"(server CPU {result['server_cpu_share']:.0%}), lost {result['lost']} of {expected}, "
        f"closed {result['closed']}, p99 {result['p99_ms']} ms",
        flush=True,
    )
    return result


def wait_disconnected(gateway, timeout=30):
    """Until the gateway's /metrics counts no open connection (or ``timeout``)."""
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{gateway.http_port}/metrics", timeout=2) as r:
                text = r.read().decode()
        except OSError:
            text = ""
        open_now = [
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("chatgateway_server_active_connections")
        ]
        if open_now and sum(open_now) == 0:
            return
        time.sleep(0.3)


def summarise(steps, rates, edges):
    """Per rate and edge: medians over the repeats (and each repeat's figures); ratios of the medians."""
    summary = {}
    for rate in rates:
        row = {}
        for edge in edges:
            runs = [s for s in steps if s["edge"] == edge and s["publish_rate"] == rate]
            if runs:
                row[edge] = {
                    "server_cpu_us_per_delivery": statistics.median(s["server_cpu_us_per_delivery"] for s in runs),
                    "lost": statistics.median(s["lost"] for s in runs),
                    "us_each": [s["server_cpu_us_per_delivery"] for s in runs],
                    "lost_each": [s["lost"] for s in runs],
                    "closed_each": [s["closed"] for s in runs],
                    "p99_ms": statistics.median(s["p99_ms"] or 0 for s in runs),
                }
        ratios = {}
        for top, bottom in (("grpc", "ws"), ("grpc", "grpc-ref"), ("ws", "ws-ref"), ("grpc-ref", "ws-ref")):
            if top in row and bottom in row:
                ratios[f"{top}/{bottom}"] = round(
                    row[top]["server_cpu_us_per_delivery"] / row[bottom]["server_cpu_us_per_delivery"], 2
                )
        row["ratios"] = ratios
        summary[str(rate)] = row
    return summary


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=500)
    parser.add_argument("--rates", default="20,40", help="events/s published to the room (comma-separated)")
    parser.add_argument("--seconds", type=float, default=5.0, help="publishing time of each step")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--client-processes", type=int, default=2, help="client processes per round")
    parser.add_argument(
        "--edges", default="ws,grpc,ws-ref,grpc-ref", help="rounds: the gateway's ws, grpc; the bare ws-ref, grpc-ref"
    )
    parser.add_argument("--shared-channel", action="store_true", help="gRPC: one channel per client process")
    parser.add_argument("--tree", default=str(ROOT), help="the checkout whose gateway runs (e.g. a worktree of main)")
    parser.add_argument("--out", default=str(OUT / "grpc_vs_ws.json"))
    options = parser.parse_args()
    rates = [float(r) if "." in r else int(r) for r in options.rates.split(",")]
    edges = options.edges.split(",")
    signal.signal(signal.SIGTERM, _sigterm)
    OUT.mkdir(parents=True, exist_ok=True)
    os.sched_setaffinity(0, {int(c) for c in LOAD_CPU.split(",")})
    redis_server = RedisServer()
    redis_client = redis.Redis(port=redis_server.port)
    core = gateway = None
    steps = []
    results = {
        "command": " ".join(sys.argv),
        "tree": options.tree,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "load": os.getloadavg()},
        "steps": steps,
    }
    try:
        if any(edge in ("ws", "grpc") for edge in edges):
            core_port = free_port()
            env = {**os.environ, "JWT_SECRET": SECRET, "CACHE_URI": redis_server.uri, "LOG_LEVEL": "warning"}
            core = spawn(
                pinned(LOAD_CPU, [*TWISTD, "--nodaemon", "--pidfile=", "chatcore", "--port", str(core_port)]),
                env=env,
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            wait_port(core_port, core)
            make_room(core_port, redis_client, ROOM, PREFIX, 1)
            gateway = Gateway(redis_server.uri, core_port, Path(options.tree))
        for repeat in range(options.repeats):
            order = edges if repeat % 2 == 0 else list(reversed(edges))
            for edge in order:
                print(f"repeat {repeat + 1}, {edge}: connecting {options.devices} devices", flush=True)
                server = gateway if edge in ("ws", "grpc") else Reference(edge, redis_server.uri)
                clients = None
                try:
                    clients = Clients(edge, server, options.devices, options.client_processes, options.shared_channel)
                    if clients.connected != options.devices:
                        raise RuntimeError(f"{clients.connected} of {options.devices} connected")
                    for rate in rates:
                        result = step(server, redis_client, clients, options.devices, rate, options.seconds)
                        result["repeat"] = repeat
                        steps.append(result)
                finally:
                    if clients is not None:
                        clients.stop()
                    if server is not gateway:
                        server.stop()
                if server is gateway:
                    wait_disconnected(gateway)
        results["summary"] = summarise(steps, rates, edges)
    finally:
        if gateway is not None:
            gateway.stop()
        if core is not None:
            kill_tree(core)
        redis_server.cleanup()
        _cleanup()
        results["machine"]["load_after"] = os.getloadavg()
        Path(options.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results.get("summary"), indent=2))


if __name__ == "__main__":
    main()
