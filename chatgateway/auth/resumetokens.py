"""Resume tokens: what a device gives back to resume (docs/protocol.md#resume-tokens).

A token is ``r1.<payload>.<signature>``: the payload is base64url JSON
``{"p": profile, "d": device, "i": issued, "e": expires, "r": [[room, epoch, offset], ...]}``
and the signature base64url HMAC-SHA256 of ``r1.<payload>`` with the key every gateway
shares (RESUME_TOKEN_SECRET, else derived from JWT_SECRET, else random per gateway: the
parent of --workers draws one for all of them, chatgateway.tap).

A token grants nothing: it is read only for the profile and device its connection
authenticated as, and the positions it carries are used only for rooms the profile is
a member of when it reconnects (chatgateway.sessions.resume). It carries the positions
its session started from (at most MAX_TOKEN_ROOMS rooms), so that a device resumes from
them even when the server-side record of its positions is gone; the record, written
later, is usually further along (chatgateway.store.resumepositions).

``read`` raises ResumeTokenError, whose message says why a token is ignored (another
profile or device, tampered, expired, malformed); the connect goes on without it.
"""

import base64
import binascii
import hashlib
import hmac
import json
import os

PREFIX = "r1."
# Rooms a token carries positions for: it travels in a URL (?resume_token=), so it stays short.
MAX_TOKEN_ROOMS = 32
# A longer one is not even decoded.
MAX_TOKEN_CHARS = 8192
_DERIVATION = b"chatgateway resume tokens v1"
MAX_OFFSET = 2**64 - 1  # a uint64, as in the API


class ResumeTokenError(Exception):
    """Why a resume token is ignored."""


def token_secret(config):
    """The key resume tokens are signed with: RESUME_TOKEN_SECRET; else derived from JWT_SECRET
    (gateways that verify the same HS256 tokens share it); else random, for this process only."""
    if config.resume_token_secret:
        return config.resume_token_secret.encode("utf-8")
    if config.jwt_secret:
        return hmac.new(config.jwt_secret.encode("utf-8"), _DERIVATION, hashlib.sha256).digest()
    return os.urandom(32)


def _b64(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text):
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class ResumeClaims:
    """A token that was read: its device and the positions it carries."""

    __slots__ = ("profile_id", "device_id", "issued_at", "expires_at", "positions")

    def __init__(self, profile_id, device_id, issued_at, expires_at, positions):
        self.profile_id = profile_id
        self.device_id = device_id
        self.issued_at = issued_at
        self.expires_at = expires_at
        self.positions = positions  # room id -> (epoch, offset)


class ResumeTokens:
    """Issues and reads resume tokens; ``ttl_sec`` after its issue a token is expired."""

    def __init__(self, secret, ttl_sec, clock):
        self._secret = secret
        self._ttl = ttl_sec
        self._clock = clock

    def _sign(self, signed):
        return _b64(hmac.digest(self._secret, signed.encode("ascii"), "sha256"))  # one-shot: the C path

    def issue(self, profile_id, device_id, positions):
        """A token for the device, carrying ``positions`` (room id -> (epoch, offset)), the
        MAX_TOKEN_ROOMS furthest along if there are more."""
        now = int(self._clock.seconds())
        chosen = sorted(positions.items(), key=lambda item: item[1][1], reverse=True)[:MAX_TOKEN_ROOMS]
        payload = {
            "p": profile_id,
            "d": device_id,
            "i": now,
            "e": now + int(self._ttl),
            "r": [[room, epoch, offset] for room, (epoch, offset) in sorted(chosen)],
        }
        signed = PREFIX + _b64(json.dumps(payload, separators=(",", ":")).encode("utf-8"))
        return signed + "." + self._sign(signed)

    def read(self, token, profile_id, device_id):
        """The claims of ``token`` for this profile and device; ResumeTokenError says why not."""
        if len(token) > MAX_TOKEN_CHARS or not token.startswith(PREFIX):
            raise ResumeTokenError("not a resume token of this gateway")
        signed, dot, signature = token.rpartition(".")
        if not dot or signed == PREFIX[:-1] or not hmac.compare_digest(self._sign(signed), signature):
            raise ResumeTokenError("bad signature (tampered, or signed with another RESUME_TOKEN_SECRET)")
        try:
            payload = json.loads(_unb64(signed[len(PREFIX) :]))
            claims = ResumeClaims(
                str(payload["p"]),
                str(payload["d"]),
                int(payload["i"]),
                int(payload["e"]),
                {str(room): (str(epoch), int(offset)) for room, epoch, offset in payload["r"]},
            )
        except (ValueError, KeyError, TypeError, binascii.Error, RecursionError) as e:
            raise ResumeTokenError(f"malformed payload ({e.__class__.__name__})") from None
        if claims.profile_id != profile_id or claims.device_id != device_id:
            raise ResumeTokenError("issued to another profile or device")
        if self._clock.seconds() >= claims.expires_at:
            raise ResumeTokenError("expired")
        if any(not 0 <= offset <= MAX_OFFSET for _, offset in claims.positions.values()):
            raise ResumeTokenError("malformed payload (offset out of range)")
        return claims
