"""``chatgateway-client tail``: a room's messages as they arrive, reconnecting and resuming by
itself (docs/protocol.md#guide-for-client-authors)."""

from twisted.internet import defer, task

from chatgateway.api import chat_pb2 as pb
from chatgateway.client import backoff
from chatgateway.client.connection import DEFAULT_TAIL_DEVICE, Failed, _close, command, open_connection
from chatgateway.client.output import as_json, close_text, err, format_event, out
from chatgateway.client.wsclient import ClosedError

# Acks sent at most this often (the server-side record is written once per heartbeat anyway).
ACK_EVERY_SEC = 1.0


class TailState:
    """What tail keeps across its connections to resume where it left off: the latest resume
    token and the room's last position."""

    def __init__(self, room):
        self.room = room
        self.token = ""
        self.positions = {}  # room id -> (epoch, offset) of the last event printed
        self.client = None
        self.stopping = False
        self.tailing = False
        self.connections = 0
        self.acked_at = None  # when the last ack went out

    def ack_due(self, now):
        """True at most once per ACK_EVERY_SEC: the gateway keeps the furthest position, so
        acking the latest event then says as much as acking each (and spares the device's
        inbound budget in a busy room)."""
        if self.acked_at is not None and now - self.acked_at < ACK_EVERY_SEC:
            return False
        self.acked_at = now
        return True

    def fresh(self, event):
        """False for a room event at or below the room's position (already printed); else
        True, and the position moves to it."""
        if not event.offset:
            return True
        last = self.positions.get(self.room)
        if last is not None and last[0] == event.epoch and event.offset <= last[1]:
            return False
        self.positions[self.room] = (event.epoch, event.offset)
        return True

    def gap(self, gap):
        """Positions that will never come: the room goes on after them."""
        self.positions[self.room] = (gap.epoch, gap.last_offset)


async def cmd_tail(reactor, args):
    """Print the room's messages until Ctrl-C. A connection the gateway closes with a reconnect
    hint (1001, 1013), a refused upgrade (503, 429) and a dropped connection are reconnected
    after the delay asked for, with full-jitter backoff (client/backoff.py), and resumed from
    the last event printed (its resume token and position)."""
    tail = TailState(args.room)

    def stop():
        tail.stopping = True
        return _close_on_shutdown(reactor, tail.client) if tail.client is not None else None

    reactor.addSystemEventTrigger("before", "shutdown", stop)
    failures = 0
    while True:
        try:
            await _tail(reactor, args, tail)
        except (ClosedError, Failed) as e:
            closed = e if isinstance(e, ClosedError) else e.closed
            if tail.stopping:
                return
            failures = 0 if tail.tailing else failures + 1
            delay = None if closed is None else backoff.reconnect_after(closed, failures)
            if delay is None:
                raise
            err(f"connection closed: {close_text(closed)}; reconnecting in {delay:.1f}s")
            tail.client, tail.tailing = None, False
            await task.deferLater(reactor, delay, lambda: None)


async def _tail(reactor, args, tail):
    """One connection of tail: until it closes (ClosedError, or Failed if it never opened)."""
    client, connected = await open_connection(reactor, args, DEFAULT_TAIL_DEVICE, resume=tail)
    tail.client = client
    tail.token = connected.resume_token or tail.token
    if tail.connections:
        err(reconnected_text(connected, tail))
    tail.connections += 1
    try:
        # Asks the core again if the room is new to this connection; refused
        # with PERMISSION_DENIED when the profile is not a member.
        await command(client, args.timeout, subscribe=pb.RoomsCommand(room_ids=[args.room]))
        others = [room for room in connected.room_ids if room != args.room]
        if others:
            await command(client, args.timeout, unsubscribe=pb.RoomsCommand(room_ids=others))
    except BaseException:
        if not tail.stopping:
            await _close(reactor, client)
        raise
    err(f"tailing room {args.room} as {connected.profile_id} (Ctrl-C to stop)")
    tail.tailing = True
    while True:
        event = await client.next_event(timeout=None)
        which = event.WhichOneof("payload")
        if which == "error":
            err(f"notice from the gateway: {event.error.status}: {event.error.message}")
        elif which == "gap" and event.gap.room_id == args.room:
            tail.gap(event.gap)
            out(as_json(event) if args.json else gap_text(event.gap))
        elif which == "message" and event.message.room_id == args.room and not tail.fresh(event):
            err(f"dropped a duplicate: offset {event.offset} of epoch {event.epoch}")
        else:
            line = tail_line(event, args.room, args.json)
            if line is not None:
                out(line)
                if tail.ack_due(reactor.seconds()):
                    _ack(client, event)


def reconnected_text(connected, tail):
    """What tail says when a connection after the first is open."""
    where = f"reconnected to {connected.gateway_id}"
    position = tail.positions.get(tail.room)
    if connected.resumed and position is not None:
        return f"{where}; resumed after offset {position[1]} of epoch {position[0]}"
    if connected.resumed:
        return f"{where}; resumed"
    return f"{where}; not resumed (nothing to catch up from)"


def gap_text(gap):
    """What tail prints for a GapEvent: events it will never get."""
    why = f" ({gap.reason})" if gap.reason else ""
    return f"--:--:-- [gap] events {gap.first_offset}-{gap.last_offset} of epoch {gap.epoch} are missing{why}"


def _ack(client, event):
    """Acknowledge a room event with its position (the gateway keeps it for a resume)."""
    if event.offset and event.WhichOneof("payload") == "message":
        ack = pb.Ack(event_id=event.message.id, room_id=event.message.room_id, epoch=event.epoch, offset=event.offset)
        try:
            client.send(pb.StreamRequest(ack=ack))
        except ClosedError:
            pass  # closing: the next connection resumes from the position anyway


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
