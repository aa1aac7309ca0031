"""JWT verification for the gateway and the reference core.

Two kinds of signing key, never mixed:

- HS256 with JWT_SECRET (development), only when the secret is set;
- RS256/RS384/RS512/PS256/ES256/ES384 with the issuer's JWKS (OAUTH2_JWKS_URI, or the
  ``jwks_uri`` of ``{OAUTH2_ISSUER}/.well-known/openid-configuration``).

The token's ``alg`` only picks which of the two is consulted; every decode names its
algorithms explicitly and uses a key of that family, so an HS256 token can never be
checked against an RSA public key and an RS256 token never against the secret.
``kid`` is a dictionary key into the cached JWKS and nothing else; ``jku``, ``x5u``,
``jwk`` and ``x5c`` headers are ignored. Time claims are checked against the injected
clock (PyJWT reads the wall clock itself), with JWT_LEEWAY_SEC of skew.

A verified token is remembered (by its exact string, up to VERIFIED_TOKENS of them,
least recently used forgotten first) with the key that verified it, so a device that
reconnects with the same token skips PyJWT's decoding and signature check. Everything
that can change is still checked on each use: the time claims against the clock, and
the key - a remembered verification counts only while the same key object is the one
found for the token now, so a JWKS refetch (at least every JWKS_MAX_AGE_SEC) or a
removed key sends the token through full verification again.

The JWKS is fetched with blocking I/O: ``verify`` (reactor thread) runs it on a
one-thread pool owned by the verifier, ``verify_blocking`` (worker threads, e.g. the
core's gRPC handlers) runs it inline. Either way there is at most one fetch in flight,
and a fetch starts only when the cache is empty, misses a kid, or is older than
JWKS_MAX_AGE_SEC - and no sooner than JWKS_REFETCH_COOLDOWN_SEC after the previous
attempt. A failed fetch keeps the last good keys.
"""

import base64
import binascii
import collections
import dataclasses
import json
import math
import re
import threading
import time
import urllib.request
from urllib.parse import urlsplit

import jwt
from jwt.algorithms import HMACAlgorithm
from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

HMAC_ALGORITHMS = frozenset({"HS256"})
RSA_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256")
EC_ALGORITHMS = {"P-256": ("ES256",), "P-384": ("ES384",)}
JWKS_ALGORITHMS = frozenset(RSA_ALGORITHMS).union(*EC_ALGORITHMS.values())

ACCEPTED_TYPES = frozenset({"jwt", "at+jwt", "application/jwt", "application/at+jwt"})
MAX_TOKEN_BYTES = 16 * 1024
MAX_DOCUMENT_BYTES = 1024 * 1024  # JWKS or discovery document
MIN_RSA_BITS = 2048
JWKS_MAX_AGE_SEC = 3600.0  # keys are refetched at least this often: a key the issuer revoked goes away
# Verified tokens remembered for reconnects (module docstring); longer tokens are not kept.
VERIFIED_TOKENS = 2048
MAX_REMEMBERED_TOKEN_BYTES = 2048

_PRINTABLE_ALG = re.compile(r"[A-Za-z0-9+\-]{1,16}\Z")


class AuthError(Exception):
    """A token was refused; ``str(e)`` is a short reason safe to show the client."""


@dataclasses.dataclass(frozen=True)
class Claims:
    profile_id: str
    device_id: str | None
    expires_at: float
    claims: dict


def mint_token(secret, profile_id, *, device_id=None, issuer="", audience="", ttl=3600, now=None, extra=None):
    """An HS256 token for development, the CLI and tests.

    ``iss``/``aud`` are omitted when empty; ``extra`` claims are added last (and may
    replace the standard ones, which tests use to craft bad tokens).
    """
    if now is None:
        now = time.time()
    payload = {"sub": profile_id, "iat": int(now), "exp": int(now + ttl)}
    if device_id is not None:
        payload["device_id"] = device_id
    if issuer:
        payload["iss"] = issuer
    if audience:
        payload["aud"] = audience
    payload.update(extra or {})
    return jwt.encode(payload, secret, algorithm="HS256")


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
class _Key:
    kid: str | None
    algorithms: tuple
    key: object  # a cryptography public key


