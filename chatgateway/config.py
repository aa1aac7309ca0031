"""Gateway configuration: environment variables, overridden by twistd options.

Every setting is declared once in SETTINGS (name, parser, default, help); the
README's configuration table is checked against it. ``load`` collects every
problem before failing, so an operator sees all of them in one run.
"""

import collections
import dataclasses
import math
import os
import socket
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from chatgateway.configvalues import (
    Parser,
    _bool,
    _host_port,
    _http_url,
    _int,
    _log_format,
    _log_level,
    _number,
    _or_derived,
    _origins,
    _store_uri,
    _text,
)


class ConfigError(Exception):
    """Invalid configuration; ``problems`` holds one line per problem."""

    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = list(problems)


class InvalidConfiguration(SystemExit):
    """Raised by a twistd plugin's options: the process exits 1, printing one line per problem.

    Not a usage.UsageError, which twistd prints after its whole ``--help``: the
    problems would be lost at the end of a page of options.
    """

    def __init__(self, problems: Iterable[str], program: str = "chatgateway") -> None:
        self.problems = list(problems)
        super().__init__("\n".join(f"{program}: invalid configuration: {p}" for p in self.problems))


@dataclasses.dataclass(frozen=True)
class Setting:
    name: str
    parse: Parser
    default: str
    help: str

    @property
    def field(self) -> str:
        return self.name.lower()


