"""AWS's published IP ranges (``ip-ranges.json``): the packaged snapshot, loading and validation.

The snapshot ships compressed inside the package (``detector/data/aws-ip-ranges.json.gz``);
``detector ip-ranges update`` refreshes a copy from AWS's official URL.
"""

from __future__ import annotations

import gzip
import zlib
from importlib import resources
from pathlib import Path
from typing import Any

import orjson

from .core.addresses import AddressIndex, parse_network

OFFICIAL_URL = "https://ip-ranges.amazonaws.com/ip-ranges.json"
SNAPSHOT_NAME = "aws-ip-ranges.json.gz"


class IpRangesError(ValueError):
    """An ip-ranges document that cannot be used; the message says where and why."""


def snapshot_path() -> Path:
    return Path(str(resources.files("detector") / "data" / SNAPSHOT_NAME))


def read_bytes(path: str | Path) -> bytes:
    data = Path(path).read_bytes()
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    return data


def validate(document: Any, source: str = "<ip-ranges>") -> list[tuple[int, int, int]]:
    """Check the fields AWS documents (syncToken, createDate, prefixes); return parsed networks."""
    if not isinstance(document, dict):
        raise IpRangesError(f"{source}: not a JSON object")
    token = document.get("syncToken")
    if not isinstance(token, str) or not token.isdigit():
        raise IpRangesError(f"{source}: syncToken missing or not a number string")
    created = document.get("createDate")
    if not isinstance(created, str) or len(created) != 19:
        raise IpRangesError(f"{source}: createDate missing or not YYYY-MM-DD-hh-mm-ss")
    networks: list[tuple[int, int, int]] = []
    for field, key in (("prefixes", "ip_prefix"), ("ipv6_prefixes", "ipv6_prefix")):
        entries = document.get(field)
        if not isinstance(entries, list):
            raise IpRangesError(f"{source}: {field} missing or not a list")
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict) or key not in entry:
                raise IpRangesError(f"{source}: {field}[{i}] has no {key}")
            try:
                networks.append(parse_network(entry[key]))
            except ValueError as exc:
                raise IpRangesError(f"{source}: {field}[{i}].{key}: {exc}") from None
    if not networks:
        raise IpRangesError(f"{source}: no prefixes at all")
    return networks


def load(path: str | Path | None = None) -> tuple[AddressIndex[bool], dict[str, Any]]:
    """Load ranges from ``path`` (plain or gzipped JSON) or the packaged snapshot.

    Returns the address index and a small description (source, syncToken, createDate, prefix count).
    """
    source = str(path) if path is not None else snapshot_path()
    try:
        raw = read_bytes(source)
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise IpRangesError(f"{source}: corrupt gzip data ({exc})") from None
    except OSError as exc:
        raise IpRangesError(f"{source}: cannot read ({exc.strerror or exc})") from None
    try:
        document = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise IpRangesError(f"{source}: not valid JSON ({exc})") from None
    networks = validate(document, str(source))
    index: AddressIndex[bool] = AddressIndex((net, True) for net in networks)
    info = {
        "source": str(source),
        "syncToken": document["syncToken"],
        "createDate": document["createDate"],
        "prefixes": len(networks),
    }
    return index, info
