"""The common HS256 token, verified without PyJWT's generic machinery (docs/performance.md#jwt-verification).

PyJWT checks a token's base64url alphabet one character at a time in Python and
re-reads its options on every decode: ~70 us per token, the largest part of a
connect after Autobahn's handshake. ``verified_payload`` does the same checks for
the one shape nearly every token has, with C-implemented parts (a regular
expression, base64, json, hmac), and gives up (None) on anything else, which then
goes to PyJWT for the verdict and its reason. So it accepts a subset of what PyJWT
accepts, with the same payload; it never refuses a token itself.

The shape: three unpadded, canonical base64url segments; a header that is a JSON
object with ``alg`` "HS256", a string ``kid`` if any, and no ``b64`` or ``crit``; a
signature that matches; a payload that is a JSON object with ``exp`` and a string
``sub``, a string ``jti`` if any, and ``aud``/``iss`` exactly as PyJWT requires
them for the configured audience and issuer. Time claims are the verifier's.
"""

import base64
import binascii
import hashlib
import hmac
import json
import re

_COMPACT = re.compile(rb"\A([A-Za-z0-9_-]+)\.([A-Za-z0-9_-]+)\.([A-Za-z0-9_-]+)\Z")


def _segment(text):
    """The bytes of a canonical unpadded base64url segment, or None."""
    if len(text) % 4 == 1:
        return None
    try:
        data = base64.urlsafe_b64decode(text + b"=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        return None
    # Unused low bits of the last character set would decode the same: PyJWT refuses them.
    if base64.urlsafe_b64encode(data).rstrip(b"=") != text:
        return None
    return data


def _object(data):
    try:
        value = json.loads(data)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def _audience_ok(payload, audience):
    claim = payload.get("aud")
    if audience is None:
        return not claim
    if isinstance(claim, str):
        return claim == audience
    return isinstance(claim, list) and all(isinstance(c, str) for c in claim) and audience in claim


def verified_payload(token, key, audience=None, issuer=None):
    """The payload of ``token`` (str) if it is a well-formed HS256 JWT signed with ``key``
    (bytes) that PyJWT would accept for ``audience`` and ``issuer``; None otherwise
    (not necessarily a bad token: PyJWT decides)."""
    try:
        raw = token.encode("ascii")
    except (UnicodeError, AttributeError):
        return None
    match = _COMPACT.match(raw)
    if match is None:
        return None
    header_text, payload_text, signature_text = match.groups()
    header_data, payload_data, signature = _segment(header_text), _segment(payload_text), _segment(signature_text)
    if header_data is None or payload_data is None or signature is None:
        return None
    header = _object(header_data)
    if header is None or header.get("alg") != "HS256" or "b64" in header or "crit" in header:
        return None
    if "kid" in header and not isinstance(header["kid"], str):
        return None
    expected = hmac.new(key, raw[: match.end(2)], hashlib.sha256).digest()
    if not hmac.compare_digest(expected, signature):
        return None
    payload = _object(payload_data)
    if payload is None or payload.get("exp") is None or not isinstance(payload.get("sub"), str):
        return None
    if "jti" in payload and not isinstance(payload["jti"], str):
        return None
    if issuer is not None and payload.get("iss") != issuer:  # PyJWT: present, a string, equal
        return None
    if not _audience_ok(payload, audience):
        return None
    return payload
