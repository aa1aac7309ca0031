"""How a setting's text becomes its value: each parser returns the value, or raises
ValueError with a short reason that chatgateway.config puts in its one line per problem."""

from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

# A setting's parser: its text to its value; ValueError (a short reason) when invalid.
Parser = Callable[[str], Any]


def _at_least(convert: Callable[[str], float], kind: str, minimum: float) -> Parser:
    """A parser of finite numbers of one kind, no smaller than minimum."""

    def parse(text: str) -> float:
        try:
            value = convert(text)
        except ValueError:
            raise ValueError(f"must be {kind}") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError("must be a finite number")
        if value < minimum:
            raise ValueError(f"must be at least {minimum}")
        return value

    return parse


def _int(minimum: int) -> Parser:
    return _at_least(int, "a whole number", minimum)


def _number(minimum: float) -> Parser:
    return _at_least(float, "a number", minimum)


def _or_derived(parse: Parser) -> Parser:
    """``parse``, or None for an empty value (load() derives it from another setting)."""

    def parse_or_none(text: str) -> Any:
        return parse(text) if text.strip() else None

    return parse_or_none


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("must be true or false")


def _text(text: str) -> str:
    return text.strip()


def _host_port(text: str) -> str:
    """host:port, as grpcio takes it (``dns:///`` prefixes are passed through)."""
    text = text.strip()
    target = text.split("///", 1)[-1]
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("must be host:port, e.g. 127.0.0.1:7010")
    return text


def _store_uri(text: str) -> str:
    from chatgateway.redisconn.uri import store_uri

    return store_uri(text)


def _http_url(text: str) -> str:
    text = text.strip()
    if not text:
        return ""
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError("must be an http:// or https:// URL")
    return text


def _log_level(text: str) -> str:
    level = text.strip().lower()
    if level == "warn":
        level = "warning"
    if level not in ("debug", "info", "warning", "error"):
        raise ValueError("must be one of debug, info, warning, error")
    return level


def _log_format(text: str) -> str:
    fmt = text.strip().lower()
    if fmt not in ("text", "json"):
        raise ValueError("must be text or json")
    return fmt


def _origins(text: str) -> tuple[str, ...]:
    return tuple(o.strip() for o in text.split(",") if o.strip())
