"""``detector registry sync`` against a real moto server: organization, assumed roles, inventory, overlay,
atomic output, partial and total failure."""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from aws_helpers import (
    REGION,
    ROLE_NAME,
    ROOT_KEYS,
    Member,
    MotoServer,
    Org,
    build_org,
    cli_env,
    grant_inventory_read,
    create_user,
)

from detector.aws import SyncError, SyncOptions, merge_registry, sync_registry, write_registry
from detector.aws.merge import normalise_registry
from detector.core.registry import RegistryError
from detector.registry import load_registry

pytestmark = pytest.mark.aws

REPO = Path(__file__).resolve().parents[1]


def canonical(cidr: str) -> str:
    return str(ipaddress.ip_network(cidr))


def run_sync(server: MotoServer, keys: dict[str, str], output: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "detector", "registry", "sync", "--endpoint-url", server.url,
         "--role-name", ROLE_NAME, "--regions", REGION, "--output", str(output), *extra],
        env=cli_env(keys), cwd=REPO, capture_output=True, text=True, timeout=60,
    )


@pytest.fixture(scope="module")
def world() -> tuple[MotoServer, Org]:
    """A permissive moto: three accounts (management + two members with networks), a GuardDuty detector."""
    server = MotoServer()
    try:
        org = build_org(server)
        server.client("guardduty").create_detector(Enable=True)  # moto has no ListMembers: the warning path
        yield server, org
    finally:
        server.stop()


@pytest.fixture(scope="module")
def strict_world() -> tuple[MotoServer, Org, dict[str, dict[str, str]]]:
    """A moto enforcing IAM: only member-a's role may be assumed by the ``syncer`` user."""
    server = MotoServer()
    try:
        org = build_org(server)
        a, b = org.members["member-a"].account_id, org.members["member-b"].account_id
        for account_id in (a, b):
            grant_inventory_read(server, account_id)
        everything_but_assume = [
            {"Effect": "Allow", "Action": ["organizations:*", "ec2:Describe*", "guardduty:*"], "Resource": "*"},
        ]
        users = {
            "syncer": create_user(server, "syncer", {"Version": "2012-10-17", "Statement": everything_but_assume + [
                {"Effect": "Allow", "Action": "sts:AssumeRole", "Resource": f"arn:aws:iam::{a}:role/{ROLE_NAME}"},
            ]}),
            "org-only": create_user(server, "org-only", {"Version": "2012-10-17", "Statement": [
                {"Effect": "Allow", "Action": "organizations:*", "Resource": "*"},
            ]}),
            "nobody": create_user(server, "nobody", None),
        }
        server.enforce_iam()
        yield server, org, users
    finally:
        server.stop()


def test_sync_lists_every_account_with_its_inventory(world: tuple[MotoServer, Org], tmp_path: Path) -> None:
    server, org = world
    output = tmp_path / "registry.json"
    result = run_sync(server, ROOT_KEYS, output)
    assert result.returncode == 0, result.stderr

    registry = load_registry(output)
    expected = {org.management} | {m.account_id for m in org.members.values()}
    assert set(registry.accounts) == expected
    assert all(registry.is_affiliated(a) for a in expected)
    for member in org.members.values():
        entry = registry.accounts[member.account_id]
        assert entry.name == member.name
        assert {f"{ip}/32" for ip in member.eips} <= set(entry.cidrs)
        assert {canonical(c) for c in member.ipv6} <= set(entry.cidrs)
        assert set(member.vpc_endpoints) == set(entry.vpc_endpoints)
        assert registry.has_inventory(member.account_id)
        others = [m for m in org.members.values() if m is not member]
        assert not {f"{ip}/32" for m in others for ip in m.eips} & set(entry.cidrs), "inventory crossed accounts"
    assert registry.accounts[org.management].vpc_endpoints == ()

    # deterministic JSON: sorted keys, indented, and what `registry check` accepts
    text = output.read_text()
    data = json.loads(text)
    assert text == json.dumps(data, indent=2, sort_keys=True) + "\n"
    assert data["expected_networks"] == []

    lines = result.stderr.splitlines()
    assert sum(1 for line in lines if "[" in line and "/3]" in line) == 3, result.stderr
    assert any("WARNING" in line and "GuardDuty" in line for line in lines), result.stderr
    assert "wrote" in lines[-1]


