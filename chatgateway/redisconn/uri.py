"""Where Redis is: CACHE_URI / EVENTS_URI parsed into a RedisAddress.

redis://[[user]:password@]host[:port][/db]      (port 6379, db 0 by default)
unix:///path/to/redis.sock[?db=N][&password=P]
rediss://...                                    refused: TLS is not supported yet
"""

import dataclasses
from urllib.parse import parse_qs, unquote, urlsplit

from twisted.internet.endpoints import HostnameEndpoint, UNIXClientEndpoint


@dataclasses.dataclass(frozen=True)
class RedisAddress:
    host: str | None = None
    port: int | None = None
    path: str | None = None  # unix socket
    db: int = 0
    username: str | None = None
    password: str | None = dataclasses.field(default=None, repr=False)

    def __str__(self):
        """For logs: never shows the password."""
        where = f"unix://{self.path}" if self.path else f"redis://{self.host}:{self.port}"
        return f"{where}/{self.db}"

    def endpoint(self, reactor, timeout):
        if self.path:
            return UNIXClientEndpoint(reactor, self.path, timeout=timeout)
        return HostnameEndpoint(reactor, self.host, self.port, timeout=timeout)


def parse_uri(uri):
    """The RedisAddress of a redis:// or unix:// URI; ValueError (one clear line) otherwise."""
    parts = urlsplit(uri.strip())
    query = parse_qs(parts.query)
    if parts.scheme == "rediss":
        raise ValueError(f"{uri!r}: rediss:// (TLS to Redis) is not supported yet; use redis:// or unix://")
    if parts.scheme not in ("redis", "unix"):
        raise ValueError(f"{uri!r}: not a Redis URI; use redis://host:port/db or unix:///path?db=N")
    password = unquote(parts.password) if parts.password else None
    password = query.get("password", [password])[0]
    username = unquote(parts.username) if parts.username else None
    try:
        if parts.scheme == "unix":
            if not parts.path:
                raise ValueError("unix:// must name a socket path, e.g. unix:///run/redis.sock?db=0")
            db = int(query.get("db", ["0"])[0])
            address = RedisAddress(path=parts.path, db=db, username=username, password=password)
        else:
            if not parts.hostname:
                raise ValueError("must name a host, e.g. redis://127.0.0.1:6379/0")
            db_text = parts.path.strip("/") or query.get("db", ["0"])[0]
            address = RedisAddress(
                host=parts.hostname, port=parts.port or 6379, db=int(db_text), username=username, password=password
            )
    except ValueError as e:
        raise ValueError(f"{uri!r}: {e}") from None
    if address.db < 0:
        raise ValueError(f"{uri!r}: the database number must be 0 or more")
    return address
