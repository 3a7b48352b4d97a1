"""TLS and SASL/SCRAM-SHA-512 on Apache Kafka (issue 10, item 4).

The session broker has a second client listener, SASL_SSL with SCRAM-SHA-512, its certificate signed by
a CA made for the session (``trustme``); each test creates its own SCRAM user through the admin API
(AlterUserScramCredentials). The service is configured exactly as docs/configuration.md and
deploy/kubernetes say: ``security_protocol``, ``sasl_mechanism``, ``sasl_username``, ``sasl_password``
(from the environment), ``ssl_cafile``.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest
from kafka_support import (  # noqa: F401 - fixtures
    DetectorProcess,
    broker,
    create_topics,
    expected_key,
    finding_key,
    latest_findings,
    librdkafka_produce,
    read_topic,
    require_real,
    service_settings,
    unique,
    wait_until,
)

from detector.demo import sample_world, world_messages

pytestmark = pytest.mark.kafka

WORLD = sample_world()
EXPECTED = sorted(expected_key(e) for e in orjson.loads(WORLD.expected.read_bytes()))
REPO = Path(__file__).resolve().parents[1]


def secure_env(broker: Any, user: str, password: str, cafile: Path) -> dict[str, str]:
    return {
        "DETECTOR_KAFKA_BOOTSTRAP": broker.secure_bootstrap,
        "DETECTOR_SECURITY_PROTOCOL": "SASL_SSL",
        "DETECTOR_SASL_MECHANISM": "SCRAM-SHA-512",
        "DETECTOR_SASL_USERNAME": user,
        "DETECTOR_SASL_PASSWORD": password,
        "DETECTOR_SSL_CAFILE": str(cafile),
    }


def new_user(broker: Any) -> tuple[str, str]:
    user, password = unique("detector"), f"pw-{uuid.uuid4().hex}"
    broker.add_scram_user(user, password)
    return user, password


async def test_service_over_sasl_ssl_scram_processes_the_stream_and_logs_no_secret(broker: Any, tmp_path: Path) -> None:
    require_real(broker, "TLS and SASL/SCRAM")
    user, password = new_user(broker)
    prefix = unique("scram")
    s = service_settings(broker.bootstrap, prefix, registry=WORLD.registry, finding_update_seconds=0.5)
    await create_topics(broker.bootstrap, {s.input_topics: 2})
    log = tmp_path / "detector.log"
    proc = DetectorProcess(s, log, secure_env(broker, user, password, broker.ca_file))
    try:
        await wait_until(proc.ready, timeout=60)
        librdkafka_produce(broker.bootstrap, s.input_topics, world_messages(WORLD))

        async def findings() -> bool:
            latest = latest_findings(await read_topic(broker.bootstrap, s.findings_topic))
            return sorted(finding_key(f) for f in latest.values()) == EXPECTED

        await wait_until(findings, timeout=60, interval=0.5)
        assert proc.terminate() == 0
    finally:
        proc.ensure_stopped()
    output = log.read_text()
    assert f"bootstrap={broker.secure_bootstrap}" in output or broker.secure_bootstrap in output
    assert password not in output  # no secret in any log line
    assert "connected" in output


def run_detector(env: dict[str, str], tmp_path: Path, prefix: str) -> subprocess.CompletedProcess[str]:
    import os

    values = dict(os.environ) | env | {
        "DETECTOR_INPUT_TOPICS": f"{prefix}.cloudtrail",
        "DETECTOR_FINDINGS_TOPIC": f"{prefix}.findings",
        "DETECTOR_DLQ_TOPIC": f"{prefix}.dlq",
        "DETECTOR_GROUP_ID": f"{prefix}.group",
        "DETECTOR_HTTP_PORT": "0",
        "DETECTOR_REGISTRY": str(WORLD.registry),
        "DETECTOR_LOG_LEVEL": "debug",
    }
    return subprocess.run(
        [sys.executable, "-m", "detector", "run"], env=values, capture_output=True, text=True, timeout=60,
        stdin=subprocess.DEVNULL, cwd=REPO, check=False,
    )


def test_wrong_password_fails_at_start_up_naming_the_setting(broker: Any, tmp_path: Path) -> None:
    require_real(broker, "TLS and SASL/SCRAM")
    user, password = new_user(broker)
    wrong = f"wrong-{uuid.uuid4().hex}"
    done = run_detector(secure_env(broker, user, wrong, broker.ca_file), tmp_path, unique("badpw"))
    assert done.returncode == 2, done.stderr[-2000:]
    assert "start-up error: sasl_username/sasl_password" in done.stderr
    assert repr(user) in done.stderr and "SCRAM-SHA-512" in done.stderr
    everything = done.stdout + done.stderr
    assert wrong not in everything and password not in everything  # no secret in any log line


def test_untrusted_ca_fails_at_start_up_naming_ssl_cafile(broker: Any, tmp_path: Path) -> None:
    import trustme

    require_real(broker, "TLS and SASL/SCRAM")
    user, password = new_user(broker)
    stranger = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(stranger))
    done = run_detector(secure_env(broker, user, password, stranger), tmp_path, unique("badca"))
    assert done.returncode == 2, done.stderr[-2000:]
    assert "start-up error: ssl_cafile" in done.stderr
    assert str(stranger) in done.stderr and broker.secure_bootstrap in done.stderr
    assert password not in done.stdout + done.stderr


async def test_an_unreachable_secure_broker_is_an_outage_not_a_configuration_error(tmp_path: Path) -> None:
    """Nothing listening: access_problem has nothing to blame on a setting, so start-up keeps retrying."""
    import trustme

    from detector.embedded import free_port
    from detector.service.kafka_config import access_problem
    from detector.service.settings import Settings

    cafile = tmp_path / "ca.pem"
    trustme.CA().cert_pem.write_to_path(str(cafile))
    settings = Settings(
        kafka_bootstrap=f"127.0.0.1:{free_port()}", security_protocol="SASL_SSL", sasl_mechanism="SCRAM-SHA-512",
        sasl_username="u", sasl_password="p", ssl_cafile=cafile,
    )  # fmt: skip
    assert await access_problem(settings, timeout=5) is None
