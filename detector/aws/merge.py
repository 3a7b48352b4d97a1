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

Validation is the detector's own parser's (:func:`detector.core.registry.registry_from_mapping`, SPEC §7
and §12): what the sync writes is exactly what the detector will load, and a bad key is reported once,
naming the file, the key and the problem.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from ..core.registry import Instance, Registry, registry_from_mapping

__all__ = ["address_key", "canonical_cidr", "merge_registry", "normalise_registry"]

_ADDRESS_FIELDS = ("private", "public", "ipv6")


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


def _instance_entry(inst: Instance) -> dict[str, Any]:
    """One ``instances`` entry in output form (the parser has normalised the addresses)."""
    entry: dict[str, Any] = {"vpc": inst.vpc} if inst.vpc is not None else {}
    for field in _ADDRESS_FIELDS:
        entry[field] = sorted(set(getattr(inst, field)), key=address_key)
    entry["egress"] = inst.egress
    return entry


def _output(registry: Registry) -> dict[str, Any]:
    """``registry`` in output form (see the module docstring)."""
    out = registry.to_mapping()
    for acct in registry.accounts.values():
        entry = out["accounts"][acct.account_id]
        entry["vpc_endpoints"] = {vpce: ({"vpc": vpc} if vpc else {}) for vpce, vpc in sorted(acct.endpoint_vpcs)}
        entry["instances"] = {
            inst.instance_id: _instance_entry(inst) for inst in sorted(acct.instances, key=lambda i: i.instance_id)
        }
    return out


def _parse(data: Mapping[str, Any] | Registry | None, source: str) -> Registry:
    if isinstance(data, Registry):
        return data
    return registry_from_mapping({} if data is None else data, source)


def normalise_registry(data: Mapping[str, Any] | Registry, source: str = "<registry>") -> tuple[dict[str, Any], Registry]:
    """``data`` validated and in output form (see the module docstring), with the registry it loads as.

    Raises :class:`~detector.core.registry.RegistryError` naming ``source``, the key and the problem.
    """
    registry = _parse(data, source)
    return _output(registry), registry


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
    synced_accounts = _output(_parse(synced, "<synced registry>"))["accounts"]
    theirs = _output(_parse(overlay, "<overlay>"))
    human_accounts = theirs["accounts"]
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
    merged = {"accounts": accounts, "expected_networks": theirs["expected_networks"]}
    return normalise_registry(merged, "<merged registry>")[0]