def test_overlay_decisions_survive_the_sync(world: tuple[MotoServer, Org], tmp_path: Path) -> None:
    server, org = world
    a, b = org.members["member-a"], org.members["member-b"]
    overlay = tmp_path / "overlay.toml"
    overlay.write_text(
        f"""
[accounts."{a.account_id}"]
name = "prod (human)"
trusted = true
cidrs = ["198.51.100.7/32", "{a.eips[0]}/32"]
vpc_endpoints = ["vpce-0123456789abcdef0"]

[accounts."{b.account_id}"]
affiliated = false

[accounts."999999999999"]
name = "partner hub"
trusted = true

[[expected_networks]]
cidr = "203.0.113.0/24"
name = "on-prem egress"
accounts = ["{a.account_id}"]
"""
    )
    output = tmp_path / "registry.json"
    result = run_sync(server, ROOT_KEYS, output, "--overlay", str(overlay))
    assert result.returncode == 0, result.stderr
    registry = load_registry(output)

    entry_a = registry.accounts[a.account_id]
    assert (entry_a.name, entry_a.trusted, entry_a.affiliated) == ("prod (human)", True, True)
    assert {"198.51.100.7/32", *(f"{ip}/32" for ip in a.eips), *map(canonical, a.ipv6)} == set(entry_a.cidrs)
    assert {"vpce-0123456789abcdef0", *a.vpc_endpoints} == set(entry_a.vpc_endpoints)

    entry_b = registry.accounts[b.account_id]
    assert not registry.is_affiliated(b.account_id)
    assert entry_b.name == "member-b"  # the overlay named nothing: the Organizations name stays
    assert f"{b.eips[0]}/32" in entry_b.cidrs

    assert registry.accounts["999999999999"].name == "partner hub" and registry.is_trusted("999999999999")
    assert registry.accounts[org.management].affiliated
    assert [(n.cidr, n.name, n.accounts) for n in registry.expected_networks] == [
        ("203.0.113.0/24", "on-prem egress", frozenset({a.account_id}))
    ]


def test_bad_overlay_or_toml_output_writes_nothing(world: tuple[MotoServer, Org], tmp_path: Path) -> None:
    server, _ = world
    bad = tmp_path / "overlay.json"
    bad.write_text('{"accounts": {"12345": {}}}')
    output = tmp_path / "registry.json"
    result = run_sync(server, ROOT_KEYS, output, "--overlay", str(bad))
    assert result.returncode == 2 and "accounts.12345" in result.stderr
    result = run_sync(server, ROOT_KEYS, tmp_path / "registry.toml")
    assert result.returncode == 2 and "JSON only" in result.stderr
    assert sorted(os.listdir(tmp_path)) == ["overlay.json"]


async def test_sync_registry_in_process(world: tuple[MotoServer, Org]) -> None:
    """The service's entry point: same result in-process, overlay given as a mapping."""
    from aiobotocore.session import get_session

    server, org = world
    session = get_session()
    session.set_credentials(ROOT_KEYS["aws_access_key_id"], ROOT_KEYS["aws_secret_access_key"])
    lines: list[str] = []
    a = org.members["member-a"]
    options = SyncOptions(endpoint_url=server.url, regions=(REGION,), region_name=REGION, concurrency=2)
    mapping = await sync_registry(
        session, options, overlay={"accounts": {a.account_id: {"trusted": True}}}, progress=lines.append
    )
    assert mapping["accounts"][a.account_id]["trusted"] is True
    assert mapping["accounts"][a.account_id]["name"] == "member-a"
    assert set(mapping["accounts"][a.account_id]["vpc_endpoints"]) == set(a.vpc_endpoints)
    assert len(mapping["accounts"]) == 3
    assert sum(1 for line in lines if line.startswith("[")) == 3


