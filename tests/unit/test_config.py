"""Configuration: the spec's defaults, overrides, and every problem reported at once."""

import pytest

from chatgateway import config
from chatgateway.tap import Options

BASE = {"JWT_SECRET": "s" * 32}


def test_spec_defaults():
    c = config.load(BASE)
    assert c.chat_service_uri == "127.0.0.1:7010"
    assert c.max_connections_per_device == 1
    assert c.connection_timeout_sec == 300
    assert c.heartbeat_interval_sec == 30
    assert c.max_events_per_second == 100
    assert c.oauth2_jwt_verify_audience == "service_chat_gateway"
    assert (c.http_port, c.grpc_port) == (80, 50051)
    assert c.cache_uri == c.events_uri == "memory://"
    assert c.in_memory == ["CACHE_URI", "EVENTS_URI"]
    assert c.gateway_id.startswith("gateway-")


def test_events_uri_defaults_to_cache_uri():
    c = config.load({**BASE, "CACHE_URI": "redis://10.0.0.5:6379/2"})
    assert c.events_uri == "redis://10.0.0.5:6379/2"
    assert c.in_memory == []


def test_inbound_budget_settings():
    c = config.load(BASE)
    assert (c.max_frames_per_second, c.max_bytes_per_second) == (200, 1048576)
    assert (c.over_budget_close_sec, c.max_token_refreshes_per_minute) == (10, 10)
    # Every command is a frame: the frame budget follows MAX_EVENTS_PER_SECOND unless set.
    assert config.load({**BASE, "MAX_EVENTS_PER_SECOND": "1000"}).max_frames_per_second == 1100
    assert config.load({**BASE, "MAX_FRAMES_PER_SECOND": "50"}).max_frames_per_second == 50
    with pytest.raises(config.ConfigError) as error:
        config.load({**BASE, "MAX_BYTES_PER_SECOND": "1000", "MAX_FRAMES_PER_SECOND": "0.5"})
    assert len(error.value.problems) == 2
    with pytest.raises(config.ConfigError) as error:
        config.load({**BASE, "MAX_BYTES_PER_SECOND": "65536", "MAX_MESSAGE_BYTES": "100000"})
    assert error.value.problems == ["MAX_BYTES_PER_SECOND=65536 must be at least MAX_MESSAGE_BYTES=100000"]


def test_overrides_win_over_environment():
    c = config.load({**BASE, "HTTP_PORT": "9000"}, {"http-port": "9100", "log_level": "DEBUG"})
    assert c.http_port == 9100
    assert c.log_level == "debug"


def test_every_problem_is_reported_at_once():
    with pytest.raises(config.ConfigError) as error:
        config.load(
            {
                "MAX_CONNECTIONS_PER_DEVICE": "-1",
                "HEARTBEAT_INTERVAL_SEC": "300",
                "CONNECTION_TIMEOUT_SEC": "300",
                "CACHE_URI": "ftp://cache:21",
                "CHAT_SERVICE_URI": "no-port",
                "HTTP_PORT": "eighty",
                "GRPC_PORT": "70000",
                "MAX_EVENTS_PER_SECOND": "nan",
                "PUBLISH_FORWARDED_EVENTS": "maybe",
                "LOG_LEVEL": "loud",
            }
        )
    problems = error.value.problems
    text = "\n".join(problems)
    for name in (
        "MAX_CONNECTIONS_PER_DEVICE",
        "HEARTBEAT_INTERVAL_SEC=300 must be less than CONNECTION_TIMEOUT_SEC=300",
        "CACHE_URI='ftp://cache:21': unknown scheme",
        "CHAT_SERVICE_URI",
        "HTTP_PORT='eighty'",
        "GRPC_PORT=70000",
        "MAX_EVENTS_PER_SECOND",
        "PUBLISH_FORWARDED_EVENTS",
        "LOG_LEVEL",
        "no way to verify tokens",
    ):
        assert name in text, name
    assert len(problems) == 10


@pytest.mark.parametrize(
    "uri",
    ["redis://", "redis://host:notaport/0", "unix://", "http://cache:6379"],
)
def test_malformed_cache_uris(uri):
    with pytest.raises(config.ConfigError) as error:
        config.load({**BASE, "CACHE_URI": uri})
    assert error.value.problems[0].startswith("CACHE_URI=")


def test_client_credentials_go_together():
    with pytest.raises(config.ConfigError) as error:
        config.load({**BASE, "JWT_CLIENT_ID": "gw"})
    assert "go together" in error.value.problems[0]


