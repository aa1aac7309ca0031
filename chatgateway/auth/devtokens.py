"""HS256 tokens signed with JWT_SECRET: for development, the CLI, the benchmarks and tests."""

import time

import jwt


def mint_token(secret, profile_id, *, device_id=None, issuer="", audience="", ttl=3600, now=None, extra=None):
    """An HS256 token for development, the CLI and tests.

    ``iss``/``aud`` are omitted when empty; ``extra`` claims are added last (and may
    replace the standard ones, which tests use to craft bad tokens).
    """
    if now is None:
        now = time.time()
    payload = {"sub": profile_id, "iat": int(now), "exp": int(now + ttl)}
    if device_id is not None:
        payload["device_id"] = device_id
    if issuer:
        payload["iss"] = issuer
    if audience:
        payload["aud"] = audience
    payload.update(extra or {})
    return jwt.encode(payload, secret, algorithm="HS256")