def test_unassumable_account_is_reported_and_skipped(strict_world, tmp_path: Path) -> None:
    server, org, users = strict_world
    a, b = org.members["member-a"], org.members["member-b"]
    output = tmp_path / "registry.json"
    result = run_sync(server, users["syncer"], output)
    assert result.returncode == 0, result.stderr

    [failure] = [line for line in result.stderr.splitlines() if "ERROR" in line]
    assert b.account_id in failure and "AccessDenied" in failure
    assert f"1 account(s) skipped: {b.account_id}" in result.stderr

    registry = load_registry(output)
    assert registry.is_affiliated(b.account_id) and not registry.has_inventory(b.account_id)
    assert {f"{ip}/32" for ip in a.eips} <= set(registry.accounts[a.account_id].cidrs)
    assert set(registry.accounts[a.account_id].vpc_endpoints) == set(a.vpc_endpoints)
    assert registry.is_affiliated(org.management)


@pytest.mark.parametrize(
    ("user", "why"),
    [("nobody", "cannot list the organization's accounts"), ("org-only", "nothing could be read")],
)
def test_nothing_readable_fails_and_leaves_the_output_untouched(strict_world, tmp_path: Path, user: str, why: str) -> None:
    server, _, users = strict_world
    output = tmp_path / "registry.json"
    before = b'{"accounts": {"111122223333": {"name": "kept"}}}\n'
    output.write_bytes(before)
    result = run_sync(server, users[user], output)
    assert result.returncode == 1, result.stderr
    assert why in result.stderr and "not written" in result.stderr
    assert output.read_bytes() == before
    assert os.listdir(tmp_path) == ["registry.json"]


def test_write_registry_is_atomic(tmp_path: Path) -> None:
    output = tmp_path / "registry.json"
    output.write_bytes(b"previous")
    with pytest.raises(RegistryError):
        write_registry(output, {"accounts": {"111122223333": {"cidrs": ["not-a-cidr"]}}})
    assert output.read_bytes() == b"previous"
    os.chmod(output, 0o640)
    registry = write_registry(output, {"accounts": {"111122223333": {"cidrs": ["52.1.2.3/32"]}}})
    assert registry.has_inventory("111122223333")
    assert load_registry(output).accounts["111122223333"].cidrs == ("52.1.2.3/32",)
    assert output.stat().st_mode & 0o777 == 0o640
    assert os.listdir(tmp_path) == ["registry.json"]


def test_merge_rules() -> None:
    synced = {"accounts": {
        "111111111111": {"name": "org-name", "cidrs": ["2400:6500:2ef4:0f00::/56", "52.1.2.3/32"], "vpc_endpoints": ["vpce-0000000011111111"]},
        "222222222222": {"name": "two", "vpc_endpoints": ["vpce-aaaaaaaabbbbbbbb"]},
    }}
    overlay = {
        "accounts": {
            "111111111111": {"name": "", "cidrs": ["52.1.2.3/32", "10.0.0.0/8"]},
            "333333333333": {"name": "hub", "trusted": True, "vpc_endpoints": ["vpce-aaaaaaaabbbbbbbb"]},
        },
        "expected_networks": [{"cidr": "198.51.100.0/24"}],
    }
    warnings: list[str] = []
    merged = merge_registry(synced, overlay, warn=warnings.append)
    one = merged["accounts"]["111111111111"]
    assert one["name"] == "org-name"  # an empty overlay name does not blank the synced one
    assert one["cidrs"] == ["10.0.0.0/8", "52.1.2.3/32", "2400:6500:2ef4:f00::/56"]
    # the overlay put the endpoint under the hub: it stays there, the conflict is reported
    assert merged["accounts"]["222222222222"]["vpc_endpoints"] == {}
    assert merged["accounts"]["333333333333"]["vpc_endpoints"] == {"vpce-aaaaaaaabbbbbbbb": {}}
    assert len(warnings) == 1 and "vpce-aaaaaaaabbbbbbbb" in warnings[0]
    assert merged["expected_networks"] == [{"cidr": "198.51.100.0/24", "name": ""}]
    assert merge_registry(synced)["expected_networks"] == []


