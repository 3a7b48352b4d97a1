"""The pure parts of export and respond: reading findings-topic messages, ASFF, the deny statements and
the merge of a role's containment policy (SPEC §14 "Out")."""

from __future__ import annotations

import copy
import json
from typing import Any

import orjson
import pytest

from detector.core.engine import Engine
from detector.demo import sample_world
from detector.outputs import asff, containment
from detector.outputs.findings import (
    AFTER_INSTANCE_STOPPED, IMDSV1, INSIDE_AWS, INVALID, NOT_A_FINDING, NOT_JSON, OTHER_INSTANCE, OUTSIDE_AWS,
    UNKNOWN_TYPE, Finding, parse_finding,
)  # fmt: skip
from detector.outputs.settings import ExportSettings, RespondSettings
from detector.registry import load_registry
from detector.replay import Replayer
from detector.service.app import eventbridge_envelope


@pytest.fixture(scope="module")
def findings(aws_ranges: Any) -> list[dict[str, Any]]:
    """The sample world's findings as `detector replay` renders them."""
    world = sample_world()
    replayer = Replayer(Engine(load_registry(world.registry), aws_ranges))
    replayer.run([str(p) for p in world.inputs])
    return replayer.findings()


def of_type(findings: list[dict[str, Any]], suffix: str, origin: str | None = None) -> dict[str, Any]:
    for f in findings:
        if f["type"].endswith(suffix) and (origin is None or f["service"]["additionalInfo"]["originKind"] == origin):
            return copy.deepcopy(f)
    raise AssertionError(f"no {suffix} {origin} finding in the sample world")


def parsed(doc: dict[str, Any]) -> Finding:
    result = parse_finding(orjson.dumps(doc))
    assert isinstance(result, Finding), result
    return result


def test_parse_bare_enveloped_and_bad_messages(findings: list[dict[str, Any]]) -> None:
    f = findings[0]
    assert parsed(f).id == f["id"]
    assert parsed(eventbridge_envelope(f)).data == f
    # finding_format = "ocsf": an OCSF 1.3 Detection Finding with the GuardDuty-shaped finding under `unmapped`
    assert parsed({"class_uid": 2004, "category_uid": 2, "activity_id": 1, "finding_info": {"uid": f["id"]}, "unmapped": f}).data == f
    assert parse_finding(orjson.dumps({"class_uid": 2004, "unmapped": {"note": "no finding"}})) == NOT_A_FINDING
    assert parse_finding(b"{not json") == NOT_JSON
    assert parse_finding(None) == NOT_JSON
    assert parse_finding(b"[1, 2]") == NOT_A_FINDING
    assert parse_finding(orjson.dumps({"detail-type": "AWS API Call via CloudTrail", "detail": f})) == NOT_A_FINDING
    assert parse_finding(orjson.dumps(f | {"type": "Recon:EC2/PortProbeUnprotectedPort"})) == UNKNOWN_TYPE
    for broken in ({"id": "XYZ"}, {"accountId": "12"}, {"updatedAt": "yesterday"}, {"severity": "high"},
                   {"resource": {"accessKeyDetails": {}}}):  # fmt: skip
        assert parse_finding(orjson.dumps(f | broken)) == INVALID, broken
    # the instance identity role is in scope (SPEC §10): its findings are ours too (respond skips the role)
    identity = copy.deepcopy(f)
    identity["resource"]["accessKeyDetails"]["userName"] = "aws:ec2-instance"
    assert parsed(identity).role == "aws:ec2-instance"
    identity["resource"]["accessKeyDetails"]["userName"] = "ec2:instance"
    assert parse_finding(orjson.dumps(identity)) == INVALID


