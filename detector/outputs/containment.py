"""The inline deny policy that contains stolen instance credentials (SPEC §14 "respond"; pure).

One statement per finding, ``Sid`` derived from the finding id (so a statement is never added twice),
``Effect: Deny`` on every action and resource, scoped to the credentials of the one instance
(``ArnLike ec2:SourceInstanceARN``: other instances of the role keep working) and to where they were used:

============================================  ===================================================
finding                                       extra condition
============================================  ===================================================
OutsideAWS; InsideAWS from an address         ``IpAddress aws:SourceIp`` = the remote address(es)
InsideAWS through a VPC endpoint              ``StringEquals aws:SourceVpce`` = the endpoint
OtherInstance by public address               ``IpAddress aws:SourceIp`` = that address
OtherInstance through a VPC endpoint          ``IpAddress aws:VpcSourceIp`` = the private address
AfterInstanceStopped                          ``DateLessThan aws:TokenIssueTime`` = the stop time
============================================  ===================================================

All statements of one role live in ONE inline policy (:data:`POLICY_NAME` by default). IAM caps the
inline policies of a role at 10,240 characters in aggregate (whitespace not counted): when a merge would
go past it, the oldest of our statements roll off first.
"""

from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import dataclass, field
from datetime import timedelta, timezone
from typing import Any

from .findings import AFTER_INSTANCE_STOPPED, INSIDE_AWS, OTHER_INSTANCE, OUTSIDE_AWS, Finding, parse_time

POLICY_NAME = "detector-containment"
POLICY_VERSION = "2012-10-17"
SID_PREFIX = "DetectorContain"
ROLE_POLICY_LIMIT = 10_240
CONTAINED_SEVERITY = 8

# reasons a finding gets no statement (metric label values)
NO_ADDRESS = "no_address"  # nothing to scope the deny to: the finding carries no usable evidence
UNSUPPORTED_TYPE = "unsupported_type"  # a type respond does not contain (e.g. the IMDSv1 policy finding)

_SID_RE = re.compile(rf"{SID_PREFIX}[0-9a-f]{{32}}")


def sid(finding_id: str) -> str:
    return SID_PREFIX + finding_id


def policy_size(document: Any) -> int:
    """Characters IAM counts for a policy document (its JSON without insignificant whitespace)."""
    if isinstance(document, str):
        document = json.loads(document)
    return len(json.dumps(document, separators=(",", ":"), ensure_ascii=False))


def _address(value: Any) -> str | None:
    if not isinstance(value, str):
        return None
    try:
        ip = ipaddress.ip_address(value)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # IAM compares aws:SourceIp as the IPv4 address
    return str(ip)


def _addresses(finding: Finding) -> list[str]:
    """The remote addresses of the finding: its latest one and the distinct ones in the evidence."""
    found = [_address(finding.remote_ip)]
    info = finding.additional_info
    found.append(_address(info.get("address")))
    remote = info.get("remoteAddresses")
    if isinstance(remote, list):
        found.extend(_address(a) for a in remote)
    return sorted({a for a in found if a is not None}, key=lambda a: (":" in a, a))


