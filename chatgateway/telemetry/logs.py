"""LOG_LEVEL and LOG_FORMAT for a twistd process, and the redaction of secrets in every line.

twistd starts its log observer after makeService, so both are applied by a
service when the tree starts: the file observer twistd made (stdout, or
--logfile) gets our line format, then every observer in place is wrapped in a
level filter, and txaio (Autobahn's logging) gets the same level. twistd's own
first two lines (its version and the reactor) are written before that, in its
text format; ``twistd --logger chatgateway.telemetry.logs.observer`` makes even those
follow LOG_FORMAT.

Whatever the format, every line goes through ``redact`` on its way out: JWTs,
``Bearer`` credentials, ``access_token=``-style parameters, token fields of JSON
frames and the configured secrets (JWT_SECRET, JWT_CLIENT_SECRET, RESUME_TOKEN_SECRET) are replaced
with ``REDACTED``. Code should not log them in the first place; this is the net
under it.

LOG_FORMAT=json writes one JSON object per line::

    {"time": "2026-11-27T08:00:00.123456Z", "level": "info", "namespace": "chatgateway.sessions.gateway.Gateway",
     "message": "device alice/phone connected with 3 rooms", "profile_id": "alice", "device_id": "phone", "rooms": 3}

``message`` is the formatted event; the event's own fields follow (values JSON
cannot hold are written as text); a logged failure adds ``traceback``.
"""

import datetime
import json
import logging
import os
import re
import sys

import txaio
from twisted.application import service
from twisted.logger import (
    FileLogObserver,
    FilteringLogObserver,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
    formatEventAsClassicLogText,
    globalLogPublisher,
)

_TXAIO_NAMES = {"debug": "debug", "info": "info", "warning": "warn", "error": "error"}
_LEVEL_NAMES = {"warn": "warning", "critical": "error"}
# Keys of legacy twisted.python.log events (and our own) not repeated as fields.
_NOT_FIELDS = frozenset({"message", "format", "isError", "system", "why", "failure", "time", "log_legacy"})
MAX_FIELD_CHARS = 2000
REDACTED = "REDACTED"
# Secrets shorter than this are not searched for (they would garble ordinary text).
MIN_SECRET_CHARS = 6

_PATTERNS = (
    # A JWT (JWS compact serialization): header.payload.signature, base64url.
    (re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*"), REDACTED),
    # An HTTP credential, whatever its form.
    (re.compile(r"\b(Bearer|Basic)\s+[^\s\"',;\\]+", re.IGNORECASE), r"\1 " + REDACTED),
    # key=value in URLs, forms and text.
    (
        re.compile(r"\b(\w*(?:token|secret|password)=)[^&\s\"',;\\]+", re.IGNORECASE),
        r"\1" + REDACTED,
    ),
    # "key": "value" in JSON (frames, bodies), with or without escaped quotes around.
    (
        re.compile(
            r"((?:\\?\")(?:authToken|auth_token|accessToken|access_token|token|resumeToken|resume_token|"
            r"client_secret|clientSecret|password|secret)(?:\\?\")\s*:\s*\\?\")(?:[^\"\\]|\\[^\"])*",
            re.IGNORECASE,
        ),
        r"\1" + REDACTED,
    ),
)


class Redactor:
    """Replaces credentials and the given secrets in a line of log text."""

    def __init__(self, secrets=()):
        literals = set()
        for secret in secrets:
            if secret and len(secret) >= MIN_SECRET_CHARS:
                literals.add(secret)
                literals.add(json.dumps(secret)[1:-1])  # as it appears inside a JSON string
        # Longest first, so a secret containing another is replaced whole.
        self._literals = sorted(literals, key=len, reverse=True)

    def __call__(self, text):
        if not text:
            return text
        for literal in self._literals:
            text = text.replace(literal, REDACTED)
        for pattern, replacement in _PATTERNS:
            text = pattern.sub(replacement, text)
        return text


def _jsonable(value):
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, str):
        return value[:MAX_FIELD_CHARS]
    if isinstance(value, (list, tuple, set, frozenset)) and len(value) <= 100:
        items = [_jsonable(v) for v in value]
        return sorted(items, key=str) if isinstance(value, (set, frozenset)) else items
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return str(value)[:MAX_FIELD_CHARS]