SETTINGS = [
    Setting("CHAT_SERVICE_URI", _host_port, "127.0.0.1:7010", "host:port of the core chat service (gRPC)."),
    Setting(
        "MAX_CONNECTIONS_PER_DEVICE",
        _int(1),
        "1",
        "Connections one device may hold; a newer one closes the oldest with 4001.",
    ),
    Setting("CONNECTION_TIMEOUT_SEC", _number(1), "300", "No frame from a device for this long closes it with 4408."),
    Setting("HEARTBEAT_INTERVAL_SEC", _number(0.1), "30", "Interval of WebSocket pings (and metadata refresh)."),
    Setting(
        "MAX_EVENTS_PER_SECOND",
        _number(0.1),
        "100",
        "Commands per second per connection (token bucket, burst of the same size).",
    ),
    Setting(
        "MAX_FRAMES_PER_SECOND",
        _or_derived(_number(1)),
        "",
        "Frames per second a device may send, of every kind (default: MAX_EVENTS_PER_SECOND + 100); beyond it the device is not read until its budget refills.",
    ),
    Setting(
        "MAX_BYTES_PER_SECOND",
        _int(65536),
        "1048576",
        "Bytes per second a device may send; beyond it the device is not read until its budget refills.",
    ),
    Setting(
        "OVER_BUDGET_CLOSE_SEC",
        _number(1),
        "10",
        "A device over its frame or byte budget again and again for this long is closed with 1008.",
    ),
    Setting(
        "MAX_TOKEN_REFRESHES_PER_MINUTE",
        _int(1),
        "10",
        "auth_token refreshes per minute per connection (burst of the same size); more are refused.",
    ),
    Setting(
        "CACHE_URI",
        _store_uri,
        "memory://",
        "Connection metadata store: memory:// (one instance), redis://host:port/db, rediss:// (TLS), unix:///path, or redis+cluster://host:port,host:port (rediss+cluster:// with TLS).",
    ),
    Setting("EVENTS_URI", _store_uri, "", "Event bus; defaults to CACHE_URI."),
    Setting(
        "REDIS_TLS_CA_FILE", _text, "", "rediss://: PEM file of the CAs of Redis's certificate (default: the system's)."
    ),
    Setting("REDIS_TLS_CERT_FILE", _text, "", "rediss://: PEM client certificate, with REDIS_TLS_KEY_FILE."),
    Setting("REDIS_TLS_KEY_FILE", _text, "", "rediss://: PEM private key of REDIS_TLS_CERT_FILE."),
    Setting("REDIS_TLS_VERIFY", _bool, "true", "rediss://: verify Redis's certificate and host name (false: do not)."),
    Setting(
        "OAUTH2_ISSUER",
        _text,
        "",
        "Expected iss claim; its OpenID discovery gives the JWKS unless OAUTH2_JWKS_URI is set.",
    ),
    Setting("OAUTH2_JWT_VERIFY_AUDIENCE", _text, "service_chat_gateway", "Expected aud claim."),
    Setting(
        "OAUTH2_JWKS_URI",
        _http_url,
        "",
        "JWKS URL for RS256/ES256 tokens (default: from the issuer's discovery document).",
    ),
    Setting("OAUTH2_TOKEN_ENDPOINT", _http_url, "", "Token endpoint for the gateway's own client-credentials token."),
    Setting("JWT_CLIENT_ID", _text, "", "The gateway's OAuth2 client id."),
    Setting("JWT_CLIENT_SECRET", _text, "", "The gateway's OAuth2 client secret."),
    Setting("JWT_SECRET", _text, "", "HS256 secret (development); enables HS256 tokens."),
    Setting(
        "JWT_LEEWAY_SEC",
        _number(0),
        "30",
        "Clock skew allowed on exp/nbf/iat; a session is closed at its token's exp plus this.",
    ),
    Setting(
        "JWKS_REFETCH_COOLDOWN_SEC",
        _number(0),
        "60",
        "An unknown kid refetches the JWKS at most once per this many seconds.",
    ),
    Setting("HTTP_PORT", _int(0), "80", "WebSocket (/ws), /healthz, /readyz."),
    Setting("HTTP_INTERFACE", _text, "", "Address the HTTP port binds (default: all)."),
    Setting("GRPC_PORT", _int(0), "50051", "gRPC port: chat.v1.ChatService, grpc.health.v1 and server reflection."),
    Setting("GRPC_INTERFACE", _text, "", "Address the gRPC port binds (default: HTTP_INTERFACE)."),
    Setting("GATEWAY_ID", _text, "", "This instance's id (default: gateway-<host>-<random>)."),
    Setting(
        "AUTH_TIMEOUT_SEC", _number(0.1), "10", "Time for a device to authenticate in its first frame (else 4401)."
    ),
    Setting(
        "HANDSHAKE_TIMEOUT_SEC",
        _number(0.1),
        "10",
        "Time for a connection to send request headers (first, or after a response), and again to complete a WebSocket upgrade.",
    ),
    Setting(
        "CLOSE_TIMEOUT_SEC",
        _number(0.1),
        "5",
        "Time a closing WebSocket waits for the device's close frame before dropping the connection.",
    ),
    Setting("MAX_MESSAGE_BYTES", _int(256), "65536", "Largest frame/message a device may send (else 1009)."),
    Setting(
        "SEND_BUFFER_BYTES",
        _int(1024),
        "1048576",
        "Outbound bytes buffered per connection before it is a slow consumer.",
    ),
    Setting(
        "BEHIND_DRAIN_SEC",
        _number(0),
        "30",
        "Longest a device whose outbox is full (behind) may take to drain before it is closed 4429.",
    ),
    Setting(
        "MAX_CONNECTIONS",
        _int(1),
        "10000",
        "WebSocket connections per process; beyond it /ws answers 503 and /readyz reports full.",
    ),
    Setting(
        "MAX_UNAUTHENTICATED_PER_ADDRESS",
        _int(0),
        "64",
        "Connections of one client address not yet authenticated (0: no cap); beyond it 429.",
    ),
    Setting(
        "MAX_CONNECTS_PER_SECOND",
        _number(0),
        "1000",
        "New connections per second per process (0: no limit); beyond it /ws answers 503 with a jittered Retry-After, before any token is verified.",
    ),
    Setting(
        "CONNECT_BURST",
        _or_derived(_int(1)),
        "",
        "New connections let in at once above MAX_CONNECTS_PER_SECOND (default: one second's worth).",
    ),
    Setting("ALLOWED_ORIGINS", _origins, "", "Comma-separated browser origins allowed (empty: any)."),
    Setting(
        "CORE_TIMEOUT_SEC",
        _number(0.01),
        "5",
        "Deadline of each call to the core, from when the device's request arrived.",
    ),
    Setting("CORE_THREADS", _int(1), "16", "Threads for blocking calls to the core (bounded pool)."),
    Setting(
        "CORE_BREAKER_FAILURES",
        _int(1),
        "5",
        "Consecutive UNAVAILABLE/DEADLINE_EXCEEDED answers that open the circuit to the core.",
    ),
    Setting(
        "CORE_BREAKER_COOLDOWN_SEC",
        _number(0.1),
        "10",
        "Time an open circuit fails calls at once before one probe goes through.",
    ),
    Setting(
        "MEMBERSHIP_CACHE_TTL_SEC",
        _number(0),
        "600",
        "A profile's rooms are cached this long after the core listed them, kept current by membership changes published on the bus; a connect of a cached profile asks the core nothing (0: always ask).",
    ),
    Setting(
        "ROOM_STREAM_MAX_LEN",
        _int(1),
        "1000",
        "Events kept per room in its stream on the events Redis (about: trimmed in whole nodes), to fill gaps of pub/sub.",
    ),
    Setting(
        "ROOM_STREAM_MAX_AGE_SEC",
        _number(1),
        "86400",
        "Longest an event is kept in its room's stream; an idle room's stream expires after it.",
    ),
    Setting(
        "RESUME_TOKEN_SECRET",
        _text,
        "",
        "Key of the resume tokens in connected, shared by every gateway (default: derived from JWT_SECRET, else random per gateway).",
    ),
    Setting(
        "RESUME_POSITIONS_TTL_SEC",
        _number(1),
        "86400",
        "How long a device's last positions are kept server-side after their last write, and how long a resume token is valid.",
    ),
    Setting("PROFILE_EVENTS_PER_SECOND", _number(0), "0", "Commands/s of one profile, all gateways (0: off)."),
    Setting("PROFILE_EVENTS_BURST", _or_derived(_int(1)), "", "Burst of PROFILE_EVENTS_PER_SECOND."),
    Setting("ROOM_EVENTS_PER_SECOND", _number(0), "0", "Events/s sent into one room, all gateways (0: off)."),
    Setting("ROOM_EVENTS_BURST", _or_derived(_int(1)), "", "Burst of ROOM_EVENTS_PER_SECOND."),
    Setting("PRESENCE_GRACE_SEC", _number(0), "10", "A profile stays online this long after its last device left."),
    Setting("PRESENCE_MAX_ROOM_SIZE", _int(0), "500", "Rooms with more devices get no presenceEvents."),
    Setting("DRAIN_TIMEOUT_SEC", _number(0), "30", "Longest a graceful stop may take."),
    Setting(
        "PUBLISH_FORWARDED_EVENTS", _bool, "false", "Publish forwarded events to the bus (for a core that does not)."
    ),
    Setting(
        "CONSOLE_ENABLED",
        _bool,
        "false",
        "Serve the web console (/console/); its status needs an admin token. On with --dev.",
    ),
    Setting("CORE_DB", _text, "", "Reference core: SQLite file (default: in memory)."),
    Setting("CORE_PORT", _int(0), "7010", "Reference core: gRPC port of twistd chatcore."),
    Setting("LOG_LEVEL", _log_level, "info", "debug, info, warning or error."),
    Setting("LOG_FORMAT", _log_format, "text", "text (twistd's lines) or json (one JSON object per line)."),
]

