"""Deployment files: Dockerfile, docker-compose.yml, Kubernetes manifests, Prometheus rules, Grafana
dashboard and the operations docs — validated against their schemas and against the real service.

Docker is not needed: the compose file is checked against the Compose specification's JSON schema (the
copy vendored in check-jsonschema) and for meaning; the Kubernetes manifests against the OpenAPI schemas
shipped by kubernetes-validate; alert rules with promtool (syntax, config and unit tests); and every
metric that a rule or a dashboard panel queries must be in a real /metrics scrape of a running command
(`detector run`, `detector ingest` against a moto server, `detector export securityhub`, `detector respond`).
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import yaml
from aws_helpers import MotoServer, moto  # noqa: F401 - moto: fixture
from click.testing import CliRunner
from ingest_support import aws_env, ingest_settings, make_queue, new_topic, start_ingest, stop_ingest
from kafka_support import broker, create_topics, read_topic, service_settings, unique, wait_until  # noqa: F401 - fixtures
from prometheus_client.parser import text_string_to_metric_families

from detector.cli import cli
from detector.demo import sample_world, world_messages
from detector.embedded import EmbeddedBroker
from detector.registry import load_registry
from detector.service.app import DetectorService, eventbridge_envelope
from detector.service.settings import CONFIG_ENV, ENV_PREFIX, Settings, SettingsError, env_var, load_settings

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
COMPOSE_FILE = REPO / "docker-compose.yml"
K8S = DEPLOY / "kubernetes"
PROM = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "detector.json"
DOCS = [REPO / "docs" / name for name in ("operations.md", "findings.md", "runbook.md")]
K8S_VERSIONS = ("1.33.0", "1.37.0")
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (Debian package `prometheus`; .ci/run installs it)"
)

# After SIGTERM the service's two stages (route, detect) each flush and then commit, every step bounded by
# grace_seconds (detector.service.app.DetectorService._shutdown).
SHUTDOWN_STEPS = 4
SETTING_ENV_VARS = {env_var(name) for name in Settings.model_fields} | {CONFIG_ENV}
SECRET_ENV_VARS = {
    env_var(name) for name, field in Settings.model_fields.items() if "Secret" in str(field.annotation)
}


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def compose() -> dict[str, Any]:
    return load_yaml(COMPOSE_FILE)


def env_map(env: Any) -> dict[str, str]:
    """A compose `environment` (mapping or list of KEY=VALUE) as a dict of strings."""
    if isinstance(env, list):
        return dict(item.split("=", 1) for item in env)
    return {k: "" if v is None else str(v).lower() if isinstance(v, bool) else str(v) for k, v in (env or {}).items()}


def settings_from_env(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> Settings:
    """``detector run``'s settings for exactly this environment (nothing else from os.environ)."""
    for name in list(os.environ):
        if name.upper().startswith(ENV_PREFIX):
            monkeypatch.delenv(name)
    for name in ("AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return load_settings()


# ======================================================================================================
# Dockerfile
# ======================================================================================================


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in (REPO / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    assert not pending, "Dockerfile ends with a line continuation"
    return out


def final_stage(instructions: list[tuple[str, str]]) -> tuple[str, list[tuple[str, str]]]:
    """The FROM argument (ARGs before the first FROM substituted) and the instructions of the last stage."""
    args = {}
    for word, rest in instructions:
        if word == "FROM":
            break
        if word == "ARG" and "=" in rest:
            k, v = rest.split("=", 1)
            args[k] = v
    starts = [i for i, (word, _) in enumerate(instructions) if word == "FROM"]
    base = instructions[starts[-1]][1]
    base = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), m.group(0)), base)
    return base, instructions[starts[-1] + 1 :]


def test_dockerfile_multi_stage_non_root_healthcheck_entrypoint() -> None:
    instructions = dockerfile_instructions()
    froms = [rest for word, rest in instructions if word == "FROM"]
    assert len(froms) >= 2, "multi-stage: a builder and a runtime stage"
    assert any(re.search(r"\bAS\s+builder\b", f, re.I) for f in froms[:-1])
    base, stage = final_stage(instructions)
    assert base.split()[0] == "python:3.11-slim", base
    words = [w for w, _ in stage]
    # the runtime stage copies the built environment, it does not build
    assert any(w == "COPY" and "--from=builder" in r for w, r in stage)
    assert not any(w == "RUN" and re.search(r"pip (install|wheel)", r) for w, r in stage)
    # non-root, numeric (Kubernetes' runAsNonRoot checks a numeric UID)
    users = [r for w, r in stage if w == "USER"]
    assert users, "the runtime stage sets USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, users[-1]
    # the health check probes /healthz with the interpreter (no curl in the slim image)
    checks = [r for w, r in stage if w == "HEALTHCHECK"]
    assert len(checks) == 1 and "/healthz" in checks[0] and "python" in checks[0] and "curl" not in checks[0]
    assert json.loads(dict(stage)["ENTRYPOINT"]) == ["detector"]
    assert json.loads(dict(stage)["CMD"]) == ["run"]
    expose = [r for w, r in stage if w == "EXPOSE"]
    assert [p.split("/")[0] for e in expose for p in e.split()] == [str(Settings.model_fields["http_port"].default)]
    assert words.index("USER") < words.index("ENTRYPOINT")


def test_dockerfile_installs_runtime_dependencies_only() -> None:
    instructions = dockerfile_instructions()
    text = " ".join(f"{w} {r}" for w, r in instructions)
    assert not re.search(r"\[[^\]]*\bdev\b[^\]]*\]", text), "the dev extra must not be installed"
    args = dict(r.split("=", 1) for w, r in instructions if w == "ARG" and "=" in r)
    if "EXTRAS" in args:
        extras = {e.strip() for e in args["EXTRAS"].strip("\"'").split(",") if e.strip()}
        import tomllib

        optional = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
        assert extras <= set(optional) - {"dev"}, extras
    runs = " ".join(r for w, r in instructions if w == "RUN")
    assert "pip wheel" in runs or "pip install ." in runs or "build" in runs


def test_dockerfile_env_are_real_settings_and_port_matches_healthcheck() -> None:
    _, stage = final_stage(dockerfile_instructions())
    env: dict[str, str] = {}
    for word, rest in stage:
        if word == "ENV":
            for token in shlex.split(rest):
                if "=" in token:
                    k, v = token.split("=", 1)
                    env[k] = v
    detector_env = {k for k in env if k.startswith(ENV_PREFIX)}
    assert detector_env, "sensible DETECTOR_* defaults in the image"
    assert detector_env <= SETTING_ENV_VARS, detector_env - SETTING_ENV_VARS
    assert env.get("DETECTOR_HTTP_PORT", "9108") == "9108"
    assert "/opt/detector/bin" in env.get("PATH", "") or any(w == "ENTRYPOINT" for w, _ in stage)


