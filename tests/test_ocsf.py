"""``--finding-format ocsf`` (SPEC §14): every finding an OCSF 1.3 Detection Finding, valid against the
OCSF 1.3.0 schema (tests/fixtures/ocsf-1.3.0) and py-ocsf-models, carrying the GuardDuty-shaped finding
under ``unmapped`` with the same ids and counts."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from ocsf_schema import assert_valid_ocsf, schema_errors
from test_replay import findings_of, summary_of
from worldgen import make_world, write_world

from detector.core.ocsf import severity_id, to_ocsf

INSIDE = "UnauthorizedAccess:IAMUser/InstanceCredentialExfiltration.InsideAWS"


def both_formats(run_detector: Any, *args: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    guardduty = run_detector("replay", *args)
    ocsf = run_detector("replay", "--finding-format", "ocsf", *args)
    assert summary_of(guardduty) == summary_of(ocsf)
    return findings_of(guardduty), findings_of(ocsf)


def check_same_findings(guardduty: list[dict[str, Any]], ocsf: list[dict[str, Any]]) -> None:
    assert guardduty and len(ocsf) == len(guardduty)
    for gd, event in zip(guardduty, ocsf, strict=True):
        assert_valid_ocsf(event)
        assert event["unmapped"] == gd
        assert event["finding_info"]["uid"] == gd["id"]
        assert event["finding_info"]["types"] == [gd["type"]]
        assert event["count"] == gd["service"]["count"]
        assert event["activity_id"] == 1 and event["type_uid"] == 200401  # a replay writes each group once
        assert event["cloud"]["account"]["uid"] == gd["accountId"]
        uids = {r["uid"] for r in event["resources"]}
        assert gd["resource"]["instanceDetails"]["instanceId"] in uids
        assert gd["resource"]["accessKeyDetails"]["accessKeyId"] in uids


def test_sample_world_as_ocsf(run_detector: Any, sample_world: Any) -> None:
    guardduty, ocsf = both_formats(run_detector, "--registry", sample_world.registry, *sample_world.inputs)
    check_same_findings(guardduty, ocsf)
    assert {e["severity"] for e in ocsf} == {"High", "Medium", "Low"}  # Low: SPEC §13 IMDSv1 findings


def test_generated_world_as_ocsf(run_detector: Any, tmp_path: Path) -> None:
    world = make_world(5, n_accounts=4)
    paths = write_world(world, tmp_path)
    guardduty, ocsf = both_formats(run_detector, "--registry", tmp_path / "registry.json", *paths)
    check_same_findings(guardduty, ocsf)
    assert len(ocsf) == len(world.expected)
    for event in ocsf:
        gd = event["unmapped"]
        action = gd["service"]["action"]["awsApiCallAction"]
        (evidence,) = event["evidences"]
        assert evidence["api"] == {"operation": action["api"], "service": {"name": action["serviceName"]}}
        ip = (action.get("remoteIpDetails") or {})
        assert evidence.get("src_endpoint", {}).get("ip") == (ip.get("ipAddressV4") or ip.get("ipAddressV6"))
        remote = (action.get("remoteAccountDetails") or {}).get("accountId")
        owner = evidence.get("src_endpoint", {}).get("owner", {}).get("account", {}).get("uid")
        assert owner == remote
        observed = {(o["type_id"], o["value"]) for o in event["observables"]}
        if owner:
            assert (99, owner) in observed
        if evidence.get("src_endpoint", {}).get("ip"):
            assert (2, evidence["src_endpoint"]["ip"]) in observed


def test_output_file_and_bad_format(run_detector: Any, sample_world: Any, tmp_path: Path) -> None:
    out = tmp_path / "findings.jsonl"
    proc = run_detector("replay", "--finding-format", "OCSF", "-o", out, "--registry", sample_world.registry, *sample_world.inputs)
    assert proc.returncode == 0
    lines = out.read_text().splitlines()
    assert lines and all(json.loads(line)["class_uid"] == 2004 for line in lines)
    proc = run_detector("replay", "--finding-format", "asff", sample_world.inputs[0])
    assert proc.returncode == 2 and b"'asff' is not one of 'guardduty', 'ocsf'" in proc.stderr


# --- the mapping, finding by finding --------------------------------------------------------------------


def guardduty_finding(**changes: Any) -> dict[str, Any]:
    finding: dict[str, Any] = {
        "schemaVersion": "2.0", "accountId": "111122223333", "region": "eu-west-1", "partition": "aws",
        "id": "0123456789abcdef0123456789abcdef", "type": INSIDE, "severity": 8,
        "title": "Credentials for instance role app used from a different AWS account.",
        "description": "Credentials created exclusively for EC2 instance i-0123456789abcdef0 ...",
        "resource": {
            "resourceType": "AccessKey",
            "accessKeyDetails": {"accessKeyId": "ASIAEXAMPLE", "principalId": "AROAEXAMPLE:i-0123456789abcdef0", "userName": "app", "userType": "AssumedRole"},
            "instanceDetails": {"instanceId": "i-0123456789abcdef0"},
        },
        "service": {
            "action": {"actionType": "AWS_API_CALL", "awsApiCallAction": {
                "api": "ListBuckets", "serviceName": "s3.amazonaws.com",
                "remoteIpDetails": {"ipAddressV6": "2600:1f18::1"},
                "remoteAccountDetails": {"accountId": "444455556666", "affiliated": False},
            }},
            "archived": False, "count": 3,
            "eventFirstSeen": "2026-11-20T10:00:00Z", "eventLastSeen": "2026-11-20T10:05:00Z",
            "additionalInfo": {"sessionArn": "arn:aws:sts::111122223333:assumed-role/app/i-0123456789abcdef0", "originKind": "AWS_ADDRESS"},
        },
        "createdAt": "2026-11-20T10:00:00.000Z", "updatedAt": "2026-11-20T10:05:00.250Z",
    }  # fmt: skip
    for path, value in changes.items():
        *parents, last = path.split("__")
        holder = finding
        for name in parents:
            holder = holder[name]
        if value is None:
            holder.pop(last, None)
        else:
            holder[last] = value
    return finding


@pytest.mark.parametrize(("severity", "expected"), [(2, (2, "Low")), (5, (3, "Medium")), (8, (4, "High")), (9.5, (5, "Critical")), (0.5, (1, "Informational"))])
def test_severity(severity: float, expected: tuple[int, str]) -> None:
    event = to_ocsf(guardduty_finding(severity=severity), new=True)
    assert (event["severity_id"], event["severity"]) == expected
    assert severity_id(severity) == expected[0]
    assert_valid_ocsf(event)


def test_activity_times_and_cloud() -> None:
    created, updated = to_ocsf(guardduty_finding(), new=True), to_ocsf(guardduty_finding(), new=False)
    assert (created["activity_id"], created["activity_name"], created["type_uid"]) == (1, "Create", 200401)
    assert (updated["activity_id"], updated["activity_name"], updated["type_uid"]) == (2, "Update", 200402)
    info = created["finding_info"]
    assert (info["first_seen_time"], info["last_seen_time"]) == (1795168800000, 1795169100000)
    assert created["time"] == info["modified_time"] == 1795169100250
    assert (created["status_id"], created["status"]) == (1, "New")
    assert created["cloud"] == {"provider": "AWS", "account": {"uid": "111122223333", "type_id": 10, "type": "AWS Account"}, "region": "eu-west-1"}
    assert created["metadata"]["product"]["name"] == "ec2-credential-detector" and created["metadata"]["version"] == "1.3.0"
    types = {r["type"]: r["uid"] for r in created["resources"]}
    assert types == {
        "AWS::EC2::Instance": "i-0123456789abcdef0",
        "AWS::IAM::Role": "arn:aws:iam::111122223333:role/app",
        "AWS::IAM::AccessKey": "ASIAEXAMPLE",
    }
    for event in (created, updated):
        assert_valid_ocsf(event)


def test_vpc_endpoint_evidence_and_unknown_remote_account() -> None:
    finding = guardduty_finding(
        service__action__awsApiCallAction__remoteAccountDetails={"affiliated": False},
        service__action__awsApiCallAction__remoteIpDetails={"ipAddressV4": "10.1.2.3"},
    )
    finding["service"]["additionalInfo"]["vpcEndpointId"] = "vpce-0123456789abcdef0"
    event = to_ocsf(finding, new=True)
    assert_valid_ocsf(event)
    (evidence,) = event["evidences"]
    assert evidence["src_endpoint"] == {"ip": "10.1.2.3", "uid": "vpce-0123456789abcdef0", "type": "VPC Endpoint", "type_id": 99}
    assert evidence["data"]["remoteAccountAffiliated"] is False
    assert {o["value"] for o in event["observables"]} >= {"10.1.2.3", "vpce-0123456789abcdef0"}


def test_other_finding_types_render_generically() -> None:
    """Types the engine may add (SPEC part two): no remote details, new additionalInfo fields, severity 2."""
    finding = guardduty_finding(
        type="Policy:EC2/InstanceCredentialsDeliveredByIMDSv1", severity=2,
        service__action__awsApiCallAction__remoteAccountDetails=None,
        service__action__awsApiCallAction__remoteIpDetails=None,
    )  # fmt: skip
    finding["service"]["additionalInfo"] |= {"apiCalls": [{"api": "GetObject", "count": 2}], "errorCodes": {"AccessDenied": 1}}
    event = to_ocsf(finding, new=False)
    assert_valid_ocsf(event)
    assert (event["severity_id"], event["severity"]) == (2, "Low")
    assert event["finding_info"]["types"] == ["Policy:EC2/InstanceCredentialsDeliveredByIMDSv1"]
    assert "src_endpoint" not in event["evidences"][0]
    assert event["unmapped"]["service"]["additionalInfo"]["errorCodes"] == {"AccessDenied": 1}


def test_the_schema_check_can_fail() -> None:
    event = to_ocsf(guardduty_finding(), new=True)
    for mutate, expected in (
        (lambda e: e.update(severity_id=7), "severity_id"),
        (lambda e: e.update(activity_id=5), "activity_id"),
        (lambda e: e["finding_info"].pop("uid"), "'uid' is a required property"),
        (lambda e: e["evidences"][0]["src_endpoint"].update(address="1.2.3.4"), "'address' was unexpected"),
        (lambda e: e["evidences"][0]["src_endpoint"].update(ip="not-an-ip"), "not an IP address"),
        (lambda e: e.update(time="yesterday"), "time"),
        (lambda e: e["cloud"].pop("provider"), "'provider' is a required property"),
    ):
        bad = copy.deepcopy(event)
        mutate(bad)
        assert any(expected in error for error in schema_errors(bad)), (expected, schema_errors(bad))


def test_findings_doc_ocsf_example_is_real_replay_output(run_detector: Any) -> None:
    import re

    text = (Path(__file__).resolve().parents[1] / "docs" / "findings.md").read_text()
    blocks = [json.loads(b) for b in re.findall(r"^```json\n(.*?)^```", text, re.S | re.M)]
    examples = [b for b in blocks if isinstance(b, dict) and b.get("class_uid") == 2004]
    assert len(examples) == 1
    invictus = Path(__file__).parent / "fixtures" / "invictus-aws" / "CloudTrail"
    real = findings_of(run_detector("replay", "--no-imdsv1-findings", "--finding-format", "ocsf", invictus))
    assert examples == real
    assert_valid_ocsf(examples[0])
