"""The affiliation registry (SPEC §7): JSON and TOML files, defaults, and errors that name the file,
the key and the problem."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from detector.core import EMPTY_REGISTRY, RegistryError, registry_from_mapping
from detector.core.addresses import parse_address
from detector.registry import load_registry

SPEC_EXAMPLE = {
    "accounts": {
        "111122223333": {
            "name": "prod",
            "affiliated": True,
            "trusted": False,
            "cidrs": ["52.1.2.3/32", "2600:1f18:abc::/56"],
            "vpc_endpoints": ["vpce-0123456789abcdef0"],
        },
        "222233334444": {"name": "hub", "trusted": True, "cidrs": ["52.9.9.9/32"], "vpc_endpoints": ["vpce-22222222"]},
        "777788889999": {"name": "partner", "affiliated": False},
        "444455556666": {},
    },
    "expected_networks": [
        {"cidr": "198.51.100.0/24", "accounts": ["111122223333"], "name": "on-prem egress"},
        {"cidr": "203.0.113.0/24", "name": "VPN, every account"},
        {"cidr": "2001:db8:1::/48", "accounts": ["444455556666", "777788889999"]},
    ],
}

SPEC_EXAMPLE_TOML = """
[accounts.111122223333]
name = "prod"
affiliated = true
trusted = false
cidrs = ["52.1.2.3/32", "2600:1f18:abc::/56"]
vpc_endpoints = ["vpce-0123456789abcdef0"]

[accounts.222233334444]
name = "hub"
trusted = true
cidrs = ["52.9.9.9/32"]
vpc_endpoints = ["vpce-22222222"]

[accounts.777788889999]
name = "partner"
affiliated = false

[accounts.444455556666]

[[expected_networks]]
cidr = "198.51.100.0/24"
accounts = ["111122223333"]
name = "on-prem egress"

[[expected_networks]]
cidr = "203.0.113.0/24"
name = "VPN, every account"

