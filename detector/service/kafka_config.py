"""aiokafka constructor arguments derived from :class:`~detector.service.settings.Settings`.

``AIOKafkaConsumer(*topics, **consumer_kwargs(s))``, ``AIOKafkaProducer(**producer_kwargs(s))`` and
``AIOKafkaAdminClient(**kafka_common_kwargs(s))``: the consumer and producer dicts already include the
common connection arguments (servers, client id, TLS, SASL).
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiokafka.abc import AbstractTokenProvider
from aiokafka.helpers import create_ssl_context

from .settings import KafkaClientSettings, Settings, SettingsError

PRODUCER_LINGER_MS = 0  # outputs are sent as a batch then awaited at once: lingering only adds latency


class MskIamTokenProvider(AbstractTokenProvider):
    """OAUTHBEARER tokens for Amazon MSK IAM access control, signed from the default AWS credentials.

    Signing is local, but finding the credentials may call the instance metadata service, so it runs in
    a worker thread. A token is reused until ``refresh_margin`` seconds before it expires (tokens last
    15 minutes); concurrent connections share one signing.
    """

    def __init__(
        self,
        region: str,
        *,
        refresh_margin: float = 60.0,
        generate: Callable[[str], tuple[str, int]] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if generate is None:
            from aws_msk_iam_sasl_signer import MSKAuthTokenProvider

            generate = MSKAuthTokenProvider.generate_auth_token
        self.region = region
        self._generate = generate
        self._refresh_margin = refresh_margin
        self._clock = clock
        self._token: str | None = None
        self._expires_at = 0.0  # epoch seconds
        self._lock = asyncio.Lock()

    async def token(self) -> str:
        async with self._lock:
            if self._token is None or self._clock() >= self._expires_at - self._refresh_margin:
                token, expiry_ms = await asyncio.to_thread(self._generate, self.region)
                self._token, self._expires_at = token, expiry_ms / 1000.0
            return self._token


class FileTokenProvider(AbstractTokenProvider):
    """OAUTHBEARER token read from a file at every authentication (a sidecar may rotate the file)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    async def token(self) -> str:
        text = await asyncio.to_thread(self.path.read_text, encoding="utf-8")
        token = text.strip()
        if not token:
            raise ValueError(f"sasl_oauth_token_file {str(self.path)!r} is empty")
        return token


def ssl_context(settings: KafkaClientSettings) -> ssl.SSLContext:
    """The client TLS context: CA file (else the system CAs), optional client certificate, hostname check.

    Raises :class:`SettingsError` naming the setting when a file cannot be loaded. An encrypted key with
    no ``ssl_key_password`` fails instead of prompting on the terminal.
    """
    try:
        context = create_ssl_context(cafile=settings.ssl_cafile)
    except (ssl.SSLError, OSError) as exc:
        raise SettingsError(f"ssl_cafile: cannot load CA certificates from {str(settings.ssl_cafile)!r}: {exc}") from None
    if settings.ssl_certfile is not None:
        password = settings.ssl_key_password.get_secret_value() if settings.ssl_key_password is not None else (lambda: b"")
        try:
            context.load_cert_chain(settings.ssl_certfile, settings.ssl_keyfile, password)
        except (ssl.SSLError, OSError) as exc:
            raise SettingsError(
                f"ssl_certfile/ssl_keyfile/ssl_key_password: cannot load the client certificate "
                f"{str(settings.ssl_certfile)!r} with key {str(settings.ssl_keyfile)!r}: {exc}"
            ) from None
    if not settings.ssl_check_hostname:
        context.check_hostname = False  # the certificate chain is still verified
    return context


def kafka_common_kwargs(settings: KafkaClientSettings) -> dict[str, Any]:
    """Connection arguments shared by AIOKafkaConsumer, AIOKafkaProducer and AIOKafkaAdminClient."""
    kwargs: dict[str, Any] = {
        "bootstrap_servers": settings.bootstrap_servers,
        "client_id": settings.client_id,
        "security_protocol": settings.security_protocol,
    }
    if settings.security_protocol in ("SSL", "SASL_SSL"):
        kwargs["ssl_context"] = ssl_context(settings)
    mechanism = settings.sasl_mechanism
    if settings.security_protocol in ("SASL_PLAINTEXT", "SASL_SSL") and mechanism is not None:
        if mechanism == "AWS_MSK_IAM":
            assert settings.msk_iam_region is not None  # enforced by Settings
            kwargs["sasl_mechanism"] = "OAUTHBEARER"
            kwargs["sasl_oauth_token_provider"] = MskIamTokenProvider(settings.msk_iam_region)
        elif mechanism == "OAUTHBEARER":
            assert settings.sasl_oauth_token_file is not None  # enforced by Settings
            kwargs["sasl_mechanism"] = "OAUTHBEARER"
            kwargs["sasl_oauth_token_provider"] = FileTokenProvider(settings.sasl_oauth_token_file)
        else:  # PLAIN, SCRAM-SHA-256, SCRAM-SHA-512: aiokafka takes the credentials under the "plain" names
            assert settings.sasl_password is not None  # enforced by Settings
            kwargs["sasl_mechanism"] = mechanism
            kwargs["sasl_plain_username"] = settings.sasl_username
            kwargs["sasl_plain_password"] = settings.sasl_password.get_secret_value()
    return kwargs


