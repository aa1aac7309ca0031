"""``chatgateway-client tail`` reconnects and resumes by itself: its gateway is SIGKILLed and
started again while messages go on through another gateway (real redis-server, chatcore, two
`twistd chatgateway`, the CLI as subprocesses); tail prints every message once, in order."""

import re

import pytest
from test_cli import LINE, Running, cli, ok

from chatgateway.auth.devtokens import mint_token
from support.chat import unique
from support.processes import Twistd, free_port
from support.redis import RedisServer

SECRET = "cli-resume-secret-0123456789abcdef012345"


def token(profile, device):
    return mint_token(SECRET, profile, device_id=device, audience="service_chat_gateway")


@pytest.fixture
def deployment():
    redis = RedisServer()
    core_port = free_port()
    env = {"JWT_SECRET": SECRET, "CACHE_URI": redis.uri, "OAUTH2_ISSUER": "", "LOG_LEVEL": "info"}
    core = Twistd("chatcore", ["--port", core_port], env=env, port=core_port)
    gateways = []
    for name in ("gw-tail", "gw-send"):
        port = free_port()
        gateway_env = {
            **env,
            "CHAT_SERVICE_URI": f"127.0.0.1:{core_port}",
            "HTTP_PORT": str(port),
            "GRPC_PORT": str(free_port()),
            "HTTP_INTERFACE": "127.0.0.1",
            "GATEWAY_ID": name,
        }
        gateways.append(Twistd("chatgateway", ["--workers", "1"], env=gateway_env, port=port))
    core.start()
    for gateway in gateways:
        gateway.start()
    yield gateways
    for gateway in gateways:
        gateway.stop()
    core.stop()
    redis.cleanup()


@pytest.fixture
def started():
    processes = []

    def start(*args):
        processes.append(Running(*args))
        return processes[-1]

    yield start
    for process in processes:
        process.stop()


def url(gateway):
    return f"ws://127.0.0.1:{gateway.port}/ws"


def test_tail_resumes_without_loss_after_its_gateway_was_killed(deployment, started):
    tail_gateway, send_gateway = deployment
    owner, member = unique("owner"), unique("member")
    as_owner = ("--url", url(send_gateway), "--token", token(owner, "desk"))
    room = ok(cli(*as_owner, "rooms", "create", unique("tailed"), "--member", member)).splitlines()[0]
    tail = started("--url", url(tail_gateway), "--token", token(member, "phone"), "tail", room)
    tail.wait_for(rf"tailing room {re.escape(room)} as {member}", stream="stderr")

    texts = [f"m{i}" for i in range(10)]
    printed = []

    def send_and_see(text):
        ok(cli(*as_owner, "send", room, text))
        printed.append(tail.wait_for(LINE.pattern)["text"])

    for text in texts[:3]:
        send_and_see(text)
    tail_gateway.kill()  # SIGKILL: no close frame, no record written at the disconnect
    tail.wait_for(r"connection closed: .*; reconnecting in", stream="stderr")
    for text in texts[3:7]:  # while tail has no gateway
        ok(cli(*as_owner, "send", room, text))
    tail_gateway.start()
    reconnected = tail.wait_for(r"reconnected to gw-tail; (.*)$", stream="stderr", timeout=60)
    assert reconnected.group(1).startswith("resumed after offset "), reconnected.group(0)
    for _ in texts[3:7]:
        printed.append(tail.wait_for(LINE.pattern)["text"])
    for text in texts[7:]:
        send_and_see(text)

    assert printed == texts  # every message once, in order
    assert tail.stop() == 0
    stderr = tail.seen["stderr"] + tail.rest("stderr")
    assert not [line for line in stderr if "duplicate" in line or "[gap]" in line or "Traceback" in line]
    assert not [line for line in tail.rest("stdout") if line]  # nothing printed twice after the end

    # A new tail of the device starts where this one left off (the gateway's record of it).
    later = ["after 1", "after 2"]
    for text in later:
        ok(cli(*as_owner, "send", room, text))
    again = started("--url", url(tail_gateway), "--token", token(member, "phone"), "tail", room)
    assert [again.wait_for(LINE.pattern)["text"] for _ in later] == later
