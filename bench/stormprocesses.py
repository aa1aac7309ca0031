"""The processes of bench/storm.py: Redis pinned, the reference core, rooms, the two servers of a
system, and the devices' client processes (tests/support/stormdevices.py)."""

import atexit
import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
from suite import ready

from chatgateway.api import chat_pb2 as pb
from chatgateway.api import chat_pb2_grpc
from chatgateway.auth.devtokens import mint_token
from chatgateway.workers import BACKLOG
from support.loadgen import LineProcess
from support.processes import TWISTD, Twistd, free_port, until

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

SECRET = "bench-storm-secret-0123456789abcdef0123456"
SERVER_CPU, LOAD_CPU = "0", "1"
# The gateway systems and their settings: "gateway" as configured by default; "gateway-uncached"
# without the membership cache and the connection-rate limit (every connect asks the core, no
# 503s: how a gateway met a storm before issue #18).
GATEWAYS = {
    "gateway": {},
    "gateway-uncached": {"MEMBERSHIP_CACHE_TTL_SEC": "0", "MAX_CONNECTS_PER_SECOND": "0"},
}
PREFIX = "storm"
ROOM_EVENTS_QUIET_SEC = 2.0


_started = []  # every server this run started (Twistd or Script): killed at exit if still running


@atexit.register
def _kill_started():
    for server in _started:
        try:
            server.kill()
        except Exception:
            pass


def pin_threads(pid, cpus):
    """Every thread of ``pid`` to ``cpus`` (for a process started without taskset, e.g. Redis)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        os.sched_setaffinity(int(tid), {int(c) for c in cpus.split(",")})


def cpu_seconds(pid):
    """utime + stime of the process (all its threads)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_core(redis_uri, log_dir):
    port = free_port()
    env = {"JWT_SECRET": SECRET, "CACHE_URI": redis_uri, "OAUTH2_ISSUER": "", "LOG_LEVEL": "warning"}
    core = Twistd(
        "chatcore", ["--port", port], env=env, port=port, log_dir=log_dir, twistd=("taskset", "-c", LOAD_CPU, *TWISTD)
    )
    _started.append(core)
    return core.start()


def make_rooms(core_port, redis_client, profiles, room_size):
    """Rooms of ``room_size`` consecutive profiles through the core, then wait until the core's
    room-creation events stop (it publishes them after answering; a gateway would fan them out)."""
    watcher = redis_client.pubsub(ignore_subscribe_messages=True)
    watcher.psubscribe("chat:*")
    owner = mint_token(SECRET, "storm-owner", audience="service_chat_gateway")
    with grpc.insecure_channel(f"127.0.0.1:{core_port}") as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        for start in range(0, profiles, room_size):
            members = [f"{PREFIX}{i}" for i in range(start, min(profiles, start + room_size))]
            stub.CreateRoom(
                pb.CreateRoomRequest(name=f"storm {start}", member_ids=members),
                metadata=[("authorization", f"Bearer {owner}")],
                timeout=30,
            )
    quiet_since = time.monotonic()
    while time.monotonic() - quiet_since < ROOM_EVENTS_QUIET_SEC:
        if watcher.get_message(timeout=0.2) is not None:
            quiet_since = time.monotonic()
    watcher.close()


def start_servers(system, redis_uri, core_port, log_dir, extra_env):
    """The two servers of ``system`` on CPU 0, started and listening (on a failure, none)."""
    servers = []
    try:
        return _start_servers(servers, system, redis_uri, core_port, log_dir, extra_env)
    except BaseException:
        for server in servers:
            server.kill()
        raise


def _start_servers(servers, system, redis_uri, core_port, log_dir, extra_env):
    for i in range(2):
        port = free_port()
        directory = log_dir / f"{system}-{i}"
        directory.mkdir(parents=True, exist_ok=True)
        if system == "reference":
            argv = [str(HERE / "reference_server.py"), "--port", port, "--redis", redis_uri, "--backlog", BACKLOG]
            script = Script(argv, port, directory / "reference.log")
            _started.append(script)
            servers.append(script.start())
            continue
        env = {
            "JWT_SECRET": SECRET,
            "OAUTH2_ISSUER": "",
            "CACHE_URI": redis_uri,
            "CHAT_SERVICE_URI": f"127.0.0.1:{core_port}",
            "HTTP_PORT": str(port),
            "HTTP_INTERFACE": "127.0.0.1",
            "GRPC_PORT": str(free_port()),
            "GATEWAY_ID": f"storm-gw-{i}",
            "LOG_LEVEL": "warning",
            # the devices come from a few loopback addresses, not from one each (docs/security.md)
            "MAX_UNAUTHENTICATED_PER_ADDRESS": "0",
            "MAX_CONNECTIONS": "25000",
            **GATEWAYS[system],
            **extra_env,
        }
        server = Twistd(
            "chatgateway",
            ["--workers", "1"],
            env=env,
            port=port,
            log_dir=directory,
            twistd=("taskset", "-c", SERVER_CPU, *TWISTD),
        )
        _started.append(server)
        servers.append(server.start())
    if system in GATEWAYS:
        for server in servers:
            until(lambda s=server: ready(s.port), timeout=30, what=f"/readyz 200 on {server.port}")
    return servers


class Script:
    """``python <argv>`` on CPU 0 listening on ``port``: the part of support.processes.Twistd a plain script needs."""

    def __init__(self, argv, port, log_path):
        self.argv = ["taskset", "-c", SERVER_CPU, sys.executable, *map(str, argv)]
        self.port = port
        self.log_path = log_path
        self.process = None

    @property
    def pid(self):
        return self.process.pid

    def start(self):
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.argv, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        until(lambda: _accepts(self.port) or self.process.poll() is not None, timeout=30, what=f"port {self.port}")
        if self.process.poll() is not None:
            raise RuntimeError(f"{self.argv} exited with {self.process.returncode}")
        return self

    def kill(self):
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()

    def stop(self):
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


def _accepts(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


class Clients:
    """The devices, over client processes pinned to the load CPU."""

    def __init__(self, system, servers, args, log_dir):
        self.processes = []
        path = "/?room=storm" if system == "reference" else "/ws"
        urls = ",".join(f"ws://127.0.0.1:{s.port}{path}" for s in servers)
        parts = max(1, math.ceil(args.devices / args.per_client))
        size = math.ceil(args.devices / parts)
        for n, first in enumerate(range(0, args.devices, size)):
            argv = [
                "--urls",
                urls,
                "--secret",
                SECRET,
                "--first",
                first,
                "--count",
                min(size, args.devices - first),
                "--profiles",
                args.profiles or args.devices,
                "--prefix",
                PREFIX,
                "--concurrency",
                max(4, args.concurrency // parts),
                "--source",
                f"127.0.0.{2 + n}",
                "--base",
                args.base,
                "--cap",
                args.cap,
                "--hello",
                "none" if system == "reference" else "connected",
            ]
            process = LineProcess("tests/support/stormdevices.py", argv, log_path=log_dir / "clients.log")
            pin_threads(process.process.pid, LOAD_CPU)
            self.processes.append(process)

    def ready(self, timeout):
        figures = []
        for p in self.processes:
            count, _, rest = p.expect("READY", timeout).partition(" ")
            figures.append({"connected": int(count), **json.loads(rest)})
        return figures

    def command(self, word, timeout=30):
        for p in self.processes:
            p.send(word)
        return [p.expect(word, timeout) for p in self.processes]

    def stats(self):
        return [json.loads(line) for line in self.command("STATS")]

    def stop(self):
        for p in self.processes:
            try:
                p.send("QUIT")
            except OSError:
                pass
            p.stop()
