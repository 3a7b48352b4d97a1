"""Rendering a finding group as a GuardDuty-shaped finding (SPEC §8)."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from .addresses import V4, parse_address
from .engine import AFTER_STOP, IMDSV1, INSIDE_AWS, OTHER, OTHER_INSTANCE, ORIGIN_AWS, ORIGIN_ENDPOINT, ORIGIN_PRIVATE
from .state import FindingGroup

SCHEMA_VERSION = "2.0"
PRODUCT = "ec2-credential-detector"
TOP_API_CALLS = 32  # SPEC §13: the most frequent pairs listed; the rest summed in one entry
_TIME_EVIDENCE = ("stoppedAt", "startedAt", "accessKeyFirstSeen")  # evidence times (seconds) shown as ISO 8601


# isoformat, not strftime: "%Y" does not pad years before 1000 to four digits on every platform.
def iso_seconds(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).replace(tzinfo=None).isoformat(timespec="seconds") + "Z"


def iso_millis(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).replace(tzinfo=None).isoformat(timespec="milliseconds") + "Z"


def _where(group: FindingGroup) -> str:
    if group.type != INSIDE_AWS and group.origin not in (ORIGIN_PRIVATE, "OUTSIDE_AWS"):
        if group.vpce:
            return f"VPC endpoint {group.vpce}" + (f" (address {group.ip})" if group.ip else "")
        return f"address {group.ip}" if group.ip else "an AWS service"
    if group.type == INSIDE_AWS:
        if group.remote_account:
            who = f"AWS account {group.remote_account}" + (
                " (affiliated with yours)" if group.affiliated else " (not affiliated with yours)"
            )
        elif group.origin == ORIGIN_AWS:
            who = f"an AWS address ({group.ip}) whose account is not yours or is not known"
        else:
            who = "another AWS account whose ID is not known"
        if group.vpce:
            who += f" through VPC endpoint {group.vpce}"
        elif group.remote_account and group.ip:
            who += f" from address {group.ip}"
        return who
    if group.origin == ORIGIN_PRIVATE:
        return f"private address {group.ip} without a VPC endpoint (not the instance's own network path)"
    return f"external IP address {group.ip}"


def title(group: FindingGroup) -> str:
    if group.type == AFTER_STOP:
        return f"Credentials for instance role {group.role} used after their instance stopped."
    if group.type == OTHER_INSTANCE:
        return f"Credentials for instance role {group.role} used from another instance."
    if group.type == IMDSV1:
        return f"Credentials for instance role {group.role} delivered by IMDSv1."
    if group.type == INSIDE_AWS:
        return f"Credentials for instance role {group.role} used from a different AWS account."
    return f"Credentials for instance role {group.role} used from external IP address."


def description(group: FindingGroup) -> str:
    evidence = group.evidence or {}
    if group.type == AFTER_STOP:
        state = evidence.get("instanceState") or "stopped"
        when = iso_seconds(evidence["stoppedAt"]) if evidence.get("stoppedAt") is not None else "an unknown time"
        return (
            f"Credentials created exclusively for EC2 instance {group.instance_id} through instance role "
            f"{group.role} in account {group.account} have been used from {_where(group)} after the instance "
            f"was {state} at {when}: the instance cannot use them any more."
        )
    if group.type == OTHER_INSTANCE:
        return (
            f"Credentials created exclusively for EC2 instance {group.instance_id} through instance role "
            f"{group.role} in account {group.account} have been used from address {group.ip} of another "
            f"instance, {group.other_instance} (account {evidence.get('otherInstanceAccountId')})"
            + (f" through VPC endpoint {group.vpce}." if group.vpce else ".")
        )
    if group.type == IMDSV1:
        return (
            f"EC2 instance {group.instance_id} (instance role {group.role}, account {group.account}) serves its "
            "credentials through IMDSv1, without a session token: the path server-side request forgery takes. "
            "Require IMDSv2 (HttpTokens required) on the instance."
        )
    return (
        f"Credentials created exclusively for EC2 instance {group.instance_id} through instance role "
        f"{group.role} in account {group.account} have been used from {_where(group)}."
    )


def api_calls(calls: dict[str, int]) -> list[dict[str, Any]]:
    """SPEC §13: the 32 most frequent eventSource/eventName pairs with their counts, then — when there
    are more — one entry ``{"other": true, "pairs": <how many>, "count": <their records>}``."""
    pairs = sorted(
        ((n, *pair.split("\x1f", 1)) for pair, n in calls.items() if pair != OTHER), key=lambda p: (-p[0], p[1], p[2])
    )
    out: list[dict[str, Any]] = [{"eventSource": source, "eventName": name, "count": n} for n, source, name in pairs[:TOP_API_CALLS]]
    rest = pairs[TOP_API_CALLS:]
    beyond = calls.get(OTHER, 0)
    if rest or beyond:
        out.append({"other": True, "pairs": len(rest) + (1 if beyond else 0), "count": sum(p[0] for p in rest) + beyond})
    return out


def render(group: FindingGroup) -> dict[str, Any]:
    """The GuardDuty finding JSON (camelCase) for the group's current state."""
    action: dict[str, Any] = {"api": group.api, "serviceName": group.service_name}
    if group.ip:
        parsed = parse_address(group.ip)
        if parsed is not None:
            field = "ipAddressV4" if parsed[0] == V4 else "ipAddressV6"
            action["remoteIpDetails"] = {field: group.ip}
    if group.type == INSIDE_AWS:
        remote: dict[str, Any] = {"affiliated": bool(group.affiliated)}
        if group.remote_account:
            remote["accountId"] = group.remote_account
        action["remoteAccountDetails"] = remote
    partition = group.partition or "aws"
    region = group.region or "unknown"
    additional: dict[str, Any] = {
        "sessionArn": group.session_key,
        "originKind": group.origin,
        "remoteAddresses": list(group.remote_addresses),
        "baseline": group.baseline,
        "ec2RoleDelivery": list(group.deliveries),
        "product": PRODUCT,
    }
    if group.origin == ORIGIN_ENDPOINT or group.vpce:
        additional["vpcEndpointId"] = group.vpce
    for name, value in (group.evidence or {}).items():
        additional[name] = iso_seconds(value) if name in _TIME_EVIDENCE and value is not None else value
    if group.other_instance is not None:
        additional["otherInstanceId"] = group.other_instance
    additional["apiCalls"] = api_calls(group.api_calls or {})
    additional["errorCodes"] = {("other" if code == OTHER else code): n for code, n in (group.error_codes or {}).items()}
    return {
        "schemaVersion": SCHEMA_VERSION,
        "accountId": group.account,
        "region": region,
        "partition": partition,
        "id": group.id,
        "arn": f"arn:{partition}:guardduty:{region}:{group.account}:detector/{PRODUCT}/finding/{group.id}",
        "type": group.type,
        "severity": group.severity,
        "title": title(group),
        "description": description(group),
        "resource": {
            "resourceType": "AccessKey",
            "accessKeyDetails": {
                "accessKeyId": group.access_key_id,
                "principalId": group.principal_id,
                "userName": group.role,
                "userType": "AssumedRole",
            },
            "instanceDetails": {"instanceId": group.instance_id},
        },
        "service": {
            "serviceName": PRODUCT,
            "detectorId": PRODUCT,
            "action": {"actionType": "AWS_API_CALL", "awsApiCallAction": action},
            "archived": False,
            "resourceRole": "TARGET",
            "count": group.count,
            "eventFirstSeen": iso_seconds(group.first_ts),
            "eventLastSeen": iso_seconds(group.last_ts),
            "additionalInfo": additional,
        },
        "createdAt": iso_millis(group.created_at),
        "updatedAt": iso_millis(group.updated_at),
    }