def test_dockerignore_keeps_the_context_small_but_complete() -> None:
    patterns = [
        line.strip() for line in (REPO / ".dockerignore").read_text().splitlines() if line.strip() and not line.startswith("#")
    ]

    def ignored(path: str) -> bool:  # last matching pattern wins, as in Docker
        import fnmatch

        result = False
        for pattern in patterns:
            negate = pattern.startswith("!")
            p = pattern[1:] if negate else pattern
            p = p.rstrip("/")
            parts = path.split("/")
            prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
            if any(fnmatch.fnmatch(pre, p) or fnmatch.fnmatch(pre, p.replace("**/", "")) for pre in prefixes):
                result = not negate
        return result

    for path in (".venv/bin/python", ".git/config", "tests/test_deploy.py", ".hypothesis/x", "deploy/compose/registry.json"):
        assert ignored(path), f"{path} should not be sent to the build"
    copied = [
        src
        for word, rest in dockerfile_instructions()
        if word == "COPY" and "--from" not in rest
        for src in shlex.split(rest)[:-1]
    ]
    assert copied
    for src in copied:
        assert not ignored(src.rstrip("/")), f"{src} is COPY'd but excluded by .dockerignore"
        assert (REPO / src).exists(), src
    assert not ignored("detector/data/sample-world/registry.json")
    assert ignored("detector/__pycache__/cli.cpython-311.pyc")


# ======================================================================================================
# docker-compose.yml
# ======================================================================================================


def check_jsonschema(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "check_jsonschema", *args], capture_output=True, text=True, timeout=60
    )


def test_compose_file_matches_the_compose_specification(tmp_path: Path) -> None:
    result = check_jsonschema("--builtin-schema", "vendor.compose-spec", str(COMPOSE_FILE))
    assert result.returncode == 0, result.stdout + result.stderr
    # the validator is really checking: a misspelt depends_on condition is rejected
    broken = compose()
    broken["services"]["detector"]["depends_on"]["topic-init"]["condition"] = "service_finished"
    bad = tmp_path / "docker-compose.yml"
    bad.write_text(yaml.safe_dump(broken))
    result = check_jsonschema("--builtin-schema", "vendor.compose-spec", str(bad))
    assert result.returncode != 0 and "service_finished" in result.stdout + result.stderr


def listeners(value: str) -> dict[str, tuple[str, int]]:
    out = {}
    for item in value.split(","):
        m = re.fullmatch(r"([A-Z_]+)://([^:]*):(\d+)", item.strip())
        assert m, f"bad listener {item!r}"
        out[m.group(1)] = (m.group(2), int(m.group(3)))
    return out


def test_compose_kafka_is_a_consistent_kraft_single_node() -> None:
    services = compose()["services"]
    kafka = services["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    env = env_map(kafka["environment"])
    host = kafka.get("hostname", "kafka")
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    node_id = env["KAFKA_NODE_ID"]
    listen = listeners(env["KAFKA_LISTENERS"])
    advertised = listeners(env["KAFKA_ADVERTISED_LISTENERS"])
    protocols = dict(item.split(":") for item in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(","))
    controller = env["KAFKA_CONTROLLER_LISTENER_NAMES"]
    assert "PLAINTEXT" in listen and controller in listen
    assert set(listen) <= set(protocols) and set(advertised) <= set(listen)
    assert controller not in advertised, "the controller listener is never advertised to clients"
    assert env.get("KAFKA_INTER_BROKER_LISTENER_NAME", "PLAINTEXT") in advertised
    # the single voter is this node, on its controller port
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == f"{node_id}@{host}:{listen[controller][1]}"
    # one broker: internal topics with one replica
    for key in ("KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR", "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR", "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR"):
        assert env[key] == "1", key
    if "CLUSTER_ID" in env:  # a base64url UUID
        import base64

        assert len(base64.urlsafe_b64decode(env["CLUSTER_ID"] + "==")) == 16
    # containers reach the broker on the advertised PLAINTEXT listener
    adv_host, adv_port = advertised["PLAINTEXT"]
    assert adv_host == host and adv_port == listen["PLAINTEXT"][1]
    bootstrap = env_map(services["detector"]["environment"])["DETECTOR_KAFKA_BOOTSTRAP"]
    assert bootstrap == f"{adv_host}:{adv_port}"
    # health check: the broker answers the API-versions request on its client listener
    test = kafka["healthcheck"]["test"]
    command = test[1] if test[0] == "CMD-SHELL" else " ".join(test[1:])
    assert "/opt/kafka/bin/kafka-broker-api-versions.sh" in command
    assert f"--bootstrap-server localhost:{listen['PLAINTEXT'][1]}" in command


def topic_commands(service: dict[str, Any]) -> list[list[str]]:
    command = service["command"]
    text = command if isinstance(command, str) else "\n".join(command)
    text = text.replace("\\\n", " ")
    return [shlex.split(line) for line in text.splitlines() if "kafka-topics.sh" in line and "--create" in line]


def option_values(argv: list[str], name: str) -> list[str]:
    return [argv[i + 1] for i, word in enumerate(argv[:-1]) if word == name]


def test_compose_topic_init_creates_every_topic_the_detector_uses(monkeypatch: pytest.MonkeyPatch) -> None:
    services = compose()["services"]
    init = services["topic-init"]
    assert init["image"] == services["kafka"]["image"]
    assert init["depends_on"]["kafka"]["condition"] == "service_healthy"
    assert init.get("restart", "no") == "no"
    created: dict[str, dict[str, Any]] = {}
    for argv in topic_commands(init):
        assert "--if-not-exists" in argv, argv
        (topic,) = option_values(argv, "--topic")
        (partitions,) = option_values(argv, "--partitions")
        configs = dict(c.split("=", 1) for c in option_values(argv, "--config"))
        assert option_values(argv, "--bootstrap-server") == [env_map(services["detector"]["environment"])["DETECTOR_KAFKA_BOOTSTRAP"]]
        created[topic] = {"partitions": int(partitions), "configs": configs}
    s = compose_settings(monkeypatch)
    kind, inputs = s.input_subscription
    assert kind == "topics"
    sessions = getattr(s, "sessions_topic_name", f"{s.group_id}.sessions")
    changelog = getattr(s, "changelog_topic_name", f"{s.group_id}.changelog")
    assert set(created) == {*inputs, s.findings_topic, s.dlq_topic, sessions, changelog}
    assert sessions == "detector.sessions" and changelog == "detector.changelog"
    assert created[s.findings_topic]["configs"]["cleanup.policy"] == "compact"
    assert created[changelog]["configs"]["cleanup.policy"] == "compact"
    from detector.service import app

    # the same configuration the detector gives the changelog when it creates it
    assert created[changelog]["configs"] == getattr(app, "CHANGELOG_CONFIG", created[changelog]["configs"])
    assert created[s.dlq_topic]["configs"].get("cleanup.policy", "delete") == "delete"
    assert created[sessions]["configs"].get("cleanup.policy", "delete") == "delete"
    assert created[sessions]["partitions"] == created[changelog]["partitions"]
    if "state_partitions" in Settings.model_fields:
        assert created[sessions]["partitions"] == s.state_partitions
    # the topics exist before the detector starts, so it need not create them
    assert s.auto_create_topics is False


def volume_map(service: dict[str, Any]) -> dict[str, Path]:
    """container path -> repo path of the service's bind mounts."""
    out = {}
    for volume in service.get("volumes", []):
        parts = volume.split(":") if isinstance(volume, str) else [volume["source"], volume["target"]]
        if parts[0].startswith("./"):
            out[parts[1]] = (REPO / parts[0]).resolve()
    return out


def host_path(service: dict[str, Any], container_path: str) -> Path:
    for target, source in sorted(volume_map(service).items(), key=lambda kv: -len(kv[0])):
        if container_path == target or container_path.startswith(target.rstrip("/") + "/"):
            return source / os.path.relpath(container_path, target)
    raise AssertionError(f"{container_path} is not mounted from the repo")


def compose_settings(monkeypatch: pytest.MonkeyPatch) -> Settings:
    detector = compose()["services"]["detector"]
    env = env_map(detector["environment"])
    for key in ("DETECTOR_REGISTRY", "DETECTOR_IP_RANGES"):
        if key in env:
            env[key] = str(host_path(detector, env[key]))
    return settings_from_env(monkeypatch, env)


def test_compose_detector_service(monkeypatch: pytest.MonkeyPatch) -> None:
    services = compose()["services"]
    detector = services["detector"]
    assert detector["build"]["context"] in (".", "./")
    assert detector["depends_on"]["topic-init"]["condition"] == "service_completed_successfully"
    env = env_map(detector["environment"])
    assert set(env) <= SETTING_ENV_VARS, set(env) - SETTING_ENV_VARS
    s = compose_settings(monkeypatch)  # the environment is valid for `detector run`
    # the mounted registry is the sample world's, so replay-sample produces its expected findings
    assert s.registry is not None
    assert load_registry(s.registry).summary() == load_registry(sample_world().registry).summary()
    assert orjson.loads(s.registry.read_bytes()) == orjson.loads(sample_world().registry.read_bytes())
    port = str(s.http_port)
    assert any(str(p).split(":")[-1] == port for p in detector["ports"])
    assert f"{port}/healthz" in " ".join(detector["healthcheck"]["test"])
    # stop_grace_period covers the shutdown: two stages, each flush then commit, each bounded by the grace
    assert compose_duration(detector["stop_grace_period"]) > SHUTDOWN_STEPS * s.grace_seconds
    assert detector.get("read_only") is True


def compose_duration(value: str) -> float:
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", value):
        total += float(number) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]
    assert total > 0, value
    return total