def test_asff_of_a_finding(findings: list[dict[str, Any]]) -> None:
    f = of_type(findings, "OutsideAWS")
    doc = asff.to_asff(parsed(f), region="eu-west-1", product_account="999988887777")
    assert doc["ProductArn"] == "arn:aws:securityhub:eu-west-1:999988887777:product/999988887777/default"
    assert doc["AwsAccountId"] == f["accountId"] and doc["Id"] == f["arn"]
    assert doc["Severity"] == doc["FindingProviderFields"]["Severity"] == {"Label": "HIGH", "Original": "8"}
    assert doc["Types"] == doc["FindingProviderFields"]["Types"]
    assert doc["Types"][0] == "TTPs/Credential Access/UnauthorizedAccess:IAMUser-InstanceCredentialExfiltration.OutsideAWS"
    assert all(t.count("/") == 2 for t in doc["Types"])
    assert (doc["FirstObservedAt"], doc["LastObservedAt"]) == (f["service"]["eventFirstSeen"], f["service"]["eventLastSeen"])
    assert (doc["CreatedAt"], doc["UpdatedAt"], doc["RecordState"]) == (f["createdAt"], f["updatedAt"], "ACTIVE")
    types = {r["Type"]: r for r in doc["Resources"]}
    iid, role = f["resource"]["instanceDetails"]["instanceId"], f["resource"]["accessKeyDetails"]["userName"]
    assert types["AwsEc2Instance"]["Id"].endswith(f":{f['accountId']}:instance/{iid}")
    assert types["AwsIamRole"]["Id"] == f"arn:aws:iam::{f['accountId']}:role/{role}"
    assert types["AwsIamAccessKey"]["Details"]["AwsIamAccessKey"]["AccessKeyId"] == f["resource"]["accessKeyDetails"]["accessKeyId"]
    ip = f["service"]["action"]["awsApiCallAction"]["remoteIpDetails"]
    assert set(ip.values()) <= set(doc["Network"].values())
    fields = doc["ProductFields"]
    assert len(fields) <= 50 and all(isinstance(v, str) and len(v) <= 2048 for v in fields.values())
    assert json.loads(fields["ec2-credential-detector/additionalInfo.remoteAddresses"]) == f["service"]["additionalInfo"]["remoteAddresses"]
    archived = copy.deepcopy(f)
    archived["service"]["archived"] = True
    assert asff.to_asff(parsed(archived), region="eu-west-1", product_account="1" * 12)["RecordState"] == "ARCHIVED"
    assert [asff.severity_label(s) for s in (2, 5, 8, 9.5)] == ["LOW", "MEDIUM", "HIGH", "CRITICAL"]
    assert asff.finding_types(IMDSV1)[0].startswith("Software and Configuration Checks/")


def condition(doc: dict[str, Any]) -> dict[str, Any]:
    stmt = containment.statement(parsed(doc))
    assert isinstance(stmt, dict), stmt
    assert (stmt["Effect"], stmt["Action"], stmt["Resource"]) == ("Deny", "*", "*")
    assert stmt["Sid"] == "DetectorContain" + doc["id"]
    arn = stmt["Condition"]["ArnLike"]["ec2:SourceInstanceARN"]
    assert arn == f"arn:aws:ec2:*:{doc['accountId']}:instance/{doc['resource']['instanceDetails']['instanceId']}"
    return {k: v for k, v in stmt["Condition"].items() if k != "ArnLike"}


def test_statements_per_finding_kind(findings: list[dict[str, Any]]) -> None:
    outside = of_type(findings, "OutsideAWS")
    addresses = outside["service"]["additionalInfo"]["remoteAddresses"]
    got = condition(outside)["IpAddress"]["aws:SourceIp"]
    assert set([got] if isinstance(got, str) else got) == set(addresses)
    by_endpoint = of_type(findings, "InsideAWS", "VPC_ENDPOINT")
    assert condition(by_endpoint) == {"StringEquals": {"aws:SourceVpce": by_endpoint["service"]["additionalInfo"]["vpcEndpointId"]}}
    by_address = of_type(findings, "InsideAWS", "AWS_ADDRESS")
    assert set(condition(by_address)["IpAddress"]["aws:SourceIp"]) == set(by_address["service"]["additionalInfo"]["remoteAddresses"])
    # part two (SPEC §11, §12): evidence named as the SPEC names it
    stopped = outside | {"type": AFTER_INSTANCE_STOPPED}
    stopped["service"] = copy.deepcopy(outside["service"])
    stopped["service"]["additionalInfo"].update(instanceState="stopped", stoppedAt="2026-11-09T09:05:00.250Z")
    assert condition(stopped) == {"DateLessThan": {"aws:TokenIssueTime": "2026-11-09T09:05:01Z"}}
    other = copy.deepcopy(outside) | {"type": OTHER_INSTANCE}
    other["service"]["additionalInfo"].update(otherInstanceId="i-0a1b2c3d4e5f60718", address="52.1.2.3")
    assert condition(other) == {"IpAddress": {"aws:SourceIp": "52.1.2.3"}}
    other["service"]["additionalInfo"].update(address="10.0.1.77", vpcEndpointId="vpce-0123456789abcdef0", vpc="vpc-1")
    assert condition(other) == {"IpAddress": {"aws:VpcSourceIp": "10.0.1.77"}}
    imds = copy.deepcopy(outside) | {"type": IMDSV1, "severity": 2}
    assert containment.statement(parsed(imds)) == containment.UNSUPPORTED_TYPE
    bare = copy.deepcopy(outside)
    bare["service"]["action"]["awsApiCallAction"].pop("remoteIpDetails")
    bare["service"]["additionalInfo"]["remoteAddresses"] = []
    assert containment.statement(parsed(bare)) == containment.NO_ADDRESS
    mapped = copy.deepcopy(bare)
    mapped["service"]["additionalInfo"]["remoteAddresses"] = ["::ffff:203.0.113.9"]
    assert condition(mapped) == {"IpAddress": {"aws:SourceIp": "203.0.113.9"}}
    assert INSIDE_AWS != OUTSIDE_AWS


