"""Settings of ``detector export securityhub`` and ``detector respond`` (the same four layers as
``detector run``: defaults < TOML file < ``DETECTOR_*`` environment < flags)."""

from __future__ import annotations

import fnmatch
import re

from pydantic import Field, ValidationInfo, field_validator

from .containment import POLICY_NAME
from ..service.settings import KafkaClientSettings, _check_topic, non_empty, optional_str

_PLACEHOLDER_RE = re.compile(r"\{([^{}]*)\}")
_ROLE_ARN_RE = re.compile(r"arn:aws(?:-[a-z]+)*:iam::\d{12}:role/[\w+=,.@/-]{1,512}")
_POLICY_NAME_RE = re.compile(r"[\w+=,.@-]{1,128}")


def role_arn(template: str, account: str, partition: str = "aws") -> str:
    """The role to assume for ``account``: ``{account}`` and ``{partition}`` of the template filled in."""
    return template.replace("{account}", account).replace("{partition}", partition)


class OutputSettings(KafkaClientSettings):
    """What both findings-topic consumers share (on top of the Kafka connection, HTTP and process)."""

    findings_topic: str = Field("detector.findings", description="Topic of the findings to consume.")
    group_id: str = Field("detector-output", description="Consumer group of this consumer.")
    batch_size: int = Field(500, ge=1, le=10_000, description="Most findings fetched and handled as one batch.")
    assume_role_arn: str | None = Field(
        None,
        description="Role to assume in each finding's home account, as an ARN template: `{account}` becomes the "
        "finding's `accountId` and `{partition}` its partition, e.g. `arn:aws:iam::{account}:role/DetectorSecurityHub`. "
        "Unset: the process's own AWS credentials (environment, IRSA, instance role) for every account.",
    )
    aws_max_attempts: int = Field(
        8, ge=1, le=50,
        description="Attempts of one AWS call on throttling or a transient error, with exponential backoff and "
        "jitter; after the last one the batch is retried later (its offsets are not committed).",
    )  # fmt: skip
    aws_retry_base_seconds: float = Field(0.25, gt=0, le=60, description="First backoff delay of an AWS retry.")
    aws_retry_max_seconds: float = Field(20.0, gt=0, le=600, description="Longest backoff delay of an AWS retry.")
    tracked_findings: int = Field(
        200_000, ge=1000,
        description="Finding ids remembered (least recently used dropped) to tell new findings and newer states "
        "from repeats.",
    )  # fmt: skip
    grace_seconds: float = Field(20.0, gt=0, description="After SIGTERM: time to finish the batch in hand and commit.")

    @field_validator("findings_topic")
    @classmethod
    def _topic(cls, value: str, info: ValidationInfo) -> str:
        return _check_topic(str(info.field_name), value)

    @field_validator("group_id")
    @classmethod
    def _group(cls, value: str, info: ValidationInfo) -> str:
        return non_empty(value, info)

    @field_validator("assume_role_arn")
    @classmethod
    def _template(cls, value: str | None, info: ValidationInfo) -> str | None:
        value = optional_str(value, info)
        if value is None:
            return None
        unknown = sorted({m for m in _PLACEHOLDER_RE.findall(value) if m not in ("account", "partition")})
        if unknown:
            raise ValueError(f"assume_role_arn: unknown placeholder(s) {', '.join('{' + u + '}' for u in unknown)}; only {{account}} and {{partition}}")
        if not _ROLE_ARN_RE.fullmatch(role_arn(value, "123456789012")):
            raise ValueError(f"assume_role_arn: {value!r} is not an IAM role ARN (arn:aws:iam::{{account}}:role/NAME)")
        return value


class ExportSettings(OutputSettings):
    """`detector export securityhub` consumes the findings topic and imports every finding into AWS Security Hub (ASFF) in its home account."""

    group_id: str = Field("detector-export-securityhub", description="Consumer group of the exporter.")
    securityhub_region: str | None = Field(
        None,
        description="Import every finding into this region's Security Hub (an aggregation region). Unset: the "
        "finding's own `region` (the AWS default region when it has none).",
    )
    hub_check_seconds: float = Field(
        300.0, gt=0,
        description="How long an account's Security Hub is taken as enabled or disabled before DescribeHub asks again.",
    )  # fmt: skip

    @field_validator("securityhub_region")
    @classmethod
    def _region(cls, value: str | None, info: ValidationInfo) -> str | None:
        return optional_str(value, info)


class RespondSettings(OutputSettings):
    """`detector respond` consumes the findings topic and, for each new finding of severity 8, puts an inline deny policy on the instance role that blocks the stolen credentials (SPEC §14); dry run unless `apply`."""

    group_id: str = Field("detector-respond", description="Consumer group of the responder.")
    apply: bool = Field(
        False,
        description="Attach the policies (IAM PutRolePolicy). Off: dry run, every policy that would be attached is "
        "printed as a JSON line on standard output and nothing changes.",
    )
    role_name_pattern: str | None = Field(
        None,
        description="Roles respond may touch: a glob (`*` any run, `?` one character, `[..]` a set; e.g. `app-*`), "
        "or, when it starts with `^`, a regular expression that must match the whole name. Other roles are "
        "logged, counted and skipped. Unset: every role.",
    )
    policy_name: str = Field(POLICY_NAME, description="Name of the one inline policy respond writes per role.")

    @field_validator("role_name_pattern")
    @classmethod
    def _pattern(cls, value: str | None, info: ValidationInfo) -> str | None:
        value = optional_str(value, info)
        if value is not None and value.startswith("^"):
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"role_name_pattern: {value!r} is not a valid regular expression: {exc}") from None
        return value

    @field_validator("policy_name")
    @classmethod
    def _policy_name(cls, value: str) -> str:
        if not _POLICY_NAME_RE.fullmatch(value):
            raise ValueError(f"policy_name: {value!r} is not an IAM policy name (1-128 of A-Z a-z 0-9 _+=,.@-)")
        return value

    def role_allowed(self, role: str) -> bool:
        pattern = self.role_name_pattern
        if pattern is None:
            return True
        if pattern.startswith("^"):
            return re.fullmatch(pattern, role) is not None
        return fnmatch.fnmatchcase(role, pattern)
