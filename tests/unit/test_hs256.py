"""chatgateway.auth.hs256 accepts only what PyJWT accepts, with the same payload, and the
verifier takes the common token through it without PyJWT (docs/performance.md#jwt-verification)."""

import base64
import hashlib
import hmac
import json
import time

import jwt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import task

from chatgateway import config
from chatgateway.auth import hs256
from chatgateway.auth.devtokens import mint_token
from chatgateway.auth.tokens import AuthError, TokenVerifier

SECRET = "hs256-test-secret-0123456789abcdef0123"
KEY = SECRET.encode()
AUDIENCE = "service_chat_gateway"
ISSUER = "https://issuer.example"


def b64(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def compact(header, payload, key=KEY, header_bytes=None, payload_bytes=None):
    head = b64(header_bytes if header_bytes is not None else json.dumps(header).encode())
    body = b64(payload_bytes if payload_bytes is not None else json.dumps(payload).encode())
    signature = hmac.new(key, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(signature)}"


def pyjwt(token, audience, issuer):
    """What TokenVerifier asks of PyJWT: the payload, or None when it refuses."""
    try:
        return jwt.decode(
            token,
            SECRET,
            algorithms=["HS256"],
            audience=audience,
            issuer=issuer,
            options={"require": ["exp", "sub"], "verify_exp": False, "verify_nbf": False, "verify_iat": False},
        )
    except jwt.PyJWTError:
        return None


def claims(**extra):
    base = {"sub": "alice", "exp": int(time.time()) + 3600, "aud": AUDIENCE, "iss": ISSUER}
    base.update(extra)
    return {k: v for k, v in base.items() if v is not None}


def mutate(token, position, character):
    position %= len(token)
    return token[:position] + character + token[position + 1 :]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)
claim_values = st.one_of(
    st.just(AUDIENCE), st.just(ISSUER), st.just([AUDIENCE, "other"]), st.just([]), st.just(""), json_values
)
headers = st.fixed_dictionaries(
    {"alg": st.sampled_from(["HS256", "HS384", "none", "RS256", "hs256"])},
    optional={
        "typ": st.sampled_from(["JWT", "at+jwt", 1]),
        "kid": st.one_of(st.text(max_size=4), st.integers()),
        "b64": st.booleans(),
        "crit": st.one_of(st.just(["b64"]), st.just([]), json_values),
    },
)
payloads = st.fixed_dictionaries(
    {},
    optional={
        "sub": st.one_of(st.just("alice"), st.just(""), json_values),
        "exp": st.one_of(st.just(int(time.time()) + 60), json_values),
        "aud": claim_values,
        "iss": claim_values,
        "jti": st.one_of(st.text(max_size=4), st.integers()),
        "device_id": st.text(max_size=4),
    },
)


@settings(max_examples=400, deadline=None)
@given(
    header=headers,
    payload=payloads,
    audience=st.sampled_from([AUDIENCE, None]),
    issuer=st.sampled_from([ISSUER, None]),
    key=st.sampled_from([KEY, b"another-key-of-some-length-0123456789"]),
    damage=st.one_of(st.none(), st.tuples(st.integers(0, 400), st.sampled_from(list("A_-=.+/ \x00é")))),
    padded=st.booleans(),
)
def test_accepts_only_what_pyjwt_accepts_with_the_same_payload(header, payload, audience, issuer, key, damage, padded):
    token = compact(header, payload, key=key)
    if padded:
        token += "=" * (-len(token.rsplit(".", 1)[1]) % 4 or 1)
    if damage is not None:
        token = mutate(token, *damage)
    fast = hs256.verified_payload(token, KEY, audience, issuer)
    if fast is not None:
        assert fast == pyjwt(token, audience, issuer)


@pytest.mark.parametrize(
    "token",
    [
        compact({"alg": "HS256", "typ": "JWT"}, claims()),
        compact({"alg": "HS256", "kid": "k1"}, claims(aud=[AUDIENCE, "x"], jti="j")),
        mint_token(SECRET, "bob", device_id="phone", audience=AUDIENCE, issuer=ISSUER),
    ],
)
def test_the_common_tokens_take_the_fast_path(token):
    payload = hs256.verified_payload(token, KEY, AUDIENCE, ISSUER)
    assert payload is not None and payload == pyjwt(token, AUDIENCE, ISSUER)


@pytest.mark.parametrize(
    "token",
    [
        compact({"alg": "HS256"}, claims(), key=b"wrong-key-0123456789abcdef0123456"),
        compact({"alg": "HS384"}, claims()),
        compact({"alg": "HS256", "b64": True}, claims()),
        compact({"alg": "HS256", "crit": ["b64"]}, claims()),
        compact({"alg": "HS256", "kid": 7}, claims()),
        compact({"alg": "HS256"}, claims(aud="someone-else")),
        compact({"alg": "HS256"}, claims(aud=None)),
        compact({"alg": "HS256"}, claims(iss="https://evil.example")),
        compact({"alg": "HS256"}, claims(sub=5)),
        compact({"alg": "HS256"}, claims(exp=None)),
        compact({"alg": "HS256"}, claims(jti=3)),
        compact({"alg": "HS256"}, None, payload_bytes=b"[1, 2]"),
        compact({"alg": "HS256"}, claims()) + "=",
        compact({"alg": "HS256"}, claims())[:-1] + "_",  # non-canonical last character (or a bad signature)
        "a.b",
        "",
    ],
)
def test_anything_else_is_left_to_pyjwt(token):
    assert hs256.verified_payload(token, KEY, AUDIENCE, ISSUER) is None


def verifier():
    clock = task.Clock()
    clock.advance(time.time())
    env = {"JWT_SECRET": SECRET, "OAUTH2_ISSUER": "", "OAUTH2_JWT_VERIFY_AUDIENCE": AUDIENCE}
    return TokenVerifier(config.load(env), clock=clock, fetch=lambda url, timeout: None)


def test_the_verifier_checks_a_common_token_without_pyjwt(monkeypatch):
    tokens = verifier()
    monkeypatch.setattr(tokens._decoder, "decode", lambda *a, **k: pytest.fail("PyJWT was asked"))
    token = mint_token(SECRET, "carol", device_id="tablet", audience=AUDIENCE)
    claims_ = tokens.verify(token).result
    assert (claims_.profile_id, claims_.device_id) == ("carol", "tablet")


def test_the_verifier_still_refuses_what_the_fast_path_leaves_to_pyjwt():
    tokens = verifier()
    forged = mint_token("another-secret-of-32-bytes-or-more!", "mallory", audience=AUDIENCE)
    failure = tokens.verify(forged)
    failures = []
    failure.addErrback(failures.append)
    assert failures[0].check(AuthError) and str(failures[0].value) == "invalid signature"
