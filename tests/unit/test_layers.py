"""The import rules of docs/architecture.md#layers, read from the package's own imports.

Imports point down the layers, never up; no edge imports another edge; telemetry imports
only the API and the core client's interface.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "chatgateway"

# Top to bottom. A module may import its own layer and those below it.
LAYERS = [
    {"tap", "service", "workers"},
    {"edge", "console"},
    {"sessions"},
    {"auth", "core", "store", "bus"},
    {"redisconn", "api", "config"},
]
# The edges: a group of modules of edge/ that may import each other, and no other group.
EDGES = [{"websocket"}, {"grpc", "grpcstream"}, {"connect"}]


def imports(path):
    """Dotted chatgateway modules ``path`` imports (``from chatgateway.x import y`` gives x and x.y)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("chatgateway"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("chatgateway"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return found


def modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if not name.startswith("chatgateway.api.chat_pb2"):
            yield name.removesuffix(".__init__"), path


def top(dotted):
    parts = dotted.split(".")
    return parts[1] if len(parts) > 1 else ""


def layer(dotted):
    for index, names in enumerate(LAYERS):
        if top(dotted) in names:
            return index
    return None  # telemetry, devcore, client: held by their own rules


@pytest.mark.parametrize("name, path", list(modules()), ids=lambda v: v if isinstance(v, str) else "")
def test_imports_point_down(name, path):
    here = layer(name)
    if here is None:
        return
    upward = sorted(i for i in imports(path) if layer(i) is not None and layer(i) < here)
    assert upward == [], f"{name} imports a layer above it"


def test_no_edge_imports_another_edge():
    crossing = []
    for name, path in modules():
        if not name.startswith("chatgateway.edge."):
            continue
        own = next((group for group in EDGES if name.rsplit(".", 1)[1] in group), None)
        if own is None:
            continue  # router, limits, origins, http: the HTTP port's plumbing
        for imported in imports(path):
            if imported.startswith("chatgateway.edge."):
                leaf = imported.split(".")[2]
                if any(leaf in group for group in EDGES) and leaf not in own:
                    crossing.append((name, imported))
    assert crossing == []


def test_telemetry_imports_only_the_api_and_the_core_clients_interface():
    allowed = {"chatgateway.api", "chatgateway.core", "chatgateway.core.ICoreClient"}
    for name, path in modules():
        if top(name) == "telemetry":
            outside = {i for i in imports(path) if top(i) != "telemetry" and not i.startswith("chatgateway.api")}
            assert outside <= allowed, (name, outside)


def test_the_rules_see_the_imports():
    # The walk above must find imports at all: an edge imports its session layer.
    assert any(i.startswith("chatgateway.sessions") for i in imports(PACKAGE / "edge" / "websocket.py"))


def test_no_module_is_over_500_lines():
    # One responsibility per module; a module past this has more than one (generated ones aside).
    long = {name: n for name, path in modules() if (n := len(path.read_text().splitlines())) > 500}
    assert long == {}
