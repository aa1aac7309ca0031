"""What chatgateway-client prints: events, and why a connection closed or failed."""

import json
import re
import sys
import time

from google.protobuf import json_format
from twisted.internet import error

from chatgateway.api import chat_pb2 as pb


def format_event(event, fallback_time=None):
    """HH:MM:SS sender: text (local time of sending)."""
    stamp = event.sent_at if event.HasField("sent_at") else fallback_time
    seconds = stamp.seconds if stamp is not None else 0
    clock = time.strftime("%H:%M:%S", time.localtime(seconds)) if seconds else "--:--:--"
    return f"{clock} {event.sender_id}: {event_text(event)}"


def event_text(event):
    if event.redacted:
        return "[redacted]"
    fields = json_format.MessageToDict(event.payload) if event.HasField("payload") else {}
    edited = " (edited)" if event.edited else ""
    if event.type == pb.RoomEvent.TEXT and isinstance(fields.get("text"), str):
        return fields["text"] + edited
    kind = pb.RoomEvent.Type.Name(event.type)
    return f"[{kind}] {json.dumps(fields, sort_keys=True, separators=(',', ':'))}{edited}"


def as_json(message):
    return json_format.MessageToJson(message, indent=None)


def out(line):
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def err(line):
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def close_text(closed):
    reason = closed.reason or ""
    refused = _UPGRADE_FAILED.search(reason)
    if refused:
        return f"HTTP {refused['status']}: {refused['why']}"
    return f"{closed.code} {reason}".strip() if closed.code is not None else reason or "no reason given"


# Autobahn's close reason when the server answered the handshake with an HTTP error.
_UPGRADE_FAILED = re.compile(r"upgrade failed \[(?P<status>\d+)\]: (?P<why>[^\"]*)")


def connect_text(failure):
    if isinstance(failure, error.ConnectionRefusedError):
        return "connection refused (is the gateway running?)"
    if isinstance(failure, error.DNSLookupError):
        return "unknown host"
    if isinstance(failure, error.TimeoutError):
        return "connection timed out"
    return str(failure) or type(failure).__name__