async def test_unreachable_aws_is_a_sync_error() -> None:
    from aiobotocore.session import get_session

    session = get_session()
    session.set_credentials(ROOT_KEYS["aws_access_key_id"], ROOT_KEYS["aws_secret_access_key"])
    with pytest.raises(SyncError, match="cannot identify the caller"):
        await sync_registry(session, SyncOptions(endpoint_url="http://127.0.0.1:9", regions=(REGION,), region_name=REGION, max_attempts=1))


async def test_account_outside_any_organization_syncs_alone(world: tuple[MotoServer, Org]) -> None:
    from aiobotocore.session import get_session

    server, _ = world
    keys = server.assume("444455556666")  # an account moto knows nothing about: in no organization
    eip = server.client("ec2", **keys).allocate_address(Domain="vpc")["PublicIp"]
    session = get_session()
    session.set_credentials(keys["aws_access_key_id"], keys["aws_secret_access_key"], keys["aws_session_token"])
    lines: list[str] = []
    mapping = await sync_registry(
        session, SyncOptions(endpoint_url=server.url, regions=(REGION,), region_name=REGION), progress=lines.append
    )
    assert list(mapping["accounts"]) == ["444455556666"]
    assert mapping["accounts"]["444455556666"]["cidrs"] == [f"{eip}/32"]
    assert any("in no AWS Organization" in line for line in lines), lines


# --- SPEC §12: instances and endpoint VPCs -------------------------------------------------------------


def cidr_order(cidrs: set[str]) -> list[str]:
    return sorted(cidrs, key=lambda c: (ipaddress.ip_network(c).version, int(ipaddress.ip_network(c).network_address)))


def expected_entry(member: Member) -> dict[str, object]:
    """The registry entry the sync must write for ``member``, from what the seeding made (never from the sync)."""
    return {
        "name": member.name,
        "affiliated": True,
        "trusted": False,
        "cidrs": cidr_order({f"{ip}/32" for ip in member.eips + member.public_ips} | {canonical(c) for c in member.ipv6}),
        "vpc_endpoints": {vpce: {"vpc": member.endpoint_vpcs[vpce]} for vpce in sorted(member.vpc_endpoints)},
        "instances": member.instances,
    }


@pytest.fixture(scope="module")
def inventory_world() -> tuple[MotoServer, Org]:
    """Two members with instances: member-a the full set of ``build_instances``, member-b one instance."""
    server = MotoServer()
    try:
        yield server, build_org(server, instances=True)
    finally:
        server.stop()


def test_sync_writes_instances_and_endpoint_vpcs(inventory_world: tuple[MotoServer, Org], tmp_path: Path) -> None:
    server, org = inventory_world
    a, b = org.members["member-a"], org.members["member-b"]
    assert len(a.instances) == 2 and len(a.endpoint_vpcs) == 3 and len(set(a.endpoint_vpcs.values())) == 3
    assert any(i["ipv6"] for i in a.instances.values()), "moto gave the IPv6 subnet no addresses"
    output = tmp_path / "registry.json"
    result = run_sync(server, ROOT_KEYS, output)
    assert result.returncode == 0, result.stderr

    data = json.loads(output.read_text())
    assert data == {
        "accounts": {
            org.management: {"name": "master", "affiliated": True, "trusted": False, "cidrs": [],
                             "vpc_endpoints": {}, "instances": {}},
            a.account_id: expected_entry(a),
            b.account_id: expected_entry(b),
        },
        "expected_networks": [],
    }
    web = next(i for i in data["accounts"][a.account_id]["instances"].values() if "10.20.1.100" in i["private"])
    assert web["private"] == ["10.20.1.5", "10.20.1.10", "10.20.1.11", "10.20.1.100"] and len(web["public"]) == 2
    assert len(web["ipv6"]) == 2
    # the same private address in two accounts' VPCs stays apart
    assert [i["private"] for i in data["accounts"][b.account_id]["instances"].values()] == [["10.20.1.10"]]
    assert f"{a.account_id} (member-a): " in result.stderr and ", 2 instances from 1 region(s)" in result.stderr

    registry = load_registry(output)
    assert set(registry.accounts[a.account_id].vpc_endpoints) == set(a.vpc_endpoints)
    assert {f"{ip}/32" for i in a.instances.values() for ip in i["public"]} <= set(registry.accounts[a.account_id].cidrs)


