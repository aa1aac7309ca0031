"""The reconnect hint of a close reason: the one format, made and read here
(docs/protocol.md#reconnect-hints).

A gateway that closes a device it wants back later (1001 draining, 1013 try again
later) ends the close reason with ``reconnect in N.Ns``: the delay, random per device,
after which to reconnect. Spread that way, the devices of one gateway do not all
arrive at the others (or at this one, once it can serve them again) in the same second.
"""

import random
import re

# A draining gateway's devices reconnect (elsewhere) within this many seconds.
DRAIN_SPREAD_SEC = 5.0
# A refusing gateway's (1013: the core could not list the rooms, overload) within these.
TRY_AGAIN_MIN_SEC = 1.0
TRY_AGAIN_SPREAD_SEC = 10.0
# WebSocket close reasons are limited to 123 bytes of UTF-8; the hint is never the part cut.
MAX_REASON_BYTES = 123

_HINT = re.compile(r"reconnect in (\d+(?:\.\d+)?) ?s\b")


def drain_delay(rng=random):
    """Seconds a drained device waits before it reconnects: uniform in [0, DRAIN_SPREAD_SEC]."""
    return rng.uniform(0.0, DRAIN_SPREAD_SEC)


def try_again_delay(rng=random):
    """Seconds a refused device waits: uniform in [TRY_AGAIN_MIN_SEC, TRY_AGAIN_SPREAD_SEC]."""
    return rng.uniform(TRY_AGAIN_MIN_SEC, TRY_AGAIN_SPREAD_SEC)


def hinted(cause, delay):
    """``"<cause>: reconnect in N.Ns"``, the cause cut so that the whole is a valid close reason."""
    hint = f": reconnect in {delay:.1f}s"
    room = MAX_REASON_BYTES - len(hint)
    encoded = cause.encode("utf-8")
    if len(encoded) > room:
        cause = encoded[:room].decode("utf-8", "ignore")
    return cause + hint


def reconnect_delay(reason):
    """The delay of a close reason's hint, in seconds; None when it carries none."""
    found = _HINT.search(reason or "")
    return float(found.group(1)) if found else None
