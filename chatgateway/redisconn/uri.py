"""Where Redis is: CACHE_URI / EVENTS_URI parsed into a RedisAddress (or a ClusterAddress).

redis://[[user]:password@]host[:port][/db]      (port 6379, db 0 by default)
rediss://...                                    the same over TLS (chatgateway.redisconn.tls)
unix:///path/to/redis.sock[?db=N][&password=P]
redis+cluster://[[user]:password@]host:port[,host:port...]   a Redis Cluster: the nodes to
rediss+cluster://...                            start from (any, primaries or replicas); db 0 only
"""

import dataclasses
from urllib.parse import parse_qs, unquote, urlsplit

from twisted.internet.endpoints import HostnameEndpoint, UNIXClientEndpoint, wrapClientTLS

from chatgateway.redisconn.tls import TLSSettings

CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
SCHEMES = ("redis", "rediss", "unix", *CLUSTER_SCHEMES)


@dataclasses.dataclass(frozen=True)
class RedisAddress:
    host: str | None = None
    port: int | None = None
    path: str | None = None  # unix socket
    db: int = 0
    username: str | None = None
    password: str | None = dataclasses.field(default=None, repr=False)
    tls: TLSSettings | None = None  # None: plain TCP

    def __str__(self):
        """For logs: never shows the password."""
        scheme = "rediss" if self.tls is not None else "redis"
        where = f"unix://{self.path}" if self.path else f"{scheme}://{self.host}:{self.port}"
        return f"{where}/{self.db}"

    def endpoint(self, reactor, timeout):
        if self.path:
            return UNIXClientEndpoint(reactor, self.path, timeout=timeout)
        tcp = HostnameEndpoint(reactor, self.host, self.port, timeout=timeout)
        if self.tls is None:
            return tcp
        return wrapClientTLS(self.tls.client_options(self.host), tcp)

    def at(self, host, port):
        """The same credentials and TLS, another node (a cluster's)."""
        return dataclasses.replace(self, host=host, port=port)


@dataclasses.dataclass(frozen=True)
class ClusterAddress:
    """A Redis Cluster: the seed nodes, and what every node connection shares."""

    seeds: tuple[RedisAddress, ...]

    def __str__(self):
        scheme = "rediss+cluster" if self.seeds[0].tls is not None else "redis+cluster"
        return f"{scheme}://" + ",".join(f"{s.host}:{s.port}" for s in self.seeds)

    @property
    def template(self):
        return self.seeds[0]


def store_uri(text):
    """CACHE_URI / EVENTS_URI as a setting: memory:// or a Redis URI parse_uri accepts;
    ValueError (a short reason) otherwise."""
    text = text.strip()
    if text in ("", "memory://"):
        return "memory://"
    if urlsplit(text).scheme not in SCHEMES:
        raise ValueError(
            f"unknown scheme {urlsplit(text).scheme!r}: use memory://, redis://host:port/db, "
            "rediss://host:port/db, unix:///path or redis+cluster://host:port,host:port"
        )
    try:
        parse_uri(text)
    except ValueError as e:
        # parse_uri names the URI itself; the caller's line already does.
        raise ValueError(str(e).split(": ", 1)[-1]) from None
    return text


def is_cluster(uri):
    return urlsplit(uri.strip()).scheme in CLUSTER_SCHEMES


def parse_uri(uri, tls=None):
    """The RedisAddress (ClusterAddress for a cluster) of a Redis URI; ValueError (one clear line)
    otherwise. ``tls``: the TLSSettings of rediss:// (default: verify with the platform's CAs)."""
    parts = urlsplit(uri.strip())
    query = parse_qs(parts.query)
    if parts.scheme not in SCHEMES:
        raise ValueError(
            f"{uri!r}: not a Redis URI; use redis://host:port/db, rediss://host:port/db, unix:///path?db=N "
            "or redis+cluster://host:port,host:port"
        )
    secure = parts.scheme.startswith("rediss")
    tls = (tls or TLSSettings()) if secure else None
    password = unquote(parts.password) if parts.password else None
    password = query.get("password", [password])[0]
    username = unquote(parts.username) if parts.username else None
    try:
        if parts.scheme in CLUSTER_SCHEMES:
            return _cluster(parts, username, password, tls)
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
                host=parts.hostname,
                port=parts.port or 6379,
                db=int(db_text),
                username=username,
                password=password,
                tls=tls,
            )
    except ValueError as e:
        raise ValueError(f"{uri!r}: {e}") from None
    if address.db < 0:
        raise ValueError(f"{uri!r}: the database number must be 0 or more")
    return address


def _cluster(parts, username, password, tls):
    hosts = parts.netloc.rpartition("@")[2]
    if parts.path.strip("/") not in ("", "0"):
        raise ValueError("a Redis Cluster has only database 0")
    seeds = []
    for item in hosts.split(","):
        host, sep, port = item.strip().rpartition(":")
        host = host.strip("[]")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{item!r}: each node must be host:port, e.g. redis+cluster://10.0.0.1:7000,10.0.0.2:7000")
        seeds.append(RedisAddress(host=host, port=int(port), username=username, password=password, tls=tls))
    return ClusterAddress(tuple(seeds))
