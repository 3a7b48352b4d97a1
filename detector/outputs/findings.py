"""Reading a findings-topic message: the GuardDuty-shaped finding, or why it is skipped (pure)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson

PREFIX = "UnauthorizedAccess:IAMUser/InstanceCredentialExfiltration."
INSIDE_AWS = PREFIX + "InsideAWS"
OUTSIDE_AWS = PREFIX + "OutsideAWS"
AFTER_INSTANCE_STOPPED = PREFIX + "AfterInstanceStopped"
OTHER_INSTANCE = PREFIX + "OtherInstance"
IMDSV1 = "Policy:EC2/InstanceCredentialsDeliveredByIMDSv1"
TYPES = frozenset({INSIDE_AWS, OUTSIDE_AWS, AFTER_INSTANCE_STOPPED, OTHER_INSTANCE, IMDSV1})

# skip reasons (metric label values)
NOT_JSON = "not_json"
NOT_A_FINDING = "not_a_finding"  # JSON, but no finding object (another EventBridge detail-type, a list...)
UNKNOWN_TYPE = "unknown_type"
INVALID = "invalid"  # one of our types, but a required field is missing or malformed
SKIP_REASONS = (NOT_JSON, NOT_A_FINDING, UNKNOWN_TYPE, INVALID)
OCSF_DETECTION_FINDING = 2004  # OCSF class_uid

_ID_RE = re.compile(r"[0-9a-f]{32}")
_ACCOUNT_RE = re.compile(r"\d{12}")
_INSTANCE_RE = re.compile(r"i-(?:[0-9a-f]{8}|[0-9a-f]{17})")
_ROLE_RE = re.compile(r"(?:aws:)?[\w+=,.@-]{1,64}")  # aws: AWS's reserved roles, e.g. aws:ec2-instance (SPEC §10)
_PARTITION_RE = re.compile(r"aws(?:-[a-z]+)*")


@dataclass(frozen=True, slots=True)
class Finding:
    """A validated finding: the fields the consumers rely on, and the whole object."""

    id: str
    type: str
    severity: float
    account: str
    partition: str
    region: str
    instance_id: str
    role: str
    updated_at: datetime
    data: dict[str, Any]

    @property
    def additional_info(self) -> dict[str, Any]:
        info = self.data.get("service", {}).get("additionalInfo")
        return info if isinstance(info, dict) else {}

    @property
    def api_action(self) -> dict[str, Any]:
        action = self.data.get("service", {}).get("action", {})
        api = action.get("awsApiCallAction") if isinstance(action, dict) else None
        return api if isinstance(api, dict) else {}

    @property
    def remote_ip(self) -> str | None:
        details = self.api_action.get("remoteIpDetails")
        if isinstance(details, dict):
            for key in ("ipAddressV4", "ipAddressV6"):
                if isinstance(details.get(key), str) and details[key]:
                    return str(details[key])
        return None

    @property
    def archived(self) -> bool:
        return self.data.get("service", {}).get("archived") is True


def parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else None


def _get(obj: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(key)
    return obj


def parse_finding(value: bytes | None) -> Finding | str:
    """The finding in a message value — a bare finding, a ``GuardDuty Finding`` EventBridge event, or an
    OCSF Detection Finding carrying it under ``unmapped`` — or the reason to skip it (:data:`SKIP_REASONS`)."""
    if value is None:
        return NOT_JSON
    try:
        doc = orjson.loads(value)
    except orjson.JSONDecodeError:
        return NOT_JSON
    if isinstance(doc, dict) and "detail-type" in doc and "detail" in doc:
        if doc["detail-type"] != "GuardDuty Finding":
            return NOT_A_FINDING
        doc = doc["detail"]
    if isinstance(doc, dict) and doc.get("class_uid") == OCSF_DETECTION_FINDING and isinstance(doc.get("unmapped"), dict):
        doc = doc["unmapped"]  # `finding_format = "ocsf"`: the GuardDuty-shaped finding is kept whole there
    if not isinstance(doc, dict) or "type" not in doc:
        return NOT_A_FINDING
    return validate(doc)


def validate(doc: dict[str, Any]) -> Finding | str:
    finding_type = doc.get("type")
    if finding_type not in TYPES:
        return UNKNOWN_TYPE
    finding_id, account, severity = doc.get("id"), doc.get("accountId"), doc.get("severity")
    instance_id = _get(doc, "resource", "instanceDetails", "instanceId")
    role = _get(doc, "resource", "accessKeyDetails", "userName")
    partition = doc.get("partition") or "aws"
    region = doc.get("region")
    updated = parse_time(doc.get("updatedAt"))
    if (
        not isinstance(finding_id, str) or not _ID_RE.fullmatch(finding_id)
        or not isinstance(account, str) or not _ACCOUNT_RE.fullmatch(account)
        or isinstance(severity, bool) or not isinstance(severity, (int, float))
        or not isinstance(instance_id, str) or not _INSTANCE_RE.fullmatch(instance_id)
        or not isinstance(role, str) or not _ROLE_RE.fullmatch(role)
        or not isinstance(partition, str) or not _PARTITION_RE.fullmatch(partition)
        or not isinstance(region, str) or not region
        or updated is None
        or not isinstance(doc.get("service"), dict)
    ):  # fmt: skip
        return INVALID
    return Finding(
        id=finding_id, type=finding_type, severity=float(severity), account=account, partition=partition,
        region=region, instance_id=instance_id, role=role, updated_at=updated, data=doc,
    )  # fmt: skip
