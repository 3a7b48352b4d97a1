"""``detector replay`` end to end through the real command line (SPEC §2, §9): the public sample world,
the real Invictus dataset, generated worlds, input handling and malformed input."""

from __future__ import annotations

import gzip
import json
import random
import shutil
from pathlib import Path
from typing import Any

import pytest
from worldgen import ATTACK_KINDS, LEGIT_KINDS, finding_group_key, make_world, sort_expected, summarize, write_world

from detector.core.addresses import is_global, parse_address

OUTSIDE = "UnauthorizedAccess:IAMUser/InstanceCredentialExfiltration.OutsideAWS"
IMDSV1 = "Policy:EC2/InstanceCredentialsDeliveredByIMDSv1"


def findings_of(proc: Any) -> list[dict[str, Any]]:
    assert proc.returncode == 0, proc.stderr.decode()
    assert b"Traceback" not in proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]


def summary_of(proc: Any) -> dict[str, Any]:
    """The replay summary: the JSON object with a ``summary`` key that replay writes to stderr."""
    for line in reversed(proc.stderr.decode().splitlines()):
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict) and "summary" in value:
            return value["summary"]
    raise AssertionError(f"no summary on stderr: {proc.stderr[-2000:]!r}")


def assert_unique(findings: list[dict[str, Any]]) -> None:
    ids = [f["id"] for f in findings]
    assert len(ids) == len(set(ids)), "a finding group was written twice"


# --- the public sample world and the Invictus dataset -------------------------------------------------


def test_sample_world_replays_to_expected(run_detector: Any, sample_world: Any) -> None:
    """SPEC part one's answer (expected.json): part two's IMDSv1 findings turned off."""
    proc = run_detector("replay", "--no-imdsv1-findings", "--registry", sample_world.registry, *sample_world.inputs)
    findings = findings_of(proc)
    assert_unique(findings)
    expected = sort_expected(json.loads(sample_world.expected.read_text()))
    assert summarize(findings) == expected
    summary = summary_of(proc)
    assert summary["findings"] == len(expected)
    assert summary["malformed"] >= 1  # the sample world mixes in malformed lines; they are counted, not fatal
    assert summary["records"] > summary["instance_records"] > 0


def test_sample_world_directory_replays_in_sorted_order(run_detector: Any, sample_world: Any, tmp_path: Path) -> None:
    listed = [Path(p).name for p in sample_world.inputs]
    assert listed == sorted(listed)  # files.txt is the sorted order
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for path in sample_world.inputs:
        shutil.copy(path, inputs)
    (inputs / "README.md").write_text("not an input")
    findings = findings_of(run_detector("replay", "--registry", sample_world.registry, inputs))
    assert summarize(findings) == sort_expected(json.loads(sample_world.expected_part2.read_text()))


def test_sample_world_replays_to_expected_part2_by_default(run_detector: Any, sample_world: Any) -> None:
    """SPEC part two with its defaults: the 8 groups of part one plus the 5 IMDSv1 sessions (§13)."""
    proc = run_detector("replay", "--registry", sample_world.registry, *sample_world.inputs)
    findings = findings_of(proc)
    assert_unique(findings)
    expected = sort_expected(json.loads(sample_world.expected_part2.read_text()))
    assert summarize(findings) == expected
    assert sum(f["type"] == IMDSV1 for f in findings) == 5
    for finding in findings:  # SPEC §13: what was done with the credentials, on every finding
        info = finding["service"]["additionalInfo"]
        assert sum(call["count"] for call in info["apiCalls"]) == finding["service"]["count"]
        assert isinstance(info["errorCodes"], dict)
    assert summary_of(proc)["findings"] == len(expected)


def test_invictus_dataset_has_exactly_the_one_stolen_credential(run_detector: Any, invictus_dir: Path) -> None:
    """The OutsideAWS finding, plus (SPEC §13) the IMDSv1 finding the stolen session earned."""
    proc = run_detector("replay", invictus_dir)
    findings = findings_of(proc)
    assert len(findings) == 2
    (imdsv1,) = [f for f in findings if f["type"] == IMDSV1]
    assert imdsv1["severity"] == 2 and imdsv1["service"]["count"] == 2
    assert imdsv1["resource"]["instanceDetails"]["instanceId"] == "i-0dbc91f429e48eeed"
    (finding,) = [f for f in findings if f["type"] != IMDSV1]
    assert finding["type"] == OUTSIDE
    assert finding["severity"] == 8
    assert finding["resource"]["instanceDetails"]["instanceId"] == "i-0dbc91f429e48eeed"
    assert finding["service"]["count"] == 2
    summary = summary_of(proc)
    assert (summary["findings"], summary["malformed"]) == (2, 0)


