"""The benchmark suite: fan-out, idle connections and handshakes, against a bare reference.

    .venv/bin/python bench/suite.py                 # everything, 3 repeats (about 45 minutes on 2 CPUs)
    .venv/bin/python bench/suite.py --quick         # one repeat, rooms of 100 and 1,000, idle 1,000 (a few minutes)
    .venv/bin/python bench/report.py                # tables and PNG plots from bench/out/suite.json

Placement (2 CPUs): every single-process system under test runs pinned to
CPU 0 with taskset; the load clients, the publisher (this process), Redis and
the reference core run on CPU 1. The two-process systems (gateway-2w,
2-gateways) may use both CPUs; the clients stay on CPU 1 (--client-cpus).
Where each process was allowed to run is recorded in the JSON ("placement").
Systems:

- reference: bench/reference_server.py, a bare Twisted + Autobahn server that
  subscribes to the room's Redis channel and fans each message out prepared;
- gateway: one `twistd chatgateway --workers 1` on Redis, with the reference
  core (used at connect time, for memberships);
- gateway-2w: `--workers 2` (one gateway in two processes sharing the port);
- 2-gateways: two `twistd chatgateway` processes on the same Redis.

Load clients: bench/fanout_client.c (`--client c`, the default; compiled with
gcc -O2 into bench/out/ when missing or older than its source) or
bench/fanout_client.py (`--client python`, also the fallback without gcc).
For the C client this process mints the devices' JWTs and hands them over in
a file. Devices are spread over client processes (at most 9,000 each, and at
least one per gateway process of the system).

Events enter every system the same way: the publisher PUBLISHes serialized
ServerEvents (about 200 bytes, as the core does) on chat:room:{room}, with
its send time as the event id; clients read it to measure delivery latency.
Per room size, the publish rate doubles until deliveries fall below 80 % of
what was published (saturation: the best delivered rate); then the rate
bisects geometrically between the highest rung with p99 <= 50 ms (and >= 95 %
delivered) and the lowest above it without, --bisect times (3: ~9 %
resolution); then latency is measured at half saturation. All figures are
also given as ratios to the reference measured in the same run (medians over
--repeats). Results: bench/out/suite.json (saved after every system),
summarised into bench/RESULTS.md by bench/report.py.
"""

import argparse
import atexit
import json
import math
import os
import platform
import queue
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.request
from pathlib import Path

import grpc
import redis

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT = HERE / "out"
sys.path.insert(0, str(ROOT / "tests"))

import segments  # noqa: E402  (bench/segments.py)

from chatgateway.api import chat_pb2 as pb  # noqa: E402
from chatgateway.api import chat_pb2_grpc  # noqa: E402
from chatgateway.auth.devtokens import mint_token  # noqa: E402
from chatgateway.bus import roomstream  # noqa: E402
from support.processes import TWISTD, free_port  # noqa: E402
from support.redis import RedisServer  # noqa: E402

SECRET = "bench-suite-secret-0123456789abcdef012345"
SERVER_CPU, LOAD_CPU = "0", "1"
# After CreateRoom, how long without a room-creation event means the core has published them all.
ROOM_EVENTS_QUIET_SEC = 3.0
ALL_CPUS = ",".join(str(c) for c in sorted(os.sched_getaffinity(0)))
MAX_PER_CLIENT = 9000  # connections per client process (file descriptor limit 20,000)
P99_TARGET_MS = 50
C_SOURCE = HERE / "fanout_client.c"
C_BINARY = OUT / "fanout_client"
# publish rates (messages/s) per room size; a ladder stops at the first rung past saturation
LADDERS = {
    100: [50, 100, 200, 400, 800, 1600, 3200, 6400, 12800],
    1000: [5, 10, 20, 40, 80, 160, 320, 640],
    5000: [1, 2, 4, 8, 16, 32, 64, 128],
}

# --------------------------------------------------------------------------- processes

_spawned = []  # every process this run started: killed (with its process group) at exit


def spawn(argv, **kwargs):
    """Popen in a session of its own (so its children can be killed with it), remembered for cleanup."""
    process = subprocess.Popen(argv, start_new_session=True, **kwargs)
    _spawned.append(process)
    return process


def kill_tree(process, timeout=20, sig=signal.SIGTERM):
    """Signal ``process`` (unless ``sig`` is None), wait ``timeout``, then SIGKILL it, its process group and its
    descendants."""
    descendants = _descendants(process.pid) if process.poll() is None else []
    if process.poll() is None:
        try:
            if sig is not None:
                process.send_signal(sig)
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        except ProcessLookupError:
            pass
    for pid in [process.pid, *descendants]:
        try:
            os.killpg(pid, signal.SIGKILL) if pid == process.pid else os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    try:
        process.wait(5)
    except subprocess.TimeoutExpired:
        pass
    if process in _spawned:
        _spawned.remove(process)


@atexit.register
def _cleanup():
    for process in list(_spawned):
        kill_tree(process, timeout=5)


