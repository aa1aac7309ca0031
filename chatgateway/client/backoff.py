"""When chatgateway-client reconnects (docs/protocol.md#reconnect-hints): after the delay the
gateway asked for (a close reason's ``reconnect in N.Ns``, a refused upgrade's Retry-After),
and never sooner than full-jitter backoff: uniform in [0, min(CAP_SEC, BASE_SEC x 2^n)] for
the n-th failure in a row."""

import random
import re

from chatgateway.sessions.reconnect import reconnect_delay

BASE_SEC = 1.0
CAP_SEC = 60.0
# Closes after which a new connection may be let in: draining (1001), dropped (1006), try again
# later (1013), heartbeat timeout (4408). Not a replaced device (4001), a refused token (4401),
# a slow consumer (4429) or a protocol error: those would only happen again.
RECONNECT_CODES = frozenset({1001, 1006, 1013, 4408})
# A refused upgrade (Autobahn's reason for it), and the statuses worth retrying.
_REFUSED = re.compile(r"upgrade failed \[(\d+)\]")
RETRY_STATUSES = frozenset({429, 503})


def asked_delay(closed):
    """Seconds the gateway asked ``closed`` (a wsclient.ClosedError) to wait, or None."""
    if closed.retry_after is not None:
        return closed.retry_after
    return reconnect_delay(closed.reason)


def reconnect_after(closed, failures, rng=random):
    """Seconds to wait before reconnecting after ``closed``, the ``failures``-th failure in a row
    (0 for the first); None when reconnecting would not help."""
    refused = _REFUSED.search(closed.reason or "")
    if refused and int(refused.group(1)) not in RETRY_STATUSES:
        return None  # 401, 403, 400...: the same request would be refused again
    if closed.code not in RECONNECT_CODES and closed.retry_after is None:
        return None
    jitter = rng.uniform(0.0, min(CAP_SEC, BASE_SEC * 2**failures))
    return max(asked_delay(closed) or 0.0, jitter)