_BY_NAME = {s.name: s for s in SETTINGS}


@dataclasses.dataclass(frozen=True)
class Config:
    chat_service_uri: str
    max_connections_per_device: int
    connection_timeout_sec: float
    heartbeat_interval_sec: float
    max_events_per_second: float
    max_frames_per_second: float
    max_bytes_per_second: int
    over_budget_close_sec: float
    max_token_refreshes_per_minute: int
    cache_uri: str
    events_uri: str
    redis_tls_ca_file: str
    redis_tls_cert_file: str
    redis_tls_key_file: str
    redis_tls_verify: bool
    oauth2_issuer: str
    oauth2_jwt_verify_audience: str
    oauth2_jwks_uri: str
    oauth2_token_endpoint: str
    jwt_client_id: str
    jwt_client_secret: str
    jwt_secret: str
    jwt_leeway_sec: float
    jwks_refetch_cooldown_sec: float
    http_port: int
    http_interface: str
    grpc_port: int
    grpc_interface: str
    gateway_id: str
    auth_timeout_sec: float
    handshake_timeout_sec: float
    close_timeout_sec: float
    max_message_bytes: int
    send_buffer_bytes: int
    behind_drain_sec: float
    max_connections: int
    max_unauthenticated_per_address: int
    max_connects_per_second: float
    connect_burst: int
    allowed_origins: tuple[str, ...]
    core_timeout_sec: float
    core_threads: int
    core_breaker_failures: int
    core_breaker_cooldown_sec: float
    membership_cache_ttl_sec: float
    room_stream_max_len: int
    room_stream_max_age_sec: float
    resume_token_secret: str
    resume_positions_ttl_sec: float
    profile_events_per_second: float
    profile_events_burst: int
    room_events_per_second: float
    room_events_burst: int
    presence_grace_sec: float
    presence_max_room_size: int
    drain_timeout_sec: float
    publish_forwarded_events: bool
    console_enabled: bool
    core_db: str
    core_port: int
    log_level: str
    log_format: str

    @property
    def in_memory(self) -> list[str]:
        """The names of the settings (CACHE_URI, EVENTS_URI) that keep their data in this process."""
        return [
            name for name, uri in (("CACHE_URI", self.cache_uri), ("EVENTS_URI", self.events_uri)) if uri == "memory://"
        ]

    def replace(self, **changes: Any) -> "Config":
        return dataclasses.replace(self, **changes)


