"""`detector ingest` settings: the four layers of every command, and its own checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from detector.ingest.settings import IngestSettings
from detector.service.settings import SettingsError, load_settings

Q1 = "https://sqs.us-east-1.amazonaws.com/111122223333/detector-ingest-trail"
Q2 = "https://sqs.us-east-1.amazonaws.com/111122223333/detector-ingest-events"


def test_file_env_and_flags_layer_like_detector_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "ingest.toml"
    config.write_text(f'queue_urls = ["{Q1}", "{Q2}"]\ntopic = "ct"\nconcurrency = 4\n')
    monkeypatch.setenv("DETECTOR_CONCURRENCY", "16")
    s = load_settings(config, {"wait_seconds": "5"}, IngestSettings)
    assert s.queues == [Q1, Q2] and s.topic == "ct" and s.concurrency == 16 and s.wait_seconds == 5
    assert s.sources["queue_urls"] == f"file {config}" and s.sources["concurrency"] == "env DETECTOR_CONCURRENCY"
    assert s.sources["wait_seconds"] == "flag --wait-seconds"
    monkeypatch.setenv("DETECTOR_QUEUE_URLS", f"{Q2}, {Q2}")
    assert load_settings(None, {}, IngestSettings).queues == [Q2]  # duplicates dropped


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({}, "no queue to read"),
        ({"queue_urls": "sqs/queue"}, "not an SQS queue URL"),
        ({"queue_urls": Q1, "topic": "bad topic"}, "not a valid Kafka topic name"),
        ({"queue_urls": Q1, "wait_seconds": "21"}, "wait_seconds"),
        ({"queue_urls": Q1, "max_messages": "11"}, "max_messages"),
        ({"queue_urls": Q1, "visibility_timeout_seconds": "0"}, "visibility_timeout_seconds"),
    ],
)
def test_bad_settings_fail_naming_the_setting_and_source(overrides: dict[str, str], message: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DETECTOR_QUEUE_URLS", raising=False)
    with pytest.raises(SettingsError, match=message) as err:
        load_settings(None, overrides, IngestSettings)
    if overrides:
        assert "flag --" in str(err.value)


def test_unknown_key_in_the_file_is_an_error(tmp_path: Path) -> None:
    config = tmp_path / "ingest.toml"
    config.write_text(f'queue_url = "{Q1}"\n')
    with pytest.raises(SettingsError, match="did you mean 'queue_urls'"):
        load_settings(config, {}, IngestSettings)