async def test_overlay_instances_merge_with_the_sync(inventory_world: tuple[MotoServer, Org]) -> None:
    """In process, overlay as a mapping: hand-set egress survives, addresses add up, placement conflicts warn."""
    from aiobotocore.session import get_session

    server, org = inventory_world
    a, b = org.members["member-a"], org.members["member-b"]
    web_id = next(i for i, e in a.instances.items() if not e["egress"])
    nat_id = next(i for i, e in a.instances.items() if e["egress"])
    [b_id] = b.instances
    [b_vpce] = [v for v in b.vpc_endpoints if b.endpoint_vpcs[v] == b.instances[b_id]["vpc"]]
    overlay = {"accounts": {
        a.account_id: {"instances": {
            web_id: {"egress": True, "public": ["198.51.100.9"]},  # a proxy AWS cannot tell; an address it forgot
            nat_id: {"vpc": "vpc-00000000000000001"},
            "i-0123456789abcdef0": {"private": ["10.99.0.1"]},  # not in AWS (yet): kept as written
        }},
        "999999999999": {"name": "hub", "instances": {b_id: {}}, "vpc_endpoints": {b_vpce: {"vpc": "vpc-0000000000000000f"}}},
    }}
    session = get_session()
    session.set_credentials(ROOT_KEYS["aws_access_key_id"], ROOT_KEYS["aws_secret_access_key"])
    lines: list[str] = []
    options = SyncOptions(endpoint_url=server.url, regions=(REGION,), region_name=REGION)
    mapping = await sync_registry(session, options, overlay=overlay, progress=lines.append)

    got = mapping["accounts"][a.account_id]["instances"]
    assert got[web_id] == {**a.instances[web_id], "egress": True, "public": [*a.instances[web_id]["public"], "198.51.100.9"]}
    assert got[nat_id] == {**a.instances[nat_id], "vpc": "vpc-00000000000000001"}  # the overlay's VPC, still egress
    assert got["i-0123456789abcdef0"] == {"private": ["10.99.0.1"], "public": [], "ipv6": [], "egress": False}
    # the overlay placed member-b's instance and endpoint under the hub: they stay there, with the overlay's data
    assert mapping["accounts"][b.account_id]["instances"] == {}
    assert b_vpce not in mapping["accounts"][b.account_id]["vpc_endpoints"]
    assert mapping["accounts"]["999999999999"]["instances"] == {b_id: {"private": [], "public": [], "ipv6": [], "egress": False}}
    assert mapping["accounts"]["999999999999"]["vpc_endpoints"] == {b_vpce: {"vpc": "vpc-0000000000000000f"}}
    conflicts = [line for line in lines if "keeping the overlay's" in line]
    assert len(conflicts) == 2 and any(b_id in c and "instance" in c for c in conflicts), lines
    assert normalise_registry(mapping)[0] == mapping  # what the sync hands over is already in output form