def test_compose_replay_sample_prometheus_and_grafana_are_wired(monkeypatch: pytest.MonkeyPatch) -> None:
    services = compose()["services"]
    detector, replay = services["detector"], services["replay-sample"]
    s = compose_settings(monkeypatch)
    # replay-sample: the detector image, the repo's script, the detector's broker and input topic
    assert replay["image"] == detector["image"]
    assert replay["depends_on"]["topic-init"]["condition"] == "service_completed_successfully"
    assert replay["entrypoint"][0] == "python"
    script = host_path(replay, replay["entrypoint"][1])
    assert script == (DEPLOY / "compose" / "produce_sample.py").resolve()
    args = replay["command"]
    assert option_values(args, "--bootstrap") == [s.kafka_bootstrap]
    assert option_values(args, "--topic")[0] in s.input_subscription[1]
    # Prometheus: this repo's config, scraping the detector's metrics port, with the alert rules
    prometheus = services["prometheus"]
    config_arg = next(a for a in prometheus["command"] if a.startswith("--config.file="))
    config_path = host_path(prometheus, config_arg.split("=", 1)[1])
    assert config_path == (PROM / "prometheus.yml").resolve()
    config = load_yaml(config_path)
    targets = [t for job in config["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]]
    assert f"detector:{s.http_port}" in targets
    assert [(config_path.parent / f).resolve() for f in config["rule_files"]] == [(PROM / "alerts.yml").resolve()]
    # Grafana: provisioning and the dashboard directory the provider reads
    grafana = services["grafana"]
    provisioning = host_path(grafana, "/etc/grafana/provisioning")
    assert provisioning == (DEPLOY / "grafana" / "provisioning").resolve()
    (provider,) = load_yaml(provisioning / "dashboards" / "detector.yml")["providers"]
    assert (host_path(grafana, provider["options"]["path"]) / "detector.json").resolve() == DASHBOARD.resolve()
    (datasource,) = load_yaml(provisioning / "datasources" / "prometheus.yml")["datasources"]
    assert datasource["type"] == "prometheus" and datasource["url"] == "http://prometheus:9090"
    assert any(str(p).endswith(":9090") for p in prometheus["ports"])


async def test_produce_sample_script_streams_the_sample_world(broker: EmbeddedBroker) -> None:  # noqa: F811
    topic = unique("sample")
    await create_topics(broker.bootstrap, {topic: 2})
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(DEPLOY / "compose" / "produce_sample.py"), "--bootstrap", broker.bootstrap, "--topic", topic,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode == 0, err.decode()
    values = world_messages(sample_world())
    assert f"sent {len(values)} messages" in out.decode()
    messages = await read_topic(broker.bootstrap, topic, idle=1.0)
    assert sorted(m.value for m in messages) == sorted(values)


# ======================================================================================================
# Kubernetes
# ======================================================================================================


def k8s_documents() -> list[tuple[Path, dict[str, Any]]]:
    kustomization = load_yaml(K8S / "kustomization.yaml")
    docs = []
    for name in kustomization["resources"]:
        for doc in yaml.safe_load_all((K8S / name).read_text()):
            if doc:
                docs.append((K8S / name, doc))
    return docs


def k8s(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for _, d in k8s_documents() if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"{kind} {name}: {len(found)} found"
    return found[0]


def test_kustomization_lists_every_manifest() -> None:
    kustomization = load_yaml(K8S / "kustomization.yaml")
    assert kustomization["apiVersion"].startswith("kustomize.config.k8s.io/") and kustomization["kind"] == "Kustomization"
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files
    kinds = {d["kind"] for _, d in k8s_documents()}
    assert {"Deployment", "ConfigMap", "Secret", "Service", "PodDisruptionBudget"} <= kinds
    (container,) = k8s("Deployment", "detector")["spec"]["template"]["spec"]["containers"]
    assert container["image"] in {i["name"] for i in kustomization.get("images", [])}


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_kubernetes_manifests_validate(version: str) -> None:
    import kubernetes_validate

    for path, doc in k8s_documents():
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:  # pragma: no cover - the failure message
            pytest.fail(f"{path.name}: {doc['kind']} {doc['metadata'].get('name')}: {exc}")
    # the validator is really checking: a wrong type and an unknown field are rejected
    deployment = copy.deepcopy(k8s("Deployment", "detector"))
    deployment["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, version, strict=True)
    deployment = copy.deepcopy(k8s("Deployment", "detector"))
    deployment["spec"]["template"]["spec"]["containers"][0]["livenessprobe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, version, strict=True)


def quantity(value: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti|k|M|G|m)?", str(value))
    assert m, value
    factor = {None: 1, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9, "m": 1e-3}
    return float(m.group(1)) * factor[m.group(2)]


def k8s_env(deployment: dict[str, Any]) -> dict[str, str]:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(k8s("ConfigMap", source["configMapRef"]["name"])["data"])
        if "secretRef" in source:
            env.update(k8s("Secret", source["secretRef"]["name"])["stringData"])
    for item in container.get("env", []):
        env[item["name"]] = item.get("value", "")
    return env


def test_kubernetes_settings_are_real_and_valid(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    deployment = k8s("Deployment", "detector")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = k8s_env(deployment)
    detector_keys = {k for k in env if k.startswith(ENV_PREFIX)}
    assert detector_keys == set(env), set(env) - detector_keys
    assert detector_keys <= SETTING_ENV_VARS, detector_keys - SETTING_ENV_VARS
    secret = k8s("Secret")
    assert set(secret["stringData"]) <= SECRET_ENV_VARS, "only secret settings belong in the Secret"
    assert not SECRET_ENV_VARS & set(k8s("ConfigMap", "detector-config")["data"]), "secrets in the ConfigMap"
    assert "CHANGE-ME" in next(iter(secret["stringData"].values())), "the password is a marked placeholder"
    # the registry file comes from the registry ConfigMap, mounted where DETECTOR_REGISTRY points
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    registry_path = Path(env["DETECTOR_REGISTRY"])
    volume = volumes[mounts[str(registry_path.parent)]]
    registry_data = k8s("ConfigMap", volume["configMap"]["name"])["data"][registry_path.name]
    local = tmp_path / registry_path.name
    local.write_text(registry_data)
    load_registry(local)
    env["DETECTOR_REGISTRY"] = str(local)
    s = settings_from_env(monkeypatch, env)  # a valid configuration for `detector run`
    assert s.sasl_password is not None and s.security_protocol.startswith("SASL")
    # probes on the metrics port: /healthz for liveness (and start-up), /readyz for readiness
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["metrics"] == s.http_port
    for probe, path in (("livenessProbe", "/healthz"), ("startupProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = container[probe]["httpGet"]
        assert get["path"] == path, probe
        assert get["port"] in ("metrics", s.http_port), probe
    # stopping: SIGTERM, then two stages each flush and commit, each step bounded by the grace period
    assert pod["terminationGracePeriodSeconds"] > SHUTDOWN_STEPS * s.grace_seconds
    # sized for the session cap: at least 2 KiB per session in the memory limit, and a request at all
    resources = container["resources"]
    assert quantity(resources["limits"]["memory"]) >= s.max_sessions * 2048
    assert quantity(resources["requests"]["memory"]) >= s.max_sessions * 1200
    assert quantity(resources["requests"]["cpu"]) > 0 and "cpu" in resources["limits"]


def test_kubernetes_security_and_wiring() -> None:
    deployment = k8s("Deployment", "detector")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    # non-root, read-only root filesystem, no privilege escalation, no capabilities
    sc, psc = container["securityContext"], pod.get("securityContext", {})
    assert sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is True
    uid = sc.get("runAsUser", psc.get("runAsUser"))
    assert uid and uid != 0
    _, stage = final_stage(dockerfile_instructions())
    assert str(uid) == [r for w, r in stage if w == "USER"][-1].split(":")[0], "same UID as the image"
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert any(m["mountPath"] == "/tmp" for m in container["volumeMounts"]), "a writable /tmp"
    # the Service exposes the metrics port of these pods; the PDB covers them
    service = k8s("Service")
    assert service["spec"]["selector"].items() <= labels.items()
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] in ("metrics", port["port"]) and port["name"] == "metrics"
    pdb = k8s("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    replicas = deployment["spec"]["replicas"]
    if "minAvailable" in pdb["spec"]:
        assert int(pdb["spec"]["minAvailable"]) < replicas, "a drain must be able to evict one pod"
    else:
        assert int(pdb["spec"]["maxUnavailable"]) >= 1


def test_kubernetes_scrape_annotations_match_the_metrics_port() -> None:
    deployments = [d for _, d in k8s_documents() if d["kind"] == "Deployment"]
    assert len(deployments) >= 3
    for deployment in deployments:
        template = deployment["spec"]["template"]
        (container,) = template["spec"]["containers"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        annotations = template["metadata"]["annotations"]
        name = deployment["metadata"]["name"]
        assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/path"] == "/metrics", name
        assert annotations["prometheus.io/port"] == str(ports["metrics"]) == k8s_env(deployment)["DETECTOR_HTTP_PORT"], name


def load_command_settings(deployment: dict[str, Any], cls: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The settings a command's pod gets from its ConfigMap and Secret, loaded as the command loads them:
    only DETECTOR_* variables of that command (and the region botocore reads)."""
    env = k8s_env(deployment)
    own = {env_var(n) for n in cls.model_fields}
    assert {k for k in env if k.startswith(ENV_PREFIX)} <= own, "only settings of this command"
    assert set(env) - own == {"AWS_DEFAULT_REGION"}, "the region botocore reads"
    for var in list(os.environ):
        if var.upper().startswith(ENV_PREFIX):
            monkeypatch.delenv(var)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    return load_settings(cls=cls)


def check_command_pod(deployment: dict[str, Any], args: list[str], settings: Any) -> None:
    """A command besides `detector run`: the detector's image and hardening, probes on its metrics port,
    AWS credentials through IRSA."""
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["args"] == args and container["image"] == k8s("Deployment", "detector")["spec"]["template"]["spec"]["containers"][0]["image"]
    resolve_command(args)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["metrics"] == settings.http_port
    for probe, path in (("livenessProbe", "/healthz"), ("startupProbe", "/healthz"), ("readinessProbe", "/readyz")):
        assert container[probe]["httpGet"]["path"] == path
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    account = k8s("ServiceAccount", pod["serviceAccountName"])
    assert "eks.amazonaws.com/role-arn" in account["metadata"]["annotations"], "AWS credentials through IRSA"


def test_kubernetes_ingest(monkeypatch: pytest.MonkeyPatch) -> None:
    """`detector ingest` in Kubernetes: valid settings of its own, a worker per CPU of its limit, room to
    drain on SIGTERM."""
    from detector.ingest.settings import IngestSettings

    deployment = k8s("Deployment", "detector-ingest")
    settings = load_command_settings(deployment, IngestSettings, monkeypatch)
    check_command_pod(deployment, ["ingest"], settings)
    assert len(settings.queues) == 2 and settings.topic == k8s("ConfigMap", "detector-config")["data"]["DETECTOR_INPUT_TOPICS"]
    assert settings.sasl_password is not None and settings.security_protocol.startswith("SASL")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert settings.workers == quantity(container["resources"]["limits"]["cpu"]), "a worker per CPU of the limit"
    assert pod["terminationGracePeriodSeconds"] > settings.grace_seconds + 10, "messages in work, then the producers' flush"


OUTPUT_CONSUMERS = {  # Deployment -> (args, settings class)
    "detector-export-securityhub": (["export", "securityhub"], "ExportSettings"),
    "detector-respond": (["respond"], "RespondSettings"),
}


@pytest.mark.parametrize("name", sorted(OUTPUT_CONSUMERS))
def test_kubernetes_output_consumers(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The findings-topic consumers: a real command, valid settings, probes, the same hardening as the detector."""
    from detector.outputs import settings as output_settings

    args, cls_name = OUTPUT_CONSUMERS[name]
    deployment = k8s("Deployment", name)
    settings = load_command_settings(deployment, getattr(output_settings, cls_name), monkeypatch)
    check_command_pod(deployment, args, settings)
    defaults = {name: field.default for name, field in Settings.model_fields.items()}
    assert settings.group_id != defaults["group_id"] and settings.findings_topic == defaults["findings_topic"]
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > settings.grace_seconds
    if name == "detector-respond":
        assert settings.apply is False, "the shipped manifest is a dry run"
        assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"]["type"] == "Recreate"


# ======================================================================================================
# Prometheus rules and Grafana dashboard
# ======================================================================================================


def promtool(*args: str, cwd: Path = PROM) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=60)


@needs_promtool
def test_promtool_checks_rules_config_and_rule_unit_tests() -> None:
    for args in (("check", "rules", "alerts.yml"), ("check", "config", "prometheus.yml"), ("test", "rules", "alerts.test.yml")):
        result = promtool(*args)
        assert result.returncode == 0, f"promtool {' '.join(args)}:\n{result.stdout}{result.stderr}"


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in load_yaml(PROM / "alerts.yml")["groups"] for rule in group["rules"]]


def dashboard_panels() -> list[dict[str, Any]]:
    out = []
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def dashboard_exprs() -> list[str]:
    exprs = [t["expr"] for p in dashboard_panels() for t in p.get("targets", []) if t.get("expr")]
    for variable in json.loads(DASHBOARD.read_text())["templating"]["list"]:
        query = variable.get("query")
        if variable["type"] == "query":
            text = query["query"] if isinstance(query, dict) else query
            m = re.fullmatch(r"label_values\((.+),\s*\w+\)", text.strip())
            exprs.append(m.group(1) if m else text)
    return exprs


GRAFANA_SUBSTITUTIONS = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}


def dashboard_variables() -> dict[str, str]:
    """Each query variable of the dashboard (``$instance``, ``$ingest_instance``...) and its "All" value."""
    variables = json.loads(DASHBOARD.read_text())["templating"]["list"]
    return {f"${v['name']}": v.get("allValue") or ".*" for v in variables if v["type"] == "query"}


def grafana_to_promql(expr: str) -> str:
    substitutions = GRAFANA_SUBSTITUTIONS | dashboard_variables()
    for var in sorted(substitutions, key=len, reverse=True):  # $__rate_interval before a shorter prefix of it
        expr = expr.replace(var, substitutions[var])
    assert "$" not in expr, f"unknown Grafana variable in {expr!r}"
    return expr


_PROMQL_WORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool", "and", "or", "unless",
    "inf", "nan", "atan2",
}


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers that are not functions, keywords or labels."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)  # strings
    text = re.sub(r"\{[^{}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\[\]]*\]", " ", text)  # ranges and subqueries
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", " ", text)  # label lists
    names = set()
    for m in re.finditer(r"(?<![\w:.$])([A-Za-z_:][\w:]*)(\s*\()?", text):
        word, call = m.group(1), m.group(2)
        if call or word.lower() in _PROMQL_WORDS:
            continue
        names.add(word)
    return names


def test_metric_name_extraction() -> None:
    assert metric_names(
        'histogram_quantile(0.99, sum by (le) (rate(detector_event_lag_seconds_bucket{instance=~"$instance"}[$__rate_interval])))'
    ) == {"detector_event_lag_seconds_bucket"}
    assert metric_names(
        '(x_total{severity="8"} unless x_total{severity="8"} offset 5m) or increase(y_total[5m]) > 0 and on (a) z'
    ) == {"x_total", "y_total", "z"}
    assert metric_names("sum(a) / sum without (b, c) (rate(d[1h:5m])) > bool 1e3") == {"a", "d"}
    assert metric_names("absent(detector_ready)") == {"detector_ready"}


async def get_metrics(port: int) -> str:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{port}/metrics") as resp:
            assert resp.status == 200
            return await resp.text()


@pytest.fixture(scope="module")
def command_scrapes(broker: EmbeddedBroker, moto: MotoServer) -> dict[str, str]:  # noqa: F811
    """The /metrics text of each long-running command, really running: `detector run`, `detector ingest`
    (a queue on a moto server), `detector export securityhub` and `detector respond`."""

    async def scrape_run() -> str:
        prefix = unique("deploy-metrics")
        settings = service_settings(broker.bootstrap, prefix, registry=sample_world().registry, grace_seconds=5)
        await create_topics(broker.bootstrap, {settings.input_topics: 1})
        service = DetectorService(settings)
        task = asyncio.create_task(service.run())
        try:
            await wait_until(service.ready, timeout=30)
            assert service.http is not None
            return await get_metrics(service.http.port)
        finally:
            service.stop()
            await asyncio.wait_for(task, timeout=30)

    async def scrape_ingest() -> str:
        with aws_env(moto.url):
            url, _ = make_queue(moto)
            topic = await new_topic(broker.bootstrap, "deploy-metrics")
            service, task = await start_ingest(ingest_settings(broker.bootstrap, topic, url))
            try:
                return await get_metrics(service.http.port)
            finally:
                assert await stop_ingest(service, task) == 0

    async def scrape_output(name: str) -> str:
        from detector.outputs.export import exporter
        from detector.outputs.respond import responder
        from detector.outputs.settings import ExportSettings, RespondSettings

        cls, build = {"export": (ExportSettings, exporter), "respond": (RespondSettings, responder)}[name]
        prefix = unique("deploy-metrics")
        consumer = build(cls(kafka_bootstrap=broker.bootstrap, findings_topic=f"{prefix}.findings", group_id=prefix,
                             http_port=0, log_level="warning"))  # fmt: skip
        task = asyncio.create_task(consumer.run())
        try:
            await wait_until(lambda: consumer.http is not None and consumer.http.port != 0, timeout=30)
            return await get_metrics(consumer.http.port)
        finally:
            consumer.stop()
            await asyncio.wait_for(task, timeout=30)

    return {
        "run": asyncio.run(scrape_run()),
        "ingest": asyncio.run(scrape_ingest()),
        "export": asyncio.run(scrape_output("export")),
        "respond": asyncio.run(scrape_output("respond")),
    }


@pytest.fixture(scope="module")
def exported_scrape(command_scrapes: dict[str, str]) -> str:
    """The /metrics texts of every command, one after the other."""
    return "".join(command_scrapes.values())


@pytest.fixture(scope="module")
def exported_metrics(exported_scrape: str) -> set[str]:
    """Every series name the scrape holds (histogram and counter suffixes included)."""
    names: set[str] = set()
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "summary": ("_sum", "_count"), "info": ("_info",)}
    for family in text_string_to_metric_families(exported_scrape):
        names.add(family.name)
        names.update(family.name + s for s in suffixes.get(family.type, ()))
        names.update(sample.name for sample in family.samples)
    return names


def test_alert_rules_and_dashboard_use_only_exported_metrics(exported_metrics: set[str]) -> None:
    assert {"detector_events_total", "detector_event_lag_seconds_bucket", "detector_consumer_lag"} <= exported_metrics
    used: dict[str, set[str]] = {}
    for rule in alert_rules():
        names = metric_names(rule["expr"])
        assert names, f"no metric in alert {rule['alert']}"
        used[f"alert {rule['alert']}"] = names
    for expr in dashboard_exprs():
        names = metric_names(grafana_to_promql(expr))
        assert names, f"no metric in dashboard query {expr}"
        used[f"dashboard {expr}"] = names
    unknown = {where: names - exported_metrics for where, names in used.items() if names - exported_metrics}
    assert not unknown, f"metrics the service does not export: {unknown}"


# SPEC §5, §11-§13: each finding type (the label is its last name) with its severity.
FINDING_SERIES = {
    ("InsideAWS", "5"), ("InsideAWS", "8"), ("OutsideAWS", "8"), ("AfterInstanceStopped", "8"),
    ("OtherInstance", "8"), ("InstanceCredentialsDeliveredByIMDSv1", "2"),
}


def queried_types(expr: str) -> set[str]:
    """The values a query's ``type`` matchers name (``type="A"``, ``type=~"A|B"``)."""
    return {v for m in re.finditer(r'\btype=~?"([^"]*)"', expr) for v in m.group(1).split("|")}


def test_finding_types_queried_are_exported(exported_scrape: str) -> None:
    """Every type/severity pair is on /metrics from start-up (so increase() and the dashboard see the first
    finding of a type), and every type a rule or panel selects is one of them."""
    series = {
        (sample.labels["type"], sample.labels["severity"])
        for family in text_string_to_metric_families(exported_scrape)
        for sample in family.samples
        if sample.name == "detector_findings_total"
    }
    assert series == FINDING_SERIES
    assert "detector_lifecycle_instances" in exported_scrape
    exprs = [r["expr"] for r in alert_rules()] + [grafana_to_promql(e) for e in dashboard_exprs()]
    selected = set().union(*(queried_types(e) for e in exprs))
    assert {"AfterInstanceStopped", "OtherInstance", "InstanceCredentialsDeliveredByIMDSv1"} <= selected
    assert selected <= {t for t, _ in FINDING_SERIES}, selected


def test_alert_rules_cover_the_operational_signals() -> None:
    rules = alert_rules()
    by_metric: dict[str, list[dict[str, Any]]] = {}
    for rule in rules:
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
        for name in metric_names(rule["expr"]):
            by_metric.setdefault(name, []).append(rule)
    for metric in (
        "detector_ready", "detector_consumer_lag", "detector_dead_letters_total", "detector_registry_reloads_total",
        "detector_commit_failures_total", "detector_broker_errors_total", "detector_findings_total",
        "detector_export_failed_total", "detector_respond_failed_total",
        "detector_ingest_oldest_message_age_seconds", "detector_ingest_failures_total",
    ):
        assert metric in by_metric, f"no alert on {metric}"
    age_exprs = " ".join(r["expr"] for r in by_metric["detector_ingest_oldest_message_age_seconds"])
    assert "deriv(" in age_exprs, "an alert on a growing oldest-message age"
    (failing,) = by_metric["detector_ingest_failures_total"]
    assert "rate(" in failing["expr"] and "for" in failing, "a sustained failure rate, not a single failure"
    lag_exprs = " ".join(r["expr"] for r in by_metric["detector_consumer_lag"])
    assert "deriv(" in lag_exprs or "delta(" in lag_exprs, "an alert on growing lag"
    finding_rules = by_metric["detector_findings_total"]
    high = [r for r in finding_rules if 'severity="8"' in r["expr"]]
    medium = [r for r in finding_rules if 'severity="5"' in r["expr"]]
    assert len(high) == 1 and len(medium) == 1 and high[0]["alert"] != medium[0]["alert"]
    assert high[0]["labels"]["severity"] == "critical"
    assert 'severity="5"' not in high[0]["expr"] and 'severity="8"' not in medium[0]["expr"]
    # the High alert selects no type, so AfterInstanceStopped and OtherInstance (severity 8) page too
    assert not queried_types(high[0]["expr"]) and not queried_types(medium[0]["expr"])
    # IMDSv1 deliveries (severity 2) are hygiene: one info (ticket) alert of their own, never a page
    imdsv1 = [r for r in finding_rules if "InstanceCredentialsDeliveredByIMDSv1" in queried_types(r["expr"])]
    assert len(imdsv1) == 1 and imdsv1[0]["labels"]["severity"] == "info"
    assert imdsv1[0]["alert"] not in (high[0]["alert"], medium[0]["alert"])
    registry = by_metric["detector_registry_reloads_total"]
    assert all('result="failure"' in r["expr"] for r in registry)


COMMAND_VARIABLES = {"detector_ingest_": "$ingest_instance", "detector_export_": "$export_instance", "detector_respond_": "$respond_instance"}


def heading_anchors(markdown: str) -> set[str]:
    """GitHub's anchors of a Markdown file's headings."""
    anchors = set()
    for m in re.finditer(r"^#+\s+(.+?)\s*$", markdown, re.M):
        anchors.add(re.sub(r"[^\w\- ]", "", m.group(1).lower()).replace(" ", "-"))
    return anchors


def test_alert_runbooks_exist() -> None:
    for rule in alert_rules():
        path, _, anchor = rule["annotations"]["runbook"].partition("#")
        assert (REPO / path).is_file(), rule["alert"]
        if anchor:
            assert anchor in heading_anchors((REPO / path).read_text()), f"{rule['alert']}: no heading #{anchor} in {path}"


def test_dashboard_shows_every_metric_of_ingest_export_and_respond(command_scrapes: dict[str, str]) -> None:
    """The rows of the three other commands cover what they export (their build info aside), and every
    command has its instance variable, listed from a metric of its own."""
    shown = set().union(*(metric_names(grafana_to_promql(e)) for e in dashboard_exprs()))
    suffixes = ("", "_total", "_bucket", "_sum", "_count")
    for command in ("ingest", "export", "respond"):
        families = [f for f in text_string_to_metric_families(command_scrapes[command]) if f.type != "info"]
        assert families and all(f.name.startswith(f"detector_{command}_") for f in families), command
        missing = [f.name for f in families if not {f.name + s for s in suffixes} & shown]
        assert not missing, f"metrics of detector {command} on no dashboard panel: {missing}"
    assert set(COMMAND_VARIABLES.values()) | {"$instance"} == set(dashboard_variables())


def test_dashboard_has_the_panels(tmp_path: Path) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [p for p in dashboard_panels() if p["type"] != "row"]
    ids = [p["id"] for p in dashboard_panels()]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    for panel in panels:
        assert panel["targets"] and panel["title"] and panel["gridPos"]["w"] > 0
        assert panel["datasource"]["uid"] == "${datasource}"

    def panel_with(metric: str, needle: str = "") -> list[str]:
        return [p["title"] for p in panels if any(metric in t["expr"] and needle in t["expr"] for t in p["targets"])]

    assert panel_with("detector_events_total", "by (topic)")
    assert panel_with("detector_events_malformed_total", "by (reason)")
    assert panel_with("detector_instance_events_total")
    assert panel_with("detector_findings_total", "by (type, severity)")
    assert set(panel_with("detector_sessions")) & set(panel_with("detector_session_capacity")), "sessions vs capacity"
    assert panel_with("detector_index_evictions_total")
    assert panel_with("detector_event_lag_seconds_bucket", "histogram_quantile(")
    assert panel_with("detector_processing_seconds_bucket", "histogram_quantile(")
    assert panel_with("detector_consumer_lag", "partition")
    assert panel_with("detector_rebalances_total")
    assert panel_with("detector_dead_letters_total")
    assert panel_with("detector_restoring_partitions") and panel_with("detector_restore_records_total")
    # SPEC part two: the High types GuardDuty cannot raise, IMDSv1 hygiene, the lifecycle entries (§11)
    for finding_type in ("AfterInstanceStopped", "OtherInstance", "InstanceCredentialsDeliveredByIMDSv1"):
        assert panel_with("detector_findings_total", finding_type), finding_type
    assert panel_with("detector_lifecycle_instances")
    # detector ingest, detector export securityhub, detector respond: a row each
    rows = [p["title"] for p in dashboard["panels"] if p["type"] == "row"]
    for command in ("detector ingest", "detector export securityhub", "detector respond"):
        assert any(command in title for title in rows), command
    assert panel_with("detector_ingest_oldest_message_age_seconds") and panel_with("detector_ingest_failures_total", "by (reason)")
    assert panel_with("detector_export_imported_total") and panel_with("detector_respond_statements_added_total")
    for prefix in ("detector_export", "detector_respond"):
        assert panel_with(f"{prefix}_aws_call_seconds_bucket", "histogram_quantile(")
        assert panel_with(f"{prefix}_failed_total", "by (reason)") and panel_with(f"{prefix}_consumer_lag", "partition")
    for panel in panels:
        unit = panel["fieldConfig"]["defaults"]["unit"]
        names: set[str] = set()
        for target in panel["targets"]:
            expr = target["expr"]
            used = metric_names(grafana_to_promql(expr))
            names |= used
            for name in used:
                # each command's metrics are filtered by that command's instance variable
                variable = next((v for p, v in COMMAND_VARIABLES.items() if name.startswith(p)), "$instance")
                assert f'instance=~"{variable}"' in expr, (panel["title"], name)
                # a counter (or a histogram's series) is only ever shown through rate() or increase()
                if name.endswith(("_total", "_bucket", "_sum", "_count")):
                    bare = len(re.findall(rf"\b{name}\b", expr))
                    assert len(re.findall(rf"\b(?:rate|increase)\({name}\b", expr)) == bare, (panel["title"], expr)
        if all(re.search(r"_seconds(_bucket|_sum|_count)?$", n) for n in names):
            assert unit == "s", panel["title"]
        if all("_bytes_" in n for n in names):
            per_second = all("rate(" in t["expr"] for t in panel["targets"])
            assert unit == ("Bps" if per_second else "bytes"), panel["title"]
    if PROMTOOL is None:
        return
    # every panel query is valid PromQL: promtool parses them as recording rules
    rules = {
        "groups": [
            {"name": "dashboard", "rules": [{"record": f"dashboard:query_{i}", "expr": grafana_to_promql(e)} for i, e in enumerate(dashboard_exprs())]}
        ]
    }
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump(rules))
    result = promtool("check", "rules", str(path), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


# ======================================================================================================
# Docs
# ======================================================================================================


def code_texts(markdown: str) -> list[str]:
    """Lines of fenced code blocks and inline code spans."""
    texts: list[str] = []
    fenced = re.findall(r"^```[^\n]*\n(.*?)^```", markdown, re.S | re.M)
    for block in fenced:
        texts.extend(block.splitlines())
    outside = re.sub(r"^```[^\n]*\n.*?^```", "", markdown, flags=re.S | re.M)
    texts.extend(re.findall(r"`([^`\n]+)`", outside))
    return texts


def detector_invocations(markdown: str) -> list[list[str]]:
    """Every `detector ...` command line in the code of a document, as argv (after `detector`)."""
    out = []
    for text in code_texts(markdown):
        for segment in re.split(r"\||&&|;|\$\(", text):
            segment = segment.strip().removeprefix("$ ").strip()
            if re.match(r"detector(\s|$)", segment) and not segment.startswith("detector:"):
                words = shlex.split(segment.split(" #")[0], posix=True)
                if len(words) > 1:
                    out.append(words[1:])
    return out


def resolve_command(argv: list[str]) -> tuple[list[str], Any]:
    import click

    command: Any = cli
    path: list[str] = []
    ctx = click.Context(cli)
    for word in argv:
        if not isinstance(command, click.Group) or word.startswith("-"):
            break
        sub = command.get_command(ctx, word)
        assert sub is not None, f"`detector {' '.join(path + [word])}`: no such command"
        command = sub
        path.append(word)
    return path, command


def test_docs_exist_and_mention_only_real_commands() -> None:
    import click

    runner = CliRunner()
    seen = set()
    for doc in DOCS:
        text = doc.read_text()
        assert len(text) > 2000, f"{doc.name} is too short to be the document"
        invocations = detector_invocations(text)
        assert invocations or doc.name == "runbook.md", f"{doc.name} mentions no detector command"
        for argv in invocations:
            path, command = resolve_command(argv)
            assert path, f"{doc.name}: `detector {' '.join(argv)}` names no subcommand"
            assert not isinstance(command, click.Group), f"{doc.name}: `detector {' '.join(path)}` is a group"
            if tuple(path) not in seen:
                result = runner.invoke(cli, [*path, "--help"])
                assert result.exit_code == 0, result.output
                seen.add(tuple(path))
            ctx = click.Context(command)
            options = {opt for param in command.get_params(ctx) for opt in (*param.opts, *param.secondary_opts)}
            for word in argv[len(path):]:
                if word.startswith("--"):
                    assert word.split("=")[0] in options, f"{doc.name}: `detector {' '.join(path)}` has no option {word}"
    assert {("run",), ("replay",)} <= seen


def test_operations_doc_covers_the_contract() -> None:
    text = (REPO / "docs" / "operations.md").read_text()
    assert "configuration.md" in text
    for needle in (
        "docker compose", "kubectl apply -k", "SIGTERM", "SIGHUP", "/healthz", "/readyz", "/metrics",
        "detector.error.reason", "detector.error", "detector.source.topic", "detector.source.partition",
        "detector.source.offset", "cleanup.policy=compact", "detector.sessions", "detector.changelog",
    ):
        assert needle in text, needle


def replay_findings(*args: str) -> dict[str, dict[str, Any]]:
    result = subprocess.run(
        [sys.executable, "-m", "detector", "replay", *args], capture_output=True, timeout=120, check=True
    )
    return {f["id"]: f for f in (orjson.loads(line) for line in result.stdout.splitlines())}


def json_blocks(markdown: str) -> list[Any]:
    return [json.loads(block) for block in re.findall(r"^```json\n(.*?)^```", markdown, re.S | re.M)]


def test_findings_doc_examples_are_real_replay_output(tmp_path: Path) -> None:
    from worldgen import make_world, write_world

    world = sample_world()
    real = replay_findings("--registry", str(world.registry), *world.inputs)
    real.update(replay_findings(str(REPO / "tests" / "fixtures" / "invictus-aws" / "CloudTrail")))
    generated = make_world(7, n_accounts=3, instances_per_account=3)  # the part-two examples
    registry = tmp_path / "registry.json"
    registry.write_bytes(orjson.dumps(generated.registry))
    real.update(replay_findings("--registry", str(registry), *map(str, write_world(generated, tmp_path / "world"))))
    blocks = json_blocks((REPO / "docs" / "findings.md").read_text())
    findings = [b for b in blocks if isinstance(b, dict) and "schemaVersion" in b]
    envelopes = [b for b in blocks if isinstance(b, dict) and b.get("detail-type") == "GuardDuty Finding"]
    types = {f["type"].rsplit(".", 1)[-1] for f in findings}
    assert types == {"InsideAWS", "OutsideAWS", "AfterInstanceStopped", "OtherInstance"}, types
    for finding in findings:
        assert finding == real.get(finding["id"]), f"example {finding['id']} is not what `detector replay` produces"
    assert any(f["accountId"] == "123837392027" for f in findings), "the Invictus (real attack) finding"
    assert envelopes, "an example of the EventBridge envelope"
    for envelope in envelopes:
        assert envelope["detail"] == real[envelope["detail"]["id"]]
        made = eventbridge_envelope(envelope["detail"])
        assert set(made) == set(envelope)
        assert {k: v for k, v in made.items() if k not in ("id", "time")} == {
            k: v for k, v in envelope.items() if k not in ("id", "time")
        }
        assert envelope["time"] == made["time"]


def test_runbook_covers_the_response() -> None:
    text = (REPO / "docs" / "runbook.md").read_text()
    for needle in (
        "aws:TokenIssueTime", "Organizations", "remoteAccountDetails", "Athena", "CloudTrail Lake",
        "HttpTokens", "HttpPutResponseHopLimit", "snapshot", "security group", "abuse",
    ):
        assert needle in text, needle
    # the IAM policy examples are valid JSON
    for block in json_blocks(text):
        assert isinstance(block, dict)


def test_settings_error_is_raised_for_unknown_values(monkeypatch: pytest.MonkeyPatch) -> None:
    """The settings check used above really rejects a bad environment (so it can fail)."""
    with pytest.raises(SettingsError):
        settings_from_env(monkeypatch, {"DETECTOR_HTTP_PORT": "not-a-port"})
