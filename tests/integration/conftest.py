"""A development gateway process (reference core in-process) shared by a test module."""

import pytest

from chatgateway.auth.devtokens import mint_token
from support.processes import Twistd, free_port

SECRET = "integration-test-secret-0123456789abcdef"
ISSUER = "chatgateway-dev"
AUDIENCE = "service_chat_gateway"


class DevGateway:
    def __init__(self, process, port, grpc_port=None):
        self.process = process
        self.port = port
        self.grpc = f"127.0.0.1:{grpc_port}"  # gRPC target (GRPC_PORT)
        self.url = f"ws://127.0.0.1:{port}/ws"
        self.http = f"http://127.0.0.1:{port}"

    def token(self, profile, device=None, **kwargs):
        kwargs.setdefault("issuer", ISSUER)
        kwargs.setdefault("audience", AUDIENCE)
        return mint_token(SECRET, profile, device_id=device, **kwargs)


@pytest.fixture(scope="module")
def dev_gateway():
    port, grpc_port = free_port(), free_port()
    process = Twistd(
        "chatgateway",
        ["--dev", "--http-port", port, "--grpc-port", grpc_port],
        env={"JWT_SECRET": SECRET, "MAX_EVENTS_PER_SECOND": "1000", "LOG_LEVEL": "info"},
        port=port,
        also_ports=[grpc_port],  # bound after HTTP_PORT; tests call it at once
    )
    process.start()
    yield DevGateway(process, port, grpc_port)
    code = process.stop()
    assert code in (0, -15), process.log_tail()
    assert "Traceback (most recent call last)" not in process.log_text(), process.log_tail(80)
