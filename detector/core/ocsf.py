"""A finding as an OCSF 1.3 Detection Finding (``class_uid`` 2004), rendered from the GuardDuty-shaped one.

Pure: a function of the GuardDuty-shaped finding (:func:`detector.core.findings.render`) and of whether
this state opens the finding group. It reads only fields every finding type has (``type``, ``severity``,
times, ``resource``, ``service.action``), so new finding types and new ``additionalInfo`` fields render
without change; the GuardDuty-shaped finding is kept whole under ``unmapped``. docs/findings.md shows
both formats side by side; tests validate every rendered line against the OCSF 1.3.0 schema.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from .. import __version__

OCSF_VERSION = "1.3.0"
PRODUCT_NAME = "ec2-credential-detector"
VENDOR_NAME = "ec2-credential-detector project"

CLASS_UID, CLASS_NAME = 2004, "Detection Finding"
CATEGORY_UID, CATEGORY_NAME = 2, "Findings"
ACTIVITY_CREATE, ACTIVITY_UPDATE = 1, 2
ACTIVITY_NAMES = {ACTIVITY_CREATE: "Create", ACTIVITY_UPDATE: "Update"}
STATUS_NEW, STATUS_SUPPRESSED = 1, 3
SEVERITY_NAMES = {1: "Informational", 2: "Low", 3: "Medium", 4: "High", 5: "Critical"}
OBSERVABLE_IP, OBSERVABLE_RESOURCE_UID, OBSERVABLE_OTHER = 2, 10, 99
ACCOUNT_AWS = 10  # account.type_id: AWS Account
ANALYTIC_RULE = 1
ENDPOINT_OTHER = 99  # network_endpoint.type_id: Other (see ``type``)


def severity_id(severity: float) -> int:
    """GuardDuty's numeric severity bands (Low 1-3.9, Medium 4-6.9, High 7-8.9, Critical 9-10) as OCSF's
    ``severity_id``; below 1, Informational."""
    if severity >= 9:
        return 5
    if severity >= 7:
        return 4
    if severity >= 4:
        return 3
    if severity >= 1:
        return 2
    return 1


def millis(iso: str | None) -> int | None:
    """An ISO 8601 time (``...Z``) as milliseconds since the epoch (OCSF ``timestamp_t``)."""
    if not iso:
        return None
    return int(round(datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp() * 1000))


def _account(uid: str) -> dict[str, Any]:
    return {"uid": uid, "type_id": ACCOUNT_AWS, "type": "AWS Account"}


def _resources(finding: dict[str, Any], partition: str, region: str | None) -> list[dict[str, Any]]:
    """The instance, its role and the access key the credentials carry (OCSF ``resource_details``)."""
    resource = finding.get("resource") or {}
    key = resource.get("accessKeyDetails") or {}
    instance = (resource.get("instanceDetails") or {}).get("instanceId")
    account = finding.get("accountId")
    out: list[dict[str, Any]] = []

    def add(kind: str, uid: str | None, name: str | None = None, data: dict[str, Any] | None = None) -> None:
        if not uid:
            return
        item: dict[str, Any] = {"type": kind, "uid": uid, "cloud_partition": partition}
        if name:
            item["name"] = name
        if region:
            item["region"] = region
        if data:
            item["data"] = data
        out.append(item)

    add("AWS::EC2::Instance", instance, instance)
    role = key.get("userName")
    if role and account:
        # CloudTrail's assumed-role ARN does not carry the role's path: the ARN below has none.
        add("AWS::IAM::Role", f"arn:{partition}:iam::{account}:role/{role}", role)
    add(
        "AWS::IAM::AccessKey",
        key.get("accessKeyId"),
        data={k: key[k] for k in ("principalId", "userType") if key.get(k)},
    )
    return out


def _evidence(finding: dict[str, Any]) -> dict[str, Any] | None:
    """Where the credentials were used from: the API call, the source address or VPC endpoint, the
    account that owns it."""
    action = ((finding.get("service") or {}).get("action") or {}).get("awsApiCallAction") or {}
    additional = (finding.get("service") or {}).get("additionalInfo") or {}
    evidence: dict[str, Any] = {}
    if action.get("api"):
        api: dict[str, Any] = {"operation": action["api"]}
        if action.get("serviceName"):
            api["service"] = {"name": action["serviceName"]}
        evidence["api"] = api
    endpoint: dict[str, Any] = {}
    remote_ip = action.get("remoteIpDetails") or {}
    ip = remote_ip.get("ipAddressV4") or remote_ip.get("ipAddressV6")
    if ip:
        endpoint["ip"] = ip
    vpce = additional.get("vpcEndpointId")
    if vpce:
        endpoint.update(uid=vpce, type="VPC Endpoint", type_id=ENDPOINT_OTHER)
    remote = action.get("remoteAccountDetails") or {}
    if remote.get("accountId"):
        endpoint["owner"] = {"account": _account(remote["accountId"])}
    if endpoint:
        evidence["src_endpoint"] = endpoint
    data = {k: additional[k] for k in ("originKind", "sessionArn") if additional.get(k)}
    if remote:
        data["remoteAccountAffiliated"] = bool(remote.get("affiliated"))
    if data:
        evidence["data"] = data
    return evidence if ("api" in evidence or "src_endpoint" in evidence) else None


def _observables(resources: list[dict[str, Any]], evidence: dict[str, Any] | None, account: str | None) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    endpoint = (evidence or {}).get("src_endpoint") or {}
    if endpoint.get("ip"):
        out.append({"name": "evidences[].src_endpoint.ip", "type_id": OBSERVABLE_IP, "type": "IP Address", "value": endpoint["ip"]})
    for item in resources:
        out.append({"name": "resources[].uid", "type_id": OBSERVABLE_RESOURCE_UID, "type": "Resource UID", "value": item["uid"]})
    if endpoint.get("uid"):
        out.append({"name": "evidences[].src_endpoint.uid", "type_id": OBSERVABLE_RESOURCE_UID, "type": "Resource UID", "value": endpoint["uid"]})
    if account:
        out.append({"name": "cloud.account.uid", "type_id": OBSERVABLE_OTHER, "type": "AWS Account ID", "value": account})
    remote = ((endpoint.get("owner") or {}).get("account") or {}).get("uid")
    if remote:
        out.append(
            {"name": "evidences[].src_endpoint.owner.account.uid", "type_id": OBSERVABLE_OTHER, "type": "AWS Account ID", "value": remote}
        )
    return out


def to_ocsf(finding: dict[str, Any], *, new: bool) -> dict[str, Any]:
    """The OCSF 1.3 Detection Finding for a GuardDuty-shaped ``finding``; ``new``: this state opens the
    finding group (activity Create), else it updates it (activity Update)."""
    activity = ACTIVITY_CREATE if new else ACTIVITY_UPDATE
    service = finding.get("service") or {}
    severity = finding.get("severity") or 0
    sev_id = severity_id(severity)
    partition = finding.get("partition") or "aws"
    region = finding.get("region")
    region = region if region and region != "unknown" else None
    account = finding.get("accountId")
    first_seen, last_seen = millis(service.get("eventFirstSeen")), millis(service.get("eventLastSeen"))
    created, updated = millis(finding.get("createdAt")), millis(finding.get("updatedAt"))
    finding_info: dict[str, Any] = {
        "uid": finding["id"],
        "title": finding.get("title") or finding.get("type") or finding["id"],
        "types": [finding["type"]] if finding.get("type") else [],
        "analytic": {"uid": finding.get("type") or "", "name": finding.get("type") or "", "type_id": ANALYTIC_RULE, "type": "Rule"},
    }
    if finding.get("description"):
        finding_info["desc"] = finding["description"]
    for name, value in (
        ("first_seen_time", first_seen), ("last_seen_time", last_seen),
        ("created_time", created), ("modified_time", updated),
    ):  # fmt: skip
        if value is not None:
            finding_info[name] = value
    cloud: dict[str, Any] = {"provider": "AWS"}
    if account:
        cloud["account"] = _account(account)
    if region:
        cloud["region"] = region
    resources = _resources(finding, partition, region)
    evidence = _evidence(finding)
    archived = bool(service.get("archived"))
    event: dict[str, Any] = {
        "class_uid": CLASS_UID,
        "class_name": CLASS_NAME,
        "category_uid": CATEGORY_UID,
        "category_name": CATEGORY_NAME,
        "activity_id": activity,
        "activity_name": ACTIVITY_NAMES[activity],
        "type_uid": CLASS_UID * 100 + activity,
        "type_name": f"{CLASS_NAME}: {ACTIVITY_NAMES[activity]}",
        "severity_id": sev_id,
        "severity": SEVERITY_NAMES[sev_id],
        "status_id": STATUS_SUPPRESSED if archived else STATUS_NEW,
        "status": "Suppressed" if archived else "New",
        "time": updated if updated is not None else (last_seen or 0),
        "message": finding.get("description") or finding_info["title"],
        "finding_info": finding_info,
        "metadata": {
            "version": OCSF_VERSION,
            "profiles": ["cloud"],
            "product": {"name": PRODUCT_NAME, "vendor_name": VENDOR_NAME, "version": __version__},
            "uid": f"{finding['id']}-{updated if updated is not None else 0}",
            "log_name": "findings",
        },
        "cloud": cloud,
        "resources": resources,
        "observables": _observables(resources, evidence, account),
        "unmapped": finding,
    }
    if evidence is not None:
        event["evidences"] = [evidence]
    if isinstance(service.get("count"), int):
        event["count"] = service["count"]
    if first_seen is not None:
        event["start_time"] = first_seen
    if last_seen is not None:
        event["end_time"] = last_seen
    return event
