"""The affiliation registry (SPEC §7): which accounts are ours, what they own, what is expected.

Pure: built from an already-parsed mapping, validated strictly, indexed once. File handling lives in
``detector.registry``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .addresses import AddressIndex, parse_network

ACCOUNT_RE = re.compile(r"^[0-9]{12}$")
VPCE_RE = re.compile(r"^vpce-[0-9a-f]{8,17}$")

_ACCOUNT_FIELDS = {"name", "affiliated", "trusted", "cidrs", "vpc_endpoints"}
_NETWORK_FIELDS = {"cidr", "accounts", "name"}
_TOP_FIELDS = {"accounts", "expected_networks"}


class RegistryError(ValueError):
    """A registry that cannot be used; the message names the file, the key and what is wrong."""


@dataclass(frozen=True, slots=True)
class Account:
    account_id: str
    name: str = ""
    affiliated: bool = True
    trusted: bool = False
    cidrs: tuple[str, ...] = ()
    vpc_endpoints: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ExpectedNetwork:
    cidr: str
    accounts: frozenset[str] | None  # None: applies to every home account
    name: str = ""


_ALL = "*"  # marker inside an expected-network payload: applies to every home account


def _union(outer: frozenset[str], inner: frozenset[str]) -> frozenset[str]:
    return outer | inner


@dataclass(slots=True)
class Registry:
    accounts: dict[str, Account] = field(default_factory=dict)
    expected_networks: tuple[ExpectedNetwork, ...] = ()
    source: str = "<empty>"
    # Derived indexes, built once in __post_init__.
    owners: AddressIndex[str] = field(init=False, repr=False)
    expected: AddressIndex[frozenset[str]] = field(init=False, repr=False)
    endpoint_owner: dict[str, str] = field(init=False, repr=False)
    inventoried: frozenset[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.owners = AddressIndex(
            (cidr, acct.account_id) for acct in self.accounts.values() for cidr in acct.cidrs
        )
        self.expected = AddressIndex(
            (
                (net.cidr, frozenset({_ALL}) if net.accounts is None else net.accounts)
                for net in self.expected_networks
            ),
            combine=_union,
        )
        self.endpoint_owner = {
            vpce: acct.account_id for acct in self.accounts.values() for vpce in acct.vpc_endpoints
        }
        self.inventoried = frozenset(a.account_id for a in self.accounts.values() if a.cidrs)

    # --- questions the decision table asks -------------------------------------------------------

    def is_affiliated(self, account_id: str) -> bool:
        acct = self.accounts.get(account_id)
        return acct is not None and acct.affiliated

    def is_trusted(self, account_id: str) -> bool:
        acct = self.accounts.get(account_id)
        return acct is not None and acct.trusted

    def has_inventory(self, account_id: str) -> bool:
        return account_id in self.inventoried

    def is_expected(self, family: int, value: int, home: str) -> bool:
        hit = self.expected.lookup(family, value)
        return hit is not None and (home in hit or _ALL in hit)

    def summary(self) -> dict[str, int]:
        return {
            "accounts": len(self.accounts),
            "affiliated": sum(1 for a in self.accounts.values() if a.affiliated),
            "trusted": sum(1 for a in self.accounts.values() if a.trusted),
            "cidrs": len(self.owners),
            "vpc_endpoints": len(self.endpoint_owner),
            "expected_networks": len(self.expected_networks),
        }

    def to_mapping(self) -> dict[str, Any]:
        """The registry as JSON-ready data (the on-disk format of SPEC §7)."""
        out: dict[str, Any] = {"accounts": {}, "expected_networks": []}
        for acct in sorted(self.accounts.values(), key=lambda a: a.account_id):
            entry: dict[str, Any] = {"name": acct.name, "affiliated": acct.affiliated, "trusted": acct.trusted}
            entry["cidrs"] = list(acct.cidrs)
            entry["vpc_endpoints"] = list(acct.vpc_endpoints)
            out["accounts"][acct.account_id] = entry
        for net in self.expected_networks:
            item: dict[str, Any] = {"cidr": net.cidr, "name": net.name}
            if net.accounts is not None:
                item["accounts"] = sorted(net.accounts)
            out["expected_networks"].append(item)
        return out


def _fail(source: str, key: str, problem: str) -> RegistryError:
    return RegistryError(f"{source}: {key}: {problem}")


def _check_account_id(source: str, key: str, value: Any) -> str:
    if not isinstance(value, str) or not ACCOUNT_RE.match(value):
        raise _fail(source, key, f"account ID must be a string of 12 digits, got {value!r}")
    return value


def _check_bool(source: str, key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _fail(source, key, f"must be true or false, got {value!r}")
    return value


def _check_str(source: str, key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise _fail(source, key, f"must be a string, got {value!r}")
    return value


def _check_list(source: str, key: str, value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise _fail(source, key, f"must be a list, got {type(value).__name__}")
    return value


def _check_cidr(source: str, key: str, value: Any) -> str:
    try:
        parse_network(value)
    except ValueError as exc:
        raise _fail(source, key, f"bad CIDR {value!r} ({exc})") from None
    return value.strip()


def _unknown(source: str, prefix: str, mapping: Mapping[str, Any], allowed: set[str]) -> None:
    extra = sorted(set(mapping) - allowed)
    if extra:
        raise _fail(
            source,
            f"{prefix}{extra[0]}",
            f"unknown field (allowed: {', '.join(sorted(allowed))})",
        )


def registry_from_mapping(data: Any, source: str = "<registry>") -> Registry:
    """Validate ``data`` (parsed JSON or TOML) and build a :class:`Registry`.

    Raises :class:`RegistryError` naming ``source``, the offending key and the problem.
    """
    if not isinstance(data, Mapping):
        raise _fail(source, "<top>", f"must be an object/table, got {type(data).__name__}")
    _unknown(source, "", data, _TOP_FIELDS)
    raw_accounts = data.get("accounts", {})
    if not isinstance(raw_accounts, Mapping):
        raise _fail(source, "accounts", "must be an object/table keyed by account ID")
    accounts: dict[str, Account] = {}
    seen_endpoints: dict[str, str] = {}
    for account_id, raw in raw_accounts.items():
        base = f"accounts.{account_id}"
        _check_account_id(source, base, account_id)
        if not isinstance(raw, Mapping):
            raise _fail(source, base, "must be an object/table")
        _unknown(source, base + ".", raw, _ACCOUNT_FIELDS)
        cidrs = tuple(
            _check_cidr(source, f"{base}.cidrs[{i}]", c)
            for i, c in enumerate(_check_list(source, f"{base}.cidrs", raw.get("cidrs", [])))
        )
        endpoints = []
        for i, e in enumerate(_check_list(source, f"{base}.vpc_endpoints", raw.get("vpc_endpoints", []))):
            key = f"{base}.vpc_endpoints[{i}]"
            if not isinstance(e, str) or not VPCE_RE.match(e):
                raise _fail(source, key, f"VPC endpoint ID must look like vpce-0123456789abcdef0, got {e!r}")
            if e in seen_endpoints and seen_endpoints[e] != account_id:
                raise _fail(source, key, f"{e} is already listed under account {seen_endpoints[e]}")
            seen_endpoints[e] = account_id
            endpoints.append(e)
        accounts[account_id] = Account(
            account_id=account_id,
            name=_check_str(source, f"{base}.name", raw.get("name", "")),
            affiliated=_check_bool(source, f"{base}.affiliated", raw.get("affiliated", True)),
            trusted=_check_bool(source, f"{base}.trusted", raw.get("trusted", False)),
            cidrs=cidrs,
            vpc_endpoints=tuple(endpoints),
        )
    networks = []
    for i, raw in enumerate(_check_list(source, "expected_networks", data.get("expected_networks", []))):
        base = f"expected_networks[{i}]"
        if not isinstance(raw, Mapping):
            raise _fail(source, base, "must be an object/table")
        _unknown(source, base + ".", raw, _NETWORK_FIELDS)
        if "cidr" not in raw:
            raise _fail(source, f"{base}.cidr", "is required")
        cidr = _check_cidr(source, f"{base}.cidr", raw["cidr"])
        accts: frozenset[str] | None = None
        if raw.get("accounts") is not None:
            accts = frozenset(
                _check_account_id(source, f"{base}.accounts[{j}]", a)
                for j, a in enumerate(_check_list(source, f"{base}.accounts", raw["accounts"]))
            )
        networks.append(
            ExpectedNetwork(cidr=cidr, accounts=accts, name=_check_str(source, f"{base}.name", raw.get("name", "")))
        )
    return Registry(accounts=accounts, expected_networks=tuple(networks), source=source)


EMPTY_REGISTRY = Registry(source="<empty>")