# --- generated worlds -----------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4, 5])
def test_generated_world_replays_to_its_labels(run_detector: Any, tmp_path: Path, seed: int) -> None:
    world = make_world(seed, n_accounts=3 + seed % 3, instances_per_account=3 + seed % 2)
    paths = write_world(world, tmp_path / "world")
    if seed % 2:  # as a directory (its file names sort in arrival order) ...
        inputs = tmp_path / "inputs"
        inputs.mkdir()
        for path in paths:
            shutil.copy(path, inputs)
        args: list[Any] = [inputs]
    else:  # ... or as files in the order given
        args = paths
    proc = run_detector("replay", "--registry", tmp_path / "world" / "registry.json", *args)
    findings = findings_of(proc)
    assert_unique(findings)
    assert summarize(findings) == world.expected
    # Times too: earliest and latest eventTime of each group.
    times = {finding_group_key(f): (f["service"]["eventFirstSeen"], f["service"]["eventLastSeen"]) for f in findings}
    for group in world.groups:
        assert times[world.group_key(group)] == (group.first_seen, group.last_seen)
    summary = summary_of(proc)
    assert summary["records"] == len(world.records_in_order) + world.state_changes  # state changes are input (§10)
    assert summary["instance_records"] == world.instance_records
    assert summary["malformed"] == world.malformed
    assert summary["skipped"] == world.skipped
    assert summary["findings"] == len(world.expected)
    assert world.session_tokens and not any(t.encode() in proc.stdout for t in world.session_tokens)


def test_generated_world_exercises_every_row_several_times() -> None:
    world = make_world(11)
    for kind in (*LEGIT_KINDS, *ATTACK_KINDS):
        assert world.kinds[kind] >= 3, kind
    for kind in ("issuance", "tofu_first_v4", "tofu_first_v6", "noise", "duplicate", "malformed", "skipped"):
        assert world.kinds[kind] >= 1, kind
    severities = {(g["type"].split(".")[-1].split("/")[-1], g["severity"], g["remoteAccountId"] is None) for g in world.expected}
    assert severities == {
        ("InsideAWS", 5, False), ("InsideAWS", 8, False), ("InsideAWS", 8, True), ("OutsideAWS", 8, True),
        ("AfterInstanceStopped", 8, True), ("OtherInstance", 8, True), ("InstanceCredentialsDeliveredByIMDSv1", 2, True),
    }  # fmt: skip
    registry = world.registry["accounts"]
    assert any(a.get("trusted") for a in registry.values())
    assert any(a.get("affiliated") is False for a in registry.values())
    assert any(a.get("cidrs") for a in registry.values()) and any(not a.get("cidrs") for a in registry.values())
    assert any("accounts" not in n for n in world.registry["expected_networks"])
    assert any("accounts" in n for n in world.registry["expected_networks"])
    shapes = {name.split("-", 1)[1] for name, _ in world.inputs}
    assert shapes == {"eventbridge.jsonl", "cloudtrail.json.gz", "records.jsonl"}
    assert len(world.records_in_order) == len(world.record_kinds)


def test_generated_addresses_are_what_their_kind_says(aws_ranges: Any) -> None:
    """AWS addresses come from the packaged ranges; outside ones are global and outside them."""
    world = make_world(12)
    checked = 0
    for record, kind in zip(world.records_in_order, world.record_kinds, strict=True):
        parsed = parse_address(record["sourceIPAddress"]) if isinstance(record.get("sourceIPAddress"), str) else None
        if kind.startswith(("aws_", "tofu_")) or kind in ("cidr_home_v4", "cidr_hub_v4", "cidr_affiliated_v4"):
            assert parsed is not None and aws_ranges.lookup(*parsed) is not None, (kind, record["sourceIPAddress"])
            checked += 1
        elif kind.startswith(("outside_", "expected_other")) or kind == "service_invoked_by":
            assert parsed is not None and aws_ranges.lookup(*parsed) is None and is_global(*parsed), kind
            checked += 1
        elif kind.startswith("private_"):
            assert parsed is not None and aws_ranges.lookup(*parsed) is None and not is_global(*parsed), kind
            checked += 1
    assert checked > 50


def test_generated_worlds_are_reproducible() -> None:
    a, b, c = make_world(3), make_world(3), make_world(4)
    assert a.inputs == b.inputs and a.expected == b.expected and a.registry == b.registry
    assert a.inputs != c.inputs


