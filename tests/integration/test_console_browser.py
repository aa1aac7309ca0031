"""The web console in a real browser: Debian's headless chromium (Selenium, chromium-driver)
against a real ``twistd chatgateway --dev`` whose core keeps its data in a file (CORE_DB),
so a restart of the gateway keeps the rooms and their history (docs/console.md).

Presence is not sent by the gateway yet (docs/protocol.md): the chat page shows it when it
comes; these tests check typing and read receipts instead.
"""

import json
import urllib.error
import urllib.request

import pytest

from support import browser
from support.processes import Twistd, free_port

SECRET = "console-browser-test-secret-0123456789ab"
POSITIONS = "chatgateway.console.positions"  # connection.js's sessionStorage key


class Gateway:
    def __init__(self, tmp_path):
        self.port, grpc_port = free_port(), free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.process = Twistd(
            "chatgateway",
            ["--dev", "--http-port", self.port, "--grpc-port", grpc_port],
            env={
                "JWT_SECRET": SECRET,  # the same after a restart: the pages' tokens stay valid
                "CORE_DB": str(tmp_path / "core.sqlite"),
                "LOG_LEVEL": "info",
                "DRAIN_TIMEOUT_SEC": "5",
            },
            port=self.port,
            also_ports=[grpc_port],
        )

    def get(self, path, token=None):
        request = urllib.request.Request(self.base + path)
        if token:
            request.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, dict(response.headers), json.loads(response.read() or b"null")
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), json.loads(e.read() or b"null")

    def dev_token(self, profile, admin=False):
        status, _, body = self.get(f"/dev/token?profile={profile}" + ("&admin=1" if admin else ""))
        assert status == 200
        return body["token"]


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    gw = Gateway(tmp_path_factory.mktemp("console"))
    gw.process.start()
    yield gw
    code = gw.process.stop()
    assert code in (0, -15), f"exit code {code}:\n{gw.process.log_tail()}"
    assert "Traceback (most recent call last)" not in gw.process.log_text(), gw.process.log_tail(80)


@pytest.fixture
def browsers():
    opened = []

    def new():
        driver = browser.chromium()
        opened.append(driver)
        return driver

    yield new
    for driver in opened:
        browser.end_session(driver)


def test_two_profiles_chat_both_ways_see_typing_receipts_and_survive_a_gateway_restart(gateway, browsers):
    alice_driver, bob_driver = browsers(), browsers()
    alice = browser.ChatPage(alice_driver, gateway.base).open().sign_in("alice", "laptop")
    bob = browser.ChatPage(bob_driver, gateway.base).open().sign_in("bob", "phone")

    room = alice.create_room("general", ["bob"])
    bob.open_room(room)  # listed for bob live, by the membership change
    alice.send("hello bob")
    bob.wait_message("alice", "hello bob")

    bob.type_without_sending("hel")
    alice.wait(lambda: alice.typing() == "bob is typing…", "bob's typing shown to alice")
    bob.send("hello alice")
    alice.wait_message("bob", "hello alice")
    alice.wait(lambda: alice.typing() == "", "bob's typing gone once his message arrived")
    # alice has the room open: her read marker for bob's message reaches bob
    bob.wait(lambda: bob.seen_by("hello alice") == "seen by alice", "alice's read receipt shown to bob")

    # Markup in a message is text: nothing runs, no element is made from it.
    hostile = '<script>window.hacked = 1</script><img src=x onerror="window.hacked = 2"><b>bold</b>'
    alice.send(hostile)
    bob.wait_message("alice", hostile)
    for page in (alice, bob):
        assert page.driver.execute_script("return window.hacked === undefined")
        assert page.all("#timeline b, #timeline img, #timeline script") == []

    before = [("alice", "hello bob"), ("bob", "hello alice"), ("alice", hostile)]
    assert alice.messages() == before and bob.messages() == before
    # the page keeps each room's position for the first frame of its next connection (resume)
    for page in (alice, bob):
        position = page.driver.execute_script("return JSON.parse(sessionStorage.getItem(arguments[0]))", POSITIONS)
        assert position[room]["epoch"] and int(position[room]["offset"]) >= len(before)

    # A restart of the gateway (drain: 1001 with a reconnect hint) and of its core.
    gateway.process.stop()
    for page in (alice, bob):
        page.wait(lambda p=page: not p.status().startswith("connected"), "the page saw the gateway go")
    gateway.process.start()
    for page in (alice, bob):
        page.wait_connected(timeout=60)  # full-jitter backoff: at most a few tens of seconds
        page.wait(lambda p=page: p.messages() == before, "the timeline intact after the restart")

    bob.send("after the restart")
    alice.wait_message("bob", "after the restart")

    # A reload of the tab keeps the sign-in (sessionStorage) and rebuilds the timeline from history.
    bob.driver.refresh()
    bob.wait_connected()
    bob.open_room(room)
    bob.wait(lambda: bob.messages() == [*before, ("bob", "after the restart")], "the history after a reload")

    # alice (the owner) adds carol: both timelines and member lists show it.
    alice.fill("add-member-id", "carol")
    alice.by_id("add-member-id").submit()
    for page in (alice, bob):
        page.wait(lambda p=page: ("alice", "added carol") in p.system_lines(), "carol's addition in the timeline")
        page.wait(lambda p=page: "carol" in p.members(), "carol in the member list")

    # bob leaves: the room leaves his list, alice's timeline says so.
    bob.by_id("leave-room").click()
    bob.wait(lambda: room not in bob.room_ids(), "the room gone from bob's list")
    bob.wait(lambda: not bob.by_id("composer").is_displayed(), "bob's room closed")
    alice.wait(lambda: alice.system_lines()[-1:] == [("bob", "left the room")], "bob's leaving shown to alice")

    for page in (alice, bob):
        assert "access_token" not in page.driver.current_url
        assert browser.page_errors(page.driver) == []


