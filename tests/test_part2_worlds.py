"""SPEC part two (§10-§13) on generated worlds: ``detector replay`` must give exactly the findings the
generator's labels say — use after stop, other instance, IMDSv1, trust-on-first-use resets, the identity
role, other ``aws:`` roles, state-change notifications, bare records — with their evidence, at the
default and at other ``stop_grace_seconds``. The labels never come from the engine (tests/worldgen.py)."""

from __future__ import annotations

import gzip
import json
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from kafka_support import broker  # noqa: F401 - fixture
from test_replay import assert_unique, findings_of, summary_of
from worldgen import (
    AFTER_STOPPED,
    IMDSV1,
    OTHER_INSTANCE,
    PART2_KINDS,
    STATE_CHANGE,
    World,
    finding_group_key,
    make_world,
    summarize,
    write_world,
)


def replay_world(run_detector: Any, world: World, directory: Path, *flags: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    paths = write_world(world, directory)
    proc = run_detector("replay", "--registry", directory / "registry.json", *flags, *paths)
    findings = findings_of(proc)
    assert_unique(findings)
    return findings, summary_of(proc)


def assert_groups_match(world: World, findings: list[dict[str, Any]]) -> None:
    """Each finding's times, evidence, apiCalls and errorCodes are those of its labelled group."""
    groups = {world.group_key(g): g for g in world.groups}
    assert len(groups) == len(world.groups), "two expected groups share a key"
    for f in findings:
        group = groups[finding_group_key(f)]
        info = f["service"]["additionalInfo"]
        where = (group.type, group.session_arn, dict(group.kinds))
        assert (f["service"]["eventFirstSeen"], f["service"]["eventLastSeen"]) == (group.first_seen, group.last_seen), where
        assert {k: info.get(k) for k in group.evidence} == group.evidence, where
        api_calls = {(c["eventSource"], c["eventName"]): c["count"] for c in info["apiCalls"]}
        assert api_calls == dict(group.api_calls), where
        assert info["errorCodes"] == dict(group.error_codes), where
        if group.type == OTHER_INSTANCE:
            owner = next(a for a in world.accounts.values() if group.other_instance_id in a.instances)
            assert info["otherInstanceAccountId"] == owner.account_id, where


@pytest.mark.parametrize("seed", [100, 101, 102, 103])
def test_part_two_world_replays_to_its_labels(run_detector: Any, tmp_path: Path, seed: int) -> None:
    world = make_world(seed, n_accounts=3 + seed % 2, instances_per_account=3 + seed % 3 // 2)
    findings, summary = replay_world(run_detector, world, tmp_path)
    assert summarize(findings) == world.expected
    assert_groups_match(world, findings)
    assert summary["records"] == len(world.records_in_order) + world.state_changes  # state changes are input (§10)
    assert summary["instance_records"] == world.instance_records
    assert summary["malformed"] == world.malformed
    assert summary["skipped"] == world.skipped
    assert summary["findings"] == len(world.expected)
    types = Counter(e["type"] for e in world.expected)
    assert types[AFTER_STOPPED] >= 10 and types[OTHER_INSTANCE] >= 10 and types[IMDSV1] >= 10


@pytest.mark.parametrize("grace", [0, 45, 1800])
def test_other_stop_grace_seconds(run_detector: Any, tmp_path: Path, grace: int) -> None:
    """Worlds labelled for another grace replay to their labels with it, and not with the default."""
    world = make_world(7 + grace, stop_grace_seconds=grace, settle_seconds=0)  # records just past stop + grace
    findings, _ = replay_world(run_detector, world, tmp_path / "a", "--stop-grace-seconds", str(grace))
    assert summarize(findings) == world.expected
    assert_groups_match(world, findings)
    default, _ = replay_world(run_detector, world, tmp_path / "b")
    assert summarize(default) != world.expected  # the grace decides some of them: this test can fail


def test_imdsv1_findings_off(run_detector: Any, tmp_path: Path) -> None:
    world = make_world(31, imdsv1_findings=False)
    assert not any(e["type"] == IMDSV1 for e in world.expected)
    findings, _ = replay_world(run_detector, world, tmp_path, "--no-imdsv1-findings")
    assert summarize(findings) == world.expected


def test_part_one_worlds_still_replay_to_their_labels(run_detector: Any, tmp_path: Path) -> None:
    """``part2=False`` worlds carry no part-two case; their IMDSv1 sessions are left out by the flag."""
    world = make_world(32, part2=False)
    assert not any(world.kinds[k] for k in PART2_KINDS if k != "imdsv1")
    findings, _ = replay_world(run_detector, world, tmp_path, "--no-imdsv1-findings")
    assert summarize(findings) == world.expected


def test_world_as_kafka_messages_from_stdin(run_detector: Any, tmp_path: Path) -> None:
    world = make_world(33)
    (tmp_path / "registry.json").write_text(json.dumps(world.registry))
    stream = gzip.compress(b"".join(m + b"\n" for m in world.messages()))
    proc = run_detector("replay", "--registry", tmp_path / "registry.json", "-", stdin=stream)
    assert summarize(findings_of(proc)) == world.expected


def test_duplicate_deliveries_of_signals_change_nothing(run_detector: Any, tmp_path: Path) -> None:
    """A StopInstances, StartInstances, AssociateAddress or BidEvictedEvent delivered twice is one event:
    its later copy (same eventID, as CloudTrail's duplicates) neither counts nor stops, starts or resets."""
    world = make_world(34, duplicate_signals=True)
    assert world.kinds["duplicate_signal"] >= 30
    findings, _ = replay_world(run_detector, world, tmp_path)
    assert summarize(findings) == world.expected


# --- the generator itself (no engine) ------------------------------------------------------------------


@pytest.mark.parametrize(("seed", "accounts", "instances"), [(0, 2, 2), (1, 3, 4), (2, 5, 3)])
def test_every_part_two_case_appears_several_times(seed: int, accounts: int, instances: int) -> None:
    world = make_world(seed, n_accounts=accounts, instances_per_account=instances)
    missing = {k: world.kinds[k] for k in PART2_KINDS if world.kinds[k] < 3}
    assert not missing
    types = {g["type"] for g in world.expected}
    assert {AFTER_STOPPED, OTHER_INSTANCE, IMDSV1} <= types
    registry = world.registry["accounts"]
    assert any(isinstance(a.get("vpc_endpoints"), dict) for a in registry.values())
    assert any(isinstance(a.get("vpc_endpoints"), list) for a in registry.values())
    instances_listed = [i for a in registry.values() for i in a.get("instances", {}).values()]
    assert any(i["egress"] for i in instances_listed) and any(not i["egress"] for i in instances_listed)


def json_or_none(line: bytes) -> Any:
    try:
        return json.loads(line)
    except ValueError:
        return None  # a malformed line


def test_part_two_cases_come_in_every_input_shape() -> None:
    """Bare records in each shape; state-change notifications in EventBridge files, which split the files
    of other shapes (every file holds one shape, as a bridge that repackages records expects)."""
    world = make_world(11)
    bare_in: set[str] = set()
    state_changes_in: set[str] = set()
    for name, data in world.inputs:
        shape = name.split("-", 1)[1]
        if name.endswith(".gz"):
            values = json.loads(gzip.decompress(data))["Records"]
        else:
            values = [json_or_none(line) for line in data.splitlines()]
        for value in values:
            if not isinstance(value, dict):
                continue
            if value.get("detail-type") == STATE_CHANGE:
                state_changes_in.add(shape)
            assert not (shape == "records.jsonl" and "detail-type" in value), name  # records files: records only
            record = value.get("detail", value)
            if isinstance(record, dict) and "userIdentity" in record and "eventTime" in record and "eventVersion" not in record:
                bare_in.add(shape)
    assert bare_in == {"eventbridge.jsonl", "cloudtrail.json.gz", "records.jsonl"}
    assert state_changes_in == {"eventbridge.jsonl"}  # one shape per file: other files split around them
    assert {name.split("-", 1)[1] for name, _ in world.inputs if "." in name.split("-", 1)[0]} >= {"eventbridge.jsonl", "cloudtrail.json.gz"}
    names = [name for name, _ in world.inputs]
    assert names == sorted(names)


def seconds(iso: str) -> float:
    return datetime.strptime(iso, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc).timestamp()


def test_after_stop_labels_follow_the_timeline() -> None:
    """Every AfterInstanceStopped record is later than stop + grace; a group's first and last records
    are in it; an out-of-order arrival exists among part-two records."""
    for grace in (600, 60):
        world = make_world(12, stop_grace_seconds=grace)
        for group in world.groups:
            if group.type == AFTER_STOPPED:
                assert seconds(group.first_seen) > seconds(group.evidence["stoppedAt"]) + grace, group
        times = [r["eventTime"] for r, k in zip(world.records_in_order, world.record_kinds, strict=True) if k in PART2_KINDS]
        assert any(later < earlier for earlier, later in zip(times, times[1:], strict=False))


# --- the service ------------------------------------------------------------------------------------


@pytest.mark.kafka
async def test_service_with_another_grace_equals_the_labels(broker: Any, tmp_path: Path) -> None:
    """The service, fed a part-two world unkeyed (lifecycle signals, state changes and records of one
    instance land on different input partitions), with ``stop_grace_seconds`` set: its findings topic
    holds exactly the labelled groups."""
    from test_state import world_findings

    world = make_world(44, stop_grace_seconds=120)
    latest = await world_findings(1, world, broker, tmp_path, stop_grace_seconds=120)
    assert summarize(latest) == world.expected
    assert_groups_match(world, latest)