def test_twistd_options_override_and_fail_with_one_line_per_problem(monkeypatch):
    monkeypatch.setenv("JWT_SECRET", "s" * 32)
    monkeypatch.setenv("HTTP_PORT", "9000")
    options = Options()
    options.parseOptions(["--http-port", "9200", "--max-events-per-second", "5"])
    assert options.config.http_port == 9200
    assert options.config.max_events_per_second == 5
    with pytest.raises(config.InvalidConfiguration) as error:
        Options().parseOptions(["--heartbeat-interval-sec", "500", "--http-port", "x"])
    assert str(error.value).splitlines() == [
        "chatgateway: invalid configuration: HTTP_PORT='x': must be a whole number",
        "chatgateway: invalid configuration: HEARTBEAT_INTERVAL_SEC=500 must be less than CONNECTION_TIMEOUT_SEC=300",
    ]
    assert error.value.code == str(error.value)  # SystemExit with a message: printed, exit status 1


def test_dev_mode_fills_only_what_is_unset(monkeypatch):
    for name in ("JWT_SECRET", "HTTP_PORT", "OAUTH2_ISSUER", "CACHE_URI"):
        monkeypatch.delenv(name, raising=False)
    options = Options()
    options.parseOptions(["--dev"])
    assert options.config.http_port == 8080
    assert len(options.config.jwt_secret) >= 32
    assert options.config.oauth2_issuer == "chatgateway-dev"
    options = Options()
    options.parseOptions(["--dev", "--http-port", "8181"])
    assert options.config.http_port == 8181


def test_workers_default_and_refusals(monkeypatch):
    monkeypatch.setenv("JWT_SECRET", "s" * 32)
    monkeypatch.delenv("CACHE_URI", raising=False)
    options = Options()
    options.parseOptions([])
    assert options.workers == 1  # embedded: one process
    with pytest.raises(config.InvalidConfiguration, match="needs the store and the bus on Redis"):
        Options().parseOptions(["--workers", "2"])
    monkeypatch.setenv("CACHE_URI", "redis://127.0.0.1:6390/0")
    options = Options()
    options.parseOptions(["--http-port", "9300"])
    import os

    assert options.workers == (os.cpu_count() or 1)
    options = Options()
    options.parseOptions(["--workers", "3", "--http-port", "9300", "--gateway-id", "gw"])
    assert options.workers == 3
    assert options.worker_args() == ["--http-port", "9300", "--gateway-id", "gw"]
    worker = Options()
    worker.parseOptions(["--worker-index", "2", "--gateway-id", "gw"])
    assert worker.workers == 1 and worker.config.gateway_id == "gw-w2"
    with pytest.raises(config.InvalidConfiguration, match="fixed HTTP_PORT"):
        Options().parseOptions(["--workers", "2", "--http-port", "0"])


@pytest.mark.parametrize(
    "cache, events, in_memory",
    [
        ("memory://", "redis://127.0.0.1:6390/0", "CACHE_URI is memory://"),
        ("redis://127.0.0.1:6390/0", "memory://", "EVENTS_URI is memory://"),
        ("memory://", "", "CACHE_URI and EVENTS_URI are memory://"),
    ],
)
def test_workers_need_both_the_store_and_the_bus_on_redis(monkeypatch, cache, events, in_memory):
    # One in-memory half is enough to break N > 1: each worker would have a store (or a bus)
    # of its own, and MAX_CONNECTIONS_PER_DEVICE (or delivery) would no longer hold.
    monkeypatch.setenv("JWT_SECRET", "s" * 32)
    monkeypatch.setenv("CACHE_URI", cache)
    monkeypatch.setenv("EVENTS_URI", events)
    options = Options()
    options.parseOptions(["--http-port", "9300"])
    assert options.workers == 1  # the default: one process unless both are Redis
    with pytest.raises(config.InvalidConfiguration) as error:
        Options().parseOptions(["--workers", "2", "--http-port", "9300"])
    assert str(error.value).splitlines() == [
        f"chatgateway: invalid configuration: --workers 2 needs the store and the bus on Redis: {in_memory}, "
        "which cannot span processes (use --workers 1)"
    ]


def test_workers_refused_with_dev(monkeypatch):
    monkeypatch.setenv("JWT_SECRET", "s" * 32)
    monkeypatch.setenv("CACHE_URI", "redis://127.0.0.1:6390/0")
    options = Options()
    options.parseOptions(["--dev"])
    assert options.workers == 1
    with pytest.raises(config.InvalidConfiguration, match="--workers 2 cannot run with --dev: the reference core"):
        Options().parseOptions(["--dev", "--workers", "2"])