def _sigterm(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def pinned(cpus, argv):
    return ["taskset", "-c", cpus, *argv]


def affinity(pid):
    try:
        return ",".join(str(c) for c in sorted(os.sched_getaffinity(pid)))
    except OSError:
        return None


def rss_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def cpu_seconds(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_split(pid):
    """(user, system) CPU seconds of ``pid`` and its threads."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0, 0.0
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


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


def listeners(port):
    """Sockets in LISTEN on ``port`` (one per worker sharing it with SO_REUSEPORT)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                count += 1
    return count


def ready(port):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as response:
            return response.status == 200
    except Exception:
        return False


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


def _tail(path, lines=20):
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# --------------------------------------------------------------------------- systems


class System:
    """One system under test: its processes, and how a device connects to a room."""

    def __init__(self, name, redis_uri, core_port, trees=None):
        self.name = name
        # "<system>+positions": the same system fed room events by the contract (positioned,
        # kept in the room's stream), so one invocation measures both (--positions: every system)
        self.positions = PUBLISH_POSITIONS or name.endswith(POSITIONS_SUFFIX)
        base = name.removesuffix(POSITIONS_SUFFIX)
        # "gateway@LABEL": the gateway of another checkout (--tree LABEL=PATH), run by its own virtualenv
        self.kind, _, label = base.partition("@")
        self.tree = Path((trees or {})[label]) if label else ROOT
        self.redis_uri = redis_uri
        self.core_port = core_port
        self.processes = []
        self.ports = []
        self.logs = []
        self.workers = 2 if self.kind == "gateway-2w" else 1
        self.cpus = ALL_CPUS if self.kind in ("gateway-2w", "2-gateways") else SERVER_CPU

    def start(self, timeout=60):
        env = {
            **os.environ,
            "JWT_SECRET": SECRET,
            "CACHE_URI": self.redis_uri,
            "LOG_LEVEL": "warning",
            "CHAT_SERVICE_URI": f"127.0.0.1:{self.core_port}",
            "MAX_EVENTS_PER_SECOND": "1000",
            "HTTP_INTERFACE": "127.0.0.1",
            "SEND_BUFFER_BYTES": str(64 * 1024 * 1024),
            # every load client connects from 127.0.0.1, and the idle runs hold up to 19,000
            "MAX_UNAUTHENTICATED_PER_ADDRESS": "0",
            "MAX_CONNECTIONS": "25000",
            # handshakes/s measures what the process can open: no connection-rate limit
            "MAX_CONNECTS_PER_SECOND": "0",
            "PYTHONUNBUFFERED": "1",
        }
        try:
            if self.kind == "reference":
                port = free_port()
                self._spawn(
                    pinned(
                        self.cpus,
                        [
                            sys.executable,
                            str(HERE / "reference_server.py"),
                            "--port",
                            str(port),
                            "--redis",
                            self.redis_uri,
                        ],
                    ),
                    env,
                    port,
                )
                return self
            count = 2 if self.kind == "2-gateways" else 1
            twistd = [str(self.tree / ".venv" / "bin" / "python"), *TWISTD[1:]] if self.tree != ROOT else list(TWISTD)
            for i in range(count):
                port = free_port()
                argv = [*twistd, "--nodaemon", "--pidfile=", "chatgateway", "--workers", str(self.workers)]
                self._spawn(
                    pinned(self.cpus, argv),
                    {
                        **env,
                        "HTTP_PORT": str(port),
                        "GRPC_PORT": str(free_port()),
                        "GATEWAY_ID": f"bench-{self.name.replace('@', '-')}-{i}",
                    },
                    port,
                )
            for port, process, log in zip(self.ports, self.processes, self.logs, strict=True):
                self._wait_ready(port, process, log, timeout)
            return self
        except BaseException:
            self.stop()
            raise

    def _spawn(self, argv, env, port):
        log = OUT / f"{self.name.replace('@', '-')}-{port}.log"
        with open(log, "wb") as f:
            process = spawn(argv, env=env, cwd=self.tree, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT)
        self.processes.append(process)
        self.ports.append(port)
        self.logs.append(log)
        try:
            wait_port(port, process)
        except Exception as e:
            raise RuntimeError(f"{self.name} did not start: {e}\n{_tail(log)}") from None

    def _wait_ready(self, port, process, log, timeout):
        """Every worker listening on the port (one LISTEN socket each), then /readyz 200 several times in a row
        (connections spread over the workers by the kernel, so every worker answers some of them)."""
        deadline = time.monotonic() + timeout
        streak = 0
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {process.returncode}:\n{_tail(log)}")
            if listeners(port) >= self.workers and ready(port):
                streak += 1
                if streak >= 4 * self.workers:
                    return
            else:
                streak = 0
                time.sleep(0.1)
        raise TimeoutError(
            f"{self.name} on port {port}: {listeners(port)} of {self.workers} workers listening, "
            f"/readyz not steadily 200 within {timeout} s\n{_tail(log)}"
        )

    def alive(self):
        return all(p.poll() is None for p in self.processes)

    def settle(self, timeout=30):
        """Before a step: wait (at most ``timeout``) until every gateway answers /readyz 200 again (after an
        overloaded step one may be reconnecting to Redis); the seconds waited."""
        if self.kind == "reference":
            return 0.0
        started = time.monotonic()
        for port, process, log in zip(self.ports, self.processes, self.logs, strict=True):
            while not ready(port):
                if process.poll() is not None:
                    raise RuntimeError(f"{self.name} exited with {process.returncode}:\n{_tail(log)}")
                if time.monotonic() - started > timeout:
                    break
                time.sleep(0.2)
        return round(time.monotonic() - started, 2)

    def pids(self):
        """Every server process (workers included)."""
        pids = []
        for p in self.processes:
            pids.append(p.pid)
            pids.extend(_descendants(p.pid))
        return [pid for pid in pids if _is_python(pid)]

    def url(self, i, room):
        port = self.ports[i % len(self.ports)]
        if self.kind == "reference":
            return f"ws://127.0.0.1:{port}/?room={room}"
        return f"ws://127.0.0.1:{port}/ws"

    def stop(self):
        for p in self.processes:
            if p.poll() is None:
                p.terminate()  # the gateway drains and exits 0
        deadline = time.monotonic() + 20
        for p in self.processes:
            kill_tree(p, timeout=max(0.1, deadline - time.monotonic()), sig=None)


# --------------------------------------------------------------------------- load clients


def build_c_client():
    """bench/out/fanout_client from bench/fanout_client.c (gcc -O2), rebuilt when older than its source;
    None (with a message) when it cannot be built."""
    if C_BINARY.exists() and C_BINARY.stat().st_mtime >= C_SOURCE.stat().st_mtime:
        return C_BINARY
    gcc = shutil.which("gcc")
    if gcc is None:
        print(
            "suite: gcc not found, so the C load client cannot be built: using bench/fanout_client.py "
            "(--client python), which costs the client CPU several times more",
            file=sys.stderr,
            flush=True,
        )
        return None
    OUT.mkdir(parents=True, exist_ok=True)
    build = subprocess.run([gcc, "-O2", "-Wall", "-o", str(C_BINARY), str(C_SOURCE)], capture_output=True, text=True)
    if build.returncode != 0:
        print(
            f"suite: building the C load client failed, using the Python one:\n{build.stderr}",
            file=sys.stderr,
            flush=True,
        )
        return None
    return C_BINARY


class Tokens:
    """JWT files for the C client (one per line, for profiles PREFIX<first> ...), minted once per run."""

    def __init__(self):
        self.dir = Path(tempfile.mkdtemp(prefix="bench-tokens-"))
        self.files = {}
        atexit.register(shutil.rmtree, self.dir, True)

    def file(self, prefix, first, count, round_name=""):
        """``round_name``: tokens of another round of the same devices are other strings (a ``jti`` of
        their own), as a reconnecting device's may be: no gateway has verified them before."""
        key = (prefix, first, count, round_name)
        if key not in self.files:
            path = self.dir / f"{prefix}{first}-{count}{round_name}.txt"
            extra = {"jti": f"{round_name}-{first}"} if round_name else None
            path.write_text(
                "".join(
                    mint_token(
                        SECRET, f"{prefix}{i}", device_id="b", audience="service_chat_gateway", ttl=86400, extra=extra
                    )
                    + "\n"
                    for i in range(first, first + count)
                )
            )
            self.files[key] = path
        return self.files[key]


class _Lines:
    """The lines of a client's stdout, read by a thread (so every wait has a timeout)."""

    def __init__(self, stream):
        self.queue = queue.Queue()
        threading.Thread(target=self._pump, args=(stream,), daemon=True).start()

    def _pump(self, stream):
        for line in stream:
            self.queue.put(line)
        self.queue.put(None)

    def read(self, prefix, timeout, process):
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no {prefix} from the load client in {timeout} s")
            try:
                line = self.queue.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                raise RuntimeError(f"load client ended ({process.poll()}) before {prefix}")
            if line.startswith(prefix):
                return line.strip()


class ClientProcesses:
    """Load client processes that follow the control-line contract (bench/README.md): a
    command word on stdin, answered by a line starting with it on stdout."""

    def __init__(self):
        self.processes = []
        self.lines = []

    def command(self, word, timeout=60):
        for p in self.processes:
            p.stdin.write(word + "\n")
            p.stdin.flush()
        return [lines.read(word, timeout, p) for p, lines in zip(self.processes, self.lines, strict=True)]

    def stats(self):
        return [json.loads(line.split(" ", 1)[1]) for line in self.command("STATS")]

    def cpu_seconds(self):
        return sum(cpu_seconds(p.pid) for p in self.processes)

    def stop(self):
        for p in self.processes:
            try:
                p.stdin.write("QUIT\n")
                p.stdin.flush()
                p.wait(30)
            except Exception:
                pass
            kill_tree(p, timeout=1)


class Clients(ClientProcesses):
    """Receiving devices spread over client processes pinned to the client CPU(s)."""

    def __init__(self, system, room, count, prefix, options, round_name=""):
        super().__init__()
        gateway = system.kind != "reference"
        parts = max(len(system.ports), math.ceil(count / MAX_PER_CLIENT))
        size = math.ceil(count / parts)
        chunks = [(start, min(size, count - start)) for start in range(0, count, size)]
        concurrency = max(4, options.concurrency // len(chunks))
        log = open(OUT / "clients.log", "ab")
        try:
            for n, (start, size) in enumerate(chunks):
                # each process connects from a loopback address of its own: its own ephemeral port range
                common = [
                    "--url",
                    system.url(n, room),
                    "--count",
                    str(size),
                    "--first",
                    str(start),
                    "--prefix",
                    prefix,
                    "--concurrency",
                    str(concurrency),
                    "--source",
                    f"127.0.0.{2 + n}",
                ]
                if options.client_binary:
                    argv = [str(options.client_binary), *common, "--tick-us", str(options.tick_us)]
                    if gateway:
                        argv += ["--tokens", str(options.tokens.file(prefix, start, size, round_name))]
                else:
                    argv = [sys.executable, str(HERE / "fanout_client.py"), *common]
                    if gateway:
                        argv += ["--secret", SECRET]
                process = spawn(
                    pinned(options.client_cpus, argv),
                    cwd=ROOT,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=log,
                    text=True,
                )
                self.processes.append(process)
                self.lines.append(_Lines(process.stdout))
            self.handshakes = []
            for p, lines in zip(self.processes, self.lines, strict=True):
                parts = lines.read("READY", 900, p).split(" ", 3)
                figures = json.loads(parts[3]) if len(parts) > 3 else {"seconds_to_connected": float(parts[2])}
                figures["count"] = int(parts[1])
                self.handshakes.append(figures)
        except BaseException:
            self.stop()
            raise
        finally:
            log.close()
        self.ready_seconds = max(h["seconds_to_connected"] for h in self.handshakes)

    def handshake_figures(self, count):
        """Handshakes/s to `connected` and to the HTTP 101 (all processes in parallel), per-device times."""
        hs = self.handshakes
        figures = {
            "connected": sum(h["count"] for h in hs),
            "failed": sum(h.get("failed", 0) for h in hs),
            "retries": sum(h.get("retries", 0) for h in hs),
            "concurrency": sum(h.get("concurrency", 0) for h in hs),
            "handshakes_per_second": round(count / max(0.001, max(h["seconds_to_connected"] for h in hs)), 1),
        }
        if all("seconds_to_101" in h for h in hs):
            figures["upgrades_per_second"] = round(count / max(0.001, max(h["seconds_to_101"] for h in hs)), 1)
        for key in ("ms_to_101", "ms_to_connected"):
            parts = [(h["count"], h[key]) for h in hs if h.get(key)]
            if parts:
                total = sum(n for n, _ in parts)
                figures[key] = {
                    "mean": round(sum(n * s["mean"] for n, s in parts) / total, 2),
                    "p50": max(s["p50"] for _, s in parts),
                    "p99": max(s["p99"] for _, s in parts),
                }
        return figures


# --------------------------------------------------------------------------- measurements


def event_bytes(room, sent_at):
    """A ~200-byte ServerEvent like the core publishes, with the send time as its id."""
    event = pb.RoomEvent(id=f"{sent_at:.6f}", room_id=room, sender_id="publisher", type=pb.RoomEvent.TEXT)
    event.payload.update({"text": "x" * 120})
    return pb.ServerEvent(id=f"{sent_at:.6f}", message=event).SerializeToString()


# --positions: publish by the contract of room events (chatgateway.bus.roomstream's script:
# positioned, kept in the room's stream) instead of a bare PUBLISH. Every system then receives
# the same positioned bytes on the channel.
PUBLISH_POSITIONS = False
POSITIONS_SUFFIX = "+positions"


def publish(client, room, rate, seconds, positions=False):
    """PUBLISH at ``rate`` per second for ``seconds`` (the messages due at once in one pipeline),
    by the contract with ``positions``; the number sent."""
    channel = f"chat:room:{room}"
    start = time.time()
    sent = 0
    pipe = client.pipeline(transaction=False)
    if positions:
        script, keys, args = roomstream.publish_call(room, b"")
        sha = client.script_load(script)

        def add(payload):
            pipe.evalsha(sha, len(keys), *keys, args[0], payload, *args[2:])
    else:

        def add(payload):
            pipe.publish(channel, payload)

    while True:
        elapsed = time.time() - start
        if elapsed >= seconds:
            return sent
        due = int(elapsed * rate) + 1
        if due > sent:
            for _ in range(due - sent):
                add(event_bytes(room, time.time()))
            pipe.execute()
            sent = due
        time.sleep(min(1.0 / rate, 0.002))


def drain(clients, quiet=0.5, timeout=60):
    """Wait until no more messages arrive (the backlog of a step is gone): the last stats, and whether it was."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        stats = clients.stats()
        count = sum(s["messages"] for s in stats)
        if count == last:
            return stats, True
        if time.monotonic() >= deadline:
            return stats, False
        last = count
        time.sleep(quiet)


def measure(system, redis_client, clients, room, rate, seconds, members, kind="ladder"):
    _, drained_before = drain(clients)
    settled = system.settle()
    clients.command("RESET")
    ports = sorted(set(system.ports))
    segments_before = segments.snapshot(ports)
    sent = publish(redis_client, room, rate, seconds, system.positions)
    in_window = sum(s["messages"] for s in clients.stats())
    stats, drained = drain(clients)  # the tail, so late deliveries count in the latencies
    delivered = sum(s["messages"] for s in stats)
    sent_segments = segments.delta(segments_before, segments.snapshot(ports))
    p99 = max((s["p99_ms"] for s in stats if s["p99_ms"] is not None), default=None)
    step = {
        "kind": kind,
        "publish_rate": rate,
        "sent": sent,
        "delivered": delivered,
        "delivered_share": round(delivered / max(1, sent * members), 4),
        "lost": max(0, sent * members - delivered),  # never delivered (shed, or to a device closed)
        "deliveries_per_second": round(in_window / seconds, 1),
        "expected_per_second": round(sent * members / seconds, 1),
        "p50_ms": max((s["p50_ms"] for s in stats if s["p50_ms"] is not None), default=None),
        "p99_ms": p99,
        "max_ms": max((s["max_ms"] for s in stats if s["max_ms"] is not None), default=None),
        "closed": sum(s["closed"] for s in stats),
        "drained": drained_before and drained,
        "not_events": sum(s.get("unparsed", 0) for s in stats),  # binary frames not from the publisher
        # the kernel's counts over the devices' connections: data segments the server sent, and
        # every segment the devices sent back (ACKs, pongs), per delivery
        "tcp": sent_segments,
        "segments_per_delivery": per_delivery(sent_segments, "server", "data_segs_out", delivered),
        "device_segments_per_delivery": per_delivery(sent_segments, "peers", "segs_out", delivered),
    }
    if settled > 0.5:
        step["waited_for_ready_s"] = settled
    print(
        f"    {kind:9} {rate:>8} msg/s: {step['deliveries_per_second']:>10,.0f} deliveries/s "
        f"({step['delivered_share']:.0%} delivered, {step['lost']} lost), p99 {p99} ms, "
        f"{step['segments_per_delivery']} segments/delivery",
        flush=True,
    )
    return step


def per_delivery(counts, side, field, delivered):
    if counts is None or not delivered:
        return None
    return round(counts[side][field] / delivered, 3)


def meets_target(step):
    return step["p99_ms"] is not None and step["p99_ms"] <= P99_TARGET_MS and step["delivered_share"] >= 0.95


def make_room(core_port, redis_client, room, prefix, members):
    """Create the room through the core and wait until the core has published its creation.

    The reference core publishes one SYSTEM event per member added (and each member's
    SubscriptionEvent before it) after CreateRoom answers; devices connecting while
    those are still coming would make the gateway fan them out to the room as it fills
    (up to N x N deliveries), which the bare reference never sees.
    """
    watcher = redis_client.pubsub(ignore_subscribe_messages=True)
    watcher.subscribe(f"chat:room:{room}")
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{core_port}", options=[("grpc.max_send_message_length", 64 << 20)])
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        owner = mint_token(SECRET, "bench-owner", audience="service_chat_gateway")
        stub.CreateRoom(
            pb.CreateRoomRequest(id=room, name=room, member_ids=[f"{prefix}{i}" for i in range(members)]),
            metadata=[("authorization", f"Bearer {owner}")],
            timeout=120,
        )
        channel.close()
        # room_created, then member_added for each member; an existing room (a later
        # repeat: the core lives for the whole run) publishes nothing, hence the quiet limit
        expected, seen = members + 1, 0
        quiet_since = time.monotonic()
        while seen < expected and time.monotonic() - quiet_since < ROOM_EVENTS_QUIET_SEC:
            if watcher.get_message(timeout=0.5) is not None:
                seen += 1
                quiet_since = time.monotonic()
        if 0 < seen < expected:
            print(f"    warning: {seen} of {expected} room-creation events seen", flush=True)
    finally:
        watcher.close()


def geometric_mid(lo, hi):
    return float(f"{math.sqrt(lo * hi):.3g}")


def fanout(system, redis_client, core_port, members, options):
    room = f"fan-{members}"
    prefix = f"f{members}-"
    if system.kind != "reference":
        make_room(core_port, redis_client, room, prefix, members)
    started = time.monotonic()
    clients = Clients(system, room, members, prefix, options)
    try:
        pids = system.pids()
        cpu0 = {p: cpu_seconds(p) for p in pids}
        sys0 = sum(cpu_split(p)[1] for p in pids)
        client_cpu0 = clients.cpu_seconds()
        ladder = LADDERS[members]
        steps = []
        for rate in ladder:
            step = measure(system, redis_client, clients, room, rate, options.seconds, members)
            steps.append(step)
            if step["deliveries_per_second"] < 0.8 * step["expected_per_second"]:
                break  # past saturation
        saturation = max(s["deliveries_per_second"] for s in steps)

        # the publish rate with p99 <= 50 ms: bisect between the best rung that met it and the next that did not
        passing = [s["publish_rate"] for s in steps if meets_target(s)]
        lo = max(passing, default=0)
        hi = min((s["publish_rate"] for s in steps if s["publish_rate"] > lo and not meets_target(s)), default=None)
        bisection = []
        if lo == 0 and hi is not None:  # even the first rung missed it: look below it first
            rate = hi
            for _ in range(3):
                rate = float(f"{rate / 2:.3g}")
                if rate * options.seconds < 2:
                    break  # a step of one message says nothing
                step = measure(system, redis_client, clients, room, rate, options.seconds, members, "below")
                bisection.append(step)
                if meets_target(step):
                    lo = rate
                    break
                hi = rate
        if lo and hi:
            for _ in range(options.bisect):
                rate = geometric_mid(lo, hi)
                if rate in (lo, hi):
                    break
                step = measure(system, redis_client, clients, room, rate, options.seconds, members, "bisect")
                bisection.append(step)
                if meets_target(step):
                    lo = rate
                else:
                    hi = rate

        half_rate = max(0.5, round(saturation / 2 / members, 2))
        half = measure(system, redis_client, clients, room, half_rate, options.seconds, members, "half")
        server_cpu = {p: round(cpu_seconds(p) - c, 2) for p, c in cpu0.items()}
        server_sys = sum(cpu_split(p)[1] for p in cpu0) - sys0
        client_cpu = clients.cpu_seconds() - client_cpu0
        every = [*steps, *bisection, half]
        delivered = sum(s["delivered"] for s in every)
        best = max(steps, key=lambda s: s["deliveries_per_second"])
        passing_steps = [s for s in [*steps, *bisection] if meets_target(s) and s["publish_rate"] == lo]
        counted = [s for s in every if s.get("tcp")]
        counted_deliveries = sum(s["delivered"] for s in counted)
        return {
            "members": members,
            "steps": steps,
            "bisection": bisection,
            "saturation_deliveries_per_second": saturation,
            "half_saturation": half,
            "max_rate_p99_under_50ms": lo,
            "first_rate_over_50ms": hi,
            "server_cpu_seconds": round(sum(server_cpu.values()), 2),
            "server_cpu_seconds_by_process": {str(p): s for p, s in server_cpu.items()},
            "client_cpu_seconds": round(client_cpu, 2),
            "client_processes": len(clients.processes),
            # CPU per delivery over every step: steadier than rates on a machine that is not quiet
            "delivered": delivered,
            "server_cpu_us_per_delivery": round(sum(server_cpu.values()) / max(1, delivered) * 1e6, 2),
            "client_cpu_us_per_delivery": round(client_cpu / max(1, delivered) * 1e6, 2),
            "server_sys_cpu_us_per_delivery": round(server_sys / max(1, delivered) * 1e6, 2),
            # what a delivery costs the readers and the kernel: the clients' CPU (their reads, and the
            # kernel's receive work charged to them) and the server's system time (its sends)
            "reader_and_kernel_us_per_delivery": round((client_cpu + server_sys) / max(1, delivered) * 1e6, 2),
            "lost": sum(s["lost"] for s in every),
            "lost_at_saturation": best["lost"],
            "lost_at_p99_rate": passing_steps[0]["lost"] if passing_steps else None,
            "segments_per_delivery": round(
                sum(s["tcp"]["server"]["data_segs_out"] for s in counted) / counted_deliveries, 3
            )
            if counted_deliveries
            else None,
            "device_segments_per_delivery": round(
                sum(s["tcp"]["peers"]["segs_out"] for s in counted) / counted_deliveries, 3
            )
            if counted_deliveries
            else None,
            "segments_per_delivery_at_saturation": best["segments_per_delivery"],
            "handshake": clients.handshake_figures(members),
            "seconds": round(time.monotonic() - started, 1),
        }
    finally:
        clients.stop()


def idle(system, core_port, count, options):
    """RSS per connection and handshakes of ``count`` devices on a fresh system.

    The first round connects every device once (its profile's memberships are not cached
    yet: the gateway asks the core and caches them); RSS is measured on it. With
    --reconnect (the default) the devices then disconnect and connect again with new
    tokens (strings no gateway has verified: the JWT is checked in full), so their
    profiles' memberships are cached: the handshake figures of that round are the ones
    reported (``handshake_round``), the first round's are kept under ``cold``.
    """
    room = f"idle-{count}"
    prefix = f"i{count}-"
    if system.kind != "reference":
        make_room(core_port, options.redis_client, room, prefix, count)
    pids = system.pids()
    before = sum(rss_kib(p) for p in pids)
    cold = connect_round(system, room, count, prefix, options, "")
    after = cold.pop("rss_kib_after")
    result = {
        "connections": count,
        "rss_kib_before": before,
        "rss_kib_after": after,
        "kib_per_connection": round((after - before) / count, 2),
        "handshake_round": "first",
        **cold,
    }
    if options.reconnect:
        time.sleep(2)  # the first round's disconnects are handled (and its CPU spent) before the second
        again = connect_round(system, room, count, prefix, options, "again")
        again.pop("rss_kib_after")
        result = {**result, **again, "handshake_round": "reconnect", "cold": cold}
    return result


def connect_round(system, room, count, prefix, options, round_name):
    """``count`` devices connect (tokens of ``round_name``), are held 1 s and leave: handshake figures,
    server CPU per handshake and, while they are held, the server processes' RSS."""
    pids = system.pids()
    cpu0 = sum(cpu_seconds(p) for p in pids)
    others0 = {name: cpu_seconds(pid) for name, pid in options.others.items()}
    clients = Clients(system, room, count, prefix, options, round_name)
    try:
        server_cpu = sum(cpu_seconds(p) for p in pids) - cpu0
        client_cpu = clients.cpu_seconds()
        # the core answers a SearchRooms per uncached gateway connect, on the load CPU
        others = {
            f"{name}_cpu_ms_per_handshake": round((cpu_seconds(options.others[name]) - c) / count * 1000, 3)
            for name, c in others0.items()
        }
        time.sleep(1)
        return {
            "rss_kib_after": sum(rss_kib(p) for p in system.pids()),
            "server_cpu_seconds": round(server_cpu, 2),
            "client_cpu_seconds": round(client_cpu, 2),
            "server_cpu_ms_per_handshake": round(server_cpu / count * 1000, 3),
            **others,
            "client_processes": len(clients.processes),
            **clients.handshake_figures(count),
        }
    finally:
        clients.stop()


def placement(system, options, core, redis_server):
    """Where each process may run (CPU affinity), as recorded while the system runs."""
    pids = system.pids()
    return {
        "server": {str(p): affinity(p) for p in pids},
        "clients": options.client_cpus,
        "publisher": affinity(0),
        "redis": affinity(redis_server.process.pid),
        "core": affinity(core.pid),
    }


# --------------------------------------------------------------------------- driver


def median_of(runs, key):
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


def run_system(name, options, redis_server, redis_client, core, core_port, results, repeats=None):
    runs = results["systems"].setdefault(name, {"fanout": {}, "idle": {}, "errors": [], "placement": None})
    for repeat in repeats if repeats is not None else range(options.repeats):
        if not options.rooms:
            break
        system = None
        try:
            system = System(name, redis_server.uri, core_port, options.trees).start()
            runs["placement"] = placement(system, options, core, redis_server)
            for members in options.rooms:
                print(f"{name} #{repeat}: room of {members}", flush=True)
                if not system.alive():
                    raise RuntimeError(f"{name} died:\n{_tail(system.logs[0])}")
                result = fanout(system, redis_client, core_port, members, options)
                runs["fanout"].setdefault(str(members), []).append(result)
                print(
                    f"{name} #{repeat} {members}: saturation {result['saturation_deliveries_per_second']:,.0f}/s, "
                    f"p99<=50ms up to {result['max_rate_p99_under_50ms']} msg/s, p99@half "
                    f"{result['half_saturation']['p99_ms']} ms, client CPU {result['client_cpu_seconds']} s vs "
                    f"server {result['server_cpu_seconds']} s ({result['seconds']} s); lost at saturation "
                    f"{result['lost_at_saturation']}, {result['segments_per_delivery']} segments/delivery",
                    flush=True,
                )
        except Exception as e:
            traceback.print_exc()
            runs["errors"].append({"repeat": repeat, "phase": "fanout", "error": f"{type(e).__name__}: {e}"})
        finally:
            if system is not None:
                system.stop()
        save(results, options.out)
    for repeat in repeats if repeats is not None else range(options.idle_repeats):
        for count in options.idle:
            system = None
            try:
                system = System(
                    name, redis_server.uri, core_port, options.trees
                ).start()  # fresh: RSS from a clean baseline
                result = idle(system, core_port, count, options)
                runs["idle"].setdefault(str(count), []).append(result)
                print(
                    f"{name} #{repeat} idle {count}: {result['kib_per_connection']} KiB/conn, "
                    f"{result['handshakes_per_second']} handshakes/s to connected, "
                    f"{result.get('upgrades_per_second')} to 101, {result['failed']} failed",
                    flush=True,
                )
            except Exception as e:
                traceback.print_exc()
                runs["errors"].append({"repeat": repeat, "phase": f"idle {count}", "error": f"{type(e).__name__}: {e}"})
            finally:
                if system is not None:
                    system.stop()
        save(results, options.out)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--quick", action="store_true", help="one repeat, rooms of 100 and 1,000, idle 1,000, 2 s steps"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--positions",
        action="store_true",
        help="publish room events by the contract (positioned, kept in a stream) to every system; "
        "a system named X+positions (e.g. gateway+positions) gets them alone",
    )
    parser.add_argument("--idle-repeats", type=int, help="repeats of the idle steps (default: --repeats)")
    parser.add_argument("--systems", default="reference,gateway,gateway-2w,2-gateways")
    parser.add_argument("--rooms", default="100,1000,5000", help="room sizes for fan-out ('' for none)")
    parser.add_argument("--idle", default="1000,10000,19000", help="idle connection counts ('' for none)")
    parser.add_argument("--seconds", type=float, default=3.0, help="publishing time of each step")
    parser.add_argument("--bisect", type=int, default=3, help="bisection steps for the p99 <= 50 ms rate")
    parser.add_argument("--client", choices=("c", "python"), default="c", help="load client (default: c)")
    parser.add_argument("--client-cpus", default=LOAD_CPU, help="taskset CPU list of the load clients")
    parser.add_argument("--tick-us", type=int, default=1000, help="C client: pause between its epoll rounds (us)")
    parser.add_argument("--concurrency", type=int, default=48, help="handshakes in flight, over all client processes")
    parser.add_argument(
        "--reconnect",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="idle steps: measure handshakes on a second connect of the same devices, memberships cached (default)",
    )
    parser.add_argument("--out", default=str(OUT / "suite.json"))
    parser.add_argument(
        "--tree",
        action="append",
        default=[],
        metavar="LABEL=PATH",
        help="another checkout (with its .venv), measured as system gateway@LABEL",
    )
    parser.add_argument(
        "--interleave", action="store_true", help="run repeat r of every system before repeat r+1 (fan-out)"
    )
    options = parser.parse_args()
    options.trees = dict(tree.split("=", 1) for tree in options.tree)
    global PUBLISH_POSITIONS
    PUBLISH_POSITIONS = options.positions
    if options.quick:
        options.repeats, options.rooms, options.idle, options.seconds = 1, "100,1000", "1000", 2.0
    if options.idle_repeats is None:
        options.idle_repeats = options.repeats
    options.rooms = [int(m) for m in options.rooms.split(",") if m]
    options.idle = [int(c) for c in options.idle.split(",") if c]
    unknown = [m for m in options.rooms if m not in LADDERS]
    if unknown:
        parser.error(f"no publish-rate ladder for rooms of {unknown}: one of {sorted(LADDERS)}")

    signal.signal(signal.SIGTERM, _sigterm)
    OUT.mkdir(parents=True, exist_ok=True)
    # the publisher (this process), and what it starts without taskset (Redis), on the load CPU
    os.sched_setaffinity(0, {int(c) for c in LOAD_CPU.split(",")})
    options.client_binary = build_c_client() if options.client == "c" else None
    options.tokens = Tokens()
    client_name = "c" if options.client_binary else "python"

    redis_server = RedisServer()
    redis_client = redis.Redis(port=redis_server.port)
    core = None
    started = time.monotonic()
    results = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "redis": redis_client.info("server")["redis_version"],
        },
        "command": " ".join(sys.argv),
        "client": client_name,
        "bisect": options.bisect,
        "p99_target_ms": P99_TARGET_MS,
        "systems": {},
    }
    try:
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
        options.redis_client = redis_client
        options.others = {"core": core.pid, "redis": redis_server.process.pid}
        names = options.systems.split(",")
        # --interleave: repeat r of every system before repeat r + 1 of any, so load from
        # elsewhere on the machine falls on every system alike
        rounds = (
            [(name, [r]) for r in range(options.repeats) for name in names]
            if options.interleave
            else [(name, None) for name in names]
        )
        for name, repeats in rounds:
            run_system(name, options, redis_server, redis_client, core, core_port, results, repeats)
            results["seconds"] = round(time.monotonic() - started)
            save(results, options.out)  # a partial file survives an interrupted run
    finally:
        if core is not None:
            kill_tree(core)
        redis_server.cleanup()
        _cleanup()
    results["seconds"] = round(time.monotonic() - started)
    save(results, options.out)
    print(json.dumps(results["summary"], indent=2))
    print(f"{results['seconds']} s in all; {options.out}")


