"""LOG_FORMAT=json lines, LOG_LEVEL filtering, and the redaction of tokens and secrets."""

import io
import json
import logging

import pytest
import txaio
from twisted.logger import FileLogObserver, Logger, LogPublisher, formatEventAsClassicLogText
from twisted.python.failure import Failure

from chatgateway.auth.devtokens import mint_token
from chatgateway.telemetry.logs import LogLevelService, Redactor, StdlibBridge, json_line

SECRET = "hs256-secret-for-the-log-tests-0123456789"


@pytest.fixture(autouse=True)
def txaio_level():
    txaio.use_twisted()
    yield
    txaio.set_global_log_level("info")
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, StdlibBridge)]:
        root.removeHandler(handler)


def test_redactor_removes_tokens_in_every_form_and_the_secrets():
    token = mint_token(SECRET, "alice", device_id="phone", audience="aud")
    redact = Redactor([SECRET, "client-secret-value", "short"])
    lines = [
        f"GET /ws?access_token={token}&device_id=x",
        f"Authorization: Bearer {token}",
        "authorization: bearer opaque-credential-123",
        "Basic dXNlcjpwYXNzd29yZA==",
        f'{{"authToken": "{token}", "deviceId": "phone"}}',
        f'{{"message": "frame {{\\"auth_token\\": \\"{token}\\"}}"}}',
        f"the secret is {SECRET} and client_secret=client-secret-value",
        f"just the token {token}",
        "resume_token=abcdef0123&x=1",
    ]
    for line in lines:
        out = redact(line)
        assert token not in out and token.split(".")[2] not in out, out
        assert SECRET not in out and "client-secret-value" not in out and "opaque-credential-123" not in out
        assert "dXNlcjpwYXNzd29yZA" not in out and "abcdef0123" not in out
        assert "REDACTED" in out
    assert redact("a short text with short words") == "a short text with short words"  # short secrets are not searched
    assert redact("device_id=x room=42") == "device_id=x room=42"


def test_json_line_has_time_level_namespace_message_and_fields():
    events = []
    log = Logger(namespace="chatgateway.test", observer=events.append)
    log.warn("device {profile_id}/{device_id} did {what}", profile_id="alice", device_id="phone", what={"a"}, count=3)
    record = json.loads(json_line(events[0]))
    assert record["level"] == "warning"
    assert record["namespace"] == "chatgateway.test"
    assert record["message"] == "device alice/phone did {'a'}"
    assert record["profile_id"] == "alice" and record["count"] == 3 and record["what"] == ["a"]
    assert record["time"].endswith("Z")
    assert not any(key.startswith("log_") for key in record)

    try:
        1 / 0  # noqa: B018 - raises on purpose: a real traceback for log.failure
    except ZeroDivisionError:
        log.failure("it broke", Failure())
    record = json.loads(json_line(events[1]))
    assert record["level"] == "error" or record["level"] == "critical"
    assert "ZeroDivisionError" in record["traceback"]


def _service(level, fmt, secrets=()):
    publisher = LogPublisher()
    out = io.StringIO()
    publisher.addObserver(FileLogObserver(out, formatEventAsClassicLogText))
    LogLevelService(level, fmt, secrets, publisher=publisher).startService()
    return Logger(namespace="chatgateway.test", observer=publisher), out


def test_json_format_and_level_apply_to_the_existing_file_observer():
    token = mint_token(SECRET, "alice")
    log, out = _service("info", "json", [SECRET])
    log.debug("not shown {token}", token=token)
    log.info("connected with {token}", token=token, rooms=2)
    lines = out.getvalue().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert record["message"] == "connected with REDACTED"
    assert record["token"] == "REDACTED" and record["rooms"] == 2
    assert token not in out.getvalue()


def test_python_logging_records_arrive_formatted_and_redacted():
    log, out = _service("info", "json", [SECRET])
    logging.getLogger("opentelemetry.exporter.test").warning("export to %s failed with %s", "collector", SECRET)
    record = json.loads(out.getvalue().splitlines()[-1])
    assert record["namespace"] == "opentelemetry.exporter.test"
    assert record["level"] == "warning"
    assert record["message"] == "export to collector failed with REDACTED"


def test_text_format_is_redacted_too():
    log, out = _service("debug", "text", [SECRET])
    log.debug("secret {s} header Bearer abc.def", s=SECRET)
    text = out.getvalue()
    assert "[chatgateway.test#debug] secret REDACTED header Bearer REDACTED" in text
    assert SECRET not in text


def test_twistd_logger_option_gives_json_from_the_first_line(monkeypatch):
    from chatgateway.telemetry.logs import observer

    monkeypatch.setenv("LOG_FORMAT", "json")
    monkeypatch.setenv("JWT_SECRET", SECRET)
    made = observer()
    events = []
    Logger(namespace="twisted.scripts", observer=events.append).info("starting with {s}", s=SECRET)
    record = json.loads(made.formatEvent(events[0]))
    assert record["message"] == "starting with REDACTED"
