"""Settings: defaults < TOML file < DETECTOR_* environment < flags, validation naming setting and source."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import click
import orjson
import pytest
from click.testing import CliRunner

from detector.cli import cli
from detector.service.settings import (
    TOML_EXAMPLE,
    Settings,
    SettingsError,
    configuration_markdown,
    env_var,
    load_settings,
    settings_from_cli,
    settings_options,
    settings_overrides,
)

DOC = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("DETECTOR_") or name in ("AWS_REGION", "AWS_DEFAULT_REGION"):
            monkeypatch.delenv(name)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def error_of(config_file: Path | None = None, overrides: dict[str, Any] | None = None) -> str:
    with pytest.raises(SettingsError) as info:
        load_settings(config_file, overrides or {})
    return str(info.value)


# --- precedence -------------------------------------------------------------------------------------

def test_defaults_without_any_source() -> None:
    s = load_settings(None, {})
    assert (s.kafka_bootstrap, s.input_subscription, s.findings_topic, s.dlq_topic) == (
        "localhost:9092", ("topics", ["cloudtrail"]), "detector.findings", "detector.dlq",
    )
    assert (s.group_id, s.client_id, s.registry, s.ip_ranges, s.http_port) == ("detector", "detector", None, None, 9108)
    assert (s.finding_update_seconds, s.session_ttl_seconds, s.max_sessions) == (60, 43200, 1_000_000)
    assert (s.security_protocol, s.sasl_mechanism, s.producer_acks, s.enable_idempotence) == ("PLAINTEXT", None, "all", False)
    assert (s.log_level, s.log_format, s.ssl_check_hostname, s.auto_create_topics) == ("info", "auto", True, True)
    assert set(s.sources.values()) == {"default"}


@pytest.mark.parametrize(
    ("name", "toml", "env", "flag", "expected"),
    [
        # name, TOML literal, env string, flag value (as click passes it), expected values at each layer
        ("http_port", "9001", "9002", "9003", (9108, 9001, 9002, 9003)),
        ("eventbridge_envelope", "true", "false", True, (False, True, False, True)),
        ("ssl_check_hostname", "false", "yes", False, (True, False, True, False)),
        ("finding_update_seconds", "1.5", "2.5", "0", (60.0, 1.5, 2.5, 0.0)),
        ("log_level", '"warning"', "ERROR", "debug", ("info", "warning", "error", "debug")),
        ("input_topics", '["a", "b"]', "^ct-.*", "x,y", ("cloudtrail", "a,b", "^ct-.*", "x,y")),
    ],
)
def test_precedence_defaults_file_env_flags(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, toml: str, env: str, flag: Any, expected: tuple[Any, ...]
) -> None:
    default, from_file, from_env, from_flag = expected
    config = write(tmp_path / "detector.toml", f"{name} = {toml}\n")
    assert getattr(load_settings(None, {}), name) == default
    s = load_settings(config, {})
    assert getattr(s, name) == from_file and s.sources[name] == f"file {config}"
    monkeypatch.setenv(env_var(name), env)
    s = load_settings(config, {})
    assert getattr(s, name) == from_env and s.sources[name] == f"env {env_var(name)}"
    s = load_settings(config, {name: flag})
    assert getattr(s, name) == from_flag and s.sources[name] == f"flag --{name.replace('_', '-')}"
    # a flag that was not given (None) does not override
    assert getattr(load_settings(config, {name: None}), name) == from_env


def test_precedence_of_a_path_and_relative_paths_in_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conf_dir = tmp_path / "conf"
    in_file = write(conf_dir / "registry.toml", "")
    from_env = write(tmp_path / "env" / "registry.json", "{}")
    from_flag = write(tmp_path / "flag.json", "{}")
    config = write(conf_dir / "detector.toml", 'registry = "registry.toml"\n')
    monkeypatch.chdir(tmp_path)  # the file's relative path must resolve against conf/, not the cwd
    assert load_settings(None, {}).registry is None
    assert load_settings(config, {}).registry == in_file
    monkeypatch.setenv("DETECTOR_REGISTRY", str(from_env))
    assert load_settings(config, {}).registry == from_env
    s = load_settings(config, {"registry": "flag.json"})  # flags are relative to the working directory
    assert s.registry is not None and s.registry.resolve() == from_flag.resolve()
    assert s.sources["registry"] == "flag --registry"


def test_config_file_from_detector_config_and_the_flag_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a = write(tmp_path / "a.toml", 'group_id = "from-a"\n')
    b = write(tmp_path / "b.toml", 'group_id = "from-b"\n')
    monkeypatch.setenv("DETECTOR_CONFIG", str(a))
    assert load_settings(None, {}).group_id == "from-a"
    assert load_settings(b, {}).group_id == "from-b"


def test_env_names_are_case_insensitive_and_empty_means_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("detector_group_id", "lower")
    monkeypatch.setenv("DETECTOR_HTTP_PORT", "")
    s = load_settings(None, {})
    assert (s.group_id, s.http_port) == ("lower", 9108)


def test_plain_settings_constructor_reads_the_environment_under_keyword_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DETECTOR_GROUP_ID", "env")
    monkeypatch.setenv("DETECTOR_CLIENT_ID", "env")
    s = Settings(client_id="kw")
    assert (s.group_id, s.client_id) == ("env", "kw")


SPEC_ENV = [
    # SPEC §9: variable, default, a value, what it becomes
    ("DETECTOR_KAFKA_BOOTSTRAP", "localhost:9092", "k1:9092,k2:9093", "k1:9092,k2:9093"),
    ("DETECTOR_INPUT_TOPICS", "cloudtrail", "ct-a,ct-b", "ct-a,ct-b"),
    ("DETECTOR_FINDINGS_TOPIC", "detector.findings", "out.findings", "out.findings"),
    ("DETECTOR_DLQ_TOPIC", "detector.dlq", "out.dlq", "out.dlq"),
    ("DETECTOR_GROUP_ID", "detector", "det-2", "det-2"),
    ("DETECTOR_REGISTRY", None, "registry.json", "registry.json"),
    ("DETECTOR_IP_RANGES", None, "ranges.json", "ranges.json"),
    ("DETECTOR_HTTP_PORT", 9108, "8080", 8080),
    ("DETECTOR_FINDING_UPDATE_SECONDS", 60.0, "5", 5.0),
]


@pytest.mark.parametrize(("var", "default", "raw", "value"), SPEC_ENV, ids=[v[0] for v in SPEC_ENV])
def test_spec_environment_variables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, var: str, default: Any, raw: str, value: Any
) -> None:
    name = var.removeprefix("DETECTOR_").lower()
    assert getattr(load_settings(None, {}), name) == default
    if name in ("registry", "ip_ranges"):
        raw = str(write(tmp_path / raw, "{}"))
        value = Path(raw)
    monkeypatch.setenv(var, raw)
    s = load_settings(None, {})
    assert getattr(s, name) == value
    assert s.sources[name] == f"env {var}"


# --- input topics -----------------------------------------------------------------------------------

def test_input_topics_list_or_pattern(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DETECTOR_INPUT_TOPICS", " a , b,a ,")
    assert load_settings(None, {}).input_subscription == ("topics", ["a", "b"])
    monkeypatch.setenv("DETECTOR_INPUT_TOPICS", "^cloudtrail(-.*)?$")
    assert load_settings(None, {}).input_subscription == ("pattern", "^cloudtrail(-.*)?$")


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        ("^cloudtrail(", "invalid regular expression"),
        (" , ,", "no topic given"),
        ("ok,bad topic", "not a valid Kafka topic name"),
        ("detector.findings", "feedback loop"),
        ("^detector\\.", "feedback loop"),
    ],
)
def test_bad_input_topics_from_env(monkeypatch: pytest.MonkeyPatch, value: str, needle: str) -> None:
    monkeypatch.setenv("DETECTOR_INPUT_TOPICS", value)
    message = error_of()
    assert "input_topics" in message and needle in message and "env DETECTOR_INPUT_TOPICS" in message


# --- errors name the setting and the source --------------------------------------------------------

BAD_VALUES = [
    ("http_port", "70000"),
    ("http_port", "eighty"),
    ("max_sessions", "0"),
    ("session_ttl_seconds", "0"),
    ("finding_update_seconds", "-1"),
    ("registry_reload_seconds", "nan"),
    ("eventbridge_envelope", "maybe"),
    ("log_level", "verbose"),
    ("log_format", "xml"),
    ("producer_acks", "2"),
    ("security_protocol", "TLS"),
    ("kafka_bootstrap", "host:port"),
    ("kafka_bootstrap", "kafka://h:9092"),
    ("findings_topic", "has space"),
    ("group_id", " "),
    ("registry", "/does/not/exist.json"),
    ("ssl_cafile", "/does/not/exist.pem"),
]


@pytest.mark.parametrize(("name", "value"), BAD_VALUES)
@pytest.mark.parametrize("layer", ["file", "env", "flag"])
def test_every_error_names_the_setting_and_its_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, layer: str, name: str, value: str
) -> None:
    config = None
    if layer == "file":
        config = write(tmp_path / "c.toml", f"{name} = {orjson.dumps(value).decode()}\n")
        source = f"file {config}"
    elif layer == "env":
        monkeypatch.setenv(env_var(name), value)
        source = f"env {env_var(name)}"
    else:
        source = f"flag --{name.replace('_', '-')}"
    message = error_of(config, {name: value} if layer == "flag" else {})
    assert f"invalid setting {name}" in message
    assert source in message


def test_native_toml_type_errors_name_the_setting(tmp_path: Path) -> None:
    config = write(tmp_path / "c.toml", "group_id = 5\nproducer_acks = true\n")
    message = error_of(config)
    assert "invalid setting group_id" in message and "invalid setting producer_acks" in message
    assert message.count(f"file {config}") == 2


def test_unknown_key_bad_toml_and_missing_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    message = error_of(write(tmp_path / "u.toml", "http_prot = 1\n"))
    assert "unknown setting 'http_prot'" in message and "u.toml" in message and "'http_port'" in message
    message = error_of(write(tmp_path / "t.toml", "[detector]\nhttp_port = 1\n"))
    assert "unknown setting 'detector'" in message and "top-level keys" in message
    message = error_of(write(tmp_path / "b.toml", "http_port = = 1\n"))
    assert "not valid TOML" in message and "b.toml" in message
    message = error_of(tmp_path / "missing.toml")
    assert "missing.toml" in message and "--config" in message and "does not exist" in message
    assert "unknown setting 'nope' (from flag)" in error_of(None, {"nope": 1})
    monkeypatch.setenv("DETECTOR_CONFIG", str(tmp_path / "gone.toml"))
    message = error_of()
    assert "gone.toml" in message and "DETECTOR_CONFIG" in message


def test_secret_values_never_appear_in_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DETECTOR_SASL_PASSWORD", "hunter2-secret")
    message = error_of()  # a password with no SASL mechanism is refused
    assert "sasl_password" in message and "hunter2-secret" not in message


# --- cross-field rules ------------------------------------------------------------------------------

@pytest.fixture
def files(tmp_path: Path) -> dict[str, str]:
    return {n: str(write(tmp_path / f"{n}.pem", "x")) for n in ("ca", "cert", "key", "token")}


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"security_protocol": "SASL_SSL"}, ["security_protocol", "sasl_mechanism"]),
        ({"security_protocol": "SASL_PLAINTEXT"}, ["security_protocol", "sasl_mechanism"]),
        ({"sasl_mechanism": "PLAIN"}, ["sasl_mechanism", "security_protocol"]),
        ({"security_protocol": "SASL_SSL", "sasl_mechanism": "PLAIN", "sasl_username": "u"}, ["sasl_password"]),
        ({"security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-512", "sasl_password": "p"}, ["sasl_username"]),
        ({"security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-256"}, ["sasl_username", "sasl_password"]),
        ({"security_protocol": "SASL_SSL", "sasl_mechanism": "OAUTHBEARER"}, ["sasl_oauth_token_file"]),
        ({"security_protocol": "SASL_SSL", "sasl_mechanism": "AWS_MSK_IAM"}, ["msk_iam_region"]),
        ({"security_protocol": "SSL", "ssl_certfile": "@cert"}, ["ssl_certfile", "ssl_keyfile"]),
        ({"security_protocol": "SSL", "ssl_keyfile": "@key"}, ["ssl_keyfile", "ssl_certfile"]),
        ({"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "PLAIN", "sasl_username": "u", "sasl_password": "p",
          "ssl_cafile": "@ca"}, ["ssl_cafile", "security_protocol"]),
        ({"transactional_id": "tx"}, ["transactional_id", "enable_idempotence"]),
        ({"enable_idempotence": True, "producer_acks": "1"}, ["enable_idempotence", "producer_acks"]),
        ({"dlq_topic": "detector.findings"}, ["findings_topic", "dlq_topic"]),
    ],
)
def test_cross_field_rules_name_every_setting_involved(files: dict[str, str], overrides: dict[str, Any], named: list[str]) -> None:
    resolved = {k: files[v[1:]] if isinstance(v, str) and v.startswith("@") else v for k, v in overrides.items()}
    message = error_of(None, resolved)
    assert message.startswith("invalid settings:")
    for name in named:
        assert name in message
    for name in overrides:
        assert f"{name} from flag --{name.replace('_', '-')}" in message or name not in named


@pytest.mark.parametrize(
    "overrides",
    [
        {"security_protocol": "SSL"},
        {"security_protocol": "SSL", "ssl_cafile": "@ca", "ssl_certfile": "@cert", "ssl_keyfile": "@key", "ssl_key_password": "k"},
        {"security_protocol": "SASL_SSL", "sasl_mechanism": "scram_sha_512", "sasl_username": "u", "sasl_password": "p"},
        {"security_protocol": "sasl_plaintext", "sasl_mechanism": "PLAIN", "sasl_username": "u", "sasl_password": "p"},
        {"security_protocol": "SASL_SSL", "sasl_mechanism": "OAUTHBEARER", "sasl_oauth_token_file": "@token"},
        {"security_protocol": "SASL_SSL", "sasl_mechanism": "AWS_MSK_IAM", "msk_iam_region": "eu-west-1"},
        {"enable_idempotence": True, "transactional_id": "detector-0"},
    ],
)
def test_valid_security_and_producer_combinations(files: dict[str, str], overrides: dict[str, Any]) -> None:
    resolved = {k: files[v[1:]] if isinstance(v, str) and v.startswith("@") else v for k, v in overrides.items()}
    s = load_settings(None, resolved)
    assert s.security_protocol in ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
    if "sasl_mechanism" in overrides:
        assert s.sasl_mechanism in ("SCRAM-SHA-512", "PLAIN", "OAUTHBEARER", "AWS_MSK_IAM")


def test_msk_iam_region_defaults_from_aws_region(monkeypatch: pytest.MonkeyPatch) -> None:
    msk = {"security_protocol": "SASL_SSL", "sasl_mechanism": "AWS_MSK_IAM"}
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-central-1")
    s = load_settings(None, msk)
    assert (s.msk_iam_region, s.sources["msk_iam_region"]) == ("eu-central-1", "env AWS_DEFAULT_REGION")
    monkeypatch.setenv("AWS_REGION", "us-west-2")
    assert load_settings(None, msk).msk_iam_region == "us-west-2"
    monkeypatch.setenv("DETECTOR_MSK_IAM_REGION", "ap-south-1")
    assert load_settings(None, msk).msk_iam_region == "ap-south-1"


def test_redacted_masks_secrets_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DETECTOR_SASL_PASSWORD", "hunter2")
    s = load_settings(None, {"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "PLAIN", "sasl_username": "me"})
    data = s.redacted()
    assert data["sasl_password"] == "***" and data["sasl_username"] == "me" and data["ssl_key_password"] is None
    assert "hunter2" not in orjson.dumps(data).decode()
    assert s.sasl_password is not None and s.sasl_password.get_secret_value() == "hunter2"


# --- command line -----------------------------------------------------------------------------------

def _probe() -> click.Command:
    @click.command()
    @settings_options
    def probe(**kwargs: Any) -> None:
        click.echo(orjson.dumps({"overrides": settings_overrides(kwargs), "settings": settings_from_cli(kwargs).redacted()}))

    return probe


def test_every_setting_has_a_flag_and_only_given_flags_override(tmp_path: Path) -> None:
    probe = _probe()
    opts = {o for p in probe.params for o in (*p.opts, *p.secondary_opts)}
    for name, field in Settings.model_fields.items():
        assert f"--{name.replace('_', '-')}" in opts
        if field.annotation is bool:
            assert f"--no-{name.replace('_', '-')}" in opts
    config = write(tmp_path / "c.toml", "http_port = 7000\neventbridge_envelope = true\n")
    result = CliRunner().invoke(
        probe, ["--config", str(config), "--no-eventbridge-envelope", "--log-level", "DEBUG", "--max-sessions", "5"]
    )
    assert result.exit_code == 0, result.output
    out = orjson.loads(result.output)
    assert out["overrides"] == {"eventbridge_envelope": False, "log_level": "debug", "max_sessions": "5"}
    assert out["settings"]["http_port"] == 7000 and out["settings"]["eventbridge_envelope"] is False
    assert out["settings"]["max_sessions"] == 5


def test_settings_show_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DETECTOR_SASL_PASSWORD", "hunter2")
    runner = CliRunner()
    result = runner.invoke(
        cli, ["settings", "show", "--security-protocol", "SASL_SSL", "--sasl-mechanism", "PLAIN", "--sasl-username", "u"]
    )
    assert result.exit_code == 0, result.output
    out = orjson.loads(result.output)
    assert out["settings"]["sasl_password"] == "***" and "hunter2" not in result.output
    assert out["sources"]["sasl_password"] == "env DETECTOR_SASL_PASSWORD"
    assert out["sources"]["security_protocol"] == "flag --security-protocol"
    assert out["sources"]["group_id"] == "default"
    result = runner.invoke(cli, ["settings", "show", "--http-port", "-1"])
    assert result.exit_code == 2 and "http_port" in result.output and "flag --http-port" in result.output


# --- documentation ----------------------------------------------------------------------------------

def test_committed_configuration_doc_is_generated_from_the_model() -> None:
    assert DOC.read_text(encoding="utf-8") == configuration_markdown(), (
        "docs/configuration.md is stale: python -m detector.service.settings > docs/configuration.md"
    )


def test_doc_lists_every_setting_with_flag_env_and_description() -> None:
    text = configuration_markdown()
    for name, field in Settings.model_fields.items():
        assert field.description, f"{name} needs a description for the docs and --help"
        row = next(line for line in text.splitlines() if line.startswith(f"| `{name}` |"))
        assert f"`--{name.replace('_', '-')}`" in row and f"`{env_var(name)}`" in row
    assert "`config`" not in Settings.model_fields  # --config is the file flag


def test_toml_example_in_the_doc_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DETECTOR_SASL_PASSWORD", "p")
    s = load_settings(write(tmp_path / "detector.toml", TOML_EXAMPLE), {})
    assert s.input_subscription == ("pattern", "^cloudtrail\\..*")
    assert (s.security_protocol, s.sasl_mechanism, s.max_sessions, s.log_format) == ("SASL_SSL", "SCRAM-SHA-512", 2_000_000, "json")
    assert s.bootstrap_servers == ["kafka-1.internal:9092", "kafka-2.internal:9092"]
