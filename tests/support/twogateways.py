"""Real processes for presence, calls and shared limits: one redis-server the test starts,
`twistd chatcore` (the reference core) publishing to it, and two `twistd chatgateway`."""

import json
import urllib.error
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from chatgateway.api import codec
from chatgateway.auth.devtokens import mint_token
from chatgateway.client.wsclient import GatewayClient
from support.processes import Twistd, free_port
from support.redis import RedisServer

SECRET = "presence-test-secret-0123456789abcdef012"
# Leases lapse after 3 heartbeats; a dead gateway's devices go offline within 4.
HEARTBEAT_SEC = 1.0


def token(profile, device=None):
    return mint_token(SECRET, profile, device_id=device, audience="service_chat_gateway")


class TwoGateways:
    def __init__(self, **settings):
        self.redis = RedisServer()
        self.core_port = free_port()
        env = {"JWT_SECRET": SECRET, "CACHE_URI": self.redis.uri, "OAUTH2_ISSUER": "", "LOG_LEVEL": "info"}
        self.core = Twistd("chatcore", ["--port", self.core_port], env=env, port=self.core_port)
        self.gateways = []
        for i in range(2):
            port = free_port()
            gateway_env = {
                **env,
                "CHAT_SERVICE_URI": f"127.0.0.1:{self.core_port}",
                "HTTP_PORT": str(port),
                "GRPC_PORT": str(free_port()),
                "HTTP_INTERFACE": "127.0.0.1",
                "GATEWAY_ID": f"gw-{i}",
                "HEARTBEAT_INTERVAL_SEC": str(HEARTBEAT_SEC),
                "CONNECTION_TIMEOUT_SEC": "60",
                "CORE_TIMEOUT_SEC": "5",
                "MAX_EVENTS_PER_SECOND": "1000",
                **{k: str(v) for k, v in settings.items()},
            }
            self.gateways.append(Twistd("chatgateway", ["--workers", "1"], env=gateway_env, port=port))
        self.clients = []

    def start(self):
        self.core.start()
        for gateway in self.gateways:
            gateway.start()
        return self

    def stop(self):
        for client in self.clients:
            if client.close_code is None:
                client.close()
        for gateway in self.gateways:
            gateway.stop()
        self.core.stop()
        self.redis.cleanup()

    def tracebacks(self):
        """The processes whose logs hold a traceback (a SIGKILLed one's log is still read)."""
        return [
            p.log_tail(60) for p in (*self.gateways, self.core) if "Traceback (most recent call last)" in p.log_text()
        ]

    async def connect(self, i, profile, device):
        url = f"ws://127.0.0.1:{self.gateways[i].port}/ws"
        client = await GatewayClient.connect(url, token(profile, device), subprotocol=codec.JSON)
        client.connected = await client.next_event("connected")
        self.clients.append(client)
        return client

    def http(self, i, method, body, bearer):
        """POST a Connect unary call (JSON) to gateway ``i``: (HTTP status, JSON body). Blocking: short calls only."""
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.gateways[i].port}/chat.v1.ChatService/{method}",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {bearer}"},
        )
        try:
            with urllib.request.urlopen(request, timeout=5) as answer:
                return answer.status, json.loads(answer.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def metric(self, i, name, **labels):
        """One sample of gateway ``i``'s /metrics (0 when absent)."""
        url = f"http://127.0.0.1:{self.gateways[i].port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as answer:
            text = answer.read().decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                own = {k: v for k, v in sample.labels.items() if not k.startswith("otel_scope")}
                if sample.name == name and own == labels:
                    return sample.value
        return 0.0
