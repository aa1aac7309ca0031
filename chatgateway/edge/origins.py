"""ALLOWED_ORIGINS: which browser origins may open a WebSocket (cross-site WebSocket hijacking).

Origins are compared normalized (lower case, default port dropped), so
"https://app.example.com" allows "https://app.example.com:443". A pattern
may use "*" for any run of characters, e.g. "https://*.example.com".
An empty list allows every origin; a request without Origin (native
devices) is always allowed; the opaque origin "null" only when listed.
"""

import fnmatch
from urllib.parse import urlsplit

_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


def normalize(origin):
    origin = origin.strip().lower()
    if origin == "null":
        return origin
    try:
        parts = urlsplit(origin)
        port = parts.port
    except ValueError:
        return None
    if not parts.scheme or not parts.hostname:
        return None
    if port is None or port == _DEFAULT_PORTS.get(parts.scheme):
        return f"{parts.scheme}://{parts.hostname}"
    return f"{parts.scheme}://{parts.hostname}:{port}"


class OriginPolicy:
    def __init__(self, allowed):
        self._patterns = [self._canonical(p) for p in allowed]

    @staticmethod
    def _canonical(pattern):
        pattern = pattern.strip().lower()
        if "*" in pattern:
            return pattern
        return normalize(pattern) or pattern

    def allows(self, origin):
        """True when a handshake with this Origin header (None: absent) may proceed."""
        if origin is None or not self._patterns:
            return True
        normalized = normalize(origin)
        if normalized is None:
            return False
        return any(fnmatch.fnmatchcase(normalized, pattern) for pattern in self._patterns)