def _iam_time(value: Any) -> str | None:
    when = parse_time(value)
    if when is None:
        return None
    if when.microsecond:  # round up: a token issued in the stop's own second is still before it
        when = when.replace(microsecond=0) + timedelta(seconds=1)
    return when.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def statement(finding: Finding) -> dict[str, Any] | str:
    """The deny statement of ``finding``, or why it has none (:data:`NO_ADDRESS`, :data:`UNSUPPORTED_TYPE`)."""
    info = finding.additional_info
    vpce = info.get("vpcEndpointId")
    vpce = vpce if isinstance(vpce, str) and vpce.startswith("vpce-") else None
    condition: dict[str, dict[str, Any]] = {
        "ArnLike": {
            "ec2:SourceInstanceARN": f"arn:{finding.partition}:ec2:*:{finding.account}:instance/{finding.instance_id}"
        }
    }
    if finding.type == AFTER_INSTANCE_STOPPED:
        stopped = _iam_time(info.get("stoppedAt"))
        if stopped is None:
            return NO_ADDRESS
        condition["DateLessThan"] = {"aws:TokenIssueTime": stopped}
    elif finding.type == OTHER_INSTANCE:
        address = _address(info.get("address")) or _address(finding.remote_ip)
        if address is None:
            return NO_ADDRESS
        key = "aws:VpcSourceIp" if vpce else "aws:SourceIp"
        condition["IpAddress"] = {key: address}
    elif finding.type == INSIDE_AWS and vpce:
        condition["StringEquals"] = {"aws:SourceVpce": vpce}
    elif finding.type in (INSIDE_AWS, OUTSIDE_AWS):
        addresses = _addresses(finding)
        if not addresses:
            return NO_ADDRESS
        condition["IpAddress"] = {"aws:SourceIp": addresses[0] if len(addresses) == 1 else addresses}
    else:
        return UNSUPPORTED_TYPE
    return {"Sid": sid(finding.id), "Effect": "Deny", "Action": "*", "Resource": "*", "Condition": condition}


def policy(statements: list[dict[str, Any]]) -> dict[str, Any]:
    return {"Version": POLICY_VERSION, "Statement": statements}


@dataclass(slots=True)
class Merge:
    """The outcome of merging new statements into a role's containment policy."""

    document: dict[str, Any]
    added: list[str] = field(default_factory=list)  # Sids new in the document
    present: list[str] = field(default_factory=list)  # Sids that were already there
    rolled_off: list[str] = field(default_factory=list)  # our older Sids dropped to stay within the limit
    too_large: list[str] = field(default_factory=list)  # new Sids that cannot fit even alone

    @property
    def changed(self) -> bool:
        return bool(self.added or self.rolled_off)


def _statements(existing: Any) -> list[dict[str, Any]]:
    if isinstance(existing, str):
        existing = json.loads(existing)
    if not isinstance(existing, dict):
        return []
    found = existing.get("Statement", [])
    if isinstance(found, dict):
        found = [found]
    return [s for s in found if isinstance(s, dict)]


def ours(stmt: dict[str, Any]) -> bool:
    return isinstance(stmt.get("Sid"), str) and _SID_RE.fullmatch(stmt["Sid"]) is not None


def rebase(read: Any, written: dict[str, Any]) -> dict[str, Any]:
    """The policy to merge into, when respond itself wrote ``written`` moments ago and IAM answered ``read``.

    IAM is eventually consistent: a read just after a write may still show the policy as it was. Our own
    statements are taken from what we wrote, everybody else's from what IAM says.
    """
    return policy([s for s in _statements(read) if not ours(s)] + [s for s in _statements(written) if ours(s)])


def merge(existing: Any, new: list[dict[str, Any]], budget: int = ROLE_POLICY_LIMIT) -> Merge:
    """Merge ``new`` statements (in order) into the ``existing`` policy document (None: no policy yet),
    within ``budget`` characters (the role's limit minus its other inline policies).

    A statement whose Sid is already present is not added again. When the result is too large, our
    oldest statements (those earliest in the document, the Sid prefix ours) roll off first; statements
    someone else added to the policy are never removed.
    """
    statements = _statements(existing)
    result = Merge(policy(statements))
    sids = {s.get("Sid") for s in statements}
    for stmt in new:
        if stmt["Sid"] in sids:
            result.present.append(stmt["Sid"])
            continue
        statements.append(stmt)
        sids.add(stmt["Sid"])
        result.added.append(stmt["Sid"])
    while policy_size(policy(statements)) > budget:
        mine = [i for i, s in enumerate(statements) if ours(s)]
        if not mine:
            break
        # the oldest statement goes first; a new one is only dropped when nothing older is left
        index = mine[0]
        gone = statements.pop(index)["Sid"]
        if gone in result.added:
            result.added.remove(gone)
            result.too_large.append(gone)
        else:
            result.rolled_off.append(gone)
    result.document = policy(statements)
    return result
