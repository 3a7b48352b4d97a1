"""Merge a synced registry with a hand-written overlay so that a sync never erases a human decision.

Pure: mappings in, mapping out (the on-disk format of SPEC §7 and §12). The rules, also in
``docs/registry.md`` and ``detector registry sync --help``:

- An account only in the sync is written as synced (affiliated, not trusted, with its inventory).
- An account only in the overlay is kept as the overlay has it.
- An account in both: the overlay's ``affiliated`` and ``trusted`` win (a field the overlay leaves out
  takes the registry default, ``affiliated: true`` / ``trusted: false``, which is also what the sync
  says); the overlay's ``name`` wins unless it is empty or absent; ``cidrs`` and ``vpc_endpoints`` are
  the union of both, an endpoint's VPC being the overlay's when it names one, else the sync's.
- ``instances`` per instance: one only in the overlay or only in the sync is kept as it is; one in both
  takes the overlay's ``vpc`` when it names one, the union of the addresses, and ``egress`` when either
  side says so (a hand-set ``egress: true`` survives every sync).
- A VPC endpoint or an instance the overlay places under one account and the sync finds under another
  stays where the overlay puts it (a conflict is reported).
- ``expected_networks`` come from the overlay only; AWS knows nothing about them.

Output form: ``vpc_endpoints`` is always the mapping ``{"vpce-…": {"vpc": "vpc-…"}}`` (``{}`` for an
endpoint whose VPC is unknown) and every account has ``instances`` (``{}`` when none), each instance
with its ``vpc`` (left out when unknown), sorted ``private``, ``public`` and ``ipv6`` addresses, and
``egress``.

The account fields of SPEC §7 are validated by :func:`detector.core.registry.registry_from_mapping`; the
§12 forms (the ``vpc_endpoints`` mapping and ``instances``) are checked here, so a registry carrying them
can be merged and written whatever the detector's own parser accepts.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ..core.registry import Registry, RegistryError, registry_from_mapping

__all__ = ["INSTANCE_RE", "VPC_RE", "address_key", "canonical_cidr", "merge_registry", "normalise_registry"]

INSTANCE_RE = re.compile(r"^i-(?:[0-9a-f]{8}|[0-9a-f]{17})$")
VPC_RE = re.compile(r"^vpc-[0-9a-f]{8,17}$")
# An instance's address lists and the IP version each holds (0: either; SPEC §12 says private IPv4, and
# the detector's parser also takes a hand-listed private IPv6 address there).
_ADDRESS_FIELDS = {"private": 0, "public": 4, "ipv6": 6}
_INSTANCE_FIELDS = {"vpc", *_ADDRESS_FIELDS, "egress"}
_ENDPOINT_FIELDS = {"vpc"}


def canonical_cidr(cidr: str) -> str:
    """``cidr`` in Python's canonical spelling (``2400:6500:2ef4:0f00::/56`` → ``2400:6500:2ef4:f00::/56``)."""
    return str(ipaddress.ip_network(cidr.strip(), strict=True))


def _cidr_key(cidr: str) -> tuple[int, int, int]:
    net = ipaddress.ip_network(cidr, strict=True)
    return net.version, int(net.network_address), net.prefixlen


def address_key(address: str) -> tuple[int, int]:
    """Sort key putting IP addresses in numeric order (``10.0.1.5`` before ``10.0.1.10``)."""
    parsed = ipaddress.ip_address(address)
    return parsed.version, int(parsed)


def _union_cidrs(*groups: Iterable[str]) -> list[str]:
    return sorted({canonical_cidr(c) for group in groups for c in group}, key=_cidr_key)


def _fail(source: str, key: str, problem: str) -> RegistryError:
    return RegistryError(f"{source}: {key}: {problem}")


def _check_vpc(source: str, key: str, value: Any) -> str:
    """A VPC ID, or "" when ``value`` says the VPC is unknown (absent, null or empty)."""
    if value is None or value == "":
        return ""
    if not isinstance(value, str) or not VPC_RE.match(value):
        raise _fail(source, key, f"VPC ID must look like vpc-0123456789abcdef0, got {value!r}")
    return value


