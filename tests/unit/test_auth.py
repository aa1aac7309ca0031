"""chatgateway.auth (tokens, jwks, tokencache, devtokens): token rules, key confusion, JWKS caching and refetch limits."""

import base64
import builtins
import hashlib
import hmac
import json
import threading
import urllib.request

import jwt
import pytest
import pytest_twisted
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from twisted.internet import defer, task, threads
from twisted.web import resource, server

from chatgateway import config
from chatgateway.auth import jwks as jwks_module
from chatgateway.auth import tokencache
from chatgateway.auth.devtokens import mint_token
from chatgateway.auth.tokens import AuthError, Claims, TokenVerifier

SECRET = "a-development-secret-of-more-than-32-bytes"
AUDIENCE = "service_chat_gateway"
ISSUER = "https://issuer.example"
JWKS_URI = "https://issuer.example/jwks.json"
START = 1_700_000_000.0


def make_config(**settings):
    environ = {"JWT_LEEWAY_SEC": "30", "JWKS_REFETCH_COOLDOWN_SEC": "60"}
    environ.update(settings)
    return config.load(environ=environ)


def b64(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def craft(header, payload, signature=b"not-a-signature"):
    """A token put together by hand, for what PyJWT refuses to produce."""
    signing_input = b64(json.dumps(header).encode()) + "." + b64(json.dumps(payload).encode())
    return signing_input + "." + b64(signature)


def payload(now=START, **claims):
    base = {"sub": "alice", "aud": AUDIENCE, "iat": int(now), "exp": int(now) + 300}
    base.update(claims)
    return {k: v for k, v in base.items() if v is not None}


@pytest.fixture(scope="session")
def keys():
    return {
        "rsa-a": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "rsa-b": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "ec-256": ec.generate_private_key(ec.SECP256R1()),
        "ec-384": ec.generate_private_key(ec.SECP384R1()),
        "attacker": rsa.generate_private_key(public_exponent=65537, key_size=2048),
    }


def to_jwk(private_key, kid, alg=None):
    algorithm = RSAAlgorithm if isinstance(private_key, rsa.RSAPrivateKey) else ECAlgorithm
    entry = algorithm.to_jwk(private_key.public_key(), as_dict=True)
    entry["kid"] = kid
    entry["use"] = "sig"
    if alg:
        entry["alg"] = alg
    return entry


def jwks(*entries):
    return json.dumps({"keys": list(entries)}).encode()


def sign(private_key, alg, claims, **headers):
    return jwt.encode(claims, private_key, algorithm=alg, headers=headers or None)


class FakeFetch:
    """fetch(url, timeout): answers from ``documents`` (bytes or an exception), counting calls."""

    def __init__(self, documents=None):
        self.documents = dict(documents or {})
        self.urls = []
        self.timeouts = []

    def __call__(self, url, timeout):
        self.urls.append(url)
        self.timeouts.append(timeout)
        answer = self.documents.get(url)
        if answer is None:
            raise OSError(f"404 {url}")
        if isinstance(answer, Exception):
            raise answer
        return answer

    @property
    def count(self):
        return len(self.urls)


@pytest_twisted.async_yield_fixture
async def verifiers():
    """Builds TokenVerifiers on the running reactor and a task.Clock; closes them after."""
    from twisted.internet import reactor

    made = []

    def make(fetch=None, clock=None, **settings):
        clock = clock or task.Clock()
        if clock.seconds() == 0:
            clock.advance(START)
        verifier = TokenVerifier(make_config(**settings), reactor, clock=clock, fetch=fetch)
        made.append(verifier)
        return verifier, clock

    yield make
    for verifier in made:
        await verifier.close()


async def refused(d):
    """The reason of the AuthError that Deferred ``d`` fails with."""
    with pytest.raises(AuthError) as raised:
        await d
    return str(raised.value)


# -- HS256 ---------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_hs256_valid_token_gives_profile_device_and_expiry(verifiers):
    verifier, clock = verifiers(JWT_SECRET=SECRET)
    token = mint_token(SECRET, "alice", device_id="phone", audience=AUDIENCE, ttl=600, now=clock.seconds())

    claims = await verifier.verify(token)

    assert isinstance(claims, Claims)
    assert claims.profile_id == "alice"
    assert claims.device_id == "phone"
    assert claims.expires_at == START + 600
    assert claims.claims["aud"] == AUDIENCE
    assert verifier.verify_blocking(token) == claims


@pytest_twisted.ensureDeferred
async def test_hs256_without_device_id_claim(verifiers):
    verifier, clock = verifiers(JWT_SECRET=SECRET)
    claims = await verifier.verify(mint_token(SECRET, "bob", audience=AUDIENCE, now=clock.seconds()))
    assert (claims.profile_id, claims.device_id) == ("bob", None)


@pytest_twisted.ensureDeferred
async def test_expired_token_is_refused_after_the_leeway(verifiers):
    verifier, clock = verifiers(JWT_SECRET=SECRET)
    token = mint_token(SECRET, "alice", audience=AUDIENCE, ttl=60, now=clock.seconds())

    clock.advance(60 + 29)  # within JWT_LEEWAY_SEC=30
    assert (await verifier.verify(token)).profile_id == "alice"
    clock.advance(2)
    assert await refused(verifier.verify(token)) == "token expired"
    with pytest.raises(AuthError, match="token expired"):
        verifier.verify_blocking(token)


@pytest_twisted.ensureDeferred
async def test_a_token_verified_before_skips_pyjwt_but_not_the_clock(verifiers, monkeypatch):
    verifier, clock = verifiers(JWT_SECRET=SECRET)
    token = mint_token(SECRET, "alice", device_id="phone", audience=AUDIENCE, ttl=60, now=clock.seconds())
    decodes = []
    real_decode = verifier._signature_and_claims  # the signature check: chatgateway.auth.hs256's or PyJWT's
    monkeypatch.setattr(verifier, "_signature_and_claims", lambda *a: decodes.append(1) or real_decode(*a))
    first = await verifier.verify(token)
    assert await verifier.verify(token) == first == verifier.verify_blocking(token)
    assert len(decodes) == 1
    clock.advance(60 + 31)  # past exp and JWT_LEEWAY_SEC
    assert await refused(verifier.verify(token)) == "token expired"
    assert await refused(verifier.verify(token)) == "token expired"
    assert len(decodes) == 2  # forgotten once refused: checked in full again
    other = mint_token(SECRET + "-other", "alice", audience=AUDIENCE, now=clock.seconds())
    assert await refused(verifier.verify(other)) == "invalid signature"
    assert await refused(verifier.verify(other)) == "invalid signature"  # refusals are not remembered


@pytest_twisted.ensureDeferred
async def test_remembered_tokens_are_bounded_least_recently_used_first(verifiers, monkeypatch):
    monkeypatch.setattr(tokencache, "VERIFIED_TOKENS", 3)
    verifier, clock = verifiers(JWT_SECRET=SECRET)
    tokens = [mint_token(SECRET, f"p{i}", audience=AUDIENCE, now=clock.seconds()) for i in range(5)]
    for token in tokens[:3]:
        await verifier.verify(token)
    await verifier.verify(tokens[0])  # used again: now the most recent
    for token in tokens[3:]:
        await verifier.verify(token)
    assert list(verifier._verified) == [tokens[0], tokens[3], tokens[4]]


@pytest.mark.parametrize(
    "claims, reason",
    [
        (payload(exp=None), "missing exp claim"),
        (payload(exp="tomorrow"), "invalid exp claim"),
        (payload(sub=None), "missing sub claim"),
        (payload(sub=""), "invalid sub claim"),
        (payload(sub=42), "invalid sub claim"),
        (payload(nbf=int(START) + 120), "token not yet valid"),
        (payload(iat=int(START) + 120), "token not yet valid"),
        (payload(aud="someone_else"), "wrong audience"),
        (payload(aud=None), "missing aud claim"),
        (payload(device_id=7), "invalid device_id claim"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_claim_rules(verifiers, claims, reason):
    verifier, _ = verifiers(JWT_SECRET=SECRET)
    token = jwt.encode(claims, SECRET, algorithm="HS256")
    assert await refused(verifier.verify(token)) == reason


@pytest_twisted.ensureDeferred
async def test_nbf_within_leeway_and_audience_lists_are_accepted(verifiers):
    verifier, _ = verifiers(JWT_SECRET=SECRET)
    token = jwt.encode(payload(nbf=int(START) + 20, aud=["other", AUDIENCE]), SECRET, algorithm="HS256")
    assert (await verifier.verify(token)).profile_id == "alice"


@pytest_twisted.ensureDeferred
async def test_issuer_is_verified_when_configured(verifiers):
    verifier, clock = verifiers(JWT_SECRET=SECRET, OAUTH2_ISSUER=ISSUER, OAUTH2_JWKS_URI=JWKS_URI)
    now = clock.seconds()
    good = mint_token(SECRET, "alice", issuer=ISSUER, audience=AUDIENCE, now=now)
    wrong = mint_token(SECRET, "alice", issuer="https://evil.example", audience=AUDIENCE, now=now)
    missing = mint_token(SECRET, "alice", audience=AUDIENCE, now=now)

    assert (await verifier.verify(good)).profile_id == "alice"
    assert await refused(verifier.verify(wrong)) == "wrong issuer"
    assert await refused(verifier.verify(missing)) == "missing iss claim"


@pytest_twisted.ensureDeferred
async def test_wrong_secret_is_an_invalid_signature(verifiers):
    verifier, clock = verifiers(JWT_SECRET=SECRET)
    token = mint_token("another-secret-that-is-also-long-enough", "alice", audience=AUDIENCE, now=clock.seconds())
    assert await refused(verifier.verify(token)) == "invalid signature"


@pytest.mark.parametrize("alg", ["none", "NONE", "None"])
@pytest_twisted.ensureDeferred
async def test_alg_none_is_refused(verifiers, alg):
    fetch = FakeFetch()
    verifier, _ = verifiers(fetch=fetch, JWT_SECRET=SECRET, OAUTH2_JWKS_URI=JWKS_URI)
    for signature in (b"", b"anything"):
        token = craft({"alg": alg, "typ": "JWT"}, payload(), signature)
        assert await refused(verifier.verify(token)) == "unsupported algorithm none"
        with pytest.raises(AuthError, match="unsupported algorithm none"):
            verifier.verify_blocking(token)
    assert fetch.count == 0


@pytest.mark.parametrize(
    "token, reason",
    [
        ("", "missing token"),
        ("garbage", "malformed token"),
        ("a.b.c", "malformed token"),
        (None, "missing token"),
        ("x" * 20000, "token too large"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_malformed_tokens(verifiers, token, reason):
    verifier, _ = verifiers(JWT_SECRET=SECRET)
    assert await refused(verifier.verify(token)) == reason


@pytest.mark.parametrize(
    "typ, ok",
    [
        ("JWT", True),
        ("jwt", True),
        ("at+jwt", True),
        ("AT+JWT", True),
        ("application/at+jwt", True),
        ("JWE", False),
        ("dpop+jwt", False),
    ],
)
@pytest_twisted.ensureDeferred
async def test_typ_header(verifiers, typ, ok):
    verifier, _ = verifiers(JWT_SECRET=SECRET)
    token = jwt.encode(payload(), SECRET, algorithm="HS256", headers={"typ": typ})
    if ok:
        assert (await verifier.verify(token)).profile_id == "alice"
    else:
        assert await refused(verifier.verify(token)) == "unsupported token type"


# -- key confusion -------------------------------------------------------------------------


def hs256_signed_with(key_bytes, claims, **header):
    """HS256 over the token with ``key_bytes`` as the HMAC key (PyJWT refuses PEM keys)."""
    header = {"alg": "HS256", "typ": "JWT", **header}
    signing_input = b64(json.dumps(header).encode()) + "." + b64(json.dumps(claims).encode())
    signature = hmac.new(key_bytes, signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + b64(signature)


@pytest_twisted.ensureDeferred
async def test_hs256_signed_with_the_rsa_public_key_is_refused(verifiers, keys):
    pem = (
        keys["rsa-a"]
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    fetch = FakeFetch({JWKS_URI: jwks(to_jwk(keys["rsa-a"], "a"))})
    token = hs256_signed_with(pem, payload(), kid="a")

    jwks_only, _ = verifiers(fetch=fetch, OAUTH2_JWKS_URI=JWKS_URI)
    assert await refused(jwks_only.verify(token)) == "unsupported algorithm HS256"
    with pytest.raises(AuthError, match="unsupported algorithm HS256"):
        jwks_only.verify_blocking(token)
    assert fetch.count == 0

    both, _ = verifiers(fetch=fetch, OAUTH2_JWKS_URI=JWKS_URI, JWT_SECRET=SECRET)
    assert await refused(both.verify(token)) == "invalid signature"
    assert fetch.count == 0  # an HS256 token never consults the JWKS


@pytest_twisted.ensureDeferred
async def test_rs256_is_never_checked_with_the_hmac_secret(verifiers, keys):
    verifier, _ = verifiers(JWT_SECRET=SECRET)
    token = sign(keys["rsa-a"], "RS256", payload(), kid="a")
    assert await refused(verifier.verify(token)) == "unsupported algorithm RS256"


@pytest_twisted.ensureDeferred
async def test_token_alg_must_match_the_key_type(verifiers, keys):
    fetch = FakeFetch({JWKS_URI: jwks(to_jwk(keys["rsa-a"], "a"), to_jwk(keys["ec-256"], "e"))})
    verifier, _ = verifiers(fetch=fetch, OAUTH2_JWKS_URI=JWKS_URI)
    # ES256 signature, but naming the RSA key's kid: refused, and a known kid is not refetched.
    token = sign(keys["ec-256"], "ES256", payload(), kid="a")
    assert await refused(verifier.verify(token)) == "algorithm does not match the signing key"
    # An RSA key published with alg RS256 does not accept PS256.
    fetch.documents[JWKS_URI] = jwks(to_jwk(keys["rsa-b"], "b", alg="RS256"))
    other, _ = verifiers(fetch=fetch, OAUTH2_JWKS_URI=JWKS_URI)
    token = sign(keys["rsa-b"], "PS256", payload(), kid="b")
    assert await refused(other.verify(token)) == "algorithm does not match the signing key"
    assert fetch.count == 2


# -- JWKS ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key_name, alg, published_alg",
    [
        ("rsa-a", "RS256", None),
        ("rsa-a", "RS256", "RS256"),
        ("rsa-a", "RS384", None),
        ("rsa-a", "RS512", None),
        ("rsa-a", "PS256", "PS256"),
        ("ec-256", "ES256", None),
        ("ec-384", "ES384", "ES384"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_jwks_tokens_are_valid(verifiers, keys, key_name, alg, published_alg):
    fetch = FakeFetch({JWKS_URI: jwks(to_jwk(keys[key_name], "k1", published_alg), to_jwk(keys["rsa-b"], "k2"))})
    verifier, _ = verifiers(fetch=fetch, OAUTH2_JWKS_URI=JWKS_URI, CORE_TIMEOUT_SEC="2.5")
    token = sign(keys[key_name], alg, payload(device_id="tablet"), kid="k1")

    claims = await verifier.verify(token)

    assert (claims.profile_id, claims.device_id) == ("alice", "tablet")
    assert verifier.verify_blocking(token) == claims
    assert fetch.urls == [JWKS_URI]
    assert fetch.timeouts == [2.5]


@pytest_twisted.ensureDeferred
async def test_signature_by_another_key_with_a_known_kid_is_refused(verifiers, keys):
    fetch = FakeFetch({JWKS_URI: jwks(to_jwk(keys["rsa-a"], "a"))})
    verifier, _ = verifiers(fetch=fetch, OAUTH2_JWKS_URI=JWKS_URI)
    token = sign(keys["attacker"], "RS256", payload(), kid="a")
    assert await refused(verifier.verify(token)) == "invalid signature"


@pytest_twisted.ensureDeferred
async def test_token_without_kid_uses_the_only_key_of_its_type(verifiers, keys):
    fetch = FakeFetch({JWKS_URI: jwks(to_jwk(keys["rsa-a"], "a"), to_jwk(keys["ec-256"], "e"))})
    verifier, _ = verifiers(fetch=fetch, OAUTH2_JWKS_URI=JWKS_URI)
    assert (await verifier.verify(sign(keys["rsa-a"], "RS256", payload()))).profile_id == "alice"
    assert (await verifier.verify(sign(keys["ec-256"], "ES256", payload()))).profile_id == "alice"

    fetch.documents[JWKS_URI] = jwks(to_jwk(keys["rsa-a"], "a"), to_jwk(keys["rsa-b"], "b"))
    ambiguous, _ = verifiers(fetch=fetch, OAUTH2_JWKS_URI=JWKS_URI)
    assert await refused(ambiguous.verify(sign(keys["rsa-a"], "RS256", payload()))) == "unknown signing key"


@pytest_twisted.ensureDeferred
async def test_unknown_kid_refetches_once_then_is_refused(verifiers, keys):
    fetch = FakeFetch({JWKS_URI: jwks(to_jwk(keys["rsa-a"], "a"))})
    verifier, clock = verifiers(fetch=fetch, OAUTH2_JWKS_URI=JWKS_URI)
    assert (await verifier.verify(sign(keys["rsa-a"], "RS256", payload(), kid="a"))).profile_id == "alice"
    assert fetch.count == 1

    clock.advance(61)
    stranger = sign(keys["rsa-b"], "RS256", payload(now=clock.seconds()), kid="b")
    assert await refused(verifier.verify(stranger)) == "unknown signing key"
    assert fetch.count == 2
    assert await refused(verifier.verify(stranger)) == "unknown signing key"
    with pytest.raises(AuthError, match="unknown signing key"):
        verifier.verify_blocking(stranger)
    assert fetch.count == 2


def unknown_kid_token(i):
    return craft({"alg": "ES256", "typ": "JWT", "kid": f"unknown-{i}"}, payload())


@pytest_twisted.ensureDeferred
async def test_a_burst_of_unknown_kids_fetches_at_most_once_per_cooldown(verifiers, keys):
    fetch = FakeFetch({JWKS_URI: jwks(to_jwk(keys["ec-256"], "e"))})
    verifier, clock = verifiers(fetch=fetch, OAUTH2_JWKS_URI=JWKS_URI)

    # An empty cache: 1,000 concurrent verify() calls share one fetch in flight.
    results = await defer.DeferredList([verifier.verify(unknown_kid_token(i)) for i in range(1000)], consumeErrors=True)
    assert fetch.count == 1
    assert {str(f.value) for ok, f in results} == {"unknown signing key"}
    assert not any(ok for ok, _ in results)

    # Within the cooldown: no fetch at all.
    clock.advance(30)
    for i in range(1000, 2000):
        assert await refused(verifier.verify(unknown_kid_token(i))) == "unknown signing key"
    assert fetch.count == 1

    # After the cooldown: one more fetch for the whole burst.
    clock.advance(31)
    results = await defer.DeferredList(
        [verifier.verify(unknown_kid_token(i)) for i in range(2000, 3000)], consumeErrors=True
    )
    assert fetch.count == 2
    assert not any(ok for ok, _ in results)


def test_verify_blocking_threads_share_one_fetch(keys):
    release = threading.Event()
    fetch = FakeFetch({JWKS_URI: jwks(to_jwk(keys["ec-256"], "e"))})

    def slow_fetch(url, timeout):
        release.wait(5)
        return fetch(url, timeout)

    clock = task.Clock()
    clock.advance(START)
    verifier = TokenVerifier(make_config(OAUTH2_JWKS_URI=JWKS_URI), reactor=None, clock=clock, fetch=slow_fetch)
    token = sign(keys["ec-256"], "ES256", payload(), kid="e")
    results = []

    def call():
        results.append(verifier.verify_blocking(token).profile_id)

    workers = [threading.Thread(target=call) for _ in range(8)]
    for worker in workers:
        worker.start()
    release.set()
    for worker in workers:
        worker.join(5)
    assert results == ["alice"] * 8
    assert fetch.count == 1


@pytest_twisted.ensureDeferred
async def test_fetch_failure_keeps_the_last_good_keys(verifiers, keys):
    fetch = FakeFetch({JWKS_URI: jwks(to_jwk(keys["rsa-a"], "a"))})
    verifier, clock = verifiers(fetch=fetch, OAUTH2_JWKS_URI=JWKS_URI)
    known = sign(keys["rsa-a"], "RS256", payload(exp=int(START) + 10_000), kid="a")
    assert (await verifier.verify(known)).profile_id == "alice"

    for broken in (OSError("connection refused"), b"<html>not json</html>", jwks(), b'{"keys": [{"kty": "oct"}]}'):
        fetch.documents[JWKS_URI] = broken
        clock.advance(61)
        assert await refused(verifier.verify(unknown_kid_token(0))) == "unknown signing key"
        assert (await verifier.verify(known)).profile_id == "alice"
    assert fetch.count == 5


@pytest_twisted.ensureDeferred
async def test_no_keys_at_all_is_reported_as_unavailable(verifiers, keys):
    fetch = FakeFetch({JWKS_URI: OSError("down")})
    verifier, clock = verifiers(fetch=fetch, OAUTH2_JWKS_URI=JWKS_URI)
    token = sign(keys["rsa-a"], "RS256", payload(), kid="a")
    assert await refused(verifier.verify(token)) == "signing keys unavailable"
    assert await refused(verifier.verify(token)) == "signing keys unavailable"
    assert fetch.count == 1  # the cooldown applies to failed fetches too

    fetch.documents[JWKS_URI] = jwks(to_jwk(keys["rsa-a"], "a"))
    clock.advance(60)
    assert (await verifier.verify(token)).profile_id == "alice"


@pytest_twisted.ensureDeferred
async def test_rotated_keys_are_picked_up_on_the_next_refetch(verifiers, keys):
    fetch = FakeFetch({JWKS_URI: jwks(to_jwk(keys["rsa-a"], "a"))})
    verifier, clock = verifiers(fetch=fetch, OAUTH2_JWKS_URI=JWKS_URI)
    old = sign(keys["rsa-a"], "RS256", payload(exp=int(START) + 10_000), kid="a")
    assert (await verifier.verify(old)).profile_id == "alice"

    fetch.documents[JWKS_URI] = jwks(to_jwk(keys["rsa-b"], "b"))  # the issuer rotates
    clock.advance(10)
    new = sign(keys["rsa-b"], "RS256", payload(now=clock.seconds()), kid="b")
    assert await refused(verifier.verify(new)) == "unknown signing key"  # cooldown
    clock.advance(51)
    assert (await verifier.verify(new)).profile_id == "alice"
    assert (
        await refused(verifier.verify(old)) == "unknown signing key"
    )  # removed at the issuer: verified before, refused now
    assert fetch.count == 2


@pytest_twisted.ensureDeferred
async def test_keys_older_than_the_max_age_are_refetched(verifiers, keys):
    fetch = FakeFetch({JWKS_URI: jwks(to_jwk(keys["rsa-a"], "a"))})
    verifier, clock = verifiers(fetch=fetch, OAUTH2_JWKS_URI=JWKS_URI)

    def token():
        return sign(keys["rsa-a"], "RS256", payload(now=clock.seconds()), kid="a")

    assert (await verifier.verify(token())).profile_id == "alice"
    remembered = token()
    assert (await verifier.verify(remembered)).profile_id == "alice"
    clock.advance(jwks_module.JWKS_MAX_AGE_SEC - 1)
    assert (await verifier.verify(token())).profile_id == "alice"
    assert fetch.count == 1
    clock.advance(1)
    fetch.documents[JWKS_URI] = OSError("down")
    assert (await verifier.verify(token())).profile_id == "alice"  # stale keys still serve
    assert fetch.count == 2
    fetch.documents[JWKS_URI] = jwks(to_jwk(keys["rsa-b"], "b"))  # "a" revoked
    clock.advance(60)
    assert await refused(verifier.verify(token())) == "unknown signing key"
    assert fetch.count == 3
    assert await refused(verifier.verify(remembered)) == "unknown signing key"  # verified by "a" before


@pytest_twisted.ensureDeferred
async def test_discovery_via_issuer(verifiers, keys):
    discovery = ISSUER + "/.well-known/openid-configuration"
    keys_uri = ISSUER + "/protocol/certs"
    fetch = FakeFetch(
        {
            discovery: json.dumps({"issuer": ISSUER, "jwks_uri": keys_uri}).encode(),
            keys_uri: jwks(to_jwk(keys["ec-256"], "e")),
        }
    )
    verifier, clock = verifiers(fetch=fetch, OAUTH2_ISSUER=ISSUER + "/")
    token = sign(keys["ec-256"], "ES256", payload(iss=ISSUER + "/"), kid="e")
    assert (await verifier.verify(token)).profile_id == "alice"
    assert fetch.urls == [discovery, keys_uri]

    clock.advance(61)
    await refused(verifier.verify(unknown_kid_token(1)))
    assert fetch.urls == [discovery, keys_uri, keys_uri]  # the jwks_uri is remembered


@pytest_twisted.ensureDeferred
async def test_discovery_naming_another_issuer_is_not_trusted(verifiers, keys):
    discovery = ISSUER + "/.well-known/openid-configuration"
    fetch = FakeFetch(
        {
            discovery: json.dumps({"issuer": "https://evil.example", "jwks_uri": JWKS_URI}).encode(),
            JWKS_URI: jwks(to_jwk(keys["ec-256"], "e")),
        }
    )
    verifier, _ = verifiers(fetch=fetch, OAUTH2_ISSUER=ISSUER)
    token = sign(keys["ec-256"], "ES256", payload(iss=ISSUER), kid="e")
    assert await refused(verifier.verify(token)) == "signing keys unavailable"
    assert fetch.urls == [discovery]


@pytest_twisted.ensureDeferred
async def test_path_like_kid_is_only_a_lookup_key(verifiers, keys, monkeypatch):
    fetch = FakeFetch({JWKS_URI: jwks(to_jwk(keys["rsa-a"], "a"))})
    verifier, _ = verifiers(fetch=fetch, OAUTH2_JWKS_URI=JWKS_URI)
    assert (await verifier.verify(sign(keys["rsa-a"], "RS256", payload(), kid="a"))).profile_id == "alice"

    def forbidden(*args, **kwargs):
        raise AssertionError(f"unexpected access: {args!r}")

    monkeypatch.setattr(builtins, "open", forbidden)
    monkeypatch.setattr(urllib.request, "urlopen", forbidden)
    monkeypatch.setattr(jwks_module._OPENER, "open", forbidden)
    for kid in ("../../etc/passwd", "/etc/passwd", "file:///etc/passwd", "http://127.0.0.1:1/keys"):
        token = sign(keys["rsa-a"], "RS256", payload(), kid=kid)
        assert await refused(verifier.verify(token)) == "unknown signing key"
        with pytest.raises(AuthError, match="unknown signing key"):
            verifier.verify_blocking(token)
    assert fetch.urls == [JWKS_URI]


# -- real HTTP servers --------------------------------------------------------------------


class CountingJSON(resource.Resource):
    isLeaf = True

    def __init__(self, documents):
        super().__init__()
        self.documents = documents
        self.requests = []

    def render_GET(self, request):
        path = request.path.decode()
        self.requests.append(path)
        if path not in self.documents:
            request.setResponseCode(404)
            return b"{}"
        request.setHeader(b"content-type", b"application/json")
        return self.documents[path]


@pytest_twisted.async_yield_fixture
async def http_server():
    from twisted.internet import reactor

    site = CountingJSON({})
    port = reactor.listenTCP(0, server.Site(site), interface="127.0.0.1")
    site.url = f"http://127.0.0.1:{port.getHost().port}"
    yield site
    await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_jku_x5u_and_jwk_headers_are_never_fetched(verifiers, keys, http_server):
    attacker_jwk = to_jwk(keys["attacker"], "evil")
    http_server.documents["/evil.json"] = jwks(attacker_jwk)
    fetch = FakeFetch({JWKS_URI: jwks(to_jwk(keys["rsa-a"], "a"))})
    verifier, clock = verifiers(fetch=fetch, OAUTH2_JWKS_URI=JWKS_URI)
    jku = http_server.url + "/evil.json"

    forged = sign(keys["attacker"], "RS256", payload(), kid="evil", jku=jku, x5u=jku)
    assert await refused(verifier.verify(forged)) == "unknown signing key"
    embedded = sign(keys["attacker"], "RS256", payload(), kid="a", jwk=attacker_jwk, jku=jku)
    assert await refused(verifier.verify(embedded)) == "invalid signature"
    clock.advance(61)
    with pytest.raises(AuthError, match="unknown signing key"):
        verifier.verify_blocking(forged)
    # A genuine token carrying a jku is verified with the configured JWKS only.
    genuine = sign(keys["rsa-a"], "RS256", payload(), kid="a", jku=jku)
    assert (await verifier.verify(genuine)).profile_id == "alice"

    assert http_server.requests == []
    assert set(fetch.urls) == {JWKS_URI}


@pytest_twisted.ensureDeferred
async def test_verify_end_to_end_against_a_real_jwks_server(keys, http_server):
    from twisted.internet import reactor

    http_server.documents["/jwks.json"] = jwks(to_jwk(keys["rsa-a"], "a"), to_jwk(keys["ec-256"], "e"))
    verifier = TokenVerifier(make_config(OAUTH2_JWKS_URI=http_server.url + "/jwks.json"), reactor)
    try:
        now = reactor.seconds()
        rs = sign(keys["rsa-a"], "RS256", payload(now=now, device_id="d1"), kid="a")
        es = sign(keys["ec-256"], "ES256", payload(now=now, sub="bob"), kid="e")

        # Concurrent first calls share one fetch, made on the verifier's thread pool.
        claims = await defer.gatherResults([verifier.verify(rs), verifier.verify(es), verifier.verify(rs)])
        assert [(c.profile_id, c.device_id) for c in claims] == [("alice", "d1"), ("bob", None), ("alice", "d1")]
        assert http_server.requests == ["/jwks.json"]

        # The core's path: blocking verification from a worker thread, served from the cache.
        blocking = await threads.deferToThread(verifier.verify_blocking, es)
        assert blocking.profile_id == "bob"
        # An unknown kid right after the fetch is within the cooldown: refused with no request.
        assert await refused(verifier.verify(unknown_kid_token(0))) == "unknown signing key"
        assert http_server.requests == ["/jwks.json"]
    finally:
        await verifier.close()


@pytest_twisted.ensureDeferred
async def test_real_fetch_failure_is_an_auth_error(http_server):
    from twisted.internet import reactor

    verifier = TokenVerifier(make_config(OAUTH2_JWKS_URI=http_server.url + "/missing.json"), reactor)
    try:
        assert await refused(verifier.verify(unknown_kid_token(0))) == "signing keys unavailable"
        assert http_server.requests == ["/missing.json"]
    finally:
        await verifier.close()


def test_fetch_url_refuses_other_schemes(monkeypatch):
    monkeypatch.setattr(builtins, "open", lambda *a, **k: pytest.fail("opened a file"))
    for url in ("file:///etc/passwd", "ftp://example.com/keys", "../../etc/passwd"):
        with pytest.raises(ValueError):
            jwks_module.fetch_url(url, 1)


# -- mint_token ------------------------------------------------------------------------------


def test_mint_token_claims():
    token = mint_token(
        SECRET, "alice", device_id="d", issuer=ISSUER, audience=AUDIENCE, ttl=10, now=START, extra={"role": "admin"}
    )
    header = jwt.get_unverified_header(token)
    claims = jwt.decode(token, SECRET, algorithms=["HS256"], audience=AUDIENCE, options={"verify_exp": False})
    assert header["alg"] == "HS256"
    assert claims == {
        "sub": "alice",
        "device_id": "d",
        "iss": ISSUER,
        "aud": AUDIENCE,
        "iat": int(START),
        "exp": int(START) + 10,
        "role": "admin",
    }

    bare = jwt.decode(mint_token(SECRET, "bob", now=START), options={"verify_signature": False})
    assert set(bare) == {"sub", "iat", "exp"}


@pytest_twisted.ensureDeferred
async def test_close_without_fetch_and_twice(verifiers):
    verifier, _ = verifiers(JWT_SECRET=SECRET)
    assert await verifier.close() is None
    assert await verifier.close() is None


# -- against a local JWKS server: the issue's list, counted at the server ----------------------


@pytest_twisted.ensureDeferred
async def test_a_burst_of_unknown_kids_makes_one_request_per_cooldown_at_a_real_jwks_server(keys, http_server):
    from twisted.internet import reactor

    http_server.documents["/jwks.json"] = jwks(to_jwk(keys["ec-256"], "e"))
    clock = task.Clock()
    clock.advance(START)
    verifier = TokenVerifier(make_config(OAUTH2_JWKS_URI=http_server.url + "/jwks.json"), reactor, clock=clock)
    try:
        for burst in range(3):
            tokens = [unknown_kid_token(burst * 1000 + i) for i in range(1000)]
            results = await defer.DeferredList([verifier.verify(t) for t in tokens], consumeErrors=True)
            assert {str(f.value) for ok, f in results if not ok} == {"unknown signing key"}
            assert all(not ok for ok, _ in results)
            # the first burst fetches once; the second is within the cooldown; the third is past it
            assert len(http_server.requests) == [1, 1, 2][burst]
            clock.advance([30, 31, 0][burst])
        good = sign(keys["ec-256"], "ES256", payload(now=clock.seconds()), kid="e")
        assert (await verifier.verify(good)).profile_id == "alice"
        assert http_server.requests == ["/jwks.json", "/jwks.json"]
    finally:
        await verifier.close()


@pytest_twisted.ensureDeferred
async def test_keys_rotated_at_a_real_jwks_server_are_picked_up_without_restart(keys, http_server):
    from twisted.internet import reactor

    http_server.documents["/jwks.json"] = jwks(to_jwk(keys["rsa-a"], "2025"))
    clock = task.Clock()
    clock.advance(START)
    verifier = TokenVerifier(make_config(OAUTH2_JWKS_URI=http_server.url + "/jwks.json"), reactor, clock=clock)
    try:
        old = sign(keys["rsa-a"], "RS256", payload(exp=int(START) + 10_000), kid="2025")
        assert (await verifier.verify(old)).profile_id == "alice"
        # The issuer publishes the next key beside the old one, then signs with it.
        http_server.documents["/jwks.json"] = jwks(to_jwk(keys["rsa-a"], "2025"), to_jwk(keys["rsa-b"], "2026"))
        clock.advance(61)
        new = sign(keys["rsa-b"], "RS256", payload(exp=int(START) + 10_000), kid="2026")
        assert (await verifier.verify(new)).profile_id == "alice"
        assert (await verifier.verify(old)).profile_id == "alice"
        # Then it retires the old key: gone at the next refetch.
        http_server.documents["/jwks.json"] = jwks(to_jwk(keys["rsa-b"], "2026"))
        clock.advance(jwks_module.JWKS_MAX_AGE_SEC)
        assert (await verifier.verify(new)).profile_id == "alice"
        assert await refused(verifier.verify(old)) == "unknown signing key"
        assert http_server.requests == ["/jwks.json"] * 3
    finally:
        await verifier.close()


@pytest_twisted.ensureDeferred
async def test_the_websocket_edge_refuses_every_bad_token_and_follows_no_jku(keys, http_server):
    """The issue's list through a real handshake: each is HTTP 401, no upgrade, no request to the jku."""
    from twisted.internet import reactor

    from support.wsharness import Harness

    pem = (
        keys["rsa-a"]
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    http_server.documents["/jwks.json"] = jwks(to_jwk(keys["rsa-a"], "a"))
    evil_jwks = http_server.url + "/evil.json"
    http_server.documents["/evil.json"] = jwks(to_jwk(keys["attacker"], "evil"))
    h = Harness(JWT_SECRET=SECRET, OAUTH2_ISSUER=ISSUER, OAUTH2_JWKS_URI=http_server.url + "/jwks.json")
    verifier = TokenVerifier(h.config, reactor, clock=h.clock)
    h.gateway.verifier = verifier
    now = h.clock.seconds()
    claims = dict(iss=ISSUER, iat=int(now), exp=int(now) + 300)
    bad = {
        "alg none": craft({"alg": "none", "typ": "JWT"}, payload(now, **claims), b""),
        "alg NONE": craft({"alg": "NONE", "typ": "JWT"}, payload(now, **claims), b""),
        "HS256 with the RSA public key": hs256_signed_with(pem, payload(now, **claims), kid="a"),
        "missing exp": jwt.encode(payload(now, **{**claims, "exp": None}), SECRET, algorithm="HS256"),
        "future nbf": jwt.encode(payload(now, nbf=int(now) + 600, **claims), SECRET, algorithm="HS256"),
        "wrong iss": jwt.encode(payload(now, **{**claims, "iss": "https://evil.example"}), SECRET, algorithm="HS256"),
        "wrong aud": jwt.encode(payload(now, aud="another-service", **claims), SECRET, algorithm="HS256"),
        "kid ../../etc/passwd": sign(keys["attacker"], "RS256", payload(now, **claims), kid="../../etc/passwd"),
        "jku to a local server": sign(keys["attacker"], "RS256", payload(now, **claims), kid="evil", jku=evil_jwks),
    }
    try:
        good = sign(keys["rsa-a"], "RS256", payload(now, **claims), kid="a")
        for name, token in [*bad.items(), ("good", good)]:
            c = h.connect(token)
            for _ in range(200):  # the JWKS is fetched on a thread: let it answer
                if c.closed is not None or c.factory.opened:
                    break
                await task.deferLater(reactor, 0.01, h.flush)
            if name == "good":
                assert c.factory.opened and c.of("connected"), name
            else:
                assert not c.factory.opened and "401" in c.client.http_status_line, name
        assert "/evil.json" not in http_server.requests
        assert http_server.requests.count("/jwks.json") <= 2
    finally:
        h.stop()
        await verifier.close()
