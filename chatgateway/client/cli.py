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

from twisted.internet import defer, task

from chatgateway.api import chat_pb2 as pb
from chatgateway.client.connection import (
    DEFAULT_DEVICE,
    DEFAULT_TAIL_DEVICE,
    DEFAULT_URL,
    DEV_AUDIENCE,
    DEV_ISSUER,
    EXIT_CALL_ERROR,
    EXIT_CLOSED,
    EXIT_NO_CONNECTION,
    Failed,
    dev_token,
    one_shot,
)
from chatgateway.client.output import as_json, close_text, err, format_event, out
from chatgateway.client.tail import cmd_tail
from chatgateway.client.wsclient import CallError, ClosedError

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


COMMANDS = {"token": cmd_token, "rooms": cmd_rooms, "send": cmd_send, "tail": cmd_tail, "history": cmd_history}


if __name__ == "__main__":
    main()