def _check_fields(source: str, key: str, value: Any, allowed: Iterable[str] | None) -> Mapping[str, Any]:
    """``value`` when it is a mapping with no field outside ``allowed`` (None: keys are IDs, checked later)."""
    if not isinstance(value, Mapping):
        raise _fail(source, key, "must be an object/table")
    extra = sorted(set(value) - set(allowed)) if allowed is not None else []
    if extra:
        raise _fail(source, f"{key}.{extra[0]}", f"unknown field (allowed: {', '.join(sorted(allowed))})")
    return value


def _check_addresses(source: str, key: str, value: Any, version: int) -> list[str]:
    if not isinstance(value, list):
        raise _fail(source, key, f"must be a list, got {type(value).__name__}")
    found = set()
    for i, text in enumerate(value):
        try:
            address = ipaddress.ip_address(text.strip() if isinstance(text, str) else text)
        except ValueError:
            address = None
        if not isinstance(text, str) or address is None or version not in (0, address.version):
            raise _fail(source, f"{key}[{i}]", f"must be an {f'IPv{version}' if version else 'IP'} address, got {text!r}")
        found.add(str(address))
    return sorted(found, key=address_key)


def _check_instance(source: str, key: str, raw: Any) -> dict[str, Any]:
    """One ``instances`` entry in output form (addresses canonical, sorted, deduplicated)."""
    raw = _check_fields(source, key, raw, _INSTANCE_FIELDS)
    vpc = _check_vpc(source, f"{key}.vpc", raw.get("vpc"))
    entry: dict[str, Any] = {"vpc": vpc} if vpc else {}
    for field, version in _ADDRESS_FIELDS.items():
        entry[field] = _check_addresses(source, f"{key}.{field}", raw.get(field, []), version)
    egress = raw.get("egress", False)
    if not isinstance(egress, bool):
        raise _fail(source, f"{key}.egress", f"must be true or false, got {egress!r}")
    entry["egress"] = egress
    return entry


@dataclass(slots=True)
class _Parsed:
    """A registry split into what the core parser validates and the §12 forms checked here."""

    registry: Registry  # the §7 part: accounts with cidrs and endpoint IDs, expected networks
    instances: dict[str, dict[str, dict[str, Any]]]  # account -> instance ID -> entry
    endpoint_vpcs: dict[str, dict[str, str]]  # account -> endpoint ID -> VPC ID ("" unknown)

    def to_mapping(self) -> dict[str, Any]:
        out = self.registry.to_mapping()
        for account_id, entry in out["accounts"].items():
            vpcs = self.endpoint_vpcs.get(account_id, {})
            entry["vpc_endpoints"] = {
                vpce: ({"vpc": vpcs[vpce]} if vpcs.get(vpce) else {}) for vpce in sorted(entry["vpc_endpoints"])
            }
            entry["instances"] = dict(sorted(self.instances.get(account_id, {}).items()))
        return out


def _parse(data: Mapping[str, Any] | Registry | None, source: str) -> _Parsed:
    if data is None:
        data = {}
    elif isinstance(data, Registry):
        data = data.to_mapping()
    instances: dict[str, dict[str, dict[str, Any]]] = {}
    endpoint_vpcs: dict[str, dict[str, str]] = {}
    raw_accounts = data.get("accounts", {}) if isinstance(data, Mapping) else None
    if not isinstance(raw_accounts, Mapping):  # not ours to explain: the core parser names the problem
        return _Parsed(registry_from_mapping(data, source), {}, {})
    accounts: dict[str, Any] = {}
    seen: dict[str, str] = {}
    for account_id, raw in raw_accounts.items():
        accounts[account_id] = raw
        if not isinstance(raw, Mapping):
            continue
        base = f"accounts.{account_id}"
        entry = accounts[account_id] = dict(raw)
        raw_instances = _check_fields(source, f"{base}.instances", entry.pop("instances", {}), None)
        ours = instances[account_id] = {}
        for instance_id, raw_instance in raw_instances.items():
            key = f"{base}.instances.{instance_id}"
            if not isinstance(instance_id, str) or not INSTANCE_RE.match(instance_id):
                raise _fail(source, key, "instance ID must look like i-0123456789abcdef0")
            if seen.setdefault(instance_id, account_id) != account_id:
                raise _fail(source, key, f"{instance_id} is already listed under account {seen[instance_id]}")
            ours[instance_id] = _check_instance(source, key, raw_instance)
        endpoints = entry.get("vpc_endpoints")
        if isinstance(endpoints, Mapping):
            entry["vpc_endpoints"] = list(endpoints)
            endpoint_vpcs[account_id] = {
                vpce: _check_vpc(
                    source,
                    f"{base}.vpc_endpoints.{vpce}.vpc",
                    _check_fields(source, f"{base}.vpc_endpoints.{vpce}", value, _ENDPOINT_FIELDS).get("vpc"),
                )
                for vpce, value in endpoints.items()
            }
    registry = registry_from_mapping({**data, "accounts": accounts}, source)
    return _Parsed(registry, instances, endpoint_vpcs)