def test_world_messages_carry_the_same_records(run_detector: Any, tmp_path: Path) -> None:
    """One message per line / log file, as a Kafka topic would hold them; replayed from stdin, gzipped."""
    world = make_world(21)
    (tmp_path / "registry.json").write_text(json.dumps(world.registry))
    stream = b"".join(m + b"\n" for m in world.messages())
    for data in (stream, gzip.compress(stream)):
        proc = run_detector("replay", "--registry", tmp_path / "registry.json", "-", stdin=data)
        assert summarize(findings_of(proc)) == world.expected
        assert summary_of(proc)["malformed"] == world.malformed


# --- input handling --------------------------------------------------------------------------------------

NOINV = "555566667777"


def tofu_record(source: str, minute: int) -> bytes:
    arn = f"arn:aws:sts::{NOINV}:assumed-role/dev-role/i-0123456789abcdef0"
    return json.dumps(
        {
            "eventVersion": "1.08",
            "userIdentity": {"type": "AssumedRole", "arn": arn, "accountId": NOINV},
            "eventTime": f"2026-11-09T08:{minute:02d}:00Z",
            "eventSource": "s3.amazonaws.com",
            "eventName": "ListBuckets",
            "awsRegion": "us-east-1",
            "sourceIPAddress": source,
            "eventID": f"id-{source}-{minute}",
        }
    ).encode() + b"\n"


def test_directory_is_expanded_in_sorted_path_order_and_only_input_files(run_detector: Any, tmp_path: Path) -> None:
    # Trust on first use makes order visible: the address seen first is learnt, the other is flagged.
    first, second, third = "3.5.140.1", "52.94.76.1", "54.239.28.85"  # AWS addresses, owner unknown
    root = tmp_path / "logs"
    (root / "b").mkdir(parents=True)
    (root / "10.jsonl").write_bytes(tofu_record(first, 0))  # "10.jsonl" sorts before "2.jsonl"
    (root / "2.jsonl").write_bytes(tofu_record(second, 1))
    (root / "b" / "c.json.gz").write_bytes(gzip.compress(json.dumps({"Records": [json.loads(tofu_record(third, 2))]}).encode()))
    (root / "notes.txt").write_bytes(tofu_record("8.8.8.8", 3))  # not an input file: ignored
    (root / "z.csv").write_bytes(b"a,b\n")
    proc = run_detector("replay", root)
    (finding,) = findings_of(proc)
    info = finding["service"]["additionalInfo"]
    assert info["baseline"]["firstUseIpv4"] == first
    assert info["remoteAddresses"] == [second, third]
    assert finding["service"]["count"] == 2
    assert summary_of(proc)["inputs"] == 3