def test_merge_rules_for_instances_and_endpoint_vpcs() -> None:
    synced = {"accounts": {"111111111111": {
        "vpc_endpoints": {"vpce-0000000011111111": {"vpc": "vpc-11111111"}, "vpce-0000000022222222": {}},
        "instances": {"i-0a1b2c3d4e5f60718": {"vpc": "vpc-11111111", "private": ["10.0.1.77", "10.0.1.5"],
                                             "public": ["52.1.2.3"], "ipv6": ["2600:1f18:ABC:0::10"], "egress": False}},
    }}}
    overlay = {"accounts": {"111111111111": {
        "vpc_endpoints": ["vpce-0000000011111111", "vpce-0000000033333333"],  # the list form: VPC unknown
        "instances": {"i-0a1b2c3d4e5f60718": {"private": ["10.0.1.5", "10.0.1.9"], "egress": True}},
    }}}
    one = merge_registry(synced, overlay)["accounts"]["111111111111"]
    assert one["vpc_endpoints"] == {
        "vpce-0000000011111111": {"vpc": "vpc-11111111"},  # a VPC-less overlay entry keeps the synced VPC
        "vpce-0000000022222222": {},
        "vpce-0000000033333333": {},
    }
    assert one["instances"] == {"i-0a1b2c3d4e5f60718": {
        "vpc": "vpc-11111111", "private": ["10.0.1.5", "10.0.1.9", "10.0.1.77"], "public": ["52.1.2.3"],
        "ipv6": ["2600:1f18:abc::10"], "egress": True,
    }}
    # a synced registry without the §12 keys still merges, and gets them in output form
    plain = merge_registry({"accounts": {"222222222222": {"vpc_endpoints": ["vpce-0000000044444444"]}}})
    assert plain["accounts"]["222222222222"]["vpc_endpoints"] == {"vpce-0000000044444444": {}}
    assert plain["accounts"]["222222222222"]["instances"] == {}


@pytest.mark.parametrize(
    ("entry", "key", "problem"),
    [
        ({"instances": {"i-xyz": {}}}, "accounts.111111111111.instances.i-xyz", "instance ID"),
        ({"instances": {"i-0a1b2c3d": {"private": ["10.0.0.300"]}}}, ".instances.i-0a1b2c3d.private[0]", "IP address"),
        ({"instances": {"i-0a1b2c3d": {"public": ["2600::1"]}}}, ".instances.i-0a1b2c3d.public[0]", "IPv4"),
        ({"instances": {"i-0a1b2c3d": {"ipv6": ["10.0.0.1"]}}}, ".instances.i-0a1b2c3d.ipv6[0]", "IPv6"),
        ({"instances": {"i-0a1b2c3d": {"public": "52.1.2.3"}}}, ".instances.i-0a1b2c3d.public", "must be a list"),
        ({"instances": {"i-0a1b2c3d": {"egress": "yes"}}}, ".instances.i-0a1b2c3d.egress", "true or false"),
        ({"instances": {"i-0a1b2c3d": {"vpc": "vpc-nothex"}}}, ".instances.i-0a1b2c3d.vpc", "VPC ID"),
        ({"instances": {"i-0a1b2c3d": {"nat": True}}}, ".instances.i-0a1b2c3d.nat", "unknown field"),
        ({"instances": []}, "accounts.111111111111.instances", "object"),
        ({"vpc_endpoints": {"vpce-0000000011111111": {"vpc": 7}}}, ".vpc_endpoints.vpce-0000000011111111.vpc", "VPC ID"),
        ({"vpc_endpoints": {"vpce-0000000011111111": {"id": 1}}}, ".vpce-0000000011111111.id", "unknown field"),
        ({"vpc_endpoints": {"vpce-bad": {}}}, ".vpc_endpoints", "vpce-0123456789abcdef0"),
    ],
)
def test_bad_section_12_keys_name_the_key(entry: dict[str, object], key: str, problem: str) -> None:
    with pytest.raises(RegistryError) as caught:
        merge_registry({"accounts": {}}, {"accounts": {"111111111111": entry}})
    assert key in str(caught.value) and problem in str(caught.value) and "<overlay>" in str(caught.value)