def json_line(event):
    """One log event as a line of JSON (LOG_FORMAT=json)."""
    level = event.get("log_level")
    level_name = level.name if level is not None else "info"
    when = event.get("log_time")
    record = {
        "time": (
            datetime.datetime.fromtimestamp(when, datetime.UTC)
            .isoformat(timespec="microseconds")
            .replace("+00:00", "Z")
            if when is not None
            else None
        ),
        "level": _LEVEL_NAMES.get(level_name, level_name),
        "namespace": event.get("log_namespace") or event.get("system") or "-",
        "message": formatEvent(event),
    }
    failure = event.get("log_failure") or event.get("failure")
    if failure is not None:
        try:
            record["traceback"] = failure.getTraceback()
        except Exception:  # noqa: BLE001 - a failure that cannot render itself still leaves a line
            record["traceback"] = repr(failure)
    for key, value in event.items():
        if key.startswith(("log_", "_")) or key in _NOT_FIELDS or key in record:
            continue
        record[key] = _jsonable(value)
    return json.dumps(record, ensure_ascii=False, separators=(", ", ": ")) + "\n"


def text_line(event):
    """twistd's own text line (time [namespace] message)."""
    return formatEventAsClassicLogText(event)


def formatter(fmt="text", secrets=(), base=None):
    """The line formatter for LOG_FORMAT ``fmt``: ``base`` (or ours) with every line redacted."""
    redact = Redactor(secrets)
    if fmt == "json":
        base = json_line
    elif base is None:
        base = text_line

    def format_event(event):
        return redact(base(event))

    format_event.redacting = True
    return format_event


def observer():
    """For ``twistd --logger chatgateway.telemetry.logs.observer``: stdout in LOG_FORMAT from the first line."""
    environ = os.environ
    fmt = "json" if environ.get("LOG_FORMAT", "").strip().lower() == "json" else "text"
    secrets = (
        environ.get("JWT_SECRET", ""),
        environ.get("JWT_CLIENT_SECRET", ""),
        environ.get("RESUME_TOKEN_SECRET", ""),
    )
    return FileLogObserver(sys.stdout, formatter(fmt, secrets))


class StdlibBridge(logging.Handler):
    """Python ``logging`` records (OpenTelemetry's exporters, grpc) into twisted.logger, so they
    get the same format, level and redaction. The root logger keeps its level (WARNING)."""

    _LEVELS = {
        logging.DEBUG: LogLevel.debug,
        logging.INFO: LogLevel.info,
        logging.WARNING: LogLevel.warn,
        logging.ERROR: LogLevel.error,
        logging.CRITICAL: LogLevel.critical,
    }

    def __init__(self, publisher):
        super().__init__()
        self._publisher = publisher
        self.setFormatter(logging.Formatter("%(message)s"))

    def emit(self, record):
        try:
            level = self._LEVELS.get(
                record.levelno, LogLevel.error if record.levelno > logging.ERROR else LogLevel.info
            )
            Logger(namespace=record.name, observer=self._publisher).emit(level, "{text}", text=self.format(record))
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


class LogLevelService(service.Service):
    def __init__(self, level, fmt="text", secrets=(), publisher=None):
        self.setName("log-level")
        self.level = level
        self.fmt = fmt
        self.secrets = tuple(secrets)
        self._publisher = publisher if publisher is not None else globalLogPublisher

    def startService(self):
        super().startService()
        txaio.set_global_log_level(_TXAIO_NAMES[self.level])
        predicate = LogLevelFilterPredicate(
            defaultLogLevel=LogLevel.levelWithName(self.level.replace("warning", "warn"))
        )
        for observer in list(self._publisher._observers):
            if isinstance(observer, FileLogObserver):
                base = observer.formatEvent
                if getattr(base, "redacting", False):
                    base = None  # already ours (--logger chatgateway.telemetry.logs.observer)
                observer.formatEvent = formatter(self.fmt, self.secrets, base)
            wrapped = FilteringLogObserver(observer, [predicate])
            self._publisher.removeObserver(observer)
            self._publisher.addObserver(wrapped)
        root = logging.getLogger()
        if not any(isinstance(h, StdlibBridge) for h in root.handlers):
            root.addHandler(StdlibBridge(self._publisher))

    # The filter stays through shutdown: unwrapping on stop would let the
    # debug events of the closing connections through.