def test_inputs_are_read_in_the_order_given(run_detector: Any, tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_bytes(tofu_record("3.5.140.1", 0))
    (tmp_path / "b.jsonl").write_bytes(tofu_record("52.94.76.1", 1))
    (finding,) = findings_of(run_detector("replay", tmp_path / "b.jsonl", tmp_path / "a.jsonl"))
    assert finding["service"]["additionalInfo"]["baseline"]["firstUseIpv4"] == "52.94.76.1"


def test_gzipped_inputs_of_every_shape(run_detector: Any, tmp_path: Path) -> None:
    world = make_world(5)
    (tmp_path / "registry.json").write_text(json.dumps(world.registry))
    paths = []
    for name, data in world.inputs:
        if name.endswith(".gz"):
            path = tmp_path / name  # already a gzipped CloudTrail log file
        elif len(paths) % 2:
            path = tmp_path / (name + ".gz")
            data = gzip.compress(data)
        else:
            path = tmp_path / name.replace(".jsonl", ".json")  # JSON Lines in a .json file
        path.write_bytes(data)
        paths.append(path)
    proc = run_detector("replay", "--registry", tmp_path / "registry.json", *paths)
    assert summarize(findings_of(proc)) == world.expected


def test_output_file(run_detector: Any, invictus_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "findings.jsonl"
    proc = run_detector("replay", "--no-imdsv1-findings", "--output", out, invictus_dir)
    assert proc.returncode == 0 and proc.stdout == b""
    assert [json.loads(line)["resource"]["instanceDetails"]["instanceId"] for line in out.read_text().splitlines()] == [
        "i-0dbc91f429e48eeed"
    ]


def test_missing_file_is_a_clear_error(run_detector: Any, tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "trail.jsonl"
    proc = run_detector("replay", missing)
    assert proc.returncode != 0
    stderr = proc.stderr.decode()
    assert str(missing) in stderr and "no such file" in stderr.lower()
    assert "Traceback" not in stderr and proc.stdout == b""


def test_corrupt_gzip_is_a_clear_error(run_detector: Any, tmp_path: Path) -> None:
    body = bytearray(gzip.compress(b'{"Records": []}\n' * 5000))
    for i in range(20, 40):
        body[i] ^= 0xFF
    path = tmp_path / "broken.jsonl.gz"
    path.write_bytes(bytes(body))
    proc = run_detector("replay", path)
    assert proc.returncode != 0
    stderr = proc.stderr.decode()
    assert str(path) in stderr and "Traceback" not in stderr


@pytest.mark.parametrize(
    ("registry", "key", "problem"),
    [
        ({"accounts": {"111122223333": {"cidrs": ["10.0.0.300/32"]}}}, "accounts.111122223333.cidrs[0]", "CIDR"),
        ({"accounts": {"1111": {}}}, "accounts.1111", "12 digits"),
        ({"accounts": {"111122223333": {"afiliated": True}}}, "accounts.111122223333.afiliated", "unknown field"),
    ],
)
def test_bad_registry_is_a_clear_error(run_detector: Any, tmp_path: Path, registry: Any, key: str, problem: str) -> None:
    path = tmp_path / "registry.json"
    path.write_text(json.dumps(registry))
    proc = run_detector("replay", "--registry", path, "tests/fixtures/invictus-aws/CloudTrail")
    assert proc.returncode != 0
    stderr = proc.stderr.decode()
    assert str(path) in stderr and key in stderr and problem in stderr
    assert "Traceback" not in stderr and proc.stdout == b""


# --- malformed input is counted, never fatal -------------------------------------------------------------


def malformed_lines(n: int, seed: int = 1234) -> list[bytes]:
    """``n`` lines that are each exactly one malformed input."""
    rng = random.Random(seed)
    arn = "arn:aws:sts::111122223333:assumed-role/web-role/i-0123456789abcdef0"
    instance = {"eventVersion": "1.08", "userIdentity": {"type": "AssumedRole", "arn": arn}}
    makers = [
        lambda: b"\xff" + bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200))).replace(b"\n", b" "),
        lambda: json.dumps(rng.choice([1, -2.5, "text", None, True, [], [1, {"a": 2}]])).encode(),
        lambda: b'{"Records": ' + rng.choice([b"{}", b'"x"', b"5", b"null"]) + b"}",
        lambda: b'{"detail-type": "AWS API Call via CloudTrail", "detail": ' + rng.choice([b'"x"', b"[1]", b"null", b"7"]) + b"}",
        lambda: b'{"detail-type": ' + rng.choice([b"[1]", b"{}", b"5", b"null"]) + b', "detail": {}}',
        lambda: b'{"eventVersion": "1.08", "userIdentity": ' + rng.choice([b"[]", b'"u"', b"3"]) + b"}",
        lambda: json.dumps({**instance, "eventTime": rng.choice([5, None, "soon", [1]]), "sourceIPAddress": "8.8.8.8"}).encode(),
        lambda: json.dumps({**instance, "eventTime": "2026-11-09T08:00:00Z", "sourceIPAddress": rng.choice([5, {}, "host", ""])}).encode(),
        lambda: b'{"eventVersion": "1.08", "userIdentity": {"type": "IAMUser"',  # truncated
        lambda: b'{"unrelated": "object"}',
    ]
    lines = [rng.choice(makers)() for _ in range(n - 40)]
    for i in range(10):  # deep nesting: 100k levels
        lines.append(b"[" * 100_000 + b"]" * 100_000 if i % 2 else b'{"a":' * 100_000 + b"1" + b"}" * 100_000)
    for i in range(30):  # 300 KB strings
        big = "A" * 300_000
        lines.append(
            [
                json.dumps(big).encode(),
                json.dumps({"blob": big}).encode(),
                json.dumps({**instance, "eventTime": "2026-11-09T08:00:00Z", "sourceIPAddress": big}).encode(),
            ][i % 3]
        )
    rng.shuffle(lines)
    return lines


def test_three_thousand_malformed_lines_are_counted_not_fatal(run_detector: Any, tmp_path: Path) -> None:
    lines = malformed_lines(3000)
    assert len(lines) == 3000 and not any(b"\n" in line for line in lines)
    attack = json.dumps(
        {
            "eventVersion": "1.08",
            "userIdentity": {"type": "AssumedRole", "arn": "arn:aws:sts::111122223333:assumed-role/r/i-01234567"},
            "eventTime": "2026-11-09T08:00:00Z",
            "sourceIPAddress": "8.8.8.8",
            "eventID": "only-good-line",
        }
    ).encode()
    lines.insert(1500, attack)
    path = tmp_path / "junk.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    proc = run_detector("replay", path)
    findings = findings_of(proc)  # exit 0, no traceback
    assert [f["resource"]["instanceDetails"]["instanceId"] for f in findings] == ["i-01234567"]
    summary = summary_of(proc)
    assert summary["malformed"] == 3000
    assert sum(summary["malformed_reasons"].values()) == 3000
    assert summary["findings"] == 1
