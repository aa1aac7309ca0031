"""The gateway's own OAuth2 token (client-credentials grant), for calls to the core.

With OAUTH2_TOKEN_ENDPOINT, JWT_CLIENT_ID and JWT_CLIENT_SECRET set, the core
client sends ``x-service-authorization: Bearer <token>`` beside the device's own
``authorization``, so the core knows the call came through a gateway.

The token is fetched with blocking urllib on a one-thread pool of its own (never
on the reactor thread), cached, and refreshed ahead of expiry: at REFRESH_AT of
its lifetime, or REFRESH_MARGIN_SEC before it ends, whichever is earlier. One
fetch at a time; callers arriving during a fetch wait for it. A failed fetch is
retried with backoff (RETRY_MIN_SEC doubling to RETRY_MAX_SEC); a cached token that
is still valid keeps being used meanwhile.
"""

import base64
import json
import urllib.parse
import urllib.request

from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

REFRESH_AT = 0.8
REFRESH_MARGIN_SEC = 60.0
DEFAULT_LIFETIME_SEC = 300.0  # when the endpoint does not say (no expires_in)
RETRY_MIN_SEC = 1.0
RETRY_MAX_SEC = 60.0
MAX_RESPONSE_BYTES = 64 * 1024


class TokenError(Exception):
    """The token endpoint did not give a usable token."""


def request_token(endpoint, client_id, client_secret, timeout):
    """Blocking: POST a client-credentials grant; returns (access_token, expires_in or None).

    The client authenticates with HTTP Basic (RFC 6749 §2.3.1, form-encoded id and secret).
    """
    if urllib.parse.urlsplit(endpoint).scheme not in ("http", "https"):
        raise TokenError(f"not an http(s) URL: {endpoint!r}")
    basic = ":".join(urllib.parse.quote(part, safe="") for part in (client_id, client_secret))
    request = urllib.request.Request(
        endpoint,
        data=urllib.parse.urlencode({"grant_type": "client_credentials"}).encode("ascii"),
        headers={
            "Authorization": "Basic " + base64.b64encode(basic.encode("utf-8")).decode("ascii"),
            "Content-Type": "application/x-www-form-urlencoded",
            "Accept": "application/json",
        },
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read(MAX_RESPONSE_BYTES + 1)
    except urllib.error.HTTPError as e:
        raise TokenError(f"token endpoint answered HTTP {e.code}") from None
    except (OSError, ValueError) as e:
        raise TokenError(f"token endpoint unreachable: {e}") from None
    if len(body) > MAX_RESPONSE_BYTES:
        raise TokenError("token response too large")
    return parse_token_response(body)


def parse_token_response(body):
    try:
        document = json.loads(body)
    except ValueError:
        raise TokenError("token response is not JSON") from None
    token = document.get("access_token") if isinstance(document, dict) else None
    if not isinstance(token, str) or not token:
        raise TokenError("token response has no access_token")
    expires_in = document.get("expires_in")
    if isinstance(expires_in, str) and expires_in.isdigit():
        expires_in = int(expires_in)
    if not isinstance(expires_in, (int, float)) or isinstance(expires_in, bool) or expires_in <= 0:
        expires_in = None
    return token, expires_in


class ClientCredentials:
    """``token()`` → Deferred[str], the current service token. Reactor thread only."""

    log = Logger()

    def __init__(self, endpoint, client_id, client_secret, reactor, clock=None, timeout=5.0, fetch=None, pool=None):
        self._endpoint = endpoint
        self._client_id = client_id
        self._client_secret = client_secret
        self._reactor = reactor
        self._clock = clock if clock is not None else reactor
        self._timeout = timeout
        self._fetch = fetch if fetch is not None else request_token
        self._own_pool = pool is None
        self._pool = pool
        self._token = None
        self._expires_at = None
        self._fetching = None  # Deferred of the fetch in flight
        self._waiters = []
        self._refresh = None  # delayed call of the next refresh
        self._retry_delay = RETRY_MIN_SEC
        self._stopped = False

    def start(self):
        """Fetch the first token now, so the first call does not wait for it."""
        self._fetch_now()

    def stop(self):
        self._stopped = True
        if self._refresh is not None and self._refresh.active():
            self._refresh.cancel()
        self._refresh = None
        pool, self._pool = self._pool, None
        if pool is not None and self._own_pool:
            pool.stop()

    def _valid(self):
        return self._token is not None and self._clock.seconds() < self._expires_at

    def token(self):
        if self._valid():
            return defer.succeed(self._token)
        waiter = defer.Deferred()
        self._waiters.append(waiter)
        self._fetch_now()
        return waiter

    def _fetch_now(self):
        if self._fetching is not None or self._stopped:
            return
        if self._refresh is not None and self._refresh.active():
            self._refresh.cancel()
        self._refresh = None
        if self._pool is None:
            self._pool = ThreadPool(minthreads=0, maxthreads=1, name="client-credentials")
            self._pool.start()
        d = deferToThreadPool(
            self._reactor, self._pool, self._fetch, self._endpoint, self._client_id, self._client_secret, self._timeout
        )
        self._fetching = d
        d.addCallbacks(self._fetched, self._failed)

    def _fetched(self, result):
        self._fetching = None
        token, expires_in = result
        lifetime = float(expires_in or DEFAULT_LIFETIME_SEC)
        now = self._clock.seconds()
        self._token, self._expires_at = token, now + lifetime
        self._retry_delay = RETRY_MIN_SEC
        ahead = lifetime * REFRESH_AT
        if lifetime > REFRESH_MARGIN_SEC:
            ahead = min(ahead, lifetime - REFRESH_MARGIN_SEC)
        self._schedule(ahead)
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(token)

    def _failed(self, failure):
        self._fetching = None
        error = failure.value
        self.log.warn("could not get the gateway's service token: {error}", error=str(error))
        delay, self._retry_delay = self._retry_delay, min(self._retry_delay * 2, RETRY_MAX_SEC)
        self._schedule(delay)
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.errback(TokenError(f"no service token: {error}"))

    def _schedule(self, delay):
        if not self._stopped:
            self._refresh = self._clock.callLater(delay, self._fetch_now)
