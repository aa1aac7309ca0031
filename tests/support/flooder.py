"""Load generator: one authenticated device that writes frames as fast as it can.

Runs in its own process, on plain blocking sockets: a writer thread sends a
block of masked frames over and over - pings, acks, malformed JSON, authToken
refreshes and commands beyond MAX_EVENTS_PER_SECOND (refused) - and a reader
thread reads everything the gateway sends (so the device is never a slow
consumer) until a close frame. Talks to the driver over stdout, one line each:

    -> READY                    the `connected` frame arrived; the flood starts
    -> CLOSED <code> <reason>   the gateway's close frame, then the process exits
    -> ENDED <error>            the connection ended without a close frame

A line on stdin "EXIT" (or its end) stops the process. ``--report-every`` adds
``WROTE <bytes>`` lines (bytes the kernel accepted so far).

    python tests/support/flooder.py --port 8080 --secret S
"""

import argparse
import json
import os
import socket
import struct
import sys
import threading
import time

from chatgateway.auth.devtokens import mint_token
from support.rawwebsocket import handshake, split_frames, upgrade_request


def masked(payload, opcode=0x1):
    """A client frame with a zero mask (the payload goes as is)."""
    n = len(payload)
    if n < 126:
        header = bytes([0x80 | opcode, 0x80 | n])
    else:
        header = bytes([0x80 | opcode, 0x80 | 126]) + struct.pack("!H", n)
    return header + b"\0\0\0\0" + payload


def flood_block(token, size=64 * 1024):
    """About ``size`` bytes of frames, each kind in turn."""
    cycle = b"".join(
        (
            masked(b"", opcode=0x9),  # ping
            masked(json.dumps({"ack": {"eventId": "e1"}}).encode()),
            masked(b'{"ack": {"eventId": '),  # malformed JSON
            masked(json.dumps({"authToken": token}).encode()),  # a refresh: a JWT verification
            masked(json.dumps({"command": {"requestId": "f", "unsubscribe": {}}}).encode()),
        )
    )
    return cycle * max(1, size // len(cycle))


def upgrade(host, port, token):
    sock = socket.create_connection((host, port), timeout=30)
    request = upgrade_request(f"{host}:{port}", "/ws", "chat.v1.json", {"Authorization": f"Bearer {token}"})
    rest = handshake(sock, request)
    sock.settimeout(None)
    return sock, rest


def frames(sock, buffer):
    """(opcode, payload) of every frame the server sends (unmasked), until the connection ends."""
    while True:
        received, buffer = split_frames(buffer)
        yield from received
        chunk = sock.recv(1 << 20)
        if not chunk:
            return
        buffer += chunk


def say(line):
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def main(argv):
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--secret", required=True)
    parser.add_argument("--profile", default="flooder")
    parser.add_argument("--report-every", type=float, default=0)
    args = parser.parse_args(argv)
    token = mint_token(args.secret, args.profile, device_id="flood", audience="service_chat_gateway")
    sock, rest = upgrade(args.host, args.port, token)
    received = frames(sock, rest)
    for opcode, payload in received:
        if opcode == 0x1 and "connected" in json.loads(payload):
            break
    block = flood_block(token)
    written = [0]

    def write():
        try:
            while True:
                sock.sendall(block)
                written[0] += len(block)
        except OSError:
            pass  # the gateway closed or dropped the connection

    def report():
        while True:
            time.sleep(args.report_every)
            say(f"WROTE {written[0]}")

    threading.Thread(target=write, daemon=True).start()
    if args.report_every:
        threading.Thread(target=report, daemon=True).start()
    threading.Thread(target=lambda: (sys.stdin.readline(), os._exit(0)), daemon=True).start()
    say("READY")
    try:
        for opcode, payload in received:
            if opcode == 0x8:
                code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
                say(f"CLOSED {code} {payload[2:].decode(errors='replace')}")
                break
        else:
            say("ENDED without a close frame")
    except OSError as e:
        say(f"ENDED {e!r}")
    say(f"WROTE {written[0]}")
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1:])
