"""Merge a synced registry with a hand-written overlay so that a sync never erases a human decision.

Pure: mappings in, mapping out (the on-disk format of SPEC §7). The rules, also in ``docs/registry.md``
and ``detector registry sync --help``:

- An account only in the sync is written as synced (affiliated, not trusted, with its inventory).
- An account only in the overlay is kept as the overlay has it.
- An account in both: the overlay's ``affiliated`` and ``trusted`` win (a field the overlay leaves out
  takes the registry default, ``affiliated: true`` / ``trusted: false``, which is also what the sync
  says); the overlay's ``name`` wins unless it is empty or absent; ``cidrs`` and ``vpc_endpoints`` are
  the union of both.
- A VPC endpoint the overlay places under one account and the sync finds under another stays where the
  overlay puts it (a conflict is reported).
- ``expected_networks`` come from the overlay only; AWS knows nothing about them.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from ..core.registry import Registry, registry_from_mapping

__all__ = ["canonical_cidr", "merge_registry"]


def canonical_cidr(cidr: str) -> str:
    """``cidr`` in Python's canonical spelling (``2400:6500:2ef4:0f00::/56`` → ``2400:6500:2ef4:f00::/56``)."""
    return str(ipaddress.ip_network(cidr.strip(), strict=True))


def _cidr_key(cidr: str) -> tuple[int, int, int]:
    net = ipaddress.ip_network(cidr, strict=True)
    return net.version, int(net.network_address), net.prefixlen


def _union_cidrs(*groups: Iterable[str]) -> list[str]:
    return sorted({canonical_cidr(c) for group in groups for c in group}, key=_cidr_key)


def _normalise(data: Mapping[str, Any] | Registry | None, source: str) -> dict[str, Any]:
    if data is None:
        return {"accounts": {}, "expected_networks": []}
    if isinstance(data, Registry):
        return data.to_mapping()
    return registry_from_mapping(data, source).to_mapping()


def merge_registry(
    synced: Mapping[str, Any] | Registry,
    overlay: Mapping[str, Any] | Registry | None = None,
    *,
    warn: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Merge ``synced`` (what AWS says) with ``overlay`` (what humans decided); see the module docstring.

    Both sides are validated (:class:`~detector.core.registry.RegistryError` names the bad key); so is
    the result, which :func:`detector.core.registry.registry_from_mapping` accepts as is.
    """
    ours = _normalise(synced, "<synced registry>")
    theirs = _normalise(overlay, "<overlay>")
    human_endpoints = {
        vpce: account_id for account_id, entry in theirs["accounts"].items() for vpce in entry["vpc_endpoints"]
    }
    accounts: dict[str, Any] = {}
    for account_id in sorted(set(ours["accounts"]) | set(theirs["accounts"])):
        synced_entry = ours["accounts"].get(account_id)
        human = theirs["accounts"].get(account_id)
        if synced_entry is None:
            accounts[account_id] = human
            continue
        endpoints = []
        for vpce in synced_entry["vpc_endpoints"]:
            owner = human_endpoints.get(vpce, account_id)
            if owner != account_id:
                if warn is not None:
                    warn(f"{vpce}: found in account {account_id} but the overlay puts it under {owner}; keeping the overlay's")
                continue
            endpoints.append(vpce)
        entry = dict(synced_entry)
        if human is not None:
            entry["affiliated"] = human["affiliated"]
            entry["trusted"] = human["trusted"]
            entry["name"] = human["name"] or synced_entry["name"]
            endpoints += human["vpc_endpoints"]
        entry["cidrs"] = _union_cidrs(synced_entry["cidrs"], human["cidrs"] if human else ())
        entry["vpc_endpoints"] = sorted(set(endpoints))
        accounts[account_id] = entry
    merged = {"accounts": accounts, "expected_networks": theirs["expected_networks"]}
    registry_from_mapping(merged, "<merged registry>")
    return merged