class _KeySet:
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
    """A _Key for a public signature JWK of a type we accept, None for others."""
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
    return _Key(kid, tuple(family), key)


class _CheckedKeyHMAC(HMACAlgorithm):
    """HS256 that remembers the keys it has checked.

    PyJWT re-examines the HMAC secret on every decode (is it a PEM, DER or JWK in
    disguise? ~20 us, a fifth of a verification), though ours never changes.
    """

    MAX_KEYS = 4

    def __init__(self):
        super().__init__(HMACAlgorithm.SHA256)
        self._prepared = {}

    def prepare_key(self, key):
        prepared = self._prepared.get(key)
        if prepared is None:
            prepared = super().prepare_key(key)  # raises for a key PyJWT refuses: never remembered
            if len(self._prepared) < self.MAX_KEYS:
                self._prepared[key] = prepared
        return prepared


def _decoder():
    """A PyJWT of our own whose HS256 remembers the checked secret."""
    decoder = jwt.PyJWT()
    # PyJWT takes no algorithms of its own; its PyJWS does (register_algorithm).
    decoder._jws.unregister_algorithm("HS256")
    decoder._jws.register_algorithm("HS256", _CheckedKeyHMAC())
    return decoder


def _unverified_header(token):
    """The JOSE header of a compact token, unverified: only to choose the key.

    PyJWT's get_unverified_header would decode and check the whole token, which
    jwt.decode then does again (strictly: whatever this lets through, it refuses).
    """
    if isinstance(token, bytes):
        token = token.decode("ascii")
    segment, dot, _ = token.partition(".")
    if not dot:
        raise ValueError("not a compact JWS")
    header = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    if "kid" in header and not isinstance(header["kid"], str):
        raise ValueError("kid is not a string")
    return header


