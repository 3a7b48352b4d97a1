"""aiokafka arguments from the settings: protocols, SASL mechanisms, TLS from real PEM files, MSK IAM tokens."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import inspect
import os
import ssl
import threading
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.abc import AbstractTokenProvider
from aiokafka.admin import AIOKafkaAdminClient
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from detector.service.kafka_config import (
    FileTokenProvider,
    MskIamTokenProvider,
    consumer_kwargs,
    kafka_common_kwargs,
    producer_kwargs,
    ssl_context,
)
from detector.service.settings import Settings, SettingsError

KEY_PASSWORD = "correct horse"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith(("DETECTOR_", "AWS_")):
            monkeypatch.delenv(name)


# --- a throw-away PKI ------------------------------------------------------------------------------

def _cert(subject: str, key: ec.EllipticCurvePrivateKey, issuer: tuple[str, ec.EllipticCurvePrivateKey] | None, *,
          ca: bool = False, san: str | None = None, usage: Any = None) -> x509.Certificate:
    now = dt.datetime.now(dt.timezone.utc)
    issuer_name, issuer_key = issuer if issuer else (subject, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_name)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        ).add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    else:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False
        )
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(san)]), critical=False)
    if usage:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _pem_key(key: ec.EllipticCurvePrivateKey, password: str | None = None) -> bytes:
    encryption = (
        serialization.BestAvailableEncryption(password.encode()) if password else serialization.NoEncryption()
    )
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("pki")
    ca_key, server_key, client_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    ca = _cert("detector test CA", ca_key, None, ca=True)
    server = _cert("localhost", server_key, ("detector test CA", ca_key), san="localhost", usage=ExtendedKeyUsageOID.SERVER_AUTH)
    client = _cert("detector", client_key, ("detector test CA", ca_key), usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    files = {
        "ca": ca.public_bytes(serialization.Encoding.PEM),
        "server_cert": server.public_bytes(serialization.Encoding.PEM),
        "server_key": _pem_key(server_key),
        "client_cert": client.public_bytes(serialization.Encoding.PEM),
        "client_key": _pem_key(client_key, KEY_PASSWORD),
        "not_pem": b"this is not a certificate\n",
    }
    paths = {}
    for name, data in files.items():
        paths[name] = d / f"{name}.pem"
        paths[name].write_bytes(data)
    return paths


def _handshake(client: ssl.SSLContext, server: ssl.SSLContext, server_hostname: str) -> None:
    """A TLS handshake in memory; raises ssl.SSLError when the client or the server refuses."""
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    c = client.wrap_bio(c_in, c_out, server_hostname=server_hostname)
    s = server.wrap_bio(s_in, s_out, server_side=True)
    done = {"c": False, "s": False}
    for _ in range(20):
        for name, end in (("c", c), ("s", s)):
            if not done[name]:
                try:
                    end.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            # TLS 1.3: the server checks the client certificate after the client thinks it is done
            c.write(b"ping")
            s_in.write(c_out.read())
            assert s.read() == b"ping"
            return
    raise AssertionError("handshake did not finish")


@pytest.fixture
def server_context(pki: dict[str, Path]) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki["server_cert"], pki["server_key"])
    ctx.load_verify_locations(pki["ca"])
    ctx.verify_mode = ssl.CERT_REQUIRED  # mutual TLS: the client must present the certificate we configured
    return ctx


def mtls_settings(pki: dict[str, Path], **extra: Any) -> Settings:
    values: dict[str, Any] = {
        "security_protocol": "SSL",
        "ssl_cafile": pki["ca"],
        "ssl_certfile": pki["client_cert"],
        "ssl_keyfile": pki["client_key"],
        "ssl_key_password": KEY_PASSWORD,
    }
    return Settings(**(values | extra))


# --- TLS --------------------------------------------------------------------------------------------

def test_ssl_context_loads_the_ca_and_the_client_certificate(pki: dict[str, Path], server_context: ssl.SSLContext) -> None:
    kwargs = kafka_common_kwargs(mtls_settings(pki))
    ctx = kwargs["ssl_context"]
    assert kwargs["security_protocol"] == "SSL" and "sasl_mechanism" not in kwargs
    assert ctx.cert_store_stats()["x509_ca"] == 1
    subjects = [dict(x[0] for x in cert["subject"]) for cert in ctx.get_ca_certs()]
    assert subjects == [{"commonName": "detector test CA"}]
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    _handshake(ctx, server_context, "localhost")  # server verified by our CA, client cert accepted by the server


def test_hostname_check_on_and_off(pki: dict[str, Path], server_context: ssl.SSLContext) -> None:
    with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch|doesn't match"):
        _handshake(ssl_context(mtls_settings(pki)), server_context, "broker.elsewhere.example")
    relaxed = ssl_context(mtls_settings(pki, ssl_check_hostname=False))
    assert not relaxed.check_hostname and relaxed.verify_mode == ssl.CERT_REQUIRED
    _handshake(relaxed, server_context, "broker.elsewhere.example")


def test_without_the_client_certificate_mutual_tls_fails(pki: dict[str, Path], server_context: ssl.SSLContext) -> None:
    ctx = ssl_context(Settings(security_protocol="SSL", ssl_cafile=pki["ca"]))
    with pytest.raises(ssl.SSLError):
        _handshake(ctx, server_context, "localhost")


def test_system_cas_without_a_cafile() -> None:
    ctx = kafka_common_kwargs(Settings(security_protocol="SSL"))["ssl_context"]
    assert isinstance(ctx, ssl.SSLContext) and ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname


def test_unloadable_tls_files_name_the_setting(pki: dict[str, Path]) -> None:
    with pytest.raises(SettingsError, match="ssl_cafile"):
        kafka_common_kwargs(Settings(security_protocol="SSL", ssl_cafile=pki["not_pem"]))
    # an encrypted key with a wrong or missing password fails at once (OpenSSL would otherwise prompt)
    with pytest.raises(SettingsError, match="ssl_key_password"):
        ssl_context(mtls_settings(pki, ssl_key_password="wrong"))
    no_password = Settings(security_protocol="SSL", ssl_cafile=pki["ca"], ssl_certfile=pki["client_cert"], ssl_keyfile=pki["client_key"])
    with pytest.raises(SettingsError, match="ssl_keyfile"):
        ssl_context(no_password)


# --- protocols and mechanisms ----------------------------------------------------------------------

def test_plaintext_kwargs_exactly() -> None:
    s = Settings(kafka_bootstrap="k1:9092, k2:9093", client_id="det-1")
    assert kafka_common_kwargs(s) == {
        "bootstrap_servers": ["k1:9092", "k2:9093"],
        "client_id": "det-1",
        "security_protocol": "PLAINTEXT",
    }


@pytest.mark.parametrize("protocol", ["SASL_PLAINTEXT", "SASL_SSL"])
@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
def test_password_mechanisms(protocol: str, mechanism: str) -> None:
    s = Settings(security_protocol=protocol, sasl_mechanism=mechanism, sasl_username="det", sasl_password="pw")
    kwargs = kafka_common_kwargs(s)
    assert (kwargs["security_protocol"], kwargs["sasl_mechanism"]) == (protocol, mechanism)
    assert (kwargs["sasl_plain_username"], kwargs["sasl_plain_password"]) == ("det", "pw")
    assert "sasl_oauth_token_provider" not in kwargs
    assert isinstance(kwargs.get("ssl_context"), ssl.SSLContext) == (protocol == "SASL_SSL")


@pytest.mark.parametrize("protocol", ["SASL_PLAINTEXT", "SASL_SSL"])
async def test_oauthbearer_reads_the_token_file_each_time(tmp_path: Path, protocol: str) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("tok-1\n")
    kwargs = kafka_common_kwargs(Settings(security_protocol=protocol, sasl_mechanism="OAUTHBEARER", sasl_oauth_token_file=token_file))
    provider = kwargs["sasl_oauth_token_provider"]
    assert kwargs["sasl_mechanism"] == "OAUTHBEARER" and isinstance(provider, FileTokenProvider)
    assert "sasl_plain_username" not in kwargs
    assert await provider.token() == "tok-1"
    token_file.write_text("tok-2")
    assert await provider.token() == "tok-2"
    token_file.write_text("  \n")
    with pytest.raises(ValueError, match="empty"):
        await provider.token()


def aws_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAIOSFODNN7EXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "session-token-example")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


async def test_msk_iam_signs_a_token_from_environment_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    aws_credentials(monkeypatch, tmp_path)
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    kwargs = kafka_common_kwargs(Settings(security_protocol="SASL_SSL", sasl_mechanism="AWS_MSK_IAM"))
    provider = kwargs["sasl_oauth_token_provider"]
    assert kwargs["sasl_mechanism"] == "OAUTHBEARER" and isinstance(kwargs["ssl_context"], ssl.SSLContext)
    assert isinstance(provider, MskIamTokenProvider) and isinstance(provider, AbstractTokenProvider)
    assert provider.region == "eu-west-1"
    pending = provider.token()
    assert inspect.isawaitable(pending)
    token = await pending
    url = urlparse(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode())
    query = parse_qs(url.query)
    assert url.hostname == "kafka.eu-west-1.amazonaws.com"
    assert query["Action"] == ["kafka-cluster:Connect"]
    assert query["X-Amz-Credential"][0].startswith("AKIAIOSFODNN7EXAMPLE/")
    assert "/eu-west-1/kafka-cluster/" in query["X-Amz-Credential"][0]
    assert query["X-Amz-Security-Token"] == ["session-token-example"] and query["X-Amz-Signature"][0]
    assert await provider.token() == token  # reused while valid


async def test_msk_iam_token_is_made_off_the_event_loop_and_refreshed_before_expiry() -> None:
    calls: list[tuple[str, int]] = []
    loop_thread = threading.get_ident()
    now = [1_000.0]

    def generate(region: str) -> tuple[str, int]:
        calls.append((region, threading.get_ident()))
        return f"token-{len(calls)}", int((now[0] + 900) * 1000)

    provider = MskIamTokenProvider("us-east-1", generate=generate, clock=lambda: now[0])
    first = await asyncio.gather(*(provider.token() for _ in range(5)))
    assert first == ["token-1"] * 5 and len(calls) == 1  # concurrent connections share one signing
    assert calls[0][0] == "us-east-1" and calls[0][1] != loop_thread
    now[0] += 900 - 61
    assert await provider.token() == "token-1"
    now[0] += 2  # within the refresh margin of the expiry
    assert await provider.token() == "token-2" and len(calls) == 2


# --- producer and consumer -------------------------------------------------------------------------

@pytest.mark.parametrize(("acks", "expected"), [("all", "all"), ("1", 1), ("0", 0)])
def test_producer_kwargs(acks: str, expected: Any) -> None:
    kwargs = producer_kwargs(Settings(producer_acks=acks, kafka_bootstrap="b:1"))
    assert kwargs["acks"] == expected and kwargs["bootstrap_servers"] == ["b:1"]
    assert kwargs["enable_idempotence"] is False and "transactional_id" not in kwargs
    assert kwargs["compression_type"] is None and 0 <= kwargs["linger_ms"] <= 10
    tx = producer_kwargs(Settings(enable_idempotence=True, transactional_id="detector-7"))
    assert (tx["enable_idempotence"], tx["transactional_id"], tx["acks"]) == (True, "detector-7", "all")


def test_consumer_kwargs() -> None:
    kwargs = consumer_kwargs(Settings(group_id="g", max_poll_records=10, fetch_max_wait_ms=7, client_id="c"))
    assert {k: kwargs[k] for k in ("group_id", "client_id", "enable_auto_commit", "auto_offset_reset",
                                   "max_poll_records", "fetch_max_wait_ms", "isolation_level")} == {
        "group_id": "g", "client_id": "c", "enable_auto_commit": False, "auto_offset_reset": "earliest",
        "max_poll_records": 10, "fetch_max_wait_ms": 7, "isolation_level": "read_uncommitted",
    }
    assert consumer_kwargs(Settings(enable_idempotence=True))["isolation_level"] == "read_uncommitted"
    assert consumer_kwargs(Settings(enable_idempotence=True, transactional_id="t"))["isolation_level"] == "read_committed"


@pytest.mark.parametrize(
    "values",
    [
        {},
        {"security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-512", "sasl_username": "u", "sasl_password": "p"},
        {"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "PLAIN", "sasl_username": "u", "sasl_password": "p"},
        {"security_protocol": "SASL_SSL", "sasl_mechanism": "AWS_MSK_IAM", "msk_iam_region": "us-east-1",
         "enable_idempotence": True, "transactional_id": "t-1"},
    ],
)
async def test_aiokafka_accepts_the_kwargs(values: dict[str, Any]) -> None:
    """The real constructors validate their arguments (no broker is contacted before start())."""
    s = Settings(**values)
    consumer = AIOKafkaConsumer(*s.input_subscription[1], **consumer_kwargs(s))
    producer = AIOKafkaProducer(**producer_kwargs(s))
    admin = AIOKafkaAdminClient(**kafka_common_kwargs(s))
    await consumer.stop()
    await producer.stop()
    await admin.close()
