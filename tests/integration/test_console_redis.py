"""The console in production mode (CONSOLE_ENABLED, no --dev) on two real gateways sharing a
real redis-server, with `twistd chatcore`: the operator status of one gateway lists every
gateway, a browser device signed in with a pasted token (no /dev/token outside development)
shows up in it and is told when its room's stream was lost, and a gateway that stopped
leaves the list (docs/console.md#the-operator-page)."""

import json
import urllib.error
import urllib.request

import pytest

from chatgateway.auth.devtokens import mint_token
from chatgateway.bus.roomstream import position_key, stream_key
from chatgateway.console.admin import ADMIN_SCOPE
from support import browser
from support.processes import Twistd, free_port, until
from support.redis import RedisServer

SECRET = "console-redis-test-secret-0123456789abcd"
HEARTBEAT = 0.5


def token(profile, device=None, **extra):
    return mint_token(SECRET, profile, device_id=device, audience="service_chat_gateway", extra=extra or None)


def status(port, bearer):
    request = urllib.request.Request(f"http://127.0.0.1:{port}/console/status.json")
    request.add_header("Authorization", f"Bearer {bearer}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def send_event(port, bearer, room_id, text):
    """A message sent through the gateway's Connect API (curl's way)."""
    body = {"event": {"roomId": room_id, "type": "TEXT", "payload": {"text": text}}}
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/chat.v1.ChatService/SendEvent",
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {bearer}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


@pytest.fixture
def deployment():
    redis = RedisServer()
    core_port = free_port()
    env = {"JWT_SECRET": SECRET, "CACHE_URI": redis.uri, "OAUTH2_ISSUER": "", "LOG_LEVEL": "info"}
    core = Twistd("chatcore", ["--port", core_port], env=env, port=core_port)
    gateways = []
    for i in range(2):
        port = free_port()
        gateway_env = {
            **env,
            "CHAT_SERVICE_URI": f"127.0.0.1:{core_port}",
            "HTTP_PORT": str(port),
            "GRPC_PORT": str(free_port()),
            "HTTP_INTERFACE": "127.0.0.1",
            "GATEWAY_ID": f"gw-{i}",
            "HEARTBEAT_INTERVAL_SEC": str(HEARTBEAT),
            "CONSOLE_ENABLED": "true",
        }
        gateways.append(Twistd("chatgateway", ["--workers", "1"], env=gateway_env, port=port))
    core.start()
    for gateway in gateways:
        gateway.start()
    yield gateways, redis
    codes = [g.stop() for g in gateways if g.running]
    core.stop()
    redis.cleanup()
    assert set(codes) <= {0}, f"exit codes {codes}:\n" + "\n".join(g.log_tail(30) for g in gateways)
    for gateway in gateways:
        assert "Traceback (most recent call last)" not in gateway.log_text(), gateway.log_tail(60)


def rows(body):
    return {g["gateway_id"]: g["connections"] for g in body["gateways"]}


def rooms(body):
    return {g["gateway_id"]: g["rooms"] for g in body["gateways"]}


def test_every_gateway_on_redis_is_listed_with_its_connections_and_a_stopped_one_leaves(deployment):
    (gw0, gw1), redis = deployment
    admin = token("operator", scope=f"openid {ADMIN_SCOPE}")
    assert status(gw0.port, token("mallory"))[0] == 403  # production: a token without the scope

    code, body = until(
        lambda: (lambda s: s if s[0] == 200 and len(s[1]["gateways"]) == 2 else None)(status(gw0.port, admin)),
        what="both gateways registered",
    )
    assert body["store"] == "redis" and body["gateway"]["id"] == "gw-0"
    assert body["gateway"]["dependencies"]["store:redis"] == "up" and body["gateway"]["dependencies"]["core"] == "up"
    assert rows(body) == {"gw-0": 0, "gw-1": 0}

    driver = browser.chromium()
    try:
        page = browser.ChatPage(driver, f"http://127.0.0.1:{gw1.port}").open()
        page.wait(lambda: page.by_id("token").is_displayed(), "the token field (no /dev/token in production)")
        page.fill("token", token("dora", "kiosk"))
        page.sign_in("dora", "kiosk")
        assert page.status() == "connected to gw-1"
        until(lambda: rows(status(gw0.port, admin)[1]).get("gw-1") == 1, what="gw-1's device seen from gw-0")
        room = page.create_room("ops")
        until(lambda: rooms(status(gw0.port, admin)[1]).get("gw-1") == 1, what="gw-1's room seen from gw-0")
        page.open_room(room)
        page.send("from production mode")
        page.wait_message("dora", "from production mode")
        assert page.by_id("notice").text == ""

        # The room's stream is lost (its epoch and stream keys gone, as after a Redis flush):
        # the next event has a new epoch; the gateway takes the old epoch's rest from the core's
        # history (nothing is missing): the page shows the message and no loss.
        redis.client().delete(position_key(room), stream_key(room))
        page.send("after the loss")
        before = [("dora", "from production mode"), ("dora", "after the loss")]
        page.wait(lambda: page.messages() == before, "the timeline whole after the loss")
        assert page.by_id("notice").text == ""

        # gw-1 goes away while 40 messages (more than a page) go in through gw-0, then comes
        # back: the page's first frame resumes it (token and positions) and the gateway sends
        # the 40, every message once, in order.
        assert gw1.stop() == 0
        page.wait(lambda: not page.status().startswith("connected"), "gw-1 gone")
        missed = [f"while away {n:02d}" for n in range(40)]
        for text in missed:
            send_event(gw0.port, token("dora", "script"), room, text)
        gw1.start()
        page.wait_connected(timeout=60)
        page.wait(lambda: page.messages() == before + [("dora", t) for t in missed], "every message, in order")
        assert page.by_id("notice").text == ""
        assert browser.page_errors(driver) == []
    finally:
        browser.end_session(driver)

    assert gw1.stop() == 0
    until(lambda: set(rows(status(gw0.port, admin)[1])) == {"gw-0"}, what="the stopped gateway gone from the list")
