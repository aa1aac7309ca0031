"""The gateway's client-credentials token: fetched off the reactor, cached, refreshed ahead."""

import base64
import http.server
import json
import threading
import urllib.parse

import pytest
from twisted.internet import task

from chatgateway.auth.clientcredentials import ClientCredentials, TokenError, parse_token_response, request_token


class InlinePool:
    """A thread pool that runs the job at once (deferToThreadPool's view of a pool)."""

    def callInThreadWithCallback(self, on_result, f, *args, **kwargs):
        try:
            result = f(*args, **kwargs)
        except Exception:
            from twisted.python.failure import Failure

            on_result(False, Failure())
        else:
            on_result(True, result)

    def stop(self):
        pass


class InlineReactor(task.Clock):
    def callFromThread(self, f, *args, **kwargs):
        f(*args, **kwargs)


class Endpoint:
    """Answers fetches with a script of (token, expires_in) or exceptions."""

    def __init__(self, *answers):
        self.answers = list(answers)
        self.fetches = 0

    def __call__(self, endpoint, client_id, client_secret, timeout):
        assert (endpoint, client_id, client_secret) == ("https://idp/token", "gw", "s3cret")
        self.fetches += 1
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


def make(endpoint):
    reactor = InlineReactor()
    credentials = ClientCredentials("https://idp/token", "gw", "s3cret", reactor, fetch=endpoint, pool=InlinePool())
    return credentials, reactor


def value(d):
    results = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    return results[0]


def test_fetched_once_and_cached():
    endpoint = Endpoint(("t1", 300))
    credentials, _ = make(endpoint)
    credentials.start()
    assert value(credentials.token()) == "t1"
    assert value(credentials.token()) == "t1"
    assert endpoint.fetches == 1


def test_refreshed_before_expiry_without_a_caller_waiting():
    endpoint = Endpoint(("t1", 300), ("t2", 3600))
    credentials, clock = make(endpoint)
    credentials.start()
    clock.advance(239)
    assert endpoint.fetches == 1
    clock.advance(1)  # 80% of 300 s (and 60 s before the end)
    assert endpoint.fetches == 2
    assert value(credentials.token()) == "t2"
    clock.advance(2880 - 1)  # 80% of 3600 s comes before 60 s ahead of the end
    assert endpoint.fetches == 2


def test_long_lived_tokens_refresh_a_margin_before_the_end():
    endpoint = Endpoint(("t1", 100_000), ("t2", 100_000))
    credentials, clock = make(endpoint)
    credentials.start()
    clock.advance(80_000 - 1)
    assert endpoint.fetches == 1
    clock.advance(1)
    assert endpoint.fetches == 2


def test_failures_are_retried_with_backoff_and_reported_to_waiters():
    endpoint = Endpoint(TokenError("HTTP 503"), TokenError("HTTP 503"), ("t1", 300))
    credentials, clock = make(endpoint)
    credentials.start()
    failure = value(credentials.token())  # no token yet: the caller's own fetch fails too
    assert endpoint.fetches == 2
    assert failure.check(TokenError)
    clock.advance(1.9)
    assert endpoint.fetches == 2
    clock.advance(0.1)  # backoff doubled to 2 s
    assert endpoint.fetches == 3
    assert value(credentials.token()) == "t1"


def test_an_expired_token_is_not_used():
    endpoint = Endpoint(("t1", 10), TokenError("down"), ("t3", 10))
    credentials, clock = make(endpoint)
    credentials.start()
    clock.advance(8)  # refresh at 80% fails; the cached token is still valid
    assert value(credentials.token()) == "t1"
    clock.advance(1)  # retry at +1 s succeeds
    assert value(credentials.token()) == "t3"


def test_stop_cancels_the_refresh():
    endpoint = Endpoint(("t1", 10))
    credentials, clock = make(endpoint)
    credentials.start()
    credentials.stop()
    assert clock.getDelayedCalls() == []


@pytest.mark.parametrize(
    "body, expected",
    [
        (b'{"access_token": "abc", "expires_in": 60, "token_type": "Bearer"}', ("abc", 60)),
        (b'{"access_token": "abc", "expires_in": "60"}', ("abc", 60)),
        (b'{"access_token": "abc"}', ("abc", None)),
        (b'{"access_token": "abc", "expires_in": -5}', ("abc", None)),
    ],
)
def test_token_responses(body, expected):
    assert parse_token_response(body) == expected


@pytest.mark.parametrize("body", [b"not json", b"[]", b"{}", b'{"access_token": ""}', b'{"access_token": 5}'])
def test_bad_token_responses(body):
    with pytest.raises(TokenError):
        parse_token_response(body)


def test_request_token_speaks_client_credentials_over_http():
    seen = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            seen["authorization"] = self.headers["Authorization"]
            seen["body"] = self.rfile.read(int(self.headers["Content-Length"])).decode()
            body = json.dumps({"access_token": "svc", "expires_in": 120}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/token"
        assert request_token(url, "gw id", "s:cret", 5) == ("svc", 120)
    finally:
        server.shutdown()
    basic = base64.b64decode(seen["authorization"].split()[1]).decode()
    assert basic == "gw%20id:s%3Acret"
    assert urllib.parse.parse_qs(seen["body"]) == {"grant_type": ["client_credentials"]}


def test_request_token_refuses_other_schemes():
    with pytest.raises(TokenError):
        request_token("file:///etc/passwd", "a", "b", 1)