[[expected_networks]]
cidr = "2001:db8:1::/48"
accounts = ["444455556666", "777788889999"]
"""


def expected(registry: Any, address: str, home: str) -> bool:
    parsed = parse_address(address)
    assert parsed is not None
    return registry.is_expected(*parsed, home)


def owner(registry: Any, address: str) -> str | None:
    return registry.owners.lookup_text(address)


def check_example(registry: Any) -> None:
    assert set(registry.accounts) == {"111122223333", "222233334444", "777788889999", "444455556666"}
    assert owner(registry, "52.1.2.3") == "111122223333"
    assert owner(registry, "52.1.2.4") is None
    assert owner(registry, "2600:1f18:abc:ff::1") == "111122223333"
    assert owner(registry, "52.9.9.9") == "222233334444"
    assert registry.endpoint_owner == {"vpce-0123456789abcdef0": "111122223333", "vpce-22222222": "222233334444"}
    assert registry.is_trusted("222233334444") and not registry.is_trusted("111122223333")
    assert not registry.is_affiliated("777788889999")
    assert registry.has_inventory("111122223333") and not registry.has_inventory("777788889999")


def test_json_and_toml_registries_load_the_same(tmp_path: Path) -> None:
    (tmp_path / "r.json").write_text(json.dumps(SPEC_EXAMPLE))
    (tmp_path / "r.TOML").write_text(SPEC_EXAMPLE_TOML)
    from_json = load_registry(tmp_path / "r.json")
    from_toml = load_registry(str(tmp_path / "r.TOML"))
    check_example(from_json)
    check_example(from_toml)
    assert from_json.to_mapping() == from_toml.to_mapping()
    assert from_json.source == str(tmp_path / "r.json")
    # to_mapping is the on-disk format: it loads back to the same registry.
    assert registry_from_mapping(from_json.to_mapping()).to_mapping() == from_json.to_mapping()


def test_defaults() -> None:
    registry = registry_from_mapping({"accounts": {"444455556666": {}}})
    account = registry.accounts["444455556666"]
    assert (account.affiliated, account.trusted, account.name, account.cidrs, account.vpc_endpoints) == (True, False, "", (), ())
    assert registry.is_affiliated("444455556666") and not registry.is_trusted("444455556666")
    assert not registry.has_inventory("444455556666")  # inventory means at least one CIDR
    # An account absent from the registry is unaffiliated (and not trusted).
    assert not registry.is_affiliated("999900001111") and not registry.is_trusted("999900001111")
    assert registry_from_mapping({}).accounts == {}


@pytest.mark.parametrize("path", [None, ""])
def test_no_registry_is_the_empty_registry(path: Any) -> None:
    assert load_registry(path) is EMPTY_REGISTRY
    assert not EMPTY_REGISTRY.accounts and not EMPTY_REGISTRY.expected_networks


def test_expected_networks_without_accounts_apply_to_every_home() -> None:
    registry = registry_from_mapping(SPEC_EXAMPLE)
    for home in ("111122223333", "444455556666", "000000000000"):
        assert expected(registry, "203.0.113.9", home)
    assert expected(registry, "198.51.100.9", "111122223333")
    assert not expected(registry, "198.51.100.9", "444455556666")
    assert expected(registry, "2001:db8:1::5", "777788889999")
    assert not expected(registry, "2001:db8:1::5", "111122223333")
    assert not expected(registry, "192.0.2.1", "111122223333")


def test_nested_expected_networks_combine_their_accounts() -> None:
    registry = registry_from_mapping(
        {
            "expected_networks": [
                {"cidr": "10.0.0.0/8", "accounts": ["111122223333"]},
                {"cidr": "10.1.0.0/16", "accounts": ["444455556666"]},
            ]
        }
    )
    assert expected(registry, "10.1.2.3", "111122223333") and expected(registry, "10.1.2.3", "444455556666")
    assert expected(registry, "10.2.0.1", "111122223333") and not expected(registry, "10.2.0.1", "444455556666")


def test_most_specific_registry_cidr_owns_the_address() -> None:
    registry = registry_from_mapping(
        {"accounts": {"111122223333": {"cidrs": ["52.0.0.0/16"]}, "444455556666": {"cidrs": ["52.0.1.0/24"]}}}
    )
    assert owner(registry, "52.0.1.7") == "444455556666"
    assert owner(registry, "52.0.2.7") == "111122223333"


BAD = [
    # (registry, key named in the error, words of the problem)
    ({"accounts": {"111122223333": {"cidrs": ["10.0.0.1/8"]}}}, "accounts.111122223333.cidrs[0]", "bad CIDR"),
    ({"accounts": {"111122223333": {"cidrs": ["52.1.2.3/32", "300.1.1.1/32"]}}}, "accounts.111122223333.cidrs[1]", "bad CIDR"),
    ({"accounts": {"111122223333": {"cidrs": ["2600:zz::/56"]}}}, "accounts.111122223333.cidrs[0]", "bad CIDR"),
    ({"accounts": {"111122223333": {"cidrs": [42]}}}, "accounts.111122223333.cidrs[0]", "bad CIDR"),
    ({"expected_networks": [{"cidr": "nonsense"}]}, "expected_networks[0].cidr", "bad CIDR"),
    ({"accounts": {"12345": {}}}, "accounts.12345", "12 digits"),
    ({"accounts": {"1111222233334": {}}}, "accounts.1111222233334", "12 digits"),
    ({"accounts": {"11112222333a": {}}}, "accounts.11112222333a", "12 digits"),
    ({"expected_networks": [{"cidr": "10.0.0.0/8", "accounts": ["123"]}]}, "expected_networks[0].accounts[0]", "12 digits"),
    ({"expected_networks": [{"cidr": "10.0.0.0/8", "accounts": [111122223333]}]}, "expected_networks[0].accounts[0]", "12 digits"),
    ({"accounts": {"111122223333": {"afiliated": True}}}, "accounts.111122223333.afiliated", "unknown field"),
    ({"account": {}}, "account", "unknown field"),
    ({"expected_networks": [{"cidr": "10.0.0.0/8", "acounts": []}]}, "expected_networks[0].acounts", "unknown field"),
    ({"accounts": {"111122223333": {"affiliated": "yes"}}}, "accounts.111122223333.affiliated", "true or false"),
    ({"accounts": {"111122223333": {"trusted": 1}}}, "accounts.111122223333.trusted", "true or false"),
    ({"accounts": {"111122223333": {"name": 5}}}, "accounts.111122223333.name", "must be a string"),
    ({"accounts": {"111122223333": {"cidrs": "10.0.0.0/8"}}}, "accounts.111122223333.cidrs", "must be a list"),
    ({"accounts": {"111122223333": {"vpc_endpoints": "vpce-22222222"}}}, "accounts.111122223333.vpc_endpoints", "must be a list"),
    ({"accounts": {"111122223333": {"vpc_endpoints": ["endpoint-1"]}}}, "accounts.111122223333.vpc_endpoints[0]", "VPC endpoint ID"),
    ({"accounts": {"111122223333": []}}, "accounts.111122223333", "object/table"),
    ({"accounts": ["111122223333"]}, "accounts", "keyed by account ID"),
    ({"expected_networks": {"cidr": "10.0.0.0/8"}}, "expected_networks", "must be a list"),
    ({"expected_networks": ["10.0.0.0/8"]}, "expected_networks[0]", "object/table"),
    ({"expected_networks": [{"name": "no cidr"}]}, "expected_networks[0].cidr", "is required"),
    ({"expected_networks": [{"cidr": "10.0.0.0/8", "name": []}]}, "expected_networks[0].name", "must be a string"),
    (
        {"accounts": {"111122223333": {"vpc_endpoints": ["vpce-22222222"]}, "444455556666": {"vpc_endpoints": ["vpce-22222222"]}}},
        "accounts.444455556666.vpc_endpoints[0]",
        "already listed",
    ),
    ([], "<top>", "object/table"),
]


@pytest.mark.parametrize(("data", "key", "problem"), BAD)
def test_errors_name_the_file_the_key_and_the_problem(tmp_path: Path, data: Any, key: str, problem: str) -> None:
    path = tmp_path / "registry.json"
    path.write_text(json.dumps(data))
    with pytest.raises(RegistryError) as info:
        load_registry(path)
    message = str(info.value)
    assert message.startswith(f"{path}: {key}: "), message
    assert problem in message


@pytest.mark.parametrize(
    ("toml", "key", "problem"),
    [
        ('[accounts.111122223333]\ncidrs = ["10.0.0.1/8"]\n', "accounts.111122223333.cidrs[0]", "bad CIDR"),
        ("[accounts.1111]\n", "accounts.1111", "12 digits"),
        ("[accounts.111122223333]\ncolour = 'blue'\n", "accounts.111122223333.colour", "unknown field"),
        ("[accounts.111122223333]\ntrusted = 'yes'\n", "accounts.111122223333.trusted", "true or false"),
        ("[[expected_networks]]\ncidr = 10\n", "expected_networks[0].cidr", "bad CIDR"),
    ],
)
def test_toml_errors_name_the_file_the_key_and_the_problem(tmp_path: Path, toml: str, key: str, problem: str) -> None:
    path = tmp_path / "registry.toml"
    path.write_text(toml)
    with pytest.raises(RegistryError) as info:
        load_registry(path)
    assert str(info.value).startswith(f"{path}: {key}: ") and problem in str(info.value)


@pytest.mark.parametrize(
    ("name", "content", "problem"),
    [
        ("registry.json", "{not json", "not valid JSON"),
        ("registry.toml", "accounts = [", "not valid TOML"),
        ("registry.toml", b"\xff\xfe", "not valid TOML"),
        ("registry.yaml", "accounts: {}", "must end in .json or .toml"),
        ("missing.json", None, "cannot read"),
    ],
)
def test_unreadable_files_are_named(tmp_path: Path, name: str, content: Any, problem: str) -> None:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(RegistryError) as info:
        load_registry(path)
    assert str(info.value).startswith(f"{path}: ") and problem in str(info.value)


def test_registry_check_command(run_detector: Any, tmp_path: Path) -> None:
    good = tmp_path / "r.json"
    good.write_text(json.dumps(SPEC_EXAMPLE))
    proc = run_detector("registry", "check", good)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert (summary["accounts"], summary["trusted"], summary["expected_networks"]) == (4, 1, 3)
    bad = tmp_path / "bad.toml"
    bad.write_text("[accounts.1111]\n")
    proc = run_detector("registry", "check", bad)
    assert proc.returncode != 0 and str(bad) in proc.stderr.decode() and "accounts.1111" in proc.stderr.decode()