def normalise_registry(data: Mapping[str, Any] | Registry, source: str = "<registry>") -> tuple[dict[str, Any], Registry]:
    """``data`` validated and in output form (see the module docstring), with the registry of its §7 part.

    Raises :class:`~detector.core.registry.RegistryError` naming ``source``, the key and the problem.
    """
    parsed = _parse(data, source)
    return parsed.to_mapping(), parsed.registry


def _merge_instance(human: Mapping[str, Any], synced: Mapping[str, Any]) -> dict[str, Any]:
    vpc = human.get("vpc") or synced.get("vpc")
    entry: dict[str, Any] = {"vpc": vpc} if vpc else {}
    for field in _ADDRESS_FIELDS:
        entry[field] = sorted({*human[field], *synced[field]}, key=address_key)
    entry["egress"] = human["egress"] or synced["egress"]
    return entry


def _placed(
    found: Mapping[str, Any], account_id: str, human_owner: Mapping[str, str], what: str, warn: Callable[[str], None] | None
) -> dict[str, Any]:
    """The synced items of ``account_id`` the overlay does not place under another account."""
    kept = {}
    for item, value in found.items():
        owner = human_owner.get(item, account_id)
        if owner != account_id:
            if warn is not None:
                warn(f"{item}: {what} found in account {account_id} but the overlay puts it under {owner}; keeping the overlay's")
            continue
        kept[item] = value
    return kept


def merge_registry(
    synced: Mapping[str, Any] | Registry,
    overlay: Mapping[str, Any] | Registry | None = None,
    *,
    warn: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Merge ``synced`` (what AWS says) with ``overlay`` (what humans decided); see the module docstring.

    Both sides are validated (:class:`~detector.core.registry.RegistryError` names the bad key); so is
    the result, which :func:`normalise_registry` returns unchanged.
    """
    ours = _parse(synced, "<synced registry>")
    theirs = _parse(overlay, "<overlay>")
    synced_accounts = ours.to_mapping()["accounts"]
    human_accounts = theirs.to_mapping()["accounts"]
    human_endpoints = {vpce: a for a, entry in human_accounts.items() for vpce in entry["vpc_endpoints"]}
    human_instances = {iid: a for a, entry in human_accounts.items() for iid in entry["instances"]}
    accounts: dict[str, Any] = {}
    for account_id in sorted(set(synced_accounts) | set(human_accounts)):
        synced_entry = synced_accounts.get(account_id)
        human = human_accounts.get(account_id)
        if synced_entry is None:
            accounts[account_id] = human
            continue
        entry = dict(synced_entry)
        endpoints = _placed(synced_entry["vpc_endpoints"], account_id, human_endpoints, "VPC endpoint", warn)
        instances = _placed(synced_entry["instances"], account_id, human_instances, "instance", warn)
        if human is not None:
            entry["affiliated"] = human["affiliated"]
            entry["trusted"] = human["trusted"]
            entry["name"] = human["name"] or synced_entry["name"]
            for vpce, value in human["vpc_endpoints"].items():
                endpoints[vpce] = value if value or vpce not in endpoints else endpoints[vpce]
            for instance_id, value in human["instances"].items():
                found = instances.get(instance_id)
                instances[instance_id] = value if found is None else _merge_instance(value, found)
        entry["cidrs"] = _union_cidrs(synced_entry["cidrs"], human["cidrs"] if human else ())
        entry["vpc_endpoints"] = dict(sorted(endpoints.items()))
        entry["instances"] = dict(sorted(instances.items()))
        accounts[account_id] = entry
    merged = {"accounts": accounts, "expected_networks": theirs.registry.to_mapping()["expected_networks"]}
    return normalise_registry(merged, "<merged registry>")[0]
