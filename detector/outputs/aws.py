"""AWS access of the findings-topic consumers: clients per account (through an optional role template),
and one retry policy for throttling and transient errors that is ours, so every retry is counted.

botocore's own retries are off (one attempt per call); :meth:`AwsAccess.call` retries throttling
(``TooManyRequestsException``, ``Throttling``, HTTP 429 ...) and transient errors (HTTP 5xx, connection
failures, timeouts) with exponential backoff and full jitter, up to ``aws_max_attempts``, then raises
:class:`Transient` so the consumer leaves the batch uncommitted and tries it again later.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import structlog
from aiobotocore.config import AioConfig
from aiobotocore.session import AioSession, get_session
from botocore.exceptions import BotoCoreError, ClientError, HTTPClientError
from botocore.exceptions import ConnectionError as BotoConnectionError

from ..aws.sync import describe_error
from .metrics import OutputMetrics
from .settings import OutputSettings, role_arn

log = structlog.get_logger("detector.outputs")
T = TypeVar("T")

THROTTLE_CODES = frozenset({
    "Throttling", "ThrottlingException", "ThrottledException", "TooManyRequestsException", "RequestLimitExceeded",
    "RequestThrottled", "RequestThrottledException", "SlowDown", "PriorRequestNotComplete",
})  # fmt: skip
TRANSIENT_CODES = frozenset({"InternalError", "InternalFailure", "InternalServerError", "ServiceUnavailable",
                             "ServiceUnavailableException", "RequestTimeout", "RequestTimeoutException"})  # fmt: skip
DENIED_CODES = frozenset({"AccessDenied", "AccessDeniedException", "UnauthorizedOperation", "InvalidClientTokenId",
                          "ExpiredToken", "ExpiredTokenException", "UnrecognizedClientException"})  # fmt: skip
CREDENTIAL_MARGIN_SECONDS = 300.0


class Transient(Exception):
    """An AWS call still throttled or failing transiently after every attempt: try the batch again later."""


class AssumeRoleFailed(Exception):
    """The role of an account could not be assumed (the message names the role and the error)."""


def error_code(exc: BaseException) -> str:
    if isinstance(exc, ClientError):
        return str(exc.response.get("Error", {}).get("Code") or "")
    return ""


def _status(exc: BaseException) -> int:
    if isinstance(exc, ClientError):
        return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
    return 0


def is_throttle(exc: BaseException) -> bool:
    return error_code(exc) in THROTTLE_CODES or _status(exc) == 429


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, ClientError):
        return error_code(exc) in TRANSIENT_CODES or _status(exc) >= 500
    return isinstance(exc, (HTTPClientError, BotoConnectionError, OSError, asyncio.TimeoutError))


def is_denied(exc: BaseException) -> bool:
    return error_code(exc) in DENIED_CODES


class AwsAccess:
    """Clients for one account at a time, with credentials of the account's role (or the process's own)."""

    def __init__(
        self, settings: OutputSettings, metrics: OutputMetrics, session_name: str, session: AioSession | None = None
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.session_name = session_name
        self.session = session or get_session()
        self.config = AioConfig(retries={"mode": "standard", "total_max_attempts": 1}, connect_timeout=10, read_timeout=30)
        # botocore reads AWS_DEFAULT_REGION (and profiles); EKS and Lambda often set only AWS_REGION
        self.default_region = self.session.get_config_variable("region") or os.environ.get("AWS_REGION") or "us-east-1"
        # account -> (credentials, caller account, expiry as time.time())
        self._assumed: dict[str, tuple[dict[str, str], str, float]] = {}
        self._own_account: str | None = None
        self._lock = asyncio.Lock()

    async def call(self, what: str, fn: Callable[[], Awaitable[T]]) -> T:
        """``await fn()`` with our retries; raises :class:`Transient` when they run out, and any other error as is."""
        s = self.settings
        attempt = 0
        while True:
            attempt += 1
            started = time.perf_counter()
            try:
                return await fn()
            except Exception as exc:  # noqa: BLE001 - classified below, re-raised unless retriable
                throttled = is_throttle(exc)
                if not throttled and not is_transient(exc):
                    raise
                # counted here: a call out of attempts is retried too, with its batch
                (self.metrics.throttled if throttled else self.metrics.aws_retries).inc()
                if attempt >= s.aws_max_attempts:
                    raise Transient(f"{what}: still failing after {attempt} attempts: {describe_error(exc)}") from exc
                delay = random.uniform(0, min(s.aws_retry_max_seconds, s.aws_retry_base_seconds * 2 ** (attempt - 1)))
                log.info("aws_retry", call=what, attempt=attempt, throttled=throttled, delay_seconds=round(delay, 3),
                         error=describe_error(exc))  # fmt: skip
                await asyncio.sleep(delay)
            finally:
                self.metrics.aws_calls.observe(time.perf_counter() - started)

    def client(self, service: str, region: str, credentials: dict[str, str] | None) -> Any:
        """An async context manager of a client (``AWS_ENDPOINT_URL`` and the standard chain apply)."""
        return self.session.create_client(service, region_name=region, config=self.config, **(credentials or {}))

    async def credentials(self, account: str, partition: str) -> tuple[dict[str, str] | None, str]:
        """Credentials to act in ``account`` (None: the process's own) and the account they belong to.

        Raises :class:`AssumeRoleFailed` (naming the role) or :class:`Transient`.
        """
        template = self.settings.assume_role_arn
        if template is None:
            return None, await self.own_account()
        async with self._lock:
            cached = self._assumed.get(account)
            if cached is not None and cached[2] - time.time() > CREDENTIAL_MARGIN_SECONDS:
                return cached[0], cached[1]
            arn = role_arn(template, account, partition)

            async def assume() -> Any:
                async with self.client("sts", self.default_region, None) as sts:
                    return await sts.assume_role(RoleArn=arn, RoleSessionName=self.session_name)

            try:
                answer = await self.call(f"sts:AssumeRole {arn}", assume)
            except Transient:
                raise
            except (ClientError, BotoCoreError) as exc:
                raise AssumeRoleFailed(f"cannot assume {arn}: {describe_error(exc)}") from None
            creds = answer["Credentials"]
            keys = {
                "aws_access_key_id": creds["AccessKeyId"],
                "aws_secret_access_key": creds["SecretAccessKey"],
                "aws_session_token": creds["SessionToken"],
            }
            caller = str(answer.get("AssumedRoleUser", {}).get("Arn", arn)).split(":")[4] or account
            expiry = creds["Expiration"].timestamp() if hasattr(creds.get("Expiration"), "timestamp") else time.time() + 900
            self._assumed[account] = (keys, caller, expiry)
            log.info("role_assumed", account=account, role_arn=arn, caller_account=caller)
            return keys, caller

    async def own_account(self) -> str:
        if self._own_account is None:

            async def identify() -> Any:
                async with self.client("sts", self.default_region, None) as sts:
                    return await sts.get_caller_identity()

            self._own_account = str((await self.call("sts:GetCallerIdentity", identify))["Account"])
        return self._own_account
