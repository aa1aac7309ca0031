"""A reconnect storm with real processes: a gateway holding 300 devices is SIGKILLed and they
all reconnect to the other one, with jittered backoff (support.stormdevices).

redis-server on a free port, the reference core (`twistd chatcore`) and two `twistd
chatgateway` on that Redis. The core calls the surviving gateway makes while the devices
come back are read from its /metrics (every call to the core is counted there,
docs/observability.md#metrics): the target of the storm is ≤ 1 % of the devices
(docs/performance.md#reconnect-storms), which only the membership cache makes possible:
a device whose profile's memberships are in the store connects without asking the core.
A second storm meets a survivor whose connection rate is low: the devices it refuses with
503 come back after their Retry-After (docs/security.md#storm-control).
"""

import json

import grpc
import pytest

from chatgateway.api import chat_pb2 as pb
from chatgateway.api import chat_pb2_grpc
from chatgateway.auth.devtokens import mint_token
from support.loadgen import LineProcess
from support.processes import Twistd, free_port, until
from support.redis import RedisServer
from support.scrape import active_connections, calls_between, core_calls

SECRET = "storm-test-secret-0123456789abcdef01234567"
DEVICES = 300
PROFILES = 100  # three devices each
ROOM_SIZE = 10
PREFIX = "storm"


class StormCluster:
    """redis-server, `twistd chatcore` and two `twistd chatgateway`, all on free ports."""

    def __init__(self, tmp_path, survivor_settings=None):
        self.redis = RedisServer()
        self.core_port = free_port()
        env = {"JWT_SECRET": SECRET, "CACHE_URI": self.redis.uri, "OAUTH2_ISSUER": "", "LOG_LEVEL": "info"}
        self.core = Twistd("chatcore", ["--port", self.core_port], env=env, port=self.core_port, log_dir=tmp_path)
        self.gateways = []
        for i in range(2):
            port = free_port()
            (tmp_path / f"gw-{i}").mkdir()
            gateway_env = {
                **env,
                "CHAT_SERVICE_URI": f"127.0.0.1:{self.core_port}",
                "HTTP_PORT": str(port),
                "GRPC_PORT": str(free_port()),
                "HTTP_INTERFACE": "127.0.0.1",
                "GATEWAY_ID": f"storm-gw-{i}",
                # every device of the test connects from 127.0.0.1 (docs/security.md)
                "MAX_UNAUTHENTICATED_PER_ADDRESS": "0",
                **((survivor_settings or {}) if i == 1 else {}),
            }
            self.gateways.append(
                Twistd("chatgateway", ["--workers", "1"], env=gateway_env, port=port, log_dir=tmp_path / f"gw-{i}")
            )

    def start(self):
        self.core.start()
        for gateway in self.gateways:
            gateway.start()
        return self

    def urls(self):
        return ",".join(f"ws://127.0.0.1:{g.port}/ws" for g in self.gateways)

    def make_rooms(self):
        """Rooms of ROOM_SIZE consecutive profiles, through the core's gRPC API."""
        owner = mint_token(SECRET, "storm-owner", audience="service_chat_gateway")
        with grpc.insecure_channel(f"127.0.0.1:{self.core_port}") as channel:
            stub = chat_pb2_grpc.ChatServiceStub(channel)
            for start in range(0, PROFILES, ROOM_SIZE):
                stub.CreateRoom(
                    pb.CreateRoomRequest(
                        name=f"storm {start}", member_ids=[f"{PREFIX}{i}" for i in range(start, start + ROOM_SIZE)]
                    ),
                    metadata=[("authorization", f"Bearer {owner}")],
                    timeout=10,
                )

    def stop(self):
        for gateway in self.gateways:
            gateway.stop()
        self.core.stop()
        self.redis.cleanup()


@pytest.fixture
def storm_cluster(tmp_path):
    made = []

    def start(**survivor_settings):
        made.append(StormCluster(tmp_path, survivor_settings).start())
        return made[-1]

    yield start
    for cluster in made:
        cluster.stop()


def storm(cluster, tmp_path):
    """300 devices on the first gateway, which is SIGKILLed: the devices' figures once all are
    back on the second (support.stormdevices.Fleet.stats), and the core calls it made meanwhile."""
    cluster.make_rooms()
    first, second = cluster.gateways
    devices = LineProcess(
        "tests/support/stormdevices.py",
        [
            "--urls",
            cluster.urls(),
            "--secret",
            SECRET,
            "--count",
            DEVICES,
            "--profiles",
            PROFILES,
            "--prefix",
            PREFIX,
            "--base",
            "1.0",
            "--cap",
            "8",
        ],
        log_path=tmp_path / "devices.log",
    )
    try:
        assert int(devices.expect("READY", 60).split()[0]) == DEVICES
        assert active_connections(first.port) == DEVICES
        before = core_calls(second.port)
        devices.send("MARK")
        devices.expect("MARK", 10)
        first.process.kill()  # SIGKILL: no drain, no close frames
        first.process.wait()

        def stats():
            devices.send("STATS")
            return json.loads(devices.expect("STATS", 10))

        back = until(lambda: (s := stats())["reconnected"] == DEVICES and s, timeout=45)
        assert back and back["reconnected"] == DEVICES, (back, second.log_tail())
        assert back["connected"] == DEVICES
        assert back["lost"] == DEVICES  # every device saw its connection to the dead gateway end
        assert active_connections(second.port) == DEVICES
        during = calls_between(core_calls(second.port), before)
    finally:
        devices.stop()
    assert "Traceback (most recent call last)" not in second.log_text(), second.log_tail(80)
    return back, during


def test_300_devices_reconnect_to_the_surviving_gateway_with_at_most_1_percent_core_calls(storm_cluster, tmp_path):
    back, during = storm(storm_cluster(), tmp_path)
    # The target (docs/performance.md#reconnect-storms): the core hardly notices the storm.
    assert sum(during.values()) <= DEVICES // 100, (during, back)


def test_devices_refused_by_the_connection_rate_come_back_after_their_retry_after(storm_cluster, tmp_path):
    # 300 devices within about a second against 100 new connections per second
    back, during = storm(storm_cluster(MAX_CONNECTS_PER_SECOND="100", CONNECT_BURST="20"), tmp_path)
    assert back["refused"].get("503", 0) > 0 and back["retry_after"] == back["refused"]["503"], back
    assert sum(during.values()) <= DEVICES // 100, (during, back)
