"""rediss://: the store and the bus over TLS to a real redis-server started with --tls-port,
with certificates the test makes (support.tlscerts)."""

import pytest
import pytest_twisted
from twisted.internet import reactor, task
from twisted.logger import globalLogPublisher

from chatgateway import config as configuration
from chatgateway.bus.redis import RedisBus
from chatgateway.store import ConnectionMeta
from chatgateway.store.redis import RedisStore
from support.redis import RedisServer, eventually
from support.tlscerts import make_certificates


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tls")
    return make_certificates(directory), make_certificates(directory, prefix="other")


@pytest.fixture(scope="module")
def tls_server(certs):
    server = RedisServer(tls=certs[0], extra=["--tls-auth-clients", "yes"])  # a client certificate is required
    yield server
    server.cleanup()


def make_config(uri, **env):
    environ = {"CACHE_URI": uri, "JWT_SECRET": "test-secret-0123456789abcdef0123456789", "GATEWAY_ID": "gw-tls", **env}
    return configuration.load(environ=environ)


@pytest.fixture
def logged():
    """The text of every log event while the test runs."""
    lines = []

    def observe(event):
        from twisted.logger import formatEvent

        lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    yield lines
    globalLogPublisher.removeObserver(observe)


def meta():
    return ConnectionMeta(
        profile_id="alice",
        device_id="phone",
        room_ids=["r1"],
        last_active=1,
        last_heartbeat=1,
        connected=1,
        gateway_id="gw-tls",
    )


@pytest_twisted.ensureDeferred
async def test_store_and_bus_over_tls_with_a_client_certificate(tls_server, certs):
    ours = certs[0]
    config = make_config(
        f"rediss://127.0.0.1:{tls_server.tls_port}/0",
        REDIS_TLS_CA_FILE=str(ours.ca),
        REDIS_TLS_CERT_FILE=str(ours.client_cert),
        REDIS_TLS_KEY_FILE=str(ours.client_key),
    )
    store = RedisStore(config, reactor)
    bus = RedisBus(config, reactor)
    got = []
    try:
        await store.start()
        bus.start(lambda channel, payload: got.append((channel, payload)))
        await eventually(lambda: store.ready and bus.ready, what="store and bus ready over TLS")
        await store.open_connection(meta(), "s1", 1)
        assert tls_server.client().exists("gateway:conn:alice:phone") == 1
        await bus.subscribe("chat:room:r1")
        await bus.publish("chat:room:r1", b"\x00over tls\xff")
        await eventually(lambda: got, what="message over TLS")
        assert got == [("chat:room:r1", b"\x00over tls\xff")]
        # Every client of the gateway came over the TLS port (the plain one saw only the test's).
        clients = tls_server.client().client_list()
        assert sum(1 for c in clients if c.get("laddr", "").endswith(f":{tls_server.tls_port}")) >= 3
    finally:
        await bus.stop()
        await store.stop()


@pytest_twisted.ensureDeferred
async def test_verification_failure_is_a_clear_error_and_never_ready(tls_server, certs, logged):
    other = certs[1]
    config = make_config(f"rediss://127.0.0.1:{tls_server.tls_port}/0", REDIS_TLS_CA_FILE=str(other.ca))
    store = RedisStore(config, reactor)
    try:
        await store.start()
        await eventually(lambda: any("TLS with" in line for line in logged), what="the TLS error logged")
        await task.deferLater(reactor, 0.5, lambda: None)
        assert not store.ready
        line = next(line for line in logged if "TLS with" in line)
        assert "certificate verify failed" in line and "REDIS_TLS_CA_FILE" in line
        assert sum("TLS with" in line for line in logged) == 1  # once, not at every retry
    finally:
        await store.stop()


@pytest_twisted.ensureDeferred
async def test_a_server_requiring_a_client_certificate_refuses_one_without(tls_server, certs, logged):
    config = make_config(f"rediss://127.0.0.1:{tls_server.tls_port}/0", REDIS_TLS_CA_FILE=str(certs[0].ca))
    store = RedisStore(config, reactor)
    try:
        await store.start()
        await task.deferLater(reactor, 1.0, lambda: None)
        assert not store.ready
    finally:
        await store.stop()


@pytest_twisted.ensureDeferred
async def test_without_verification_any_certificate_is_accepted(tls_server, certs):
    config = make_config(
        f"rediss://127.0.0.1:{tls_server.tls_port}/0",
        REDIS_TLS_VERIFY="false",
        REDIS_TLS_CERT_FILE=str(certs[0].client_cert),
        REDIS_TLS_KEY_FILE=str(certs[0].client_key),
    )
    store = RedisStore(config, reactor)
    try:
        await store.start()
        await eventually(lambda: store.ready, what="store ready without verification")
    finally:
        await store.stop()


def test_bad_tls_files_stop_the_start_with_one_line(tmp_path, certs):
    uri = "rediss://127.0.0.1:6380/0"
    with pytest.raises(configuration.ConfigError) as e:
        make_config(uri, REDIS_TLS_CA_FILE=str(tmp_path / "missing.pem"))
    assert e.value.problems == [
        f"REDIS_TLS_CA_FILE={str(tmp_path / 'missing.pem')!r}: cannot read it (No such file or directory)"
    ]
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("hello")
    with pytest.raises(configuration.ConfigError, match="REDIS_TLS_CA_FILE=.*not a PEM certificate"):
        make_config(uri, REDIS_TLS_CA_FILE=str(not_pem))
    with pytest.raises(configuration.ConfigError, match="go together"):
        make_config(uri, REDIS_TLS_CERT_FILE=str(certs[0].client_cert))
    with pytest.raises(configuration.ConfigError, match="REDIS_TLS_CERT_FILE=.*not a PEM certificate and its key"):
        make_config(uri, REDIS_TLS_CERT_FILE=str(certs[0].client_cert), REDIS_TLS_KEY_FILE=str(certs[1].client_key))
    # Without rediss:// the files are not looked at.
    make_config("redis://127.0.0.1:6379/0", REDIS_TLS_CA_FILE=str(tmp_path / "missing.pem"))