def transactions_enabled(settings: Settings) -> bool:
    return settings.transactional_id is not None


def producer_kwargs(settings: Settings) -> dict[str, Any]:
    """Everything ``AIOKafkaProducer(**...)`` needs (common arguments included)."""
    acks: int | str = settings.producer_acks if settings.producer_acks == "all" else int(settings.producer_acks)
    kwargs = kafka_common_kwargs(settings) | {
        "acks": acks,
        "enable_idempotence": settings.enable_idempotence,
        "linger_ms": PRODUCER_LINGER_MS,
        "max_request_size": settings.max_message_bytes,
        "compression_type": None,
    }
    if settings.transactional_id is not None:
        kwargs["transactional_id"] = settings.transactional_id
    return kwargs


def consumer_kwargs(settings: Settings) -> dict[str, Any]:
    """Everything ``AIOKafkaConsumer(**...)`` needs (common arguments included); subscribe separately."""
    return kafka_common_kwargs(settings) | {
        "group_id": settings.group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "max_poll_records": settings.max_poll_records,
        "fetch_max_wait_ms": settings.fetch_max_wait_ms,
        "isolation_level": "read_committed" if transactions_enabled(settings) else "read_uncommitted",
    }


async def access_problem(settings: Settings, timeout: float = 10.0) -> str | None:
    """Why the configured TLS trust or SASL credentials cannot work, naming the setting; None when they do,
    or when no broker answered at all (an outage, which the caller retries).

    aiokafka logs a refused certificate or password and then reports only that it could not bootstrap,
    which would read as an unreachable broker and be retried for ever. One connection made here, with the
    same arguments, tells the two apart. The message never carries a secret.
    """
    if settings.security_protocol == "PLAINTEXT":
        return None
    from aiokafka.conn import create_conn
    from aiokafka.errors import (
        AuthenticationFailedError,
        IllegalSaslStateError,
        KafkaError,
        SaslAuthenticationFailed,
        UnsupportedSaslMechanismError,
    )

    kwargs = {k: v for k, v in kafka_common_kwargs(settings).items() if k != "bootstrap_servers"}
    for server in settings.bootstrap_servers:
        host, _, port = server.strip().rpartition(":")
        host = host.strip("[]")
        try:
            conn = await asyncio.wait_for(create_conn(host, int(port), **kwargs), timeout)
        except ssl.SSLCertVerificationError as exc:
            where = "ssl_cafile (or the system CAs when unset)" if settings.ssl_cafile is None else "ssl_cafile"
            if "hostname" in str(exc.verify_message).lower() or "ip address mismatch" in str(exc.verify_message).lower():
                where += " / ssl_check_hostname"
            return (
                f"{where}: the certificate of broker {server} is not trusted: {exc.verify_message}"
                f" (ssl_cafile={str(settings.ssl_cafile) if settings.ssl_cafile else 'unset'})"
            )
        except (SaslAuthenticationFailed, AuthenticationFailedError, IllegalSaslStateError) as exc:
            return (
                f"sasl_username/sasl_password: broker {server} refused the {settings.sasl_mechanism} credentials "
                f"of user {settings.sasl_username!r}: {exc}"
            )
        except UnsupportedSaslMechanismError as exc:
            return f"sasl_mechanism: broker {server} does not offer {settings.sasl_mechanism}: {exc}"
        except ssl.SSLError as exc:
            return f"security_protocol/ssl_*: TLS with broker {server} failed: {exc}"
        except (OSError, KafkaError, asyncio.TimeoutError, ValueError):
            continue  # not reachable (yet): the caller's retry loop deals with outages
        conn.close()
        return None
    return None
