"""chatgateway-client's connections: development tokens, opening a connection, commands."""

import json
import os
import warnings
from urllib.parse import urlencode, urlsplit, urlunsplit

from twisted.internet import defer, error

from chatgateway.client.output import close_text, connect_text
from chatgateway.client.wsclient import CallError, ClosedError, GatewayClient

DEFAULT_URL = "ws://127.0.0.1:8080/ws"
DEFAULT_DEVICE = "cli"
# tail holds a connection open; with its own device id a send from the same
# profile does not replace it (MAX_CONNECTIONS_PER_DEVICE).
DEFAULT_TAIL_DEVICE = "cli-tail"
DEV_ISSUER = "chatgateway-dev"
DEV_AUDIENCE = "service_chat_gateway"

EXIT_CALL_ERROR = 1
EXIT_NO_CONNECTION = 2
EXIT_CLOSED = 3


class Failed(Exception):
    """An expected failure: one line for stderr and an exit status (``closed``: the ClosedError
    of a connection that did not open, if that was the cause)."""

    def __init__(self, message, status, closed=None):
        super().__init__(message)
        self.status = status
        self.closed = closed


async def dev_token(reactor, args, profile, device):
    """A development token for profile/device: minted with $JWT_SECRET, or from /dev/token."""
    if args.secret:
        secret = os.environ.get("JWT_SECRET")
        if not secret:
            raise Failed("--secret needs the HS256 secret in the JWT_SECRET environment variable", EXIT_NO_CONNECTION)
        try:
            from chatgateway.auth.devtokens import mint_token
        except ImportError as e:
            raise Failed(f"cannot mint tokens: {e}", EXIT_NO_CONNECTION) from None
        return mint_token(secret, profile, device_id=device, issuer=args.issuer, audience=args.audience)
    return await fetch_dev_token(reactor, dev_token_url(args.url), profile, device, args.timeout)


def dev_token_url(ws_url):
    """http(s)://host:port/dev/token beside the gateway's ws(s)://host:port/ws."""
    parts = urlsplit(ws_url)
    scheme = {"ws": "http", "wss": "https", "http": "http", "https": "https"}.get(parts.scheme)
    if scheme is None or not parts.hostname:
        raise Failed(f"not a ws:// or wss:// URL: {ws_url!r}", EXIT_NO_CONNECTION)
    path = parts.path[: -len("/ws")] if parts.path.endswith("/ws") else parts.path.rstrip("/")
    return urlunsplit((scheme, parts.netloc, path + "/dev/token", "", ""))


async def fetch_dev_token(reactor, url, profile, device, timeout):
    from twisted.web.client import Agent, readBody

    target = f"{url}?{urlencode({'profile': profile, 'device': device})}"
    agent = Agent(reactor, connectTimeout=timeout)
    try:
        response = await agent.request(b"GET", target.encode("ascii")).addTimeout(timeout, reactor)
        with warnings.catch_warnings():
            # Twisted warns that the body's transport proxy cannot abortConnection
            # (only cancellation needs it; the timeout still drops the request).
            warnings.simplefilter("ignore", DeprecationWarning)
            reading = readBody(response)
        body = await reading.addTimeout(timeout, reactor)
    except (error.ConnectError, error.DNSLookupError) as e:
        dropped = ClosedError(1006, connect_text(e))  # tail retries it as a dropped connection
        raise Failed(f"cannot get a token from {url}: {connect_text(e)}", EXIT_NO_CONNECTION, dropped) from None
    except defer.TimeoutError:
        raise Failed(f"cannot get a token from {url}: no answer within {timeout:g}s", EXIT_NO_CONNECTION) from None
    if response.code != 200:
        hint = (
            " (is the gateway running with --dev? otherwise use --token, or --secret)" if response.code == 404 else ""
        )
        raise Failed(f"cannot get a token from {url}: HTTP {response.code}{hint}", EXIT_NO_CONNECTION)
    try:
        return json.loads(body)["token"]
    except (ValueError, KeyError, TypeError):
        raise Failed(f"cannot get a token from {url}: the answer holds no token", EXIT_NO_CONNECTION) from None


async def open_connection(reactor, args, default_device=DEFAULT_DEVICE, resume=None):
    """(client, Connected) of a new authenticated connection; ``resume`` (a TailState) gives
    the token and positions to resume from, in the first frame (docs/protocol.md#resume)."""
    device = args.device or default_device
    if args.profile:
        token = await dev_token(reactor, args, args.profile, device)
    elif args.token:
        token = args.token
    else:
        raise Failed("no token: use --as PROFILE, --token TOKEN or set CHATGATEWAY_TOKEN", EXIT_NO_CONNECTION)
    parts = urlsplit(args.url)
    if parts.scheme != "ws" or not parts.hostname:
        raise Failed(f"--url must be a ws://host:port/path URL, not {args.url!r}", EXIT_NO_CONNECTION)
    how = {}
    if resume is not None and (resume.token or resume.positions):
        how = {"auth": "frame", "resume_token": resume.token, "positions": resume.positions}
    try:
        client = await GatewayClient.connect(args.url, token, device_id=device, reactor=reactor, **how)
    except (error.ConnectError, error.DNSLookupError) as e:
        dropped = ClosedError(1006, connect_text(e))  # no gateway there (yet): as a dropped connection
        raise Failed(f"cannot connect to {args.url}: {connect_text(e)}", EXIT_NO_CONNECTION, dropped) from None
    except ClosedError as e:
        raise Failed(f"cannot connect to {args.url}: refused: {close_text(e)}", EXIT_NO_CONNECTION, e) from None
    try:
        connected = await client.next_event("connected", timeout=args.timeout)
    except ClosedError as e:
        raise Failed(f"the gateway refused the connection: {close_text(e)}", EXIT_NO_CONNECTION, e) from None
    except BaseException:
        await _close(reactor, client)
        raise
    return client, connected.connected


async def _close(reactor, client):
    try:
        await client.close().addTimeout(5, reactor)
    except defer.TimeoutError:
        pass


async def one_shot(reactor, args, work):
    """Connect, run ``await work(client, connected)``, close."""
    client, connected = await open_connection(reactor, args)
    try:
        await work(client, connected)
    finally:
        await _close(reactor, client)


async def command(client, timeout, **fields):
    """Send a ClientCommand; its last CommandResult, or CallError."""
    results = await client.command(timeout, **fields)
    if results[-1].HasField("error"):
        raise CallError(results[-1].error)
    return results[-1]
