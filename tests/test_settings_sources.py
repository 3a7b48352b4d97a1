"""The settings layers as pydantic-settings sources: edge cases of the layering and of the report of where
each value came from (tests/test_settings.py has the main precedence and error tests)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import Field

from detector.ingest.settings import IngestSettings
from detector.service.settings import KafkaClientSettings, Settings, SettingsError, load_settings
from test_settings import clean_env, write  # noqa: F401  (clean_env: autouse, no DETECTOR_*/AWS_REGION)

QUEUE = "https://sqs.eu-west-1.amazonaws.com/123456789012/trail"


class TaggedSettings(KafkaClientSettings):
    """A settings class with a complex field, as a command may one day declare."""

    tags: list[str] = Field(default_factory=list, description="Tags.")


def test_env_value_of_the_wrong_type_names_the_variable_and_shows_the_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DETECTOR_HTTP_PORT", "eighty")
    with pytest.raises(SettingsError) as err:
        load_settings(None, {})
    assert str(err.value).startswith("invalid setting http_port")
    assert "'eighty' from env DETECTOR_HTTP_PORT" in str(err.value)


def test_a_flag_shadows_a_bad_value_in_a_lower_layer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = write(tmp_path / "c.toml", 'http_port = "not a port"\n')
    monkeypatch.setenv("DETECTOR_HTTP_PORT", "eighty")
    s = load_settings(config, {"http_port": "9000"})
    assert (s.http_port, s.sources["http_port"]) == (9000, "flag --http-port")
    monkeypatch.delenv("DETECTOR_HTTP_PORT")
    with pytest.raises(SettingsError, match=f"'not a port' from file {config}"):
        load_settings(config, {})


def test_each_layer_reports_only_what_it_gave(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = write(tmp_path / "c.toml", 'group_id = "g-file"\nclient_id = "c-file"\nhttp_port = 1\n')
    monkeypatch.setenv("DETECTOR_CLIENT_ID", "c-env")
    monkeypatch.setenv("DETECTOR_HTTP_PORT", "2")
    s = load_settings(config, {"http_port": "3"})
    assert (s.group_id, s.client_id, s.http_port) == ("g-file", "c-env", 3)
    assert {k: v for k, v in s.sources.items() if v != "default"} == {
        "group_id": f"file {config}", "client_id": "env DETECTOR_CLIENT_ID", "http_port": "flag --http-port",
    }


def test_unknown_key_names_the_file_and_key_for_another_command(tmp_path: Path) -> None:
    config = write(tmp_path / "ingest.toml", f'queue_url = "{QUEUE}"\n')
    with pytest.raises(SettingsError) as err:
        load_settings(config, {}, IngestSettings)
    message = str(err.value)
    assert f"unknown setting 'queue_url' in config file '{config}'" in message and "'queue_urls'" in message
    # a run setting is unknown to ingest, and the other way round
    with pytest.raises(SettingsError, match="unknown setting 'findings_topic'"):
        load_settings(write(tmp_path / "i2.toml", f'queue_urls = "{QUEUE}"\nfindings_topic = "x"\n'), {}, IngestSettings)


def test_a_directory_or_non_utf8_file_cannot_be_read(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match=f"config file '{tmp_path}' \\(from --config\\) cannot be read"):
        load_settings(tmp_path, {})
    bad = tmp_path / "latin1.toml"
    bad.write_bytes(b'group_id = "caf\xe9"\n')
    with pytest.raises(SettingsError, match="latin1.toml.*cannot be read"):
        load_settings(bad, {})


def test_home_relative_path_in_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    registry = write(home / "reg.json", "{}")
    monkeypatch.setenv("HOME", str(home))
    s = load_settings(write(tmp_path / "conf" / "c.toml", 'registry = "~/reg.json"\n'), {})
    assert s.registry == registry


def test_complex_field_from_env_as_json_and_from_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = write(tmp_path / "c.toml", 'tags = ["from", "file"]\n')
    assert load_settings(config, {}, TaggedSettings).tags == ["from", "file"]
    monkeypatch.setenv("DETECTOR_TAGS", '["a", "b"]')
    s = load_settings(config, {}, TaggedSettings)
    assert (s.tags, s.sources["tags"]) == (["a", "b"], "env DETECTOR_TAGS")
    monkeypatch.setenv("DETECTOR_TAGS", "a,b")  # not JSON: fails fast naming the variable, not a traceback
    with pytest.raises(SettingsError) as err:
        load_settings(config, {}, TaggedSettings)
    assert "invalid setting tags" in str(err.value) and "env DETECTOR_TAGS" in str(err.value)


def test_secret_from_the_file_is_reported_and_masked(tmp_path: Path) -> None:
    config = write(
        tmp_path / "c.toml",
        'security_protocol = "SASL_SSL"\nsasl_mechanism = "PLAIN"\nsasl_username = "u"\nsasl_password = "s3cret-file"\n',
    )
    s = load_settings(config, {})
    assert s.sources["sasl_password"] == f"file {config}" and s.redacted()["sasl_password"] == "***"
    write(config, config.read_text().replace('"s3cret-file"', "987654321"))  # a number: invalid, never shown
    with pytest.raises(SettingsError) as err:
        load_settings(config, {})
    assert "invalid setting sasl_password" in str(err.value) and f"value *** from file {config}" in str(err.value)
    assert "987654321" not in str(err.value)


def test_msk_region_setting_wins_over_aws_region_and_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    msk = {"security_protocol": "SASL_SSL", "sasl_mechanism": "AWS_MSK_IAM"}
    monkeypatch.setenv("AWS_REGION", "us-west-2")
    assert load_settings(None, msk).sources["msk_iam_region"] == "env AWS_REGION"
    s = load_settings(None, {**msk, "msk_iam_region": "eu-west-3"})
    assert (s.msk_iam_region, s.sources["msk_iam_region"]) == ("eu-west-3", "flag --msk-iam-region")


def test_plain_constructor_reads_no_config_file_even_after_a_failed_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = write(tmp_path / "c.toml", 'group_id = "from-file"\nhttp_port = -5\n')
    monkeypatch.setenv("DETECTOR_CONFIG", str(config))
    with pytest.raises(SettingsError, match="http_port"):
        load_settings(None, {})
    s = Settings()  # the file is load_settings' layer; a plain constructor is defaults < env < arguments
    assert (s.group_id, s.http_port) == ("detector", 9108)
    assert Settings(group_id="kw").sources["group_id"] == "argument"
