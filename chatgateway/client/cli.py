"""``chatgateway-client``: a console client of the gateway's WebSocket API.

    chatgateway-client --as alice rooms create general --member bob
    chatgateway-client --as bob tail ROOM_ID
    chatgateway-client --as alice send ROOM_ID hello bob

Every command but ``token`` opens one WebSocket connection (GatewayClient),
waits for ``connected``, does its work and closes. Results go to stdout,
errors to stderr. Exit status: 0 success, 1 the gateway or the core refused a
command, 2 no connection (or a usage error), 3 the gateway closed the
connection.
"""

import argparse
import json
import os
import traceback
import warnings
from urllib.parse import urlencode, urlsplit, urlunsplit

from twisted.internet import defer, error, task

from chatgateway.api import chat_pb2 as pb
from chatgateway.client import backoff
from chatgateway.client.output import as_json, close_text, connect_text, err, format_event, out
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


# ---------------------------------------------------------------- arguments


def build_parser():
    parser = argparse.ArgumentParser(
        prog="chatgateway-client",
        description="A console client of chatgateway's WebSocket API.",
        epilog="Exit status: 0 ok, 1 a command was refused (error: STATUS: message), "
        "2 no connection or usage error, 3 the gateway closed the connection.",
    )
    parser.add_argument(
        "--url",
        default=os.environ.get("CHATGATEWAY_URL") or DEFAULT_URL,
        help="gateway WebSocket URL [env CHATGATEWAY_URL, default %(default)s]",
    )
    who = parser.add_mutually_exclusive_group()
    who.add_argument(
        "--token",
        default=os.environ.get("CHATGATEWAY_TOKEN") or None,
        help="access token (JWT) [env CHATGATEWAY_TOKEN]",
    )
    who.add_argument(
        "--as",
        dest="profile",
        metavar="PROFILE",
        help="act as PROFILE with a development token (the gateway's /dev/token, or minted with --secret)",
    )
    parser.add_argument(
        "--device",
        help=f"device id for --as tokens and the connection (default {DEFAULT_DEVICE}; {DEFAULT_TAIL_DEVICE} for tail)",
    )
    parser.add_argument(
        "--secret",
        action="store_true",
        help="mint development tokens locally with the HS256 secret in $JWT_SECRET instead of asking /dev/token",
    )
    parser.add_argument("--issuer", default=DEV_ISSUER, help="iss claim of minted tokens (default %(default)s)")
    parser.add_argument("--audience", default=DEV_AUDIENCE, help="aud claim of minted tokens (default %(default)s)")
    parser.add_argument("--json", action="store_true", help="print the raw proto3 JSON of events and responses")
    parser.add_argument(
        "--timeout", type=_positive_float, default=10.0, help="seconds to wait for each answer (default %(default)s)"
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    token = commands.add_parser("token", help="print a development token")
    token.add_argument("token_profile", metavar="PROFILE")
    token.add_argument("token_device", metavar="DEVICE", nargs="?")

    rooms = commands.add_parser("rooms", help="create, list, join and leave rooms")
    rooms_commands = rooms.add_subparsers(dest="rooms_command", metavar="ROOMS_COMMAND", required=True)
    create = rooms_commands.add_parser("create", help="create a room (you become its owner); prints its id")
    create.add_argument("name", metavar="NAME")
    create.add_argument("--member", action="append", default=[], metavar="PROFILE", help="add a member (repeatable)")
    create.add_argument("--id", default="", help="choose the room id (repeating a create with it is idempotent)")
    create.add_argument("--description", default="")
    listing = rooms_commands.add_parser("list", help="the rooms you are in: ID<TAB>NAME")
    listing.add_argument("query", metavar="QUERY", nargs="?", default="", help="substring of name or description")
    join = rooms_commands.add_parser("join", help="add profiles to a room (you must be its owner or an admin)")
    join.add_argument("room", metavar="ROOM")
    join.add_argument("profiles", metavar="PROFILE", nargs="+")
    leave = rooms_commands.add_parser("leave", help="remove profiles from a room (none: leave it yourself)")
    leave.add_argument("room", metavar="ROOM")
    leave.add_argument("profiles", metavar="PROFILE", nargs="*")

    send = commands.add_parser("send", help="send a text message; prints its event id")
    send.add_argument("room", metavar="ROOM")
    send.add_argument("text", metavar="TEXT", nargs="+")

    tail = commands.add_parser("tail", help="print a room's messages as they arrive, until Ctrl-C")
    tail.add_argument("room", metavar="ROOM")

    history = commands.add_parser("history", help="print a room's latest messages, oldest first")
    history.add_argument("room", metavar="ROOM")
    history.add_argument("--limit", type=_positive_int, default=50, help="how many (default %(default)s)")
    return parser


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _positive_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError("must be a positive number")
    return value


def main(argv=None):
    args = build_parser().parse_args(argv)
    task.react(lambda reactor: defer.Deferred.fromCoroutine(run(reactor, args)))


async def run(reactor, args):
    """The command's exit status, as SystemExit (task.react turns it into the process's)."""
    try:
        await COMMANDS[args.command](reactor, args)
    except Failed as e:
        err(f"error: {e}")
        raise SystemExit(e.status) from None
    except CallError as e:
        err(f"error: {e.detail.status}: {e.detail.message}")
        raise SystemExit(EXIT_CALL_ERROR) from None
    except ClosedError as e:
        err(f"error: the gateway closed the connection: {close_text(e)}")
        raise SystemExit(EXIT_CLOSED) from None
    except defer.TimeoutError:
        err(f"error: no answer from the gateway within {args.timeout:g}s")
        raise SystemExit(EXIT_NO_CONNECTION) from None
    except Exception:
        err("error: unexpected failure (a bug in chatgateway-client):")
        traceback.print_exc()
        raise SystemExit(EXIT_CALL_ERROR) from None


# ---------------------------------------------------------------- tokens and connections


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


async def open_connection(reactor, args, default_device=DEFAULT_DEVICE):
    """(client, Connected) of a new authenticated connection."""
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
    try:
        client = await GatewayClient.connect(args.url, token, device_id=device, reactor=reactor)
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


# ---------------------------------------------------------------- commands


async def cmd_token(reactor, args):
    token = await dev_token(reactor, args, args.token_profile, args.token_device or args.device or DEFAULT_DEVICE)
    out(json.dumps({"token": token}) if args.json else token)


async def cmd_rooms(reactor, args):
    await one_shot(reactor, args, ROOMS_COMMANDS[args.rooms_command](args))


def rooms_create(args):
    async def work(client, connected):
        request = pb.CreateRoomRequest(id=args.id, name=args.name, description=args.description, member_ids=args.member)
        response = await client.call("CreateRoom", request, args.timeout)
        out(as_json(response) if args.json else response.room.id)

    return work


def rooms_list(args):
    async def work(client, connected):
        cursor, seen = "", set()
        while True:
            request = pb.SearchRoomsRequest(query=args.query, cursor=cursor)
            responses = await client.call("SearchRooms", request, args.timeout)
            for response in responses:
                if args.json:
                    out(as_json(response))
                else:
                    for room in response.data:
                        out(f"{room.id}\t{room.name}")
            cursor = responses[-1].next_cursor if responses else ""
            if not cursor or cursor in seen:
                return
            seen.add(cursor)

    return work


def rooms_join(args):
    async def work(client, connected):
        request = pb.AddRoomSubscriptionsRequest(
            room_id=args.room, members=[pb.RoomSubscription(profile_id=p) for p in args.profiles]
        )
        response = await client.call("AddRoomSubscriptions", request, args.timeout)
        if args.json:
            out(as_json(response))
        else:
            for subscription in response.subscriptions:
                out(f"{subscription.profile_id}\t{','.join(subscription.roles)}")

    return work


def rooms_leave(args):
    async def work(client, connected):
        profiles = args.profiles or [connected.profile_id]
        request = pb.RemoveRoomSubscriptionsRequest(room_id=args.room, profile_ids=profiles)
        response = await client.call("RemoveRoomSubscriptions", request, args.timeout)
        if args.json:
            out(as_json(response))
        else:
            for profile in response.removed_profile_ids:
                out(profile)

    return work


ROOMS_COMMANDS = {"create": rooms_create, "list": rooms_list, "join": rooms_join, "leave": rooms_leave}


async def cmd_send(reactor, args):
    async def work(client, connected):
        event = await client.send_message(args.room, " ".join(args.text), args.timeout)
        out(as_json(event) if args.json else event.id)

    await one_shot(reactor, args, work)


async def cmd_history(reactor, args):
    async def work(client, connected):
        request = pb.GetHistoryRequest(room_id=args.room, limit=args.limit, direction=pb.GetHistoryRequest.BACKWARD)
        response = await client.call("GetHistory", request, args.timeout)
        if args.json:
            out(as_json(response))
            return
        for event in reversed(response.events):
            out(format_event(event))

    await one_shot(reactor, args, work)


async def cmd_tail(reactor, args):
    """Print the room's messages until Ctrl-C. A connection the gateway closes with a reconnect
    hint (1001, 1013), a refused upgrade (503, 429) and a dropped connection are reconnected
    after the delay asked for, with full-jitter backoff (client/backoff.py)."""
    tail = {"client": None, "stopping": False, "tailing": False}

    def stop():
        tail["stopping"] = True
        return _close_on_shutdown(reactor, tail["client"]) if tail["client"] is not None else None

    reactor.addSystemEventTrigger("before", "shutdown", stop)
    failures = 0
    while True:
        try:
            await _tail(reactor, args, tail)
        except (ClosedError, Failed) as e:
            closed = e if isinstance(e, ClosedError) else e.closed
            if tail["stopping"]:
                return
            failures = 0 if tail["tailing"] else failures + 1
            delay = None if closed is None else backoff.reconnect_after(closed, failures)
            if delay is None:
                raise
            err(f"connection closed: {close_text(closed)}; reconnecting in {delay:.1f}s")
            tail["client"], tail["tailing"] = None, False
            await task.deferLater(reactor, delay, lambda: None)


async def _tail(reactor, args, tail):
    """One connection of tail: until it closes (ClosedError, or Failed if it never opened)."""
    client, connected = await open_connection(reactor, args, DEFAULT_TAIL_DEVICE)
    tail["client"] = client
    try:
        # Asks the core again if the room is new to this connection; refused
        # with PERMISSION_DENIED when the profile is not a member.
        await command(client, args.timeout, subscribe=pb.RoomsCommand(room_ids=[args.room]))
        others = [room for room in connected.room_ids if room != args.room]
        if others:
            await command(client, args.timeout, unsubscribe=pb.RoomsCommand(room_ids=others))
    except BaseException:
        if not tail["stopping"]:
            await _close(reactor, client)
        raise
    err(f"tailing room {args.room} as {connected.profile_id} (Ctrl-C to stop)")
    tail["tailing"] = True
    while True:
        line = tail_line(await client.next_event(timeout=None), args.room, args.json)
        if line is not None:
            out(line)


def _close_on_shutdown(reactor, client):
    d = client.close(1000, "client stopped")
    d.addTimeout(5, reactor)
    d.addErrback(_ignore_timeout)
    return d


def _ignore_timeout(failure):
    failure.trap(defer.TimeoutError)


def tail_line(event, room_id, raw):
    """What tail prints for one ServerEvent (None: nothing); ``raw``: its proto3 JSON."""
    which = event.WhichOneof("payload")
    if which == "message" and event.message.room_id == room_id:
        return as_json(event) if raw else format_event(event.message, event.timestamp)
    if raw and which in ("typing_event", "receipt_event"):
        if getattr(event, which).room_id == room_id:
            return as_json(event)
    return None


COMMANDS = {"token": cmd_token, "rooms": cmd_rooms, "send": cmd_send, "tail": cmd_tail, "history": cmd_history}


if __name__ == "__main__":
    main()
