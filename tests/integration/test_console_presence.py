"""Presence on the chat page, in a real browser against a real `twistd chatgateway --dev`:
a member who signs in shows online to the others, and offline once gone past
PRESENCE_GRACE_SEC (docs/console.md#the-chat-page).

Runs where the gateway has presence (issue 14: the ``presence`` command in the API);
without it the page shows "presence unknown", and this module is skipped, saying so.
"""

import pytest

from chatgateway.api import chat_pb2 as pb
from support import browser
from support.processes import Twistd, free_port

pytestmark = pytest.mark.skipif(
    "presence" not in pb.ClientCommand.DESCRIPTOR.fields_by_name,
    reason="this gateway has no presence yet (issue 14): typing and receipts are tested instead",
)


@pytest.fixture
def gateway():
    port, grpc_port = free_port(), free_port()
    process = Twistd(
        "chatgateway",
        ["--dev", "--http-port", port, "--grpc-port", grpc_port],
        env={
            "JWT_SECRET": "console-presence-secret-0123456789abcdef",
            "HEARTBEAT_INTERVAL_SEC": "0.5",
            "PRESENCE_GRACE_SEC": "0.5",
        },
        port=port,
        also_ports=[grpc_port],
    )
    process.start()
    yield f"http://127.0.0.1:{port}"
    assert process.stop() == 0, process.log_tail()
    assert "Traceback (most recent call last)" not in process.log_text(), process.log_tail(80)


def test_a_member_shows_online_while_signed_in_and_offline_once_gone(gateway):
    drivers = [browser.chromium(), browser.chromium()]
    try:
        alice = browser.ChatPage(drivers[0], gateway).open().sign_in("alice", "laptop")
        room = alice.create_room("presence", ["bob"])
        alice.open_room(room)
        alice.wait(lambda: alice.members().get("bob") == "offline", "bob offline before he signs in")

        bob = browser.ChatPage(drivers[1], gateway).open().sign_in("bob", "phone")
        bob.open_room(room)
        alice.wait(lambda: alice.members().get("bob") == "online", "bob online (a presenceEvent)")
        bob.wait(lambda: bob.members().get("alice") == "online", "alice online (the presence command)")

        bob.by_id("sign-out").click()  # his only device goes: offline after the grace
        alice.wait(lambda: alice.members().get("bob") == "offline", "bob offline once gone")
        for page in (alice, bob):
            assert browser.page_errors(page.driver) == []
    finally:
        for driver in drivers:
            browser.end_session(driver)
