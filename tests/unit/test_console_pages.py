"""The web console's server side (docs/console.md): its headers, the admin claim, the status
sampler's rates on task.Clock, and its resources in the gateway's own Site (mounted only with
CONSOLE_ENABLED; status.json only for an admin token)."""

import json

import pytest
from twisted.internet import task
from twisted.internet.testing import MemoryReactorClock
from twisted.web.resource import getChildForRequest
from twisted.web.server import NOT_DONE_YET
from twisted.web.test.requesthelper import DummyRequest

from chatgateway import config
from chatgateway.api import chat_pb2 as pb
from chatgateway.auth.devtokens import mint_token
from chatgateway.console import resources
from chatgateway.console.admin import ADMIN_SCOPE, is_admin
from chatgateway.console.headers import content_security_policy
from chatgateway.console.status import StatusSampler, rates, totals
from chatgateway.service import make_gateway_service
from chatgateway.store.memory import MemoryStore
from chatgateway.telemetry.counts import GatewayCounts

SECRET = "console-unit-test-secret-0123456789abcdef"


# ---------------------------------------------------------------- headers


def test_the_policy_allows_only_the_gateway_itself_and_no_inline_code():
    policy = content_security_policy("127.0.0.1:8080")
    directives = dict(d.split(" ", 1) for d in policy.split("; "))
    assert directives["default-src"] == "'none'"
    assert directives["script-src"] == "'self'" and directives["style-src"] == "'self'"
    assert directives["connect-src"] == "'self' ws://127.0.0.1:8080 wss://127.0.0.1:8080"
    assert directives["form-action"] == "'none'" and directives["frame-ancestors"] == "'none'"
    assert "unsafe" not in policy and "*" not in policy


@pytest.mark.parametrize("host", ["evil; script-src *", "a b", "x'", "", "host:8080/path", "[::1]:80; x"])
def test_a_host_header_that_could_add_a_directive_is_left_out_of_the_policy(host):
    policy = content_security_policy(host)
    assert policy.count(";") == 7 and "connect-src 'self';" in policy


def test_an_ipv6_host_is_named_in_connect_src():
    assert "ws://[::1]:8080 wss://[::1]:8080" in content_security_policy("[::1]:8080")


# ---------------------------------------------------------------- the admin claim


@pytest.mark.parametrize(
    "claims",
    [{"scope": ADMIN_SCOPE}, {"scope": f"openid {ADMIN_SCOPE} profile"}, {"roles": ["reader", ADMIN_SCOPE]}],
)
def test_the_admin_scope_in_scope_or_roles_grants(claims):
    assert is_admin({"sub": "op", **claims})


@pytest.mark.parametrize(
    "claims",
    [
        {},
        {"scope": ""},
        {"scope": ADMIN_SCOPE + "istrator"},
        {"scope": "chatgateway"},
        {"scope": [ADMIN_SCOPE]},  # scope is a string; a list is not read as one
        {"roles": ADMIN_SCOPE},  # roles is a list; a string is not read as one
        {"roles": [{"name": ADMIN_SCOPE}]},
        {"admin": True},
        {"sub": ADMIN_SCOPE},
    ],
)
def test_nothing_else_grants_it(claims):
    assert not is_admin(claims)


# ---------------------------------------------------------------- the status sampler


class _Registry:
    def __init__(self, sessions=0, rooms=()):
        self.sessions = sessions
        self.rooms = list(rooms)

    def __len__(self):
        return self.sessions

    def room_ids(self):
        return self.rooms


class _Gateway:
    def __init__(self):
        self.config = config.load({"JWT_SECRET": SECRET, "GATEWAY_ID": "gw-1"})
        self.counts = GatewayCounts()
        self.registry = _Registry(3, ["r1", "r2"])
        self.addresses = ["http://127.0.0.1:8080"]
        self.draining = False


def _command():
    return pb.StreamRequest(command=pb.ClientCommand(request_id="1", typing=pb.TypingCommand(room_id="r1")))


def test_rates_are_the_counts_of_the_last_interval_per_second():
    clock, gateway, store = task.Clock(), _Gateway(), MemoryStore()
    sampler = StatusSampler(gateway, {"core": lambda: True}, store, clock, interval=2)
    sampler.startService()
    for _ in range(10):
        gateway.counts.received(_command())
    gateway.counts.sent(pb.ServerEvent(message=pb.RoomEvent(id="e")), count=40)
    clock.advance(2)
    status = sampler.status_deferred()
    body = status.result
    assert body["rates"]["per_sec"]["commands_received"] == 5.0
    assert body["rates"]["per_sec"]["deliveries"] == body["rates"]["per_sec"]["messages_delivered"] == 20.0
    assert body["totals"]["commands_received"] == 10
    clock.advance(2)  # nothing happened in this interval
    assert sampler.status_deferred().result["rates"]["per_sec"]["commands_received"] == 0.0
    sampler.stopService()
    assert clock.getDelayedCalls() == []


def test_the_status_names_this_gateway_its_dependencies_and_every_registered_gateway():
    clock, gateway, store = task.Clock(), _Gateway(), MemoryStore()
    store.instance_alive("gw-1", {"started": 1, "addresses": [], "connections": 0})  # as of its last heartbeat
    store.instance_alive("gw-2", {"started": 2, "addresses": ["http://b"], "connections": 7})
    sampler = StatusSampler(gateway, {"core": lambda: True, "store:memory": lambda: "down"}, store, clock)
    sampler.startService()
    clock.advance(5)
    body = sampler.status_deferred().result
    assert body["gateway"]["id"] == "gw-1" and body["gateway"]["uptime_sec"] == 5
    assert body["gateway"]["connections"] == 3 and body["gateway"]["rooms"] == 2
    assert body["gateway"]["dependencies"] == {"core": "up", "store:memory": "down"}
    assert body["gateway"]["ready"] is False
    # this gateway's row is live; another's as it registered it
    assert [(g["gateway_id"], g["connections"]) for g in body["gateways"]] == [("gw-1", 3), ("gw-2", 7)]
    assert body["gateways"][0]["addresses"] == ["http://127.0.0.1:8080"]
    assert [g["rooms"] for g in body["gateways"]] == [2, 0]
    assert body["store"] == "memory" and body["registry_error"] is None
    json.dumps(body)  # what status.json sends
    sampler.stopService()


