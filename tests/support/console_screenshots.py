"""Takes the console's screenshots in docs/ (docs/console.md): a `twistd chatgateway --dev` of
its own on free ports, two headless chromium sessions as alice and bob chatting, then the
operator page with a development admin token.

    .venv/bin/python tests/support/console_screenshots.py [--out docs]
"""

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: "support" is tests/support

from support import browser  # noqa: E402
from support.processes import REPO_ROOT, Twistd, free_port  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO_ROOT / "docs"), help="folder of the PNG files")
    args = parser.parse_args()
    problem = browser.available()
    if problem:
        sys.exit(problem)
    port, grpc_port = free_port(), free_port()
    gateway = Twistd(
        "chatgateway",
        ["--dev", "--http-port", port, "--grpc-port", grpc_port],
        env={"CORE_DB": str(Path(tempfile.mkdtemp(prefix="console-shots-")) / "core.sqlite")},
        port=port,
        also_ports=[grpc_port],
    )
    base = f"http://127.0.0.1:{port}"
    drivers = []
    with gateway:
        try:
            drivers = [browser.chromium(1200, 700), browser.chromium(1200, 700), browser.chromium(1200, 980)]
            alice = browser.ChatPage(drivers[0], base).open().sign_in("alice", "laptop")
            bob = browser.ChatPage(drivers[1], base).open().sign_in("bob", "phone")
            room = alice.create_room("general", ["bob", "carol"])
            alice.create_room("design review", ["bob"])
            alice.open_room(room)
            bob.open_room(room)
            alice.send("Hi bob, the console is up: this page is a plain WebSocket client.")
            bob.wait_message("alice", "Hi bob, the console is up: this page is a plain WebSocket client.")
            bob.send("Nice. Does it escape what it shows? <script>alert('hi')</script>")
            alice.wait_message("bob", "Nice. Does it escape what it shows? <script>alert('hi')</script>")
            alice.send("It does: that was text, not a script.")
            bob.wait(lambda: bob.seen_by("Nice. Does it escape what it shows? <script>alert('hi')</script>"), "receipt")
            bob.wait_message("alice", "It does: that was text, not a script.")
            bob.type_without_sending("Great, ")
            alice.wait(lambda: alice.typing() == "bob is typing…", "bob typing")
            out = Path(args.out)
            alice.driver.save_screenshot(str(out / "console-chat.png"))

            operator = browser.OperatorPage(drivers[2], base).open()
            operator.by_id("dev-admin").click()
            operator.wait(operator.showing_status, "the status")
            operator.wait(lambda: operator.table("this-gateway").get("connections", "").startswith("2"), "2 devices")
            operator.wait(lambda: float(operator.table("rates").get("events delivered", "0") or 0) >= 0, "rates")
            operator.driver.save_screenshot(str(out / "console-operator.png"))
            print(f"wrote {out / 'console-chat.png'} and {out / 'console-operator.png'}")
        finally:
            for driver in drivers:
                browser.end_session(driver)


if __name__ == "__main__":
    main()
