"""A finding as an AWS Security Finding Format (ASFF) document for ``BatchImportFindings`` (pure).

Custom-integration findings: ``ProductArn`` is ``arn:<partition>:securityhub:<region>:<account>:product/
<account>/default`` of the account that imports them. Severity and types go both at the top level and in
``FindingProviderFields`` (the provider's own view, which Security Hub keeps when analysts change the top
level with ``BatchUpdateFindings``).
"""

from __future__ import annotations

from typing import Any

import orjson

from .findings import AFTER_INSTANCE_STOPPED, IMDSV1, INSIDE_AWS, OTHER_INSTANCE, OUTSIDE_AWS, Finding

SCHEMA_VERSION = "2018-10-08"
PRODUCT_NAME = "ec2-credential-detector"
COMPANY_NAME = "Self-hosted"
MAX_TITLE = 256
MAX_DESCRIPTION = 1024
MAX_PRODUCT_FIELD = 2048
PRODUCT_FIELD_PREFIX = "ec2-credential-detector/"

# ASFF finding-type taxonomy: namespace/category/classifier. The classifier is our type with "/" made
# "-" (as GuardDuty's own Security Hub integration writes it), since "/" separates the levels.
_TTP = {
    INSIDE_AWS: ("TTPs/Credential Access", "Unusual Behaviors/User"),
    OUTSIDE_AWS: ("TTPs/Credential Access", "Unusual Behaviors/User"),
    AFTER_INSTANCE_STOPPED: ("TTPs/Credential Access", "Unusual Behaviors/User"),
    OTHER_INSTANCE: ("TTPs/Credential Access", "Unusual Behaviors/User"),
    IMDSV1: ("Software and Configuration Checks/AWS Security Best Practices",),
}


def severity_label(severity: float) -> str:
    """GuardDuty's bands: below 1 informational, 1-3.9 low, 4-6.9 medium, 7-8.9 high, 9+ critical."""
    if severity >= 9:
        return "CRITICAL"
    if severity >= 7:
        return "HIGH"
    if severity >= 4:
        return "MEDIUM"
    if severity >= 1:
        return "LOW"
    return "INFORMATIONAL"


def finding_types(finding_type: str) -> list[str]:
    classifier = finding_type.replace("/", "-")
    return [f"{prefix}/{classifier}" for prefix in _TTP.get(finding_type, ("Unusual Behaviors/User",))]


def product_arn(partition: str, region: str, account: str) -> str:
    return f"arn:{partition}:securityhub:{region}:{account}:product/{account}/default"


def _original(severity: float) -> str:
    return str(int(severity)) if float(severity).is_integer() else str(severity)


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _product_fields(finding: Finding) -> dict[str, str]:
    """The evidence, as Security Hub's flat string map (each value at most 2,048 characters)."""
    fields: dict[str, str] = {
        "findingId": finding.id,
        "type": finding.type,
        "count": str(finding.data.get("service", {}).get("count", "")),
    }
    remote = finding.api_action.get("remoteAccountDetails")
    if isinstance(remote, dict):
        if remote.get("accountId"):
            fields["remoteAccountId"] = str(remote["accountId"])
        fields["remoteAccountAffiliated"] = str(bool(remote.get("affiliated"))).lower()
    for key in ("api", "serviceName"):
        if finding.api_action.get(key):
            fields[f"action.{key}"] = str(finding.api_action[key])
    for key, value in sorted(finding.additional_info.items()):
        if value is None or value == [] or value == {}:
            continue
        text = value if isinstance(value, str) else orjson.dumps(value).decode()
        fields[f"additionalInfo.{key}"] = _clip(text, MAX_PRODUCT_FIELD)
    # Security Hub takes at most 50 pairs
    return {PRODUCT_FIELD_PREFIX + k: v for k, v in list(fields.items())[:50]}


def _resources(finding: Finding, region: str) -> list[dict[str, Any]]:
    p, account = finding.partition, finding.account
    where = finding.region if finding.region != "unknown" else region
    resources: list[dict[str, Any]] = [
        {
            "Type": "AwsEc2Instance",
            "Id": f"arn:{p}:ec2:{where}:{account}:instance/{finding.instance_id}",
            "Partition": p,
            "Region": where,
        },
        {
            "Type": "AwsIamRole",
            "Id": f"arn:{p}:iam::{account}:role/{finding.role}",
            "Partition": p,
            "Region": where,
            "Details": {"AwsIamRole": {"RoleName": finding.role}},
        },
    ]
    key = finding.data.get("resource", {}).get("accessKeyDetails", {})
    if isinstance(key, dict) and key.get("accessKeyId"):
        details = {"PrincipalName": finding.role, "PrincipalType": "AssumedRole", "AccountId": account,
                   "AccessKeyId": str(key["accessKeyId"])}  # fmt: skip
        if key.get("principalId"):
            details["PrincipalId"] = str(key["principalId"])
        resources.append(
            {
                "Type": "AwsIamAccessKey",
                "Id": f"AWS::IAM::AccessKey:{key['accessKeyId']}",
                "Partition": p,
                "Region": where,
                "Details": {"AwsIamAccessKey": details},
            }
        )
    return resources


def to_asff(finding: Finding, *, region: str, product_account: str) -> dict[str, Any]:
    """The ASFF document of ``finding`` imported in ``region`` by ``product_account``."""
    data, service = finding.data, finding.data["service"]
    types = finding_types(finding.type)
    severity = {"Label": severity_label(finding.severity), "Original": _original(finding.severity)}
    doc: dict[str, Any] = {
        "SchemaVersion": SCHEMA_VERSION,
        "Id": str(data.get("arn") or finding.id),
        "ProductArn": product_arn(finding.partition, region, product_account),
        "ProductName": PRODUCT_NAME,
        "CompanyName": COMPANY_NAME,
        "GeneratorId": f"{PRODUCT_NAME}/{finding.type}",
        "AwsAccountId": finding.account,
        "Types": types,
        "FindingProviderFields": {"Severity": dict(severity), "Types": list(types)},
        "Severity": severity,
        "Title": _clip(str(data.get("title") or finding.type), MAX_TITLE),
        "Description": _clip(str(data.get("description") or finding.type), MAX_DESCRIPTION),
        "Resources": _resources(finding, region),
        "CreatedAt": str(data.get("createdAt") or data["updatedAt"]),
        "UpdatedAt": str(data["updatedAt"]),
        "RecordState": "ARCHIVED" if finding.archived else "ACTIVE",
        "ProductFields": _product_fields(finding),
    }
    for asff_key, ours in (("FirstObservedAt", "eventFirstSeen"), ("LastObservedAt", "eventLastSeen")):
        if isinstance(service.get(ours), str):
            doc[asff_key] = service[ours]
    ip = finding.remote_ip
    if ip is not None:
        doc["Network"] = {"Direction": "IN", ("SourceIpV6" if ":" in ip else "SourceIpV4"): ip}
    api = finding.api_action
    if api.get("api") or api.get("serviceName"):
        call: dict[str, Any] = {"Api": str(api.get("api") or ""), "ServiceName": str(api.get("serviceName") or "")}
        if ip is not None and ":" not in ip:
            call["CallerType"] = "remoteIp"
            call["RemoteIpDetails"] = {"IpAddressV4": ip}
        for asff_key, ours in (("FirstSeen", "eventFirstSeen"), ("LastSeen", "eventLastSeen")):
            if isinstance(service.get(ours), str):
                call[asff_key] = service[ours]
        doc["Action"] = {"ActionType": "AWS_API_CALL", "AwsApiCallAction": call}
    return doc
