"""The issuer's signature keys: its JWKS, fetched, cached and refetched within limits.

The JWKS is OAUTH2_JWKS_URI, or the ``jwks_uri`` of
``{OAUTH2_ISSUER}/.well-known/openid-configuration`` (a discovery document naming
another issuer is not trusted). Only public RSA (2048 bits or more) and EC (P-256,
P-384) signature keys are taken from it; symmetric keys never are.

The JWKS is fetched with blocking I/O: ``keys_for`` (reactor thread) runs it on a
one-thread pool owned by the JwksKeys, ``keys_for_blocking`` (worker threads, e.g.
the core's gRPC handlers) runs it inline. Either way there is at most one fetch in
flight, and a fetch starts only when the cache is empty, misses a kid, or is older
than JWKS_MAX_AGE_SEC - and no sooner than JWKS_REFETCH_COOLDOWN_SEC after the
previous attempt. A failed fetch keeps the last good keys.
"""

import dataclasses
import json
import threading
import urllib.request
from urllib.parse import urlsplit

import jwt
from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

RSA_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256")
EC_ALGORITHMS = {"P-256": ("ES256",), "P-384": ("ES384",)}
JWKS_ALGORITHMS = frozenset(RSA_ALGORITHMS).union(*EC_ALGORITHMS.values())

MAX_DOCUMENT_BYTES = 1024 * 1024  # JWKS or discovery document
MIN_RSA_BITS = 2048
JWKS_MAX_AGE_SEC = 3600.0  # keys are refetched at least this often: a key the issuer revoked goes away


def fetch_url(url, timeout):
    """GET ``url`` (http or https only, also across redirects); returns the body."""
    _require_http(url)
    request = urllib.request.Request(url, headers={"Accept": "application/json"})
    with _OPENER.open(request, timeout=timeout) as response:
        body = response.read(MAX_DOCUMENT_BYTES + 1)
    if len(body) > MAX_DOCUMENT_BYTES:
        raise ValueError(f"document larger than {MAX_DOCUMENT_BYTES} bytes")
    return body


def _require_http(url):
    if not isinstance(url, str) or urlsplit(url).scheme not in ("http", "https"):
        raise ValueError(f"not an http(s) URL: {url!r}")


class _HTTPOnlyRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        _require_http(newurl)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


_OPENER = urllib.request.build_opener(_HTTPOnlyRedirects)


@dataclasses.dataclass(frozen=True)
class SigningKey:
    kid: str | None
    algorithms: tuple
    key: object  # a cryptography public key


class KeySet:
    """The usable signature keys of one JWKS document, indexed by kid."""

    def __init__(self, keys):
        self.keys = keys
        self._by_kid = {}
        for key in keys:
            if key.kid is not None:
                self._by_kid.setdefault(key.kid, []).append(key)

    @classmethod
    def parse(cls, document, log=None):
        if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
            raise ValueError("not a JWK set (no 'keys' list)")
        keys = []
        for entry in document["keys"]:
            try:
                key = _parse_jwk(entry)
            except Exception as e:
                if log is not None:
                    log.warn("JWKS: skipping an unusable key: {error}", error=str(e))
                continue
            if key is not None:
                keys.append(key)
        if not keys:
            raise ValueError("the JWK set has no usable signature keys")
        return cls(keys)

    def find(self, kid, alg):
        """The key for ``kid`` (any key of ``alg`` if it is the only one, when kid is None)."""
        if kid is None:
            matching = [k for k in self.keys if alg in k.algorithms]
            return matching[0] if len(matching) == 1 else None
        candidates = self._by_kid.get(kid)
        if not candidates:
            return None
        for key in candidates:
            if alg in key.algorithms:
                return key
        return candidates[0]  # known kid, wrong algorithm: refused, not refetched

    def __len__(self):
        return len(self.keys)


