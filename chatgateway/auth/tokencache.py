"""Tokens verified before, so that a device reconnecting with the same token skips PyJWT.

A verified token is remembered by its exact string, up to VERIFIED_TOKENS of them
(least recently used forgotten first; longer than MAX_REMEMBERED_TOKEN_BYTES: not
kept), with the key that verified it. A remembered verification counts only while
that same key object is the one found for the token now, so a JWKS refetch or a
removed key sends the token through full verification again. What can change with
time (the time claims) is the verifier's to check on every use.
"""

import collections
import threading

VERIFIED_TOKENS = 2048
MAX_REMEMBERED_TOKEN_BYTES = 2048


class VerifiedTokens:
    """token -> (the key that verified it, its payload); the reactor and worker threads share it."""

    def __init__(self):
        self._entries = collections.OrderedDict()
        self._lock = threading.Lock()

    def recall(self, token, key):
        """The payload of ``token`` if ``key`` (this very object) verified it before."""
        with self._lock:
            entry = self._entries.get(token)
            if entry is None or entry[0] is not key:
                return None
            self._entries.move_to_end(token)
            return entry[1]

    def remember(self, token, key, payload):
        if len(token) > MAX_REMEMBERED_TOKEN_BYTES:
            return
        with self._lock:
            self._entries[token] = (key, payload)
            self._entries.move_to_end(token)
            if len(self._entries) > VERIFIED_TOKENS:
                self._entries.popitem(last=False)

    def forget(self, token):
        with self._lock:
            self._entries.pop(token, None)

    def __iter__(self):
        """The remembered tokens, least recently used first."""
        with self._lock:
            return iter(list(self._entries))
