"""chatgateway.auth.resumetokens: a token is bound to its profile and device, signed, and expires."""

import base64
import json

import pytest
from twisted.internet import task

from chatgateway import config
from chatgateway.auth.resumetokens import MAX_TOKEN_ROOMS, ResumeTokenError, ResumeTokens, token_secret

SECRET = b"k" * 32


def make(secret=SECRET, ttl=3600):
    clock = task.Clock()
    clock.advance(1_000_000)
    return ResumeTokens(secret, ttl, clock), clock


def test_a_token_reads_back_for_its_profile_and_device_with_its_positions():
    tokens, clock = make()
    token = tokens.issue("alice", "phone", {"r1": ("e1", 42), "r2": ("e2", 7)})
    claims = tokens.read(token, "alice", "phone")
    assert claims.positions == {"r1": ("e1", 42), "r2": ("e2", 7)}
    assert (claims.profile_id, claims.device_id) == ("alice", "phone")
    assert claims.expires_at == claims.issued_at + 3600 == int(clock.seconds()) + 3600


@pytest.mark.parametrize(
    "profile, device, reason", [("bob", "phone", "another profile"), ("alice", "laptop", "another profile or device")]
)
def test_a_token_of_another_profile_or_device_is_refused(profile, device, reason):
    tokens, _ = make()
    token = tokens.issue("alice", "phone", {"r1": ("e1", 1)})
    with pytest.raises(ResumeTokenError, match=reason):
        tokens.read(token, profile, device)


def test_a_tampered_token_is_refused():
    tokens, _ = make()
    token = tokens.issue("alice", "phone", {"r1": ("e1", 1)})
    prefix, payload, signature = token.split(".")
    forged = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    forged["r"] = [["r1", "e1", 0], ["secret-room", "e9", 0]]
    forged_payload = base64.urlsafe_b64encode(json.dumps(forged).encode()).rstrip(b"=").decode()
    with pytest.raises(ResumeTokenError, match="bad signature"):
        tokens.read(f"{prefix}.{forged_payload}.{signature}", "alice", "phone")
    flipped = signature[:-1] + ("A" if signature[-1] != "A" else "B")
    with pytest.raises(ResumeTokenError, match="bad signature"):
        tokens.read(f"{prefix}.{payload}.{flipped}", "alice", "phone")


def test_a_token_signed_with_another_key_is_refused():
    ours, _ = make()
    theirs, _ = make(secret=b"other")
    with pytest.raises(ResumeTokenError, match="bad signature"):
        ours.read(theirs.issue("alice", "phone", {}), "alice", "phone")


def test_a_token_expires_after_its_ttl():
    tokens, clock = make(ttl=60)
    token = tokens.issue("alice", "phone", {})
    clock.advance(59)
    assert tokens.read(token, "alice", "phone").positions == {}
    clock.advance(1)
    with pytest.raises(ResumeTokenError, match="expired"):
        tokens.read(token, "alice", "phone")


@pytest.mark.parametrize("garbage", ["", "r1.", "r1..", "eyJhbGciOi.x.y", "r1.abc", "x" * 9000, "r1.%%%.%%%"])
def test_garbage_is_refused_with_a_reason(garbage):
    tokens, _ = make()
    with pytest.raises(ResumeTokenError):
        tokens.read(garbage, "alice", "phone")


def test_a_well_signed_payload_of_the_wrong_shape_is_malformed():
    tokens, _ = make()
    signed = "r1." + base64.urlsafe_b64encode(b'{"p": "alice"}').rstrip(b"=").decode()
    with pytest.raises(ResumeTokenError, match="malformed"):
        tokens.read(signed + "." + tokens._sign(signed), "alice", "phone")


def test_a_token_carries_the_rooms_furthest_along_when_there_are_too_many():
    tokens, _ = make()
    positions = {f"room{i}": ("e", i) for i in range(MAX_TOKEN_ROOMS + 10)}
    carried = tokens.read(tokens.issue("alice", "phone", positions), "alice", "phone").positions
    assert len(carried) == MAX_TOKEN_ROOMS
    assert min(offset for _, offset in carried.values()) == 10


def _config(**env):
    return config.load({"JWT_SECRET": "jwt", **env})


def test_the_secret_is_the_setting_else_derived_from_jwt_secret_else_random():
    assert token_secret(_config(RESUME_TOKEN_SECRET="shared")) == b"shared"
    derived = token_secret(_config())
    assert derived == token_secret(_config())  # every gateway with the same JWT_SECRET
    assert derived != b"jwt" and derived != token_secret(config.load({"JWT_SECRET": "other"}))
    no_secret = config.load({"OAUTH2_JWKS_URI": "https://idp.example/jwks"})
    assert token_secret(no_secret) != token_secret(no_secret)  # random: this process only


def test_a_parent_of_workers_draws_one_key_for_itself_and_its_workers():
    from chatgateway.tap import shared_resume_secret

    jwks_only = config.load({"OAUTH2_JWKS_URI": "https://idp.example/jwks"})
    parent, env = shared_resume_secret(jwks_only, {"PATH": "/bin"})
    assert len(parent.resume_token_secret) == 64 and env["RESUME_TOKEN_SECRET"] == parent.resume_token_secret
    worker = config.load({"OAUTH2_JWKS_URI": "https://idp.example/jwks", **env})
    assert token_secret(worker) == token_secret(parent)
    with_jwt_secret = _config()
    assert shared_resume_secret(with_jwt_secret, {}) == (with_jwt_secret, {})  # derived: nothing to draw