def test_a_store_that_cannot_list_the_gateways_leaves_this_gateway_shown():
    from twisted.internet import defer

    class Down(MemoryStore):
        def instances(self):
            return defer.fail(ConnectionError("redis down"))

    clock, gateway = task.Clock(), _Gateway()
    body = StatusSampler(gateway, {}, Down(), clock).status_deferred().result
    assert body["gateways"] == [] and body["registry_error"] == "redis down"
    assert body["gateway"]["id"] == "gw-1"


def test_rates_of_a_zero_interval_are_zero():
    reading = totals(GatewayCounts())
    assert set(rates(reading, reading, 0).values()) == {0.0}


# ---------------------------------------------------------------- the resources in the gateway's Site


def _site(enabled, dev=False):
    settings = {"CACHE_URI": "memory://", "JWT_SECRET": SECRET, "CONSOLE_ENABLED": "true" if enabled else "false"}
    root = make_gateway_service(config.load(settings), MemoryReactorClock(), dev=dev)
    return root.http.factory.wrappedFactory.site


def _get(site, path, token=None):
    request = DummyRequest(path.lstrip("/").split("/") if path != "/" else [b""])
    request.postpath = [p.encode() for p in path.lstrip("/").split("/")]
    request.prepath = []
    request.requestHeaders.setRawHeaders(b"host", [b"127.0.0.1:8080"])
    if token:
        request.requestHeaders.setRawHeaders(b"authorization", [f"Bearer {token}".encode()])
    resource = getChildForRequest(site.resource, request)
    result = resource.render(request)
    if result is not NOT_DONE_YET:
        request.write(result)
        request.finish()
    assert request.finished, "no answer"
    code = request.responseCode or 200
    headers = {k.decode().lower(): v[-1].decode() for k, v in request.responseHeaders.getAllRawHeaders()}
    return code, headers, b"".join(request.written)


def _token(**extra):
    return mint_token(SECRET, "op", audience="service_chat_gateway", now=0, ttl=3600, extra=extra)


@pytest.mark.parametrize("path", ["/console/", "/console/operator", "/console/status.json", "/console/static/chat.js"])
def test_off_by_default_every_console_path_is_404(path):
    assert config.load({"JWT_SECRET": SECRET}).console_enabled is False
    code, _, _ = _get(_site(enabled=False), path, token=_token(scope=ADMIN_SCOPE))
    assert code == 404


def test_on_the_pages_are_served_with_the_policy():
    site = _site(enabled=True)
    for path, kind in [
        ("/console/", "text/html"),
        ("/console/operator", "text/html"),
        ("/console/static/chat.js", "text/javascript"),
        ("/console/static/console.css", "text/css"),
    ]:
        code, headers, body = _get(site, path)
        assert code == 200 and headers["content-type"].startswith(kind) and body
        assert headers["content-security-policy"] == content_security_policy("127.0.0.1:8080")
        assert headers["x-content-type-options"] == "nosniff" and headers["x-frame-options"] == "DENY"
    assert _get(site, "/console/static/nope.js")[0] == 404
    assert _get(site, "/console/static/")[0] == 404  # no listing


def test_the_pages_have_no_inline_script_or_style_and_never_parse_html():
    files = resources.read_static_files()
    for name in ("chat.html", "operator.html"):
        page = files[name][1].decode()
        assert "<style" not in page and " style=" not in page and " on" not in page.replace(" only", "")
        for line in page.splitlines():
            if "<script" in line:
                assert 'src="/console/static/' in line and "></script>" in line
    for name in ("chat.js", "connection.js", "operator.js", "common.js"):
        script = "\n".join(line for line in files[name][1].decode().splitlines() if not line.strip().startswith("//"))
        for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "access_token"):
            assert sink not in script, (name, sink)


def test_status_json_needs_a_valid_token_with_the_admin_scope():
    site = _site(enabled=True)
    code, headers, body = _get(site, "/console/status.json")
    assert code == 401 and headers["www-authenticate"].startswith("Bearer") and b"gateway" not in body
    assert _get(site, "/console/status.json", token="not.a.jwt")[0] == 401
    assert _get(site, "/console/status.json", token=_token(scope="openid"))[0] == 403
    wrong_secret = mint_token("another-secret-0123456789abcdef0123", "op", audience="service_chat_gateway", now=0)
    assert _get(site, "/console/status.json", token=wrong_secret)[0] == 401
    code, headers, body = _get(site, "/console/status.json", token=_token(scope=ADMIN_SCOPE))
    assert code == 200 and headers["cache-control"] == "no-store"
    assert json.loads(body)["gateway"]["id"]


def test_config_json_says_whether_this_is_development_mode():
    assert json.loads(_get(_site(enabled=True, dev=True), "/console/config.json")[2]) == {
        "admin_scope": ADMIN_SCOPE,
        "dev": True,
    }
    assert json.loads(_get(_site(enabled=True), "/console/config.json")[2])["dev"] is False


def test_the_bare_url_and_console_without_its_slash_redirect_to_the_chat_page():
    site = _site(enabled=True)
    for path in ("/", "/console"):
        code, headers, _ = _get(site, path)
        assert (code, headers["location"]) == (302, "/console/")