def load(environ: Mapping[str, str] | None = None, overrides: Mapping[str, object] | None = None) -> Config:
    """Build a Config from ``environ`` (default os.environ) and ``overrides``.

    ``overrides`` maps setting names (either case) to text, as twistd options
    give them; None values are ignored. Raises ConfigError listing every problem.
    """
    environ = os.environ if environ is None else environ
    raw = {s.name: environ.get(s.name, s.default) for s in SETTINGS}
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        name = key.upper().replace("-", "_")
        if name not in _BY_NAME:
            raise ConfigError([f"{key}: unknown setting"])
        raw[name] = str(value)

    problems: list[str] = []
    values: dict[str, Any] = {}
    for setting in SETTINGS:
        text = raw[setting.name]
        try:
            values[setting.field] = setting.parse(text)
        except ValueError as e:
            problems.append(f"{setting.name}={text!r}: {e}")

    problems.extend(_cross_checks(values))
    if problems:
        raise ConfigError(problems)

    if not raw["EVENTS_URI"].strip():
        values["events_uri"] = values["cache_uri"]
    if values["max_frames_per_second"] is None:
        # Every command is a frame; the rest is room for acks, pings and token refreshes.
        values["max_frames_per_second"] = values["max_events_per_second"] + 100
    for kind in ("profile", "room"):
        if values[f"{kind}_events_burst"] is None:
            values[f"{kind}_events_burst"] = max(1, math.ceil(values[f"{kind}_events_per_second"]))
    if values["connect_burst"] is None:
        values["connect_burst"] = max(1, math.ceil(values["max_connects_per_second"]))
    if not values["grpc_interface"]:
        values["grpc_interface"] = values["http_interface"]
    if not values["gateway_id"]:
        values["gateway_id"] = f"gateway-{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
    return Config(**values)


def _cross_checks(given: Mapping[str, Any]) -> Iterator[str]:
    """Checks between settings; a setting that did not parse is left out."""
    values = collections.defaultdict(lambda: None, given)
    heartbeat, timeout = values["heartbeat_interval_sec"], values["connection_timeout_sec"]
    if heartbeat is not None and timeout is not None and heartbeat >= timeout:
        yield (
            f"HEARTBEAT_INTERVAL_SEC={values['heartbeat_interval_sec']:g} must be less than "
            f"CONNECTION_TIMEOUT_SEC={values['connection_timeout_sec']:g}"
        )
    max_bytes, max_message = values["max_bytes_per_second"], values["max_message_bytes"]
    if max_bytes is not None and max_message is not None and max_bytes < max_message:
        yield f"MAX_BYTES_PER_SECOND={max_bytes} must be at least MAX_MESSAGE_BYTES={max_message}"
    for name in ("HTTP_PORT", "GRPC_PORT", "CORE_PORT"):
        if values[name.lower()] is not None and values[name.lower()] > 65535:
            yield f"{name}={values[name.lower()]}: must be a port number (0-65535)"
    if not (values["jwt_secret"] or values["oauth2_issuer"] or values["oauth2_jwks_uri"]):
        yield "no way to verify tokens: set JWT_SECRET (HS256) or OAUTH2_ISSUER / OAUTH2_JWKS_URI (RS256/ES256)"
    if values["oauth2_issuer"] and not values["oauth2_jwks_uri"] and not values["jwt_secret"]:
        try:
            _http_url(values["oauth2_issuer"])
        except ValueError:
            yield (
                f"OAUTH2_ISSUER={values['oauth2_issuer']!r}: discovery needs an http(s) URL; "
                "set OAUTH2_JWKS_URI or JWT_SECRET"
            )
    yield from _tls_checks(values)
    client = [values["oauth2_token_endpoint"] or "", values["jwt_client_id"], values["jwt_client_secret"]]
    if any(client) and not all(client):
        yield "OAUTH2_TOKEN_ENDPOINT, JWT_CLIENT_ID and JWT_CLIENT_SECRET go together: set all three or none"


def _tls_checks(values: Mapping[str, Any]) -> Iterator[str]:
    """With a rediss:// URI, the TLS files must be readable and parse now, not at the first connect."""
    from chatgateway.redisconn.tls import config_problems

    yield from config_problems(values)
