"""The README and docs/ say what the code does: the configuration table (README), the
invalid-configuration line, the workers' ids and start rule (docs/operations.md), the fields
of the connected frame (docs/protocol.md)."""

import json
import re

from chatgateway.config import SETTINGS
from support.processes import REPO_ROOT


def configuration_table():
    text = (REPO_ROOT / "README.md").read_text()
    section = text.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^\| `([A-Z0-9_]+)` \|", section, flags=re.M)


def test_readme_configuration_table_matches_settings():
    assert configuration_table() == [s.name for s in SETTINGS]


def test_readme_spec_defaults_are_stated():
    text = (REPO_ROOT / "README.md").read_text()
    for setting in SETTINGS:
        if setting.default and setting.name not in ("HTTP_PORT",):
            assert f"| `{setting.name}` | `{setting.default}` |" in text, setting.name


def test_readme_shows_the_invalid_configuration_line_the_gateway_prints(monkeypatch):
    import pytest

    from chatgateway.config import InvalidConfiguration
    from chatgateway.tap import Options

    monkeypatch.setenv("JWT_SECRET", "s" * 32)
    with pytest.raises(InvalidConfiguration) as error:
        Options().parseOptions(["--http-port", "x"])
    assert f"```\n{error.value}\n```" in running_it()


def running_it():
    return (REPO_ROOT / "docs" / "operations.md").read_text().split("## Running it", 1)[1].split("\n## ", 1)[0]


def test_readme_gives_each_worker_the_id_the_options_give_it(monkeypatch):
    from chatgateway.tap import Options

    monkeypatch.setenv("JWT_SECRET", "s" * 32)
    monkeypatch.setenv("CACHE_URI", "redis://127.0.0.1:6390/0")
    parent, worker = Options(), Options()
    parent.parseOptions(["--workers", "2", "--http-port", "9300", "--gateway-id", "gw"])
    worker.parseOptions([*parent.worker_args(), "--worker-index", "1"])
    assert (parent.config.gateway_id, worker.config.gateway_id) == ("gw", "gw-w1")
    text = " ".join(running_it().split())
    assert "the parent (worker 0) keeps `GATEWAY_ID`, worker i (1 to N-1) is `<GATEWAY_ID>-w<i>`" in text


def test_readme_states_the_workers_start_rule_the_pool_applies():
    from chatgateway import workers

    text = " ".join(running_it().split())
    window, deaths = f"{workers.STARTUP_WINDOW_SEC:g} s", workers.STARTUP_DEATHS
    assert f"A worker that dies within {window} of its start {deaths} times in a row will not start" in text
    assert f"restarts a worker that dies, {workers.RESTART_DELAY_SEC:g} s later" in text
    assert f"worker w1 died {deaths} times within {window} of starting (last exit: status 1)" in text


def test_readme_connected_example_has_the_fields_the_gateway_sends():
    from google.protobuf import json_format

    from support.wsharness import Harness

    harness = Harness()
    try:
        harness.core.rooms["alice"] = ["r1"]
        (event,) = harness.connect("alice/phone").of("connected")
    finally:
        harness.stop()
    sent = json_format.MessageToDict(event)["connected"]  # the JSON subprotocol's field names
    protocol = (
        (REPO_ROOT / "docs" / "protocol.md").read_text().split("## The WebSocket protocol", 1)[1].split("\n## ", 1)[0]
    )
    example = json.loads(re.search(r'^\{"id": .*"connected": .*\}$', protocol, flags=re.M).group(0))["connected"]
    assert set(example) == set(sent)
    # Every connected carries a resume token (docs/protocol.md#resume-tokens).
    assert sent["resumeToken"].startswith("r1.")