def save(results, out):
    summarise(results)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(results, indent=2) + "\n")


def summarise(results):
    """Medians over repeats, and ratios to the reference."""
    summary = {}
    for name, runs in results["systems"].items():
        entry = {"fanout": {}, "idle": {}}
        for members, reps in runs["fanout"].items():
            entry["fanout"][members] = {
                "saturation_deliveries_per_second": median_of(reps, "saturation_deliveries_per_second"),
                "max_rate_p99_under_50ms": median_of(reps, "max_rate_p99_under_50ms"),
                "p50_ms_at_half": statistics.median([r["half_saturation"]["p50_ms"] or 0 for r in reps]),
                "p99_ms_at_half": statistics.median([r["half_saturation"]["p99_ms"] or 0 for r in reps]),
                "max_ms_at_half": statistics.median([r["half_saturation"]["max_ms"] or 0 for r in reps]),
                "client_cpu_share": round(
                    sum(r["client_cpu_seconds"] for r in reps)
                    / max(0.01, sum(r["client_cpu_seconds"] + r["server_cpu_seconds"] for r in reps)),
                    2,
                ),
                "server_cpu_us_per_delivery": median_of(reps, "server_cpu_us_per_delivery"),
                "client_cpu_us_per_delivery": median_of(reps, "client_cpu_us_per_delivery"),
                "server_sys_cpu_us_per_delivery": median_of(reps, "server_sys_cpu_us_per_delivery"),
                "reader_and_kernel_us_per_delivery": median_of(reps, "reader_and_kernel_us_per_delivery"),
                "segments_per_delivery": median_of(reps, "segments_per_delivery"),
                "segments_per_delivery_at_saturation": median_of(reps, "segments_per_delivery_at_saturation"),
                "device_segments_per_delivery": median_of(reps, "device_segments_per_delivery"),
                "lost_at_saturation": median_of(reps, "lost_at_saturation"),
                "lost_at_p99_rate": median_of(reps, "lost_at_p99_rate"),
                "lost": median_of(reps, "lost"),
                "first_rate_over_50ms": median_of(reps, "first_rate_over_50ms"),
                "repeats": len(reps),
            }
        for count, reps in runs["idle"].items():
            if isinstance(reps, dict):  # files from before the idle steps were repeated
                reps = [reps]
            figures = {
                key: median_of(reps, key)
                for key in (
                    "kib_per_connection",
                    "handshakes_per_second",
                    "upgrades_per_second",
                    "server_cpu_ms_per_handshake",
                    "core_cpu_ms_per_handshake",
                )
            }
            for key in ("ms_to_101", "ms_to_connected"):
                values = [r[key]["mean"] for r in reps if r.get(key)]
                figures[f"{key}_mean"] = statistics.median(values) if values else None
            figures["handshake_round"] = reps[-1].get("handshake_round", "first")
            colds = [r["cold"] for r in reps if r.get("cold")]
            if colds:
                figures["cold_handshakes_per_second"] = median_of(colds, "handshakes_per_second")
                figures["cold_server_cpu_ms_per_handshake"] = median_of(colds, "server_cpu_ms_per_handshake")
            figures["failed"] = sum(r.get("failed", 0) for r in reps)
            figures["repeats"] = len(reps)
            entry["idle"][count] = figures
        summary[name] = entry
    for name, entry in summary.items():  # "X+positions" against "X", measured in the same run
        if not name.endswith(POSITIONS_SUFFIX) or name.removesuffix(POSITIONS_SUFFIX) not in summary:
            continue
        bare = summary[name.removesuffix(POSITIONS_SUFFIX)]
        for members, figures in entry["fanout"].items():
            without = bare["fanout"].get(members, {}).get("saturation_deliveries_per_second")
            if without and figures["saturation_deliveries_per_second"] is not None:
                figures["saturation_ratio_to_without_positions"] = round(
                    figures["saturation_deliveries_per_second"] / without, 2
                )
    reference = summary.get("reference")
    if reference:
        for entry in summary.values():
            for members, figures in entry["fanout"].items():
                ref = reference["fanout"].get(members)
                if ref and ref["saturation_deliveries_per_second"]:
                    figures["saturation_ratio"] = round(
                        figures["saturation_deliveries_per_second"] / ref["saturation_deliveries_per_second"], 2
                    )
                if ref and ref["max_rate_p99_under_50ms"] and figures["max_rate_p99_under_50ms"] is not None:
                    figures["p99_50ms_rate_ratio"] = round(
                        figures["max_rate_p99_under_50ms"] / ref["max_rate_p99_under_50ms"], 2
                    )
            for count, figures in entry["idle"].items():
                ref = reference["idle"].get(count)
                if ref and ref["kib_per_connection"] is not None and figures["kib_per_connection"] is not None:
                    figures["kib_over_reference"] = round(figures["kib_per_connection"] - ref["kib_per_connection"], 2)
                if ref and ref["handshakes_per_second"] and figures["handshakes_per_second"]:
                    figures["handshake_ratio"] = round(
                        figures["handshakes_per_second"] / max(0.1, ref["handshakes_per_second"]), 2
                    )
                if ref and ref.get("cold_handshakes_per_second") and figures.get("cold_handshakes_per_second"):
                    figures["cold_handshake_ratio"] = round(
                        figures["cold_handshakes_per_second"] / ref["cold_handshakes_per_second"], 2
                    )
                if ref and ref.get("upgrades_per_second") and figures.get("upgrades_per_second"):
                    figures["upgrade_ratio"] = round(figures["upgrades_per_second"] / ref["upgrades_per_second"], 2)
    one = summary.get("gateway")
    for name in ("gateway-2w", "2-gateways"):
        two = summary.get(name)
        if one and two:
            for members, figures in two["fanout"].items():
                single = one["fanout"].get(members)
                if single and single["saturation_deliveries_per_second"]:
                    figures["over_one_worker"] = round(
                        figures["saturation_deliveries_per_second"] / single["saturation_deliveries_per_second"], 2
                    )
    results["summary"] = summary


if __name__ == "__main__":
    main()