def stmt(n: int, pad: int = 0) -> dict[str, Any]:
    return {"Sid": containment.sid(f"{n:032x}"), "Effect": "Deny", "Action": "*", "Resource": "*",
            "Condition": {"IpAddress": {"aws:SourceIp": ["198.51.100.1"] * (1 + pad)}}}  # fmt: skip


def test_merge_never_duplicates_and_rolls_the_oldest_off() -> None:
    first = containment.merge(None, [stmt(1), stmt(2)])
    assert first.added == [stmt(1)["Sid"], stmt(2)["Sid"]] and first.changed
    again = containment.merge(json.dumps(first.document), [stmt(2)])
    assert again.present == [stmt(2)["Sid"]] and not again.changed and again.document == first.document
    foreign = {"Sid": "HandWritten", "Effect": "Deny", "Action": "s3:*", "Resource": "*"}
    doc = containment.policy([foreign, *first.document["Statement"]])
    size = containment.policy_size(containment.policy([foreign, stmt(2), stmt(3)]))
    rolled = containment.merge(doc, [stmt(3)], budget=size)
    assert rolled.rolled_off == [stmt(1)["Sid"]] and rolled.added == [stmt(3)["Sid"]]
    assert rolled.document["Statement"] == [foreign, stmt(2), stmt(3)]
    assert containment.policy_size(rolled.document) <= size
    # a statement that cannot fit even alone is reported, never the hand-written one removed
    tiny = containment.merge(containment.policy([foreign]), [stmt(4, pad=50)], budget=200)
    assert tiny.too_large == [stmt(4)["Sid"]] and tiny.document["Statement"] == [foreign]
    assert containment.policy_size('{"a": [1, 2]}') == len('{"a":[1,2]}')


def test_settings_of_the_consumers() -> None:
    assert ExportSettings().group_id != RespondSettings().group_id
    s = RespondSettings(role_name_pattern="app-*")
    assert s.role_allowed("app-web") and not s.role_allowed("db-app-web")
    s = RespondSettings(role_name_pattern="^(web|etl)-node-role$")
    assert s.role_allowed("web-node-role") and not s.role_allowed("web-node-role2")
    assert RespondSettings().role_allowed("anything") and not RespondSettings().apply
    for bad in ({"assume_role_arn": "arn:aws:iam::{acct}:role/X"}, {"assume_role_arn": "not-an-arn"}):
        with pytest.raises(ValueError):
            ExportSettings(**bad)
    with pytest.raises(ValueError):
        RespondSettings(role_name_pattern="^(unclosed")
    with pytest.raises(ValueError):
        RespondSettings(policy_name="has space")


def test_rebase_trusts_our_own_recent_write_over_a_stale_read() -> None:
    """IAM read-after-write: GetRolePolicy just after PutRolePolicy may answer the older document."""
    foreign = {"Sid": "HandWritten", "Effect": "Deny", "Action": "s3:*", "Resource": "*"}
    stale = containment.policy([foreign, stmt(1)])  # what IAM still answers
    written = containment.policy([stmt(2), stmt(3)])  # what we put: 1 rolled off, 2 and 3 added
    base = containment.rebase(stale, written)
    assert base["Statement"] == [foreign, stmt(2), stmt(3)]
    merged = containment.merge(base, [stmt(3), stmt(4)])
    assert merged.present == [stmt(3)["Sid"]] and merged.added == [stmt(4)["Sid"]]
    assert containment.rebase(None, written)["Statement"] == [stmt(2), stmt(3)]