def _number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class TokenVerifier:
    """Verifies bearer tokens into Claims; see the module docstring for the rules."""

    log = Logger()

    def __init__(self, config, reactor=None, clock=None, fetch=None):
        if reactor is None:
            from twisted.internet import reactor
        self._reactor = reactor
        self._clock = clock if clock is not None else reactor
        self._fetch = fetch if fetch is not None else fetch_url
        self._secret = config.jwt_secret or None
        self._issuer = config.oauth2_issuer or None
        self._audience = config.oauth2_jwt_verify_audience or None
        self._jwks_uri_configured = config.oauth2_jwks_uri or None
        self._discovery_uri = None
        if not self._jwks_uri_configured and self._issuer:
            self._discovery_uri = self._issuer.rstrip("/") + "/.well-known/openid-configuration"
        self._jwks_enabled = bool(self._jwks_uri_configured or self._discovery_uri)
        self._leeway = float(config.jwt_leeway_sec)
        self._cooldown = float(config.jwks_refetch_cooldown_sec)
        self._timeout = float(config.core_timeout_sec)
        if self._secret is not None and len(self._secret.encode()) < 32:
            self.log.warn("JWT_SECRET is shorter than 32 bytes; use a longer random secret")

        # JWKS state, shared by the reactor thread and blocking callers: guarded by _lock.
        self._lock = threading.Lock()
        self._fetch_done = threading.Condition(self._lock)
        self._keys = None  # _KeySet, the last good one
        self._fetched_at = None  # clock time of the last good fetch
        self._attempted_at = None  # clock time of the last attempt, good or bad
        self._fetching = False
        self._waiters = []  # reactor-side Deferreds waiting for the fetch in flight
        self._jwks_uri = self._jwks_uri_configured

        self._pool = None
        self._pool_job = None
        self._shutdown_trigger = None
        self._closed = False

        self._decoder = _decoder()
        # token -> (the key that verified it, its payload); reactor and worker threads share it.
        self._verified = collections.OrderedDict()
        self._verified_lock = threading.Lock()

    # -- public API ------------------------------------------------------------------

    def verify(self, token):
        """Deferred[Claims]; fails with AuthError only. Never blocks the reactor."""
        try:
            header, alg = self._inspect(token)
            if alg in HMAC_ALGORITHMS:
                return defer.succeed(self._decode(token, self._secret, alg))
            return self._verify_jwks(token, header, alg)
        except AuthError as e:
            return defer.fail(e)
        except Exception:
            self.log.failure("token verification failed unexpectedly")
            return defer.fail(AuthError("invalid token"))

    def verify_blocking(self, token):
        """Claims, or raises AuthError. For threads other than the reactor's: may fetch inline."""
        header, alg = self._inspect(token)
        if alg in HMAC_ALGORITHMS:
            return self._decode(token, self._secret, alg)
        kid = header.get("kid")
        with self._lock:
            step, key = self._plan(kid, alg)
            if step == "wait":
                self._fetch_done.wait_for(lambda: not self._fetching, timeout=2 * self._timeout + 1)
        if step == "fetch":
            self._fetch_blocking()
        if step != "use":
            key = self._key_after_fetch(kid, alg)
        return self._decode(token, key, alg)

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

    # -- checks that need no key -------------------------------------------------------

    def _inspect(self, token):
        """The unverified header and alg of ``token``, if a key of ours could accept it."""
        if isinstance(token, str):
            token = token.strip()
        if not token:
            raise AuthError("missing token")
        if not isinstance(token, (str, bytes)):
            raise AuthError("malformed token")
        if len(token) > MAX_TOKEN_BYTES:
            raise AuthError("token too large")
        try:
            header = _unverified_header(token)
        except (ValueError, binascii.Error, RecursionError):  # UnicodeError and JSONDecodeError are ValueErrors
            raise AuthError("malformed token") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or not alg:
            raise AuthError("missing algorithm")
        if alg.lower() == "none":
            raise AuthError("unsupported algorithm none")
        typ = header.get("typ")
        if typ is not None and (not isinstance(typ, str) or typ.lower() not in ACCEPTED_TYPES):
            raise AuthError("unsupported token type")
        if alg in HMAC_ALGORITHMS and self._secret is not None:
            return header, alg
        if alg in JWKS_ALGORITHMS and self._jwks_enabled:
            return header, alg
        if _PRINTABLE_ALG.match(alg):
            raise AuthError(f"unsupported algorithm {alg}")
        raise AuthError("unsupported algorithm")

    # -- signature and claims ------------------------------------------------------------

    def _decode(self, token, key, alg):
        if isinstance(key, _Key) and alg not in key.algorithms:
            raise AuthError("algorithm does not match the signing key")
        payload = self._recall(token, key)
        if payload is None:
            payload = self._signature_and_claims(token, key.key if isinstance(key, _Key) else key, alg)
            self._remember(token, key, payload)
        try:
            return self._claims(payload)
        except AuthError:
            self._forget(token)  # expired or not yet valid: verified afresh if it comes again
            raise

    def _recall(self, token, key):
        """The payload of ``token`` if ``key`` (this very object) verified it before."""
        with self._verified_lock:
            entry = self._verified.get(token)
            if entry is None or entry[0] is not key:
                return None
            self._verified.move_to_end(token)
            return entry[1]

    def _remember(self, token, key, payload):
        if len(token) > MAX_REMEMBERED_TOKEN_BYTES:
            return
        with self._verified_lock:
            self._verified[token] = (key, payload)
            self._verified.move_to_end(token)
            if len(self._verified) > VERIFIED_TOKENS:
                self._verified.popitem(last=False)

    def _forget(self, token):
        with self._verified_lock:
            self._verified.pop(token, None)

    def _signature_and_claims(self, token, key, alg):
        """PyJWT's checks: signature, algorithm, audience, issuer, required claims. Returns the payload."""
        try:
            payload = self._decoder.decode(
                token,
                key,
                algorithms=[alg],
                audience=self._audience,
                issuer=self._issuer,
                options={
                    "require": ["exp", "sub"],
                    # Time claims are checked in _claims, against our clock (on every use).
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                },
            )
        except jwt.MissingRequiredClaimError as e:
            raise AuthError(f"missing {e.claim} claim") from None
        except jwt.InvalidAudienceError:
            raise AuthError("wrong audience") from None
        except jwt.InvalidIssuerError:
            raise AuthError("wrong issuer") from None
        except jwt.InvalidSignatureError:
            raise AuthError("invalid signature") from None
        except jwt.InvalidAlgorithmError:
            raise AuthError("algorithm does not match the signing key") from None
        except jwt.exceptions.InvalidSubjectError:
            raise AuthError("invalid sub claim") from None
        except jwt.DecodeError:
            raise AuthError("malformed token") from None
        except Exception as e:  # a key PyJWT cannot use, an odd claim type...
            self.log.debug("token refused: {error_type}", error_type=type(e).__name__)
            raise AuthError("invalid token") from None
        return payload

    def _claims(self, payload):
        now = self._clock.seconds()
        exp = payload["exp"]
        if not _number(exp):
            raise AuthError("invalid exp claim")
        if exp <= now - self._leeway:
            raise AuthError("token expired")
        for name in ("nbf", "iat"):
            value = payload.get(name)
            if value is None:
                continue
            if not _number(value):
                raise AuthError(f"invalid {name} claim")
            if value > now + self._leeway:
                raise AuthError("token not yet valid")
        sub = payload["sub"]
        if not isinstance(sub, str) or not sub:
            raise AuthError("invalid sub claim")
        device_id = payload.get("device_id")
        if device_id is not None and (not isinstance(device_id, str) or not device_id):
            raise AuthError("invalid device_id claim")
        return Claims(profile_id=sub, device_id=device_id, expires_at=float(exp), claims=payload)

    # -- JWKS: lookup, cooldown, one fetch in flight ------------------------------------------

    def _plan(self, kid, alg):
        """Under the lock: ("use", key) | ("fetch", None) | ("wait", None) | ("give up", None).

        "fetch" claims the fetch for the caller, who must call _install afterwards.
        """
        now = self._clock.seconds()
        key = self._keys.find(kid, alg) if self._keys is not None else None
        fresh = self._fetched_at is not None and 0 <= now - self._fetched_at < JWKS_MAX_AGE_SEC
        if key is not None and fresh:
            return "use", key
        if self._fetching:
            return "wait", None
        # A clock that went backwards does not block fetching until it catches up.
        cooled = self._attempted_at is None or not 0 <= now - self._attempted_at < self._cooldown
        if cooled and not self._closed:
            self._fetching = True
            self._attempted_at = now
            return "fetch", None
        if key is not None:
            return "use", key  # stale, but a refetch was tried too recently
        return "give up", None

    def _key_after_fetch(self, kid, alg):
        with self._lock:
            keys = self._keys
        if keys is None:
            raise AuthError("signing keys unavailable")
        key = keys.find(kid, alg)
        if key is None:
            raise AuthError("unknown signing key")
        return key

    def _verify_jwks(self, token, header, alg):
        kid = header.get("kid")
        with self._lock:
            step, key = self._plan(kid, alg)
            if step in ("wait", "fetch"):
                waiter = defer.Deferred()
                self._waiters.append(waiter)
        if step == "give up":
            key = self._key_after_fetch(kid, alg)  # raises: no key to use
        if step in ("use", "give up"):
            return defer.succeed(self._decode(token, key, alg))
        if step == "fetch":
            try:
                self._start_pool_fetch()
            except Exception as e:  # e.g. a thread that cannot start: fail the waiters, not the lock
                self._wake(self._install(e))

        def fetched(_):
            return self._decode(token, self._key_after_fetch(kid, alg), alg)

        return waiter.addCallback(fetched)

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
        """Record a fetch's outcome (a _KeySet, or an exception/Failure); returns the waiters to wake."""
        with self._lock:
            if isinstance(result, _KeySet):
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
        """Blocking: discovery if needed, then the JWKS. Returns a _KeySet."""
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
        keys = _KeySet.parse(self._get_json(uri), log=self.log)
        self.log.info("JWKS fetched from {uri}: {count} keys", uri=uri, count=len(keys))
        return keys

    def _get_json(self, url):
        body = self._fetch(url, self._timeout)
        if isinstance(body, bytes):
            body = body.decode("utf-8")
        return json.loads(body)
