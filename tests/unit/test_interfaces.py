"""Everything that stands at a seam provides its interface in full (zope.interface.verify).

Each real class and each test fake is listed here by name: a fake that lacks a method
of the interface, or takes fewer arguments, fails this test rather than a distant one.
The store's and the bus's implementations (memory and Redis) are verified in
tests/integration/test_redis_store.py and tests/integration/test_redis_bus.py, which
have a Redis to connect the Redis ones to.
"""

import pytest
from twisted.internet import defer, task
from zope.interface import implementer
from zope.interface.exceptions import Invalid
from zope.interface.verify import verifyObject

from chatgateway import config
from chatgateway.auth import ITokenVerifier
from chatgateway.auth.tokens import TokenVerifier
from chatgateway.core import ICoreClient
from chatgateway.core.client import CoreClient
from chatgateway.telemetry.corecalls import InstrumentedCore
from chatgateway.telemetry.counts import GatewayCounts
from support.wsharness import FakeCore, FakeVerifier, RecordingCore, SlowVerifier


def core_client():
    return CoreClient("127.0.0.1:1", task.Clock(), timeout=1.0, threads=1, gateway_id="gw-test")


CORE_CLIENTS = {
    "CoreClient": core_client,
    "InstrumentedCore around a CoreClient": lambda: InstrumentedCore(core_client(), GatewayCounts()),
    "InstrumentedCore around a FakeCore": lambda: InstrumentedCore(FakeCore(), GatewayCounts()),
    "support.wsharness.FakeCore": FakeCore,
    "support.wsharness.RecordingCore": RecordingCore,
}

TOKEN_VERIFIERS = {
    "TokenVerifier": lambda: TokenVerifier(
        config.load({"JWT_SECRET": "a-secret-of-at-least-32-bytes-for-hs256"}), task.Clock()
    ),
    "support.wsharness.FakeVerifier": lambda: FakeVerifier(task.Clock()),
    "support.wsharness.SlowVerifier": lambda: SlowVerifier(FakeVerifier(task.Clock()), task.Clock(), 1.0),
}


@pytest.mark.parametrize("name", CORE_CLIENTS)
def test_core_clients_provide_ICoreClient(name):
    assert verifyObject(ICoreClient, CORE_CLIENTS[name]())


@pytest.mark.parametrize("name", TOKEN_VERIFIERS)
def test_token_verifiers_provide_ITokenVerifier(name):
    assert verifyObject(ITokenVerifier, TOKEN_VERIFIERS[name]())


def test_a_fake_missing_a_method_is_caught():
    @implementer(ICoreClient)
    class NoReadiness:
        def start(self):
            """Nothing to start."""

        def stop(self):
            return defer.succeed(None)

        def call(self, method, request, token, device_id="", traceparent=None, tracestate=None, timeout=None):
            return defer.succeed(None)

    @implementer(ICoreClient)
    class NoTraceContext(NoReadiness):
        def readiness(self):
            return defer.succeed("up")

        def call(self, method, request, token, device_id=""):
            return defer.succeed(None)

    with pytest.raises(Invalid, match="readiness"):
        verifyObject(ICoreClient, NoReadiness())
    with pytest.raises(Invalid, match="call"):
        verifyObject(ICoreClient, NoTraceContext())