def test_the_chat_page_loads_older_history_when_scrolled_up(gateway, browsers):
    token = gateway.dev_token("carol")

    def call(method, body):
        request = urllib.request.Request(
            f"{gateway.base}/chat.v1.ChatService/{method}",
            data=json.dumps(body).encode(),
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    room = call("CreateRoom", {"name": "long"})["room"]["id"]
    for n in range(45):  # more than one page (30)
        call("SendEvent", {"event": {"roomId": room, "type": "TEXT", "payload": {"text": f"m{n:02d}"}}})

    carol = browser.ChatPage(browsers(), gateway.base).open().sign_in("carol", "tablet")
    carol.open_room(room)
    carol.wait(lambda: len(carol.messages()) == 30, "the newest page")
    assert carol.messages()[-1] == ("carol", "m44")
    carol.driver.execute_script("document.getElementById('timeline-box').scrollTop = 0")
    carol.wait(lambda: [t for _, t in carol.messages()] == [f"m{n:02d}" for n in range(45)], "every page, in order")


def test_the_operator_page_shows_status_only_with_an_admin_token(gateway, browsers):
    page = browser.OperatorPage(browsers(), gateway.base).open()
    assert not page.showing_status()

    page.use_token(gateway.dev_token("mallory"))  # a valid token without the admin scope
    page.wait(lambda: "chatgateway:admin" in page.error(), "the scope refusal shown")
    assert not page.showing_status()

    page.use_token(gateway.dev_token("operator", admin=True))
    page.wait(page.showing_status, "the status shown")
    page.wait(lambda: page.table("this-gateway").get("ready") == "yes", "this gateway ready")
    dependencies = page.wait(lambda: page.table("dependencies"), "the dependencies listed")
    assert {"core", "listening", "store:memory", "bus:memory"} <= set(dependencies)
    assert set(dependencies.values()) == {"up"}
    gateway_id = page.table("this-gateway")["id"]
    page.wait(lambda: any(gateway_id in row for row in page.table("gateways")), "the registry lists this gateway")
    assert browser.page_errors(page.driver) == []


def test_status_json_is_never_served_without_an_admin_token(gateway):
    status, headers, body = gateway.get("/console/status.json")
    assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer") and "gateway" not in body
    status, _, body = gateway.get("/console/status.json", token="not-a-jwt")
    assert status == 401 and "gateway" not in body
    status, _, body = gateway.get("/console/status.json", token=gateway.dev_token("mallory"))
    assert status == 403 and "gateway" not in body
    status, headers, body = gateway.get("/console/status.json", token=gateway.dev_token("op", admin=True))
    assert status == 200 and body["gateway"]["ready"] is True
    assert "script-src 'self'" in headers["Content-Security-Policy"]


def test_the_page_reconnects_with_full_jitter_never_sooner_than_the_hint(gateway, browsers):
    """The chat page's delays (connection.js), sampled in the browser: uniform in
    [0, min(30 s, 1 s x 2^n)] for the n-th retry, and never below a close reason's hint."""
    page = browser.ChatPage(browsers(), gateway.base).open()
    samples = page.driver.execute_script(
        "const d = window.ChatConsole.reconnectDelay, out = {};"
        "for (const [n, reason] of arguments[0]) {"
        "  out[n + '|' + reason] = Array.from({length: 2000}, () => d(n, reason));"
        "} return out;",
        [
            [0, ""],
            [3, ""],
            [10, ""],
            [0, "gateway draining: reconnect in 2.7s"],
            [5, "core unavailable: x: reconnect in 6.3s"],
        ],
    )
    for key, delays in samples.items():
        attempt, reason = key.split("|", 1)
        ceiling = min(30000, 1000 * 2 ** int(attempt))
        floor = float(reason.rsplit("in ", 1)[1].rstrip("s")) * 1000 if reason else 0
        assert all(max(floor, 0) <= d <= max(ceiling, floor) for d in delays), key
        if floor < ceiling:  # the jitter spreads over the whole window, not a fixed schedule
            assert min(delays) < floor + 0.1 * (ceiling - floor) and max(delays) > 0.9 * ceiling, key
        else:
            assert set(delays) == {floor}, key


def test_the_browser_enforces_the_policy_an_inline_script_does_not_run(gateway, browsers):
    page = browser.ChatPage(browsers(), gateway.base).open()
    page.driver.execute_script(
        "const s = document.createElement('script'); s.textContent = 'window.inlineRan = true';"
        "document.body.appendChild(s);"
        "const t = document.createElement('script'); t.src = 'data:text/javascript,window.dataRan = true';"
        "document.body.appendChild(t);"
    )
    reported = []
    page.wait(lambda: reported.extend(browser.page_errors(page.driver)) or len(reported) >= 2, "both refusals reported")
    assert all("Content Security Policy" in message for message in reported)
    assert page.driver.execute_script("return [window.inlineRan, window.dataRan]") == [None, None]