def _parse_jwk(entry):
    """A SigningKey for a public signature JWK of a type we accept, None for others."""
    if not isinstance(entry, dict):
        return None
    if entry.get("use", "sig") != "sig":
        return None
    ops = entry.get("key_ops")
    if ops is not None and (not isinstance(ops, list) or "verify" not in ops):
        return None
    kid = entry.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise ValueError("kid is not a string")
    kty = entry.get("kty")
    if kty == "RSA":
        family = RSA_ALGORITHMS
    elif kty == "EC":
        family = EC_ALGORITHMS.get(entry.get("crv"))
        if family is None:
            return None
    else:
        return None  # "oct" (symmetric) keys are never taken from a JWKS; others unsupported
    alg = entry.get("alg")
    if alg is not None:
        if alg not in family:
            return None
        family = (alg,)
    key = jwt.PyJWK(entry, algorithm=family[0]).key
    if hasattr(key, "public_key"):  # a private JWK published by mistake: use its public half
        key = key.public_key()
    if kty == "RSA" and key.key_size < MIN_RSA_BITS:
        raise ValueError(f"RSA key {kid!r} has {key.key_size} bits (minimum {MIN_RSA_BITS})")
    return SigningKey(kid, tuple(family), key)


class JwksKeys:
    """The cached JWKS of one issuer; see the module docstring for when it is fetched.

    ``keys_for(kid, alg)`` and ``keys_for_blocking(kid, alg)`` give the KeySet to
    look a token's key up in (None when no fetch ever succeeded); which key it holds
    for the token is the caller's question.
    """

    log = Logger()

    def __init__(self, reactor, clock, fetch, jwks_uri, issuer, cooldown, timeout):
        self._reactor = reactor
        self._clock = clock
        self._fetch = fetch
        self._issuer = issuer
        self._jwks_uri_configured = jwks_uri
        self._discovery_uri = None
        if not jwks_uri and issuer:
            self._discovery_uri = issuer.rstrip("/") + "/.well-known/openid-configuration"
        self.enabled = bool(jwks_uri or self._discovery_uri)
        self._cooldown = cooldown
        self._timeout = timeout

        # Shared by the reactor thread and blocking callers: guarded by _lock.
        self._lock = threading.Lock()
        self._fetch_done = threading.Condition(self._lock)
        self._keys = None  # KeySet, the last good one
        self._fetched_at = None  # clock time of the last good fetch
        self._attempted_at = None  # clock time of the last attempt, good or bad
        self._fetching = False
        self._waiters = []  # reactor-side Deferreds waiting for the fetch in flight
        self._jwks_uri = jwks_uri

        self._pool = None
        self._pool_job = None
        self._shutdown_trigger = None
        self._closed = False

    def keys_for(self, kid, alg):
        """The KeySet for a token's ``kid``/``alg``, or a Deferred of it after a fetch.

        Reactor thread: a fetch runs on this object's own thread, never blocking the reactor.
        """
        with self._lock:
            step, keys = self._plan(kid, alg)
            if step in ("wait", "fetch"):
                waiter = defer.Deferred()
                self._waiters.append(waiter)
        if step == "use":
            return keys
        if step == "give up":
            return self._current()
        if step == "fetch":
            try:
                self._start_pool_fetch()
            except Exception as e:  # e.g. a thread that cannot start: fail the waiters, not the lock
                self._wake(self._install(e))
        return waiter.addCallback(lambda _: self._current())

    def keys_for_blocking(self, kid, alg):
        """The KeySet for a token's ``kid``/``alg``. For threads other than the reactor's: may fetch inline."""
        with self._lock:
            step, keys = self._plan(kid, alg)
            if step == "wait":
                self._fetch_done.wait_for(lambda: not self._fetching, timeout=2 * self._timeout + 1)
        if step == "fetch":
            self._fetch_blocking()
        if step == "use":
            return keys
        return self._current()

    def close(self):
        """Stop the fetch thread (after a fetch in flight ends). Returns a Deferred."""
        self._closed = True
        pool, self._pool = self._pool, None
        if pool is None:
            return defer.succeed(None)
        if self._shutdown_trigger is not None:
            self._reactor.removeSystemEventTrigger(self._shutdown_trigger)
            self._shutdown_trigger = None
        job, self._pool_job = self._pool_job, None
        if job is None:
            pool.stop()
            return defer.succeed(None)
        done = defer.Deferred()
        job.addBoth(lambda _: (pool.stop(), done.callback(None)))
        return done

    # -- lookup, cooldown, one fetch in flight ------------------------------------------

    def _plan(self, kid, alg):
        """Under the lock: ("use", keys) | ("fetch", None) | ("wait", None) | ("give up", None).

        "fetch" claims the fetch for the caller, who must call _install afterwards.
        """
        now = self._clock.seconds()
        key = self._keys.find(kid, alg) if self._keys is not None else None
        fresh = self._fetched_at is not None and 0 <= now - self._fetched_at < JWKS_MAX_AGE_SEC
        if key is not None and fresh:
            return "use", self._keys
        if self._fetching:
            return "wait", None
        # A clock that went backwards does not block fetching until it catches up.
        cooled = self._attempted_at is None or not 0 <= now - self._attempted_at < self._cooldown
        if cooled and not self._closed:
            self._fetching = True
            self._attempted_at = now
            return "fetch", None
        if key is not None:
            return "use", self._keys  # stale, but a refetch was tried too recently
        return "give up", None

    def _current(self):
        with self._lock:
            return self._keys

    def _start_pool_fetch(self):
        if self._pool is None:
            self._pool = ThreadPool(minthreads=0, maxthreads=1, name="chatgateway-jwks")
            self._pool.start()
            self._shutdown_trigger = self._reactor.addSystemEventTrigger("during", "shutdown", self._pool.stop)
        job = deferToThreadPool(self._reactor, self._pool, self._download)
        job.addBoth(self._install)
        job.addCallback(self._wake)
        self._pool_job = job

        def finished(_):
            if self._pool_job is job:
                self._pool_job = None

        job.addBoth(finished)

    def _fetch_blocking(self):
        try:
            result = self._download()
        except Exception as e:
            result = e
        waiters = self._install(result)
        if waiters:
            self._reactor.callFromThread(self._wake, waiters)

    def _install(self, result):
        """Record a fetch's outcome (a KeySet, or an exception/Failure); returns the waiters to wake."""
        with self._lock:
            if isinstance(result, KeySet):
                self._keys = result
                self._fetched_at = self._clock.seconds()
            else:
                error = getattr(result, "value", result)
                self._jwks_uri = self._jwks_uri_configured  # rediscover next time
                kept = len(self._keys) if self._keys is not None else 0
                self.log.warn(
                    "JWKS fetch failed: {error}; keeping {kept} previously fetched keys", error=str(error), kept=kept
                )
            self._fetching = False
            self._fetch_done.notify_all()
            waiters, self._waiters = self._waiters, []
        return waiters

    @staticmethod
    def _wake(waiters):
        for waiter in waiters:
            waiter.callback(None)

    def _download(self):
        """Blocking: discovery if needed, then the JWKS. Returns a KeySet."""
        uri = self._jwks_uri
        if uri is None:
            document = self._get_json(self._discovery_uri)
            uri = document.get("jwks_uri") if isinstance(document, dict) else None
            if not isinstance(uri, str):
                raise ValueError("the discovery document has no jwks_uri")
            _require_http(uri)
            issuer = document.get("issuer")
            if isinstance(issuer, str) and issuer.rstrip("/") != self._issuer.rstrip("/"):
                raise ValueError(f"the discovery document names another issuer: {issuer!r}")
            self._jwks_uri = uri
        keys = KeySet.parse(self._get_json(uri), log=self.log)
        self.log.info("JWKS fetched from {uri}: {count} keys", uri=uri, count=len(keys))
        return keys

    def _get_json(self, url):
        body = self._fetch(url, self._timeout)
        if isinstance(body, bytes):
            body = body.decode("utf-8")
        return json.loads(body)
