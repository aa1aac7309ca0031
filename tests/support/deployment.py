"""A deployment of real processes for the chaos test and bench/resume.py: one redis-server,
`twistd chatcore` publishing by the contract, and `twistd chatgateway` processes on it,
all on free ports, with rooms made through the core's gRPC API."""

import os
import re
import signal
from pathlib import Path

import grpc

from chatgateway.api import chat_pb2 as pb
from chatgateway.api import chat_pb2_grpc
from chatgateway.auth.devtokens import mint_token
from support.processes import Twistd, children_of, free_port, until
from support.redis import RedisServer

NOTABLE = re.compile(r"#(warn|error|critical)\]|Traceback|Error:")
OWNER = "fleet-owner"  # the profile that makes the rooms and publishes into them


class Deployment:
    """``gateways``: the ``--workers`` of each gateway (e.g. (1, 2)); ``settings``: environment
    of every gateway (HEARTBEAT_INTERVAL_SEC...)."""

    def __init__(self, secret, log_dir, gateways=(1, 1), **settings):
        self.secret = secret
        self.log_dir = Path(log_dir)
        self.redis = RedisServer()
        self.core_port = free_port()
        env = {"JWT_SECRET": secret, "CACHE_URI": self.redis.uri, "OAUTH2_ISSUER": "", "LOG_LEVEL": "info"}
        self.core = Twistd("chatcore", ["--port", self.core_port], env=env, port=self.core_port, log_dir=self.log_dir)
        self.gateways = []
        for i, workers in enumerate(gateways):
            port = free_port()
            (self.log_dir / f"gw-{i}").mkdir(parents=True, exist_ok=True)
            gateway_env = {
                **env,
                "CHAT_SERVICE_URI": self.core_target,
                "HTTP_PORT": str(port),
                "GRPC_PORT": str(free_port()),
                "HTTP_INTERFACE": "127.0.0.1",
                "GATEWAY_ID": f"gw-{i}",
                "MAX_UNAUTHENTICATED_PER_ADDRESS": "0",  # every device connects from 127.0.0.1
                **{k: str(v) for k, v in settings.items()},
            }
            self.gateways.append(
                Twistd(
                    "chatgateway", ["--workers", workers], env=gateway_env, port=port, log_dir=self.log_dir / f"gw-{i}"
                )
            )

    @property
    def core_target(self):
        return f"127.0.0.1:{self.core_port}"

    def start(self):
        self.core.start()
        for gateway in self.gateways:
            gateway.start()
        return self

    def url(self, i):
        return f"ws://127.0.0.1:{self.gateways[i].port}/ws"

    def urls(self, order=None):
        return ",".join(self.url(i) for i in (order or range(len(self.gateways))))

    def make_rooms(self, members):
        """One room per list of ``members`` (profiles), owned by OWNER: their ids, in order."""
        token = mint_token(self.secret, OWNER, audience="service_chat_gateway")
        rooms = []
        with grpc.insecure_channel(self.core_target) as channel:
            stub = chat_pb2_grpc.ChatServiceStub(channel)
            for i, profiles in enumerate(members):
                answer = stub.CreateRoom(
                    pb.CreateRoomRequest(name=f"fleet {i}", member_ids=list(profiles)),
                    metadata=[("authorization", f"Bearer {token}")],
                    timeout=10,
                )
                rooms.append(answer.room.id)
        return rooms

    def processes(self, i):
        """Process ids of gateway i: its parent and its workers."""
        parent = self.gateways[i].pid
        return [parent, *children_of(parent)]

    def signal(self, i, signum):
        """``signum`` to every process of gateway i (SIGSTOP/SIGCONT: the workers too)."""
        for pid in self.processes(i):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    def kill(self, i):
        """SIGKILL gateway i, workers included (a worker stops by itself when its parent is
        gone, but only once it reads that: a real crash of the machine takes them all)."""
        pids = self.processes(i)
        self.signal(i, signal.SIGKILL)
        self.gateways[i].process.wait()
        until(lambda: not any(_alive(p) for p in pids[1:]), timeout=10, what="the killed gateway's workers gone")

    def stop(self):
        codes = [g.stop(timeout=30) for g in self.gateways if g.running]
        self.core.stop()
        self.redis.cleanup()
        return codes

    def logs(self, lines=20):
        """The last warnings and errors of each gateway's log (its info lines left out)."""
        out = []
        for i, gateway in enumerate(self.gateways):
            notable = [line for line in gateway.log_text().splitlines() if NOTABLE.search(line)]
            out.append(f"--- gw-{i}: {len(notable)} warnings and errors, the last {lines}:")
            out.extend(notable[-lines:])
        return "\n".join(out)


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
