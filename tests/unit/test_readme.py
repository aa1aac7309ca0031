"""The README's configuration table names exactly the settings the gateway knows."""

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
    section = (REPO_ROOT / "README.md").read_text().split("## Running it", 1)[1].split("\n## ", 1)[0]
    assert f"```\n{error.value}\n```" in section
