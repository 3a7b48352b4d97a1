"""The affiliation registry (SPEC §7): which accounts are ours, what they own, what is expected.

Pure: built from an already-parsed mapping, validated strictly, indexed once. File handling lives in
``detector.registry``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .addresses import V4, AddressIndex, format_address, parse_address, parse_network

ACCOUNT_RE = re.compile(r"^[0-9]{12}$")
VPCE_RE = re.compile(r"^vpce-[0-9a-f]{8,17}$")
INSTANCE_RE = re.compile(r"^i-(?:[0-9a-f]{17}|[0-9a-f]{8})$")
VPC_RE = re.compile(r"^vpc-[0-9a-f]{8,17}$")

_ACCOUNT_FIELDS = {"name", "affiliated", "trusted", "cidrs", "vpc_endpoints", "instances"}
_INSTANCE_FIELDS = {"vpc", "private", "public", "ipv6", "egress"}
_ENDPOINT_FIELDS = {"vpc"}
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
    # SPEC §12 (optional): the account's instances, and the VPC of each endpoint (None: not known).
    instances: tuple[Instance, ...] = ()
    endpoint_vpcs: tuple[tuple[str, str | None], ...] = ()


@dataclass(frozen=True, slots=True)
class Instance:
    """An instance of the inventory (SPEC §12); addresses normalised."""

    instance_id: str
    vpc: str | None = None
    private: tuple[str, ...] = ()
    public: tuple[str, ...] = ()
    ipv6: tuple[str, ...] = ()
    egress: bool = False


# Who lists an address (SPEC §12): (instance ID, account, egress) per listing instance.
Listing = tuple[tuple[str, str, bool], ...]


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
    # SPEC §12: endpoint -> VPC (when known); (family, value) of a public/IPv6 address -> who lists it;
    # (VPC, family, value) of a private/IPv6 address -> who lists it.
    endpoint_vpc: dict[str, str] = field(init=False, repr=False)
    by_public: dict[tuple[int, int], Listing] = field(init=False, repr=False)
    by_private: dict[tuple[str, int, int], Listing] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        by_public: dict[tuple[int, int], Listing] = {}
        by_private: dict[tuple[str, int, int], Listing] = {}
        for acct in self.accounts.values():
            for inst in acct.instances:
                who = ((inst.instance_id, acct.account_id, inst.egress),)
                for address in (*inst.public, *inst.ipv6):
                    key = parse_address(address)
                    assert key is not None
                    if who[0] not in by_public.get(key, ()):
                        by_public[key] = by_public.get(key, ()) + who
                if inst.vpc is not None:
                    for address in (*inst.private, *inst.ipv6):
                        family, value = parse_address(address)  # type: ignore[misc]
                        pkey = (inst.vpc, family, value)
                        if who[0] not in by_private.get(pkey, ()):
                            by_private[pkey] = by_private.get(pkey, ()) + who
        self.by_public = by_public
        self.by_private = by_private
        self.endpoint_vpc = {
            vpce: vpc for acct in self.accounts.values() for vpce, vpc in acct.endpoint_vpcs if vpc is not None
        }
        # An instance's public and IPv6 addresses are addresses of its account (SPEC §12, for §4.3a).
        self.owners = AddressIndex(
            [(cidr, acct.account_id) for acct in self.accounts.values() for cidr in acct.cidrs]
            + [
                (f"{address}/{32 if family == V4 else 128}", who[0][1])
                for (family, value), who in by_public.items()
                for address in (format_address(family, value),)
            ]
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
            "instances": sum(len(a.instances) for a in self.accounts.values()),
        }

    @property
    def has_instances(self) -> bool:
        return bool(self.by_public or self.by_private)

    def other_instance(self, address_key: tuple[int, int], vpce: str | None, instance_id: str) -> tuple[str, str] | None:
        """SPEC §12: ``(J, J's account)`` when the address ``(family, value)`` of a record of instance
        ``instance_id`` belongs to another, non-egress instance J of the inventory — through an endpoint
        whose VPC is known, as J's private (or IPv6) address in that VPC; otherwise as J's public or IPv6
        address. None when the address is listed for ``instance_id`` itself, for no instance, or only for
        egress instances."""
        vpc = self.endpoint_vpc.get(vpce) if vpce is not None else None
        if vpc is not None:
            listing = self.by_private.get((vpc, address_key[0], address_key[1]), ())
        else:
            listing = self.by_public.get(address_key, ())
        if not listing or any(who[0] == instance_id for who in listing):
            return None
        for other, account, egress in sorted(listing):
            if not egress:
                return other, account
        return None

    def to_mapping(self) -> dict[str, Any]:
        """The registry as JSON-ready data (the on-disk format of SPEC §7)."""
        out: dict[str, Any] = {"accounts": {}, "expected_networks": []}
        for acct in sorted(self.accounts.values(), key=lambda a: a.account_id):
            entry: dict[str, Any] = {"name": acct.name, "affiliated": acct.affiliated, "trusted": acct.trusted}
            entry["cidrs"] = list(acct.cidrs)
            if any(vpc is not None for _, vpc in acct.endpoint_vpcs):
                entry["vpc_endpoints"] = {
                    vpce: ({"vpc": vpc} if vpc is not None else {}) for vpce, vpc in acct.endpoint_vpcs
                }
            else:
                entry["vpc_endpoints"] = list(acct.vpc_endpoints)
            if acct.instances:
                entry["instances"] = {
                    inst.instance_id: {
                        **({"vpc": inst.vpc} if inst.vpc is not None else {}),
                        "private": list(inst.private),
                        "public": list(inst.public),
                        "ipv6": list(inst.ipv6),
                        "egress": inst.egress,
                    }
                    for inst in acct.instances
                }
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


def _check_vpc(source: str, key: str, value: Any) -> str:
    if not isinstance(value, str) or not VPC_RE.match(value):
        raise _fail(source, key, f"VPC ID must look like vpc-0123456789abcdef0, got {value!r}")
    return value


def _check_addresses(source: str, key: str, value: Any, v6: bool | None) -> tuple[str, ...]:
    """A list of single addresses (``v6`` True: IPv6 only, False: IPv4 only, None: either), normalised."""
    out = []
    for i, item in enumerate(_check_list(source, key, value)):
        parsed = parse_address(item) if isinstance(item, str) else None
        if parsed is None:
            raise _fail(source, f"{key}[{i}]", f"must be an IP address, got {item!r}")
        if v6 is not None and (parsed[0] != V4) != v6:
            raise _fail(source, f"{key}[{i}]", f"must be an {'IPv6' if v6 else 'IPv4'} address, got {item!r}")
        out.append(format_address(*parsed))
    return tuple(out)


def _check_instances(source: str, base: str, raw: Any, seen: dict[str, str]) -> tuple[Instance, ...]:
    """``accounts.<id>.instances`` (SPEC §12): instance ID -> {vpc, private, public, ipv6, egress}."""
    key = f"{base}.instances"
    if not isinstance(raw, Mapping):
        raise _fail(source, key, "must be an object/table keyed by instance ID")
    out = []
    for instance_id, entry in raw.items():
        ikey = f"{key}.{instance_id}"
        if not isinstance(instance_id, str) or not INSTANCE_RE.match(instance_id):
            raise _fail(source, ikey, "instance ID must look like i-0123456789abcdef0")
        if instance_id in seen and seen[instance_id] != base:
            raise _fail(source, ikey, f"{instance_id} is already listed under {seen[instance_id]}")
        seen[instance_id] = base
        if not isinstance(entry, Mapping):
            raise _fail(source, ikey, "must be an object/table")
        _unknown(source, ikey + ".", entry, _INSTANCE_FIELDS)
        out.append(
            Instance(
                instance_id=instance_id,
                vpc=_check_vpc(source, f"{ikey}.vpc", entry["vpc"]) if entry.get("vpc") is not None else None,
                private=_check_addresses(source, f"{ikey}.private", entry.get("private", []), None),
                public=_check_addresses(source, f"{ikey}.public", entry.get("public", []), False),
                ipv6=_check_addresses(source, f"{ikey}.ipv6", entry.get("ipv6", []), True),
                egress=_check_bool(source, f"{ikey}.egress", entry.get("egress", False)),
            )
        )
    return tuple(out)


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
    seen_instances: dict[str, str] = {}
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
        endpoint_vpcs: list[tuple[str, str | None]] = []
        raw_endpoints = raw.get("vpc_endpoints", [])
        if isinstance(raw_endpoints, Mapping):  # SPEC §12: {vpce: {"vpc": ...}}
            listed: list[tuple[str, str, Any]] = [
                (f"{base}.vpc_endpoints.{e}", e, v) for e, v in raw_endpoints.items()
            ]
        else:
            listed = [
                (f"{base}.vpc_endpoints[{i}]", e, None)
                for i, e in enumerate(_check_list(source, f"{base}.vpc_endpoints", raw_endpoints))
            ]
        for key, e, details in listed:
            if not isinstance(e, str) or not VPCE_RE.match(e):
                raise _fail(source, key, f"VPC endpoint ID must look like vpce-0123456789abcdef0, got {e!r}")
            if e in seen_endpoints and seen_endpoints[e] != account_id:
                raise _fail(source, key, f"{e} is already listed under account {seen_endpoints[e]}")
            vpc = None
            if isinstance(raw_endpoints, Mapping):
                if not isinstance(details, Mapping):
                    raise _fail(source, key, 'must be an object/table (e.g. {"vpc": "vpc-0123456789abcdef0"})')
                _unknown(source, key + ".", details, _ENDPOINT_FIELDS)
                if details.get("vpc") is not None:
                    vpc = _check_vpc(source, f"{key}.vpc", details["vpc"])
            seen_endpoints[e] = account_id
            endpoints.append(e)
            endpoint_vpcs.append((e, vpc))
        instances = _check_instances(source, base, raw.get("instances", {}), seen_instances)
        accounts[account_id] = Account(
            account_id=account_id,
            name=_check_str(source, f"{base}.name", raw.get("name", "")),
            affiliated=_check_bool(source, f"{base}.affiliated", raw.get("affiliated", True)),
            trusted=_check_bool(source, f"{base}.trusted", raw.get("trusted", False)),
            cidrs=cidrs,
            vpc_endpoints=tuple(endpoints),
            instances=instances,
            endpoint_vpcs=tuple(endpoint_vpcs),
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