def test_an_instance_under_two_accounts_is_an_error() -> None:
    twice = {"accounts": {a: {"instances": {"i-0a1b2c3d": {}}} for a in ("111111111111", "222222222222")}}
    with pytest.raises(RegistryError, match=r"accounts\.222222222222\.instances\.i-0a1b2c3d: .* already listed under account 111111111111"):
        normalise_registry(twice)


def test_interface_shapes_moto_does_not_serve() -> None:
    """Shapes real EC2 returns and moto does not: a shared VPC's participant interface, an Elastic IP shown
    on the secondary address only, an interface with its own source/destination check off, and a
    secondary interface in another VPC (multi-VPC attachment) seen before the primary one."""
    from detector.aws.sync import InstanceInventory, _interface_instance

    def eni(owner: str, device: int, vpc: str, **extra: object) -> dict[str, object]:
        return {"Attachment": {"InstanceId": "i-0a1b2c3d4e5f60718", "InstanceOwnerId": owner, "DeviceIndex": device},
                "VpcId": vpc, "PrivateIpAddress": "10.0.1.5", **extra}

    assert _interface_instance(eni("222222222222", 0, "vpc-11111111"), "111111111111") is None
    assert _interface_instance({"VpcId": "vpc-11111111", "PrivateIpAddress": "10.0.1.9"}, "111111111111") is None
    secondary = eni("111111111111", 1, "vpc-22222222", SourceDestCheck=False, PrivateIpAddresses=[
        {"PrivateIpAddress": "10.0.1.5", "Primary": True},
        {"PrivateIpAddress": "10.0.1.77", "Association": {"PublicIp": "52.1.2.3"}},
    ], Ipv6Addresses=[{"Ipv6Address": "2600:1f18:ABC::0010"}])
    instance_id, found = _interface_instance(secondary, "111111111111")
    assert instance_id == "i-0a1b2c3d4e5f60718"
    assert (found.private, found.public, found.ipv6, found.egress) == ({"10.0.1.5", "10.0.1.77"}, {"52.1.2.3"}, {"2600:1f18:abc::10"}, True)
    merged = InstanceInventory()
    merged.absorb(found)
    merged.absorb(_interface_instance(eni("111111111111", 0, "vpc-11111111", PrivateIpAddress="10.0.2.4"), "111111111111")[1])
    assert merged.to_mapping() == {"vpc": "vpc-11111111", "private": ["10.0.1.5", "10.0.1.77", "10.0.2.4"],
                                   "public": ["52.1.2.3"], "ipv6": ["2600:1f18:abc::10"], "egress": True}


def test_cli_overlay_marks_an_egress_instance(inventory_world: tuple[MotoServer, Org], tmp_path: Path) -> None:
    """The operator's path: a TOML overlay, loaded by the detector's parser, hand-marks a proxy."""
    server, org = inventory_world
    a = org.members["member-a"]
    web_id = next(i for i, e in a.instances.items() if not e["egress"])
    overlay = tmp_path / "overlay.toml"
    overlay.write_text(
        f"""
[accounts."{a.account_id}"]
vpc_endpoints = ["vpce-0123456789abcdef0"]

[accounts."{a.account_id}".instances."{web_id}"]
egress = true
"""
    )
    output = tmp_path / "registry.json"
    result = run_sync(server, ROOT_KEYS, output, "--overlay", str(overlay))
    assert result.returncode == 0, result.stderr
    entry = json.loads(output.read_text())["accounts"][a.account_id]
    assert entry["instances"] == {**a.instances, web_id: {**a.instances[web_id], "egress": True}}
    assert entry["vpc_endpoints"] == {"vpce-0123456789abcdef0": {}, **expected_entry(a)["vpc_endpoints"]}
    assert load_registry(output).accounts[a.account_id].vpc_endpoints == tuple(sorted(entry["vpc_endpoints"]))
